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
    """FedRep's local schedule: by default the client's `train.local_epochs`, shared by head and body."""

    head_share: float = 0.5  # the head's share of train.local_epochs (the body gets the rest), unless epochs are set
    head_epochs: float = 0.0  # explicit epochs on the head, body frozen (10 = Collins et al.); 0 = from head_share
    body_epochs: float = 0.0  # explicit epochs on the body, head frozen; 0 = what head_epochs leaves of the budget

    def validate(self) -> None:
        if not 0 < self.head_share < 1:
            raise UserError(f"bad value for method.head_share: {self.head_share} (must be in (0, 1))")
        for key in ("head_epochs", "body_epochs"):
            value = getattr(self, key)
            if value < 0:
                raise UserError(f"bad value for method.{key}: {value} (must be >= 0; 0 = from train.local_epochs)")

    def schedule(self, local_epochs: float) -> tuple[float, float]:
        """(head, body) epochs of one local update, from the client's budget `local_epochs`.

        Default: `head_share` of the budget for the head, the rest for the body.
        An explicit `head_epochs` leaves the body the remainder; when it takes
        the whole budget or more (the reference's 10), the body gets the full
        `local_epochs` on top, and `train_samples` shows the extra compute.
        """
        head, body = self.head_epochs, self.body_epochs
        if not head and not body:
            return self.head_share * local_epochs, (1 - self.head_share) * local_epochs
        if not head:
            if body >= local_epochs:
                raise UserError(f"bad value for method.body_epochs: {body} leaves no head epochs of"
                                f" train.local_epochs={local_epochs}; set method.head_epochs too")
            return local_epochs - body, body
        return head, body or (local_epochs - head if head < local_epochs else local_epochs)


def head_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
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
        head_epochs, body_epochs = self.options.schedule(ctx.train.local_epochs)
        phases = [
            Phase(tuple(n for n in trainable if n in head), head_epochs, head_forward),
            Phase(tuple(n for n in trainable if n not in head), body_epochs),
        ]
        return [p for p in phases if p.epochs > 0]

    @classmethod
    def search_space(cls, trial: SearchTrial) -> dict[str, Any]:
        return {
            # A share of the client's budget: the body takes the rest of train.local_epochs.
            "method.head_share": trial.suggest_float("method.head_share", 0.1, 0.9),
        }
