"""FedRep: a shared representation, a personal head, and alternating local training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..benchmark.config import MethodConfig
from ..benchmark.errors import UserError
from .base import LocalContext, Method, Phase, SearchTrial, register, trainable_names
from .structure import head_entries


@dataclass
class FedRepOptions(MethodConfig):
    """FedRep's local schedule."""

    head_epochs: int = 10  # epochs on the head with the body frozen (Collins et al. use 10)
    body_epochs: int = 0  # epochs on the body with the head frozen; 0 = train.local_epochs

    def validate(self) -> None:
        if self.head_epochs < 0:
            raise UserError(f"bad value for method.head_epochs: {self.head_epochs} (must be >= 0)")
        if self.body_epochs < 0:
            raise UserError(
                f"bad value for method.body_epochs: {self.body_epochs} (must be >= 0; 0 = train.local_epochs)"
            )


def _head_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits with the body run under no_grad: only the head enters the autograd graph."""
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    return model.get_classifier()(features)


@register("fedrep")
class FedRep(Method):
    """FedRep (Collins et al., ICML 2021): train the personal head on a frozen body, then the shared body."""

    Options = FedRepOptions

    def personal_entries(self, model: nn.Module) -> set[str]:
        return head_entries(model)

    def local_phases(self, model: nn.Module, ctx: LocalContext) -> list[Phase]:
        """The head on a frozen body (body features under no_grad), then the body with the head frozen."""
        head = set(head_entries(model))
        trainable = trainable_names(model)
        body_epochs = self.options.body_epochs or ctx.train.local_epochs
        phases = []
        if self.options.head_epochs:
            phases.append(Phase(tuple(n for n in trainable if n in head), self.options.head_epochs, _head_forward))
        phases.append(Phase(tuple(n for n in trainable if n not in head), body_epochs))
        return phases

    @classmethod
    def search_space(cls, trial: SearchTrial) -> dict[str, Any]:
        return {
            "method.head_epochs": trial.suggest_int("method.head_epochs", 1, 10),
            "method.body_epochs": trial.suggest_int("method.body_epochs", 1, 5),
        }
