"""Vanilla Attention: every block's self-attention and the head stay personal (a named `partial`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..benchmark.config import MethodConfig
from .base import SearchTrial, register
from .partial import Partial
from .structure import entries_under, head_entries, layer_groups, module_names


@register("attention")
class Attention(Partial):
    """Vanilla Attention (the FedPerfix paper's baseline): every block's self-attention plus the head is personal."""

    Options = MethodConfig  # the personal set is fixed: no `method.personal`

    def personal_entries(self, model: nn.Module) -> set[str]:
        # By structure: each block's attention module (timm's `blocks[i].attn`) and the classifier.
        return entries_under(model, module_names(model, layer_groups(model)["attention"])) | head_entries(model)

    @classmethod
    def search_space(cls, trial: SearchTrial) -> dict[str, Any]:
        return {}  # nothing to choose: the part is the method
