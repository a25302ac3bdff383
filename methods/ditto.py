"""Ditto: a personal model pulled towards the global one by a proximal term."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..benchmark.config import MethodConfig
from ..benchmark.errors import UserError
from .base import LocalContext, Method, Phase, SearchTrial, register
from .twin import add_twin, shared_parameter_names, squared_distance, twin_entries, twin_of, twin_parameter_names


@dataclass
class DittoOptions(MethodConfig):
    """The proximal weight and the personal model's epochs."""

    lam: float = 0.1  # lambda of lambda/2 * ||v - w||^2: 0 = Local's personal model; larger = closer to w
    personal_epochs: float = 0.0  # epochs on the personal model v per round; 0 = train.local_epochs

    def validate(self) -> None:
        if not self.lam >= 0:
            raise UserError(f"bad value for method.lam: {self.lam} (must be >= 0)")
        if not self.personal_epochs >= 0:
            raise UserError(f"bad value for method.personal_epochs: {self.personal_epochs} "
                            "(must be >= 0; 0 = train.local_epochs)")


def _personal_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of the personal model v."""
    return twin_of(model)(x)


@register("ditto")
class Ditto(Method):
    """Ditto (Li et al., ICML 2021): a personal model trained with a proximal term towards the FedAvg model."""

    Options = DittoOptions
    options: DittoOptions

    def adapt_model(self, model: nn.Module) -> nn.Module:
        add_twin(model)  # v starts as a copy of w's initial weights
        return model

    def personal_entries(self, model: nn.Module) -> set[str]:
        return twin_entries(model)

    def local_phases(self, model: nn.Module, ctx: LocalContext) -> list[Phase]:
        """v first, with the proximal term towards the received w (frozen meanwhile), then w as in FedAvg."""
        epochs = self.options.personal_epochs or ctx.train.local_epochs
        return [
            Phase(twin_parameter_names(model), epochs, _personal_forward, penalty=self.proximal),
            Phase(shared_parameter_names(model), ctx.train.local_epochs),
        ]

    def proximal(self, model: nn.Module) -> torch.Tensor:
        """lambda/2 * ||v - w||^2; w is frozen while v trains, so this pulls v towards the received w."""
        return 0.5 * self.options.lam * squared_distance(model)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int]:
        """The personalized model is v."""
        return super().evaluate(twin_of(model), batches)

    @classmethod
    def search_space(cls, trial: SearchTrial) -> dict[str, Any]:
        return {"method.lam": trial.suggest_float("method.lam", 0.01, 2.0, log=True)}
