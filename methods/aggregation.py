"""Server math as small pure functions, each unit-tested on its own."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def weighted_mean(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The weighted mean of several states, entry by entry.

    Weights are normalized first, so a single state comes back bit-identical.
    Floating-point entries are averaged in float32 or wider; other entries
    (integer counters) are taken from the state with the largest weight.
    """
    if len(states) != len(weights) or not states:
        raise ValueError("need one weight per state, and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    coefs = [float(w) / total for w in weights]
    heaviest = max(range(len(states)), key=lambda i: weights[i])
    out: dict[str, torch.Tensor] = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            out[name] = states[heaviest][name].clone()
            continue
        acc_dtype = torch.promote_types(first.dtype, torch.float32)
        acc = torch.zeros_like(first, dtype=acc_dtype)
        for coef, state in zip(coefs, states):
            acc.add_(state[name].to(acc_dtype), alpha=coef)
        out[name] = acc.to(first.dtype)
    return out


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes needed to send `state` as raw tensors."""
    return sum(t.numel() * t.element_size() for t in state.values())


class RunningWeightedMean:
    """`weighted_mean` computed as states arrive, so a round never holds more than one of them.

    Floating-point entries are summed in float64 (`x * w` and the final
    division are exact there for float32 and narrower), so a single state
    comes back bit-identical; integer entries come from the heaviest state,
    the first of equal weights, as in `weighted_mean`.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._heaviest: dict[str, torch.Tensor] = {}
        self._max_weight = -1.0
        self._names: list[str] = []  # the first state's order
        self.total = 0.0  # sum of the weights added so far
        self.count = 0  # states added so far

    @torch.no_grad()
    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one state into the running sum."""
        weight = float(weight)
        if not self.count:
            self._names = list(state)
        if weight > self._max_weight:
            self._max_weight = weight
            self._heaviest = {n: t.detach().clone() for n, t in state.items() if not t.is_floating_point()}
        for name, value in state.items():
            if not value.is_floating_point():
                continue
            acc = self._sums.get(name)
            if acc is None:
                self._dtypes[name] = value.dtype
                dtype = torch.float32 if value.device.type == "mps" else torch.float64
                self._sums[name] = value.detach().to(dtype) * weight
            else:
                acc.add_(value.detach().to(acc.dtype), alpha=weight)
        self.total += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The weighted mean of everything added."""
        if not self.count or self.total <= 0:
            raise ValueError("need at least one state, with weights summing to a positive number")
        out = {}
        for name in self._names:
            acc = self._sums.get(name)
            out[name] = (acc / self.total).to(self._dtypes[name]) if acc is not None else self._heaviest[name].clone()
        return out
