"""Local training: the no-federation floor every PFL method must beat."""

from __future__ import annotations

from torch import nn

from .base import Method, register


@register("local")
class Local(Method):
    """Local: each client trains its own model on its own data; nothing is sent."""

    def is_personal(self, name: str, model: nn.Module) -> bool:
        # Everything personal leaves the shared state empty: 0 bytes each way.
        return True
