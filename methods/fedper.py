"""FedPer: the classifier head stays on the client."""

from __future__ import annotations

from torch import nn

from .base import Method, register
from .structure import head_entries


@register("fedper")
class FedPer(Method):
    """FedPer (Arivazhagan et al., 2019): a shared body with a personal classifier head."""

    def personal_entries(self, model: nn.Module) -> set[str]:
        return head_entries(model)
