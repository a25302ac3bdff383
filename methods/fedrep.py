"""FedRep: a shared representation, a personal head, and alternating local training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..benchmark.config import MethodConfig
from ..benchmark.errors import UserError
from .base import LocalContext, Method, SearchTrial, TrainStats, register
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

    def local_update(self, model: nn.Module, ctx: LocalContext) -> TrainStats:
        head_ids = {id(p) for p in model.get_classifier().parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        head = [p for p in trainable if id(p) in head_ids]
        body = [p for p in trainable if id(p) not in head_ids]
        body_epochs = self.options.body_epochs or ctx.train.local_epochs

        stats = TrainStats(torch.zeros((), device=ctx.device), 0)
        if self.options.head_epochs:
            stats = stats + ctx.train_epochs(model, head, self.options.head_epochs, forward=_head_forward)
        # The head is frozen by requires_grad, so backward never computes its gradients.
        for p in head:
            p.requires_grad_(False)
        try:
            stats = stats + ctx.train_epochs(model, body, body_epochs)
        finally:
            for p in head:
                p.requires_grad_(True)
        return stats

    @classmethod
    def search_space(cls, trial: SearchTrial) -> dict[str, Any]:
        return {
            "method.head_epochs": trial.suggest_int("method.head_epochs", 1, 10),
            "method.body_epochs": trial.suggest_int("method.body_epochs", 1, 5),
        }
