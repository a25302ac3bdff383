"""FedRep: a shared representation, a personal head, and alternating local training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..benchmark.config import MethodConfig
from ..benchmark.errors import UserError
from .base import LocalContext, Method, Phase, register, trainable_names
from .structure import head_entries


@dataclass
class FedRepOptions(MethodConfig):
    """FedRep's local schedule (Collins et al.): head epochs on a frozen body, then the body for the budget."""

    head_epochs: float = 10.0  # epochs on the head with the body frozen, on body features computed once (reference: 10)

    def validate(self) -> None:
        if self.head_epochs < 0:
            raise UserError(f"bad value for method.head_epochs: {self.head_epochs} (must be >= 0)")


def body_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The body's output for the head: what FedRep's head phase trains on."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def head_logits(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The head alone, on precomputed body features."""
    return model.get_classifier()(features)


def head_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits with the body run under no_grad: only the head enters the autograd graph."""
    with torch.no_grad():
        features = body_features(model, x)
    return model.get_classifier()(features)


@register("fedrep")
class FedRep(Method):
    """FedRep (Collins et al., ICML 2021): train the personal head on a frozen body, then the shared body."""

    Options = FedRepOptions
    budget_keys = ("method.head_epochs",)

    def personal_entries(self, model: nn.Module) -> set[str]:
        return head_entries(model)

    def local_phases(self, model: nn.Module, ctx: LocalContext) -> list[Phase]:
        """The head on the frozen body's features (computed once, no augmentation), then the body
        for `train.local_epochs` with the head frozen, like every other method's budget."""
        head = set(head_entries(model))
        trainable = trainable_names(model)
        phases = [
            Phase(tuple(n for n in trainable if n in head), self.options.head_epochs, head_logits,
                  features=body_features),
            Phase(tuple(n for n in trainable if n not in head), ctx.train.local_epochs),
        ]
        return [p for p in phases if p.epochs > 0]
