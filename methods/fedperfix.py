"""FedPerfix: personal prefix plugins on every attention layer, plus a personal head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..benchmark.config import MethodConfig
from ..benchmark.errors import UserError
from .base import Method, SearchTrial, register
from .structure import block_entries, entries_under, head_entries, module_names, transformer_blocks


@dataclass
class FedPerfixOptions(MethodConfig):
    """The plugin's size and strength, and how many blocks stay personal."""

    mid_dim: int = 0  # hidden width of each plugin; 0 = 2/3 of the model's width (the reference's 256 at ViT-S)
    scale: float = 1.5  # weight of the plugin's keys and values (reference: 1.5)
    personal_blocks: int = 0  # the last N transformer blocks are personal too

    def scale_to_width(self, width: int) -> None:
        # The reference's 256 is 2/3 of ViT-S's 384: at width 96 a 256-wide plugin would double the model.
        if self.mid_dim == 0:
            self.mid_dim = max(1, round(2 * width / 3))

    def validate(self) -> None:
        if self.mid_dim < 1:
            raise UserError(f"bad value for method.mid_dim: {self.mid_dim} (must be >= 1; 0 = 2/3 of the width)")
        if self.scale < 0:
            raise UserError(f"bad value for method.scale: {self.scale} (must be >= 0)")
        if self.personal_blocks < 0:
            raise UserError(f"bad value for method.personal_blocks: {self.personal_blocks} (must be >= 0)")


class PrefixQKV(nn.Module):
    """A block's qkv projection with a parallel prefix plugin on the keys and values.

    out = x W^T + b + scale * [0, dK, dV], where (dK, dV) = plugin(x) and the
    plugin is Linear(dim, mid_dim) -> Tanh -> Linear(mid_dim, 2 * attn_dim).
    It takes over the original projection's parameters under the same names
    (`weight`, `bias`), so state entries and checkpoints match the plain ViT,
    and the attention module around it (timm's fused attention) is unchanged.
    """

    def __init__(self, qkv: nn.Linear, mid_dim: int, scale: float):
        super().__init__()
        if qkv.out_features % 3:
            raise ValueError("a qkv projection's output must split into q, k and v")
        self.in_features, self.out_features = qkv.in_features, qkv.out_features
        self.attn_dim = qkv.out_features // 3
        self.weight = qkv.weight
        self.bias = qkv.bias
        self.scale = scale
        self.plugin = nn.Sequential(
            nn.Linear(qkv.in_features, mid_dim), nn.Tanh(), nn.Linear(mid_dim, 2 * self.attn_dim)
        ).to(device=qkv.weight.device, dtype=qkv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.weight, self.bias)
        # Zero-pad in front of (dK, dV) so the queries are left unchanged.
        return qkv + F.pad(self.scale * self.plugin(x), (self.attn_dim, 0))


def add_plugins(model: nn.Module, mid_dim: int, scale: float) -> list[PrefixQKV]:
    """Wrap every block's `attn.qkv` in a `PrefixQKV`; returns the new modules in block order."""
    wrapped = []
    for block in transformer_blocks(model):
        attn = getattr(block, "attn", None)
        qkv = getattr(attn, "qkv", None)
        if not isinstance(qkv, nn.Linear):
            raise UserError("fedperfix needs a ViT whose blocks have an `attn.qkv` Linear (timm's Attention)")
        attn.qkv = PrefixQKV(qkv, mid_dim, scale)
        wrapped.append(attn.qkv)
    return wrapped


@register("fedperfix")
class FedPerfix(Method):
    """FedPerfix (Sun et al., ICCV 2023): personal prefix plugins on keys and values, plus a personal head."""

    Options = FedPerfixOptions
    budget_keys = ("method.mid_dim",)  # the plugins' width: capacity and FLOPs

    def adapt_model(self, model: nn.Module) -> nn.Module:
        depth = len(transformer_blocks(model))
        if self.options.personal_blocks > depth:
            raise UserError(
                f"bad value for method.personal_blocks: {self.options.personal_blocks} (the model has {depth} blocks)"
            )
        self.options.scale_to_width(model.embed_dim)  # options made without a resolved config
        add_plugins(model, self.options.mid_dim, self.options.scale)
        return model

    def personal_entries(self, model: nn.Module) -> set[str]:
        plugins = [m.plugin for m in model.modules() if isinstance(m, PrefixQKV)]
        depth = len(transformer_blocks(model))
        last = range(depth - self.options.personal_blocks, depth)
        return entries_under(model, module_names(model, plugins)) | head_entries(model) | block_entries(model, last)

    @classmethod
    def search_space(cls, trial: SearchTrial) -> dict[str, Any]:
        # The plugin's width is capacity and compute (a budget key), fixed by the reference's ratio.
        return {
            "method.scale": trial.suggest_float("method.scale", 0.25, 4.0, log=True),
            "method.personal_blocks": trial.suggest_int("method.personal_blocks", 0, 1),
        }
