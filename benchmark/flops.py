"""Training compute in FLOPs, counted with torch's FLOP counter once per kind of step.

Every op of a ViT works sample by sample, so a step's FLOPs are its batch
size times the FLOPs of one sample. `FlopMeter` counts one sample's forward
and backward once per (phase kind, input shape) on a probe batch of one and
multiplies from then on: the counter, which slows the ops it wraps, never
runs in the batch loop.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
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

    def known(self, key: Hashable) -> float | None:
        """FLOPs per sample remembered for `key` (a step counted as it ran), or None."""
        return self._per_sample.get(key)

    def remember(self, key: Hashable, per_sample: float) -> None:
        self._per_sample[key] = float(per_sample)


def client_update_flops(method: Any, model: nn.Module, train: Any, in_chans: int, image_size: int,
                        client_samples: float) -> tuple[float, float]:
    """(FLOPs of one client's local update, FLOPs of its fine-tuning before the final evaluation),
    for a client holding `client_samples` training samples, counted on probes as the engine counts
    `train_flops`: no data is read and nothing trains. `model` is `method`'s adapted model; `train`
    the run's `TrainConfig`."""
    from .client import _frozen_except  # the engine's own freezing: the same parameters take gradients

    x = torch.zeros(1, in_chans, image_size, image_size)
    model.train()

    def per_update(phases) -> float:
        total = 0.0
        for phase in phases:
            with _frozen_except(model, phase.params):
                inputs = x
                if phase.features is not None:
                    total += client_samples * step_flops(model, phase.features, x, backward=False)
                    with torch.no_grad():
                        inputs = phase.features(model, x)
                if phase.step is not None:
                    per_sample = _own_step_flops(model, phase, train.batch_size, in_chans, image_size)
                else:
                    per_sample = step_flops(model, phase.forward, inputs)
                total += phase.epochs * client_samples * per_sample
        return total

    data = SimpleNamespace(num_samples=lambda client, split="train": int(round(client_samples)))
    ctx = SimpleNamespace(client=0, round_index=1, final=False, train=train, data=data, device=torch.device("cpu"))
    update = per_update(method.local_phases(model, ctx))
    finetune = per_update(method.finetune_phases(model, SimpleNamespace(**{**vars(ctx), "final": True})))
    return update, finetune


def _own_step_flops(model: nn.Module, phase: Any, batch_size: int, in_chans: int, image_size: int) -> float:
    """FLOPs per sample of the client's data of a phase's own step (APFL, Per-FedAvg), counted on one
    probe call (of `batch_size * batches_per_step` samples) whose optimizer step does nothing."""
    n = batch_size * phase.batches_per_step
    x, y = torch.zeros(n, in_chans, image_size, image_size), torch.zeros(n, dtype=torch.long)
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    loop = SimpleNamespace(params=named, batch_size=batch_size, autocast=contextlib.nullcontext, apply=lambda: None)
    with torch.random.fork_rng(devices=[]):
        _, flops = count_flops(phase.step, model, x, y, loop)
    for p in named.values():
        p.grad = None
    return flops / n
