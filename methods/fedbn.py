"""FedBN: normalization layers stay on the client."""

from __future__ import annotations

from torch import nn

from .base import Method, register
from .structure import norm_entries


@register("fedbn")
class FedBN(Method):
    """FedBN (Li et al., ICLR 2021): every normalization layer (LayerNorm in a ViT) is personal."""

    def personal_entries(self, model: nn.Module) -> set[str]:
        # By module type: matching "bn" in names would find nothing in a ViT.
        return norm_entries(model)
