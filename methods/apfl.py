"""APFL: each client mixes a local model with the global one, with a learned mixing weight."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..benchmark.config import MethodConfig
from ..benchmark.errors import UserError
from .base import LocalContext, Method, Phase, SearchTrial, StepLoop, register
from .twin import (TWIN, add_twin, paired_parameters, shared_parameter_names, twin_entries, twin_of,
                   twin_parameter_names, unwrapped)

ALPHA = "alpha"  # the mixing weight, a parameter of the local copy: `personal_model.alpha`


@dataclass
class APFLOptions(MethodConfig):
    """The mixing weight alpha of the personalized model alpha * v + (1 - alpha) * w."""

    alpha: float = 0.25  # alpha's initial value (the reference code's 0.25)
    learn_alpha: bool = True  # learn alpha per client by its gradient (false: keep it fixed)

    def validate(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise UserError(f"bad value for method.alpha: {self.alpha} (must be in [0, 1])")


def mixed_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """alpha * v + (1 - alpha) * w for every parameter of w; w enters as a constant (no gradient)."""
    alpha = getattr(twin_of(model), ALPHA)
    return {n: alpha * v + (1 - alpha) * w.detach() for n, w, v in paired_parameters(model)}


def mixed_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of the personalized model: w's architecture run with the mixed parameters."""
    return torch.func.functional_call(unwrapped(model), mixed_parameters(model), (x,))


@register("apfl")
class APFL(Method):
    """APFL (Deng et al., 2020): a local model v beside the global w; the client uses alpha v + (1 - alpha) w."""

    Options = APFLOptions
    options: APFLOptions

    def adapt_model(self, model: nn.Module) -> nn.Module:
        twin = add_twin(model)  # v starts as a copy of w's initial weights
        twin.register_parameter(ALPHA, nn.Parameter(torch.tensor(float(self.options.alpha))))
        return model

    def personal_entries(self, model: nn.Module) -> set[str]:
        return twin_entries(model)  # v and alpha

    def local_phases(self, model: nn.Module, ctx: LocalContext) -> list[Phase]:
        """w, v (and alpha) all step on every batch, as in the paper's Algorithm 1."""
        personal = twin_parameter_names(model)
        if not self.options.learn_alpha:
            personal = tuple(n for n in personal if n != f"{TWIN}.{ALPHA}")
        return [Phase(shared_parameter_names(model) + personal, ctx.train.local_epochs, step=apfl_step)]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int]:
        """The personalized model alpha v + (1 - alpha) w (a mixture of parameters, as the reference code)."""
        mixed = mixed_parameters(model)
        return super().evaluate(functools.partial(torch.func.functional_call, unwrapped(model), mixed), batches)

    @classmethod
    def search_space(cls, trial: SearchTrial) -> dict[str, Any]:
        return {"method.alpha": trial.suggest_categorical("method.alpha", [0.1, 0.25, 0.5, 0.75])}


def apfl_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loop: StepLoop) -> tuple[torch.Tensor, int]:
    """One APFL step on a batch: w on its own loss; v and alpha on the loss of the mixed model.

    Both losses are summed into one backward: w is a constant inside the mixture,
    so w's gradient is that of its own loss, v's is alpha * g and alpha's is
    <v - w, g>, with g the mixed model's gradient, all at the step's start (the
    paper's simultaneous update). alpha is kept in [0, 1] after the step.
    """
    with loop.autocast():
        global_loss = F.cross_entropy(model(x).float(), y)
        mixed_loss = F.cross_entropy(mixed_forward(model, x).float(), y)
    (global_loss + mixed_loss).backward()
    loop.apply()
    with torch.no_grad():
        getattr(twin_of(model), ALPHA).clamp_(0.0, 1.0)
    # Two models went through a forward and a backward pass on every sample.
    return (global_loss.detach() + mixed_loss.detach()) * len(y), 2 * len(y)
