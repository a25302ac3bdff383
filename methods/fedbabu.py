"""FedBABU: only the body is federated; the head stays at its random initialization until fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..benchmark.config import MethodConfig
from ..benchmark.errors import UserError
from .base import LocalContext, Method, Phase, register, trainable_names
from .fedrep import head_forward
from .structure import head_entries


@dataclass
class FedBABUOptions(MethodConfig):
    """The head's fine-tuning before evaluation."""

    finetune_epochs: float = 1.0  # passes over the client's training split that fine-tune the head (the reference: 1)
    finetune_every_eval: bool = False  # fine-tune before every evaluation, not only the final one (costs compute)

    def validate(self) -> None:
        if not self.finetune_epochs > 0:
            raise UserError(f"bad value for method.finetune_epochs: {self.finetune_epochs} (must be > 0)")


@register("fedbabu")
class FedBABU(Method):
    """FedBABU (Oh et al., ICLR 2022): the head stays at its random init; the body is federated, then heads fine-tune."""

    Options = FedBABUOptions
    options: FedBABUOptions

    def personal_entries(self, model: nn.Module) -> set[str]:
        # Never trained during federation and never sent: every client holds the same initial head.
        return head_entries(model)

    def local_phases(self, model: nn.Module, ctx: LocalContext) -> list[Phase]:
        """The body only, for train.local_epochs; the head gets no gradient."""
        head = head_entries(model)
        return [Phase(tuple(n for n in trainable_names(model) if n not in head), ctx.train.local_epochs)]

    def finetune_phases(self, model: nn.Module, ctx: LocalContext) -> list[Phase]:
        """The head on the frozen body (its features under no_grad), before the final evaluation (or every one)."""
        if not (ctx.final or self.options.finetune_every_eval):
            return []
        head = head_entries(model)
        params = tuple(n for n in trainable_names(model) if n in head)
        return [Phase(params, self.options.finetune_epochs, head_forward)]
