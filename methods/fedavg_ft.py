"""FedAvg with local fine-tuning: the baseline every personalization claim must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..benchmark.config import MethodConfig
from ..benchmark.errors import UserError
from .base import Method, SearchTrial, register


@dataclass
class FedAvgFTOptions(MethodConfig):
    """Options of FedAvg-FT (`method.*`)."""

    finetune_epochs: float = 1.0  # epochs each client fine-tunes the global model before it is evaluated

    def validate(self) -> None:
        if not self.finetune_epochs > 0:
            raise UserError(f"bad value for method.finetune_epochs: {self.finetune_epochs} (must be > 0)")


@register("fedavg_ft")
class FedAvgFT(Method):
    """FedAvg-FT: FedAvg, then each client fine-tunes the global model on its own data before evaluation."""

    Options = FedAvgFTOptions
    options: FedAvgFTOptions

    def finetune_epochs(self) -> float:
        return self.options.finetune_epochs

    @classmethod
    def search_space(cls, trial: SearchTrial) -> dict[str, Any]:
        return {"method.finetune_epochs": trial.suggest_categorical("method.finetune_epochs", [1.0, 2.0, 5.0])}
