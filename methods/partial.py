"""Partial personalization: any set of state entries, chosen by glob patterns, stays on the client."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..benchmark.config import MethodConfig
from ..benchmark.errors import UserError
from .base import Method, SearchTrial, register

# The personal sets a tuning study chooses among: the head alone (FedPer's), and the head with one
# kind of block part (attention is FedPerfix's finding; norms and MLPs are the alternatives).
SEARCHED_PERSONAL_SETS = ("head.*", "blocks.*.attn.*,head.*", "blocks.*.norm*,head.*", "blocks.*.mlp.*,head.*")


@dataclass
class PartialOptions(MethodConfig):
    """Which state entries are personal."""

    personal: list[str] = field(default_factory=lambda: ["head.*"])  # glob patterns, e.g. blocks.*.attn.*,head.*

    def validate(self) -> None:
        if not self.personal:
            raise UserError("method.personal is empty; give glob patterns, e.g. --set method.personal='head.*'")


@register("partial")
class Partial(Method):
    """Partial personalization (Pillutla et al., ICML 2022): the entries matching `method.personal` stay personal."""

    Options = PartialOptions

    def personal_entries(self, model: nn.Module) -> set[str]:
        names = list(model.state_dict(keep_vars=True))
        chosen: set[str] = set()
        for pattern in self.options.personal:
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]  # `*` also crosses dots
            if not matched:
                shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                raise UserError(f"method.personal pattern {pattern!r} matches no parameter; names look like: {shown}")
            chosen.update(matched)
        return chosen

    @classmethod
    def search_space(cls, trial: SearchTrial) -> dict[str, Any]:
        """Which part of the model stays personal, among `SEARCHED_PERSONAL_SETS`."""
        return {"method.personal": trial.suggest_categorical("method.personal", list(SEARCHED_PERSONAL_SETS))}
