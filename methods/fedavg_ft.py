"""FedAvg with local fine-tuning: the baseline every personalization claim must beat."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..benchmark.config import MethodConfig
from ..benchmark.errors import UserError
from .base import LocalContext, Method, Phase, register, trainable_names


@dataclass
class FedAvgFTOptions(MethodConfig):
    """Options of FedAvg-FT (`method.*`)."""

    finetune_epochs: float = 1.0  # epochs each client fine-tunes the global model before the final evaluation
    finetune_every_eval: bool = False  # fine-tune before every evaluation, not only the final one (costs compute)

    def validate(self) -> None:
        if not self.finetune_epochs > 0:
            raise UserError(f"bad value for method.finetune_epochs: {self.finetune_epochs} (must be > 0)")


@register("fedavg_ft")
class FedAvgFT(Method):
    """FedAvg-FT: FedAvg, then each client fine-tunes the global model on its own data before evaluation."""

    Options = FedAvgFTOptions
    options: FedAvgFTOptions
    budget_keys = ("method.finetune_epochs", "method.finetune_every_eval")

    def finetune_phases(self, model: nn.Module, ctx: LocalContext) -> list[Phase]:
        """Every parameter for `finetune_epochs`, before the final evaluation (or every one, if asked)."""
        if not (ctx.final or self.options.finetune_every_eval):
            return []
        return [Phase(trainable_names(model), self.options.finetune_epochs)]
