"""Training compute in FLOPs, counted with torch's FLOP counter once per kind of step.

Every op of a ViT works sample by sample, so a step's FLOPs are its batch
size times the FLOPs of one sample. `FlopMeter` counts one sample's forward
and backward once per (phase kind, input shape) on a probe batch of one and
multiplies from then on: the counter, which slows the ops it wraps, never
runs in the batch loop.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, TypeVar

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

T = TypeVar("T")
Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


aten = torch.ops.aten


def _attention_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    """Attention's backward as twice its forward, like any matmul's (no recomputed scores)."""
    return 2 * sdpa_flop_count(query.shape, key.shape, value.shape)


# torch's formulas, with two changes: the CPU's fused attention, which has none, counts as the GPU's
# kernels do; and a fused attention's backward counts the algorithm's work, not the kernel's: kernels
# that recompute the scores (flash) would otherwise cost more than the same attention written as matmuls
# (which clients trained together run on the CPU), and FLOPs must not depend on the kernel.
FORMULAS = {
    **flop_registry,
    aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[aten._scaled_dot_product_flash_attention],
    **{op: _attention_backward for op in (
        aten._scaled_dot_product_flash_attention_for_cpu_backward,
        aten._scaled_dot_product_flash_attention_backward,
        aten._scaled_dot_product_efficient_attention_backward,
        aten._scaled_dot_product_cudnn_attention_backward,
    )},
}


class _FlopCount(TorchDispatchMode):
    """Adds up torch's FLOP formulas (`FORMULAS`) over the ops that run inside it.

    `FlopCounterMode` does the same but also tracks modules with autograd hooks,
    which fail on hooks called under `no_grad` with leaf tensors (a server's
    generation step); the totals need none of that.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in FORMULAS:
            with self:  # an op without a formula may decompose into ops with one (CPU attention into matmuls)
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if packet in FORMULAS:
            self.total += int(FORMULAS[packet](*args, **kwargs, out_val=out))
        return out


def count_flops(fn: Callable[..., T], *args: Any) -> tuple[T, int]:
    """`fn(*args)` and the FLOPs of the matrix work (matmuls, convolutions, attention) it ran."""
    with _FlopCount() as counter:
        out = fn(*args)
    return out, counter.total


def step_flops(model: nn.Module, forward: Forward | None, x: torch.Tensor, backward: bool = True) -> int:
    """FLOPs of one forward (and backward, into the parameters that take gradients) of `model` on `x`.

    Runs on the given model with torch's random state restored afterwards and
    its gradients cleared, so a probe changes nothing the run depends on.
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        logits = forward(model, x) if forward is not None else model(x)
        if backward and logits.requires_grad:
            logits.float().sum().backward()

    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if backward:
            flops = count_flops(run)[1]
        else:
            with torch.no_grad():
                flops = count_flops(run)[1]
    for p in params:
        p.grad = None
    return flops


class FlopMeter:
    """FLOPs per sample of each kind of step a run takes, each counted once."""

    def __init__(self) -> None:
        self._per_sample: dict[Hashable, float] = {}

    def per_sample(self, key: Hashable, model: nn.Module, forward: Forward | None, sample: torch.Tensor,
                   backward: bool = True) -> float:
        """FLOPs of one sample (`sample` has a batch dimension of 1) through the step `key` names."""
        key = (key, tuple(sample.shape[1:]), backward)
        if key not in self._per_sample:
            self._per_sample[key] = float(step_flops(model, forward, sample, backward))
        return self._per_sample[key]
