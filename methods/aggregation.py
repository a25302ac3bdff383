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
