"""Per-FedAvg: FedAvg trained as MAML, so that one local step from the global model personalizes it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..benchmark.config import MethodConfig
from ..benchmark.errors import UserError
from .base import LocalContext, Method, Phase, SearchTrial, StepLoop, register, trainable_names

VARIANTS = ("fo", "hf")  # first-order MAML; Hessian-free (a Hessian-vector product by finite differences)

Batch = tuple[torch.Tensor, torch.Tensor]
Tensors = Mapping[str, torch.Tensor]
# (parameters, batch) -> (the loss's gradient at those parameters, the loss)
GradFn = Callable[[Tensors, Batch], tuple[dict[str, torch.Tensor], torch.Tensor]]


@dataclass
class PerFedAvgOptions(MethodConfig):
    """The MAML variant and its inner step."""

    variant: str = "fo"  # fo: first-order (FO); hf: Hessian-free (HF), Fallah et al.'s two variants
    inner_lr: float = 0.0  # alpha, the inner (adaptation) step size; 0 = train.lr (the reference uses one lr for both)
    hf_delta: float = 0.001  # delta of HF's finite-difference Hessian-vector product

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise UserError(f"bad value for method.variant: {self.variant!r} (choose one of: {', '.join(VARIANTS)})")
        if not self.inner_lr >= 0:
            raise UserError(f"bad value for method.inner_lr: {self.inner_lr} (must be >= 0; 0 = train.lr)")
        if not self.hf_delta > 0:
            raise UserError(f"bad value for method.hf_delta: {self.hf_delta} (must be > 0)")


def meta_gradient(grad: GradFn, params: Tensors, batches: Sequence[Batch], inner_lr: float, variant: str,
                  delta: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-FedAvg's estimate of the gradient of f(theta - inner_lr * grad f(theta)) and the outer loss.

    FO: grad f(theta'; D') at theta' = theta - inner_lr * grad f(theta; D).
    HF: (I - inner_lr * H(theta; D'')) grad f(theta'; D'), with the Hessian-vector
    product H u = (grad f(theta + delta u; D'') - grad f(theta - delta u; D'')) / (2 delta).
    """
    inner, _ = grad(params, batches[0])
    fast = {n: p - inner_lr * inner[n] for n, p in params.items()}
    outer, loss = grad(fast, batches[1])
    if variant == "fo":
        return outer, loss
    plus, _ = grad({n: p + delta * outer[n] for n, p in params.items()}, batches[2])
    minus, _ = grad({n: p - delta * outer[n] for n, p in params.items()}, batches[2])
    return {n: outer[n] - inner_lr * (plus[n] - minus[n]) / (2 * delta) for n in params}, loss


def _model_grad(model: nn.Module, loop: StepLoop, params: Tensors, batch: Batch) -> tuple[dict[str, torch.Tensor],
                                                                                            torch.Tensor]:
    """The cross-entropy gradient of `model` run with `params` (the rest as they are) on `batch`."""
    x, y = batch
    leaves = {n: t.detach().requires_grad_(True) for n, t in params.items()}
    with loop.autocast():
        loss = F.cross_entropy(torch.func.functional_call(model, leaves, (x,)).float(), y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads)), loss.detach()


def _split(x: torch.Tensor, y: torch.Tensor, parts: int) -> list[Batch]:
    """`parts` disjoint batches (the whole batch for each, when it has fewer samples than parts)."""
    if len(y) < parts:
        return [(x, y)] * parts
    return list(zip(x.tensor_split(parts), y.tensor_split(parts)))


def meta_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loop: StepLoop, *, inner_lr: float,
              variant: str, delta: float) -> tuple[torch.Tensor, int]:
    """One Per-FedAvg step: the meta-gradient from disjoint batches D, D' (and D''), then the optimizer step."""
    batches = _split(x, y, 3 if variant == "hf" else 2)
    params = {n: p.detach() for n, p in loop.params.items()}
    meta, loss = meta_gradient(functools.partial(_model_grad, model, loop), params, batches, inner_lr, variant, delta)
    for name, p in loop.params.items():
        p.grad = meta[name]
    loop.apply()
    # D and D' take one forward and backward pass each; HF's D'' takes two.
    samples = sum(len(b[1]) for b in batches) + (len(batches[2][1]) if variant == "hf" else 0)
    return loss * samples, samples


@torch.no_grad()
def _descend(params: Mapping[str, nn.Parameter], grads: Tensors, lr: float) -> None:
    for name, p in params.items():
        p.sub_(lr * grads[name])


def adaptation_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loop: StepLoop, *,
                    inner_lr: float) -> tuple[torch.Tensor, int]:
    """The personalization: one plain gradient step of size inner_lr, the inner step meta-training prepared for."""
    grads, loss = _model_grad(model, loop, {n: p for n, p in loop.params.items()}, (x, y))
    _descend(loop.params, grads, inner_lr)
    return loss * len(y), len(y)


@register("perfedavg")
class PerFedAvg(Method):
    """Per-FedAvg (Fallah et al., NeurIPS 2020): MAML-style local steps; each client adapts with one step."""

    Options = PerFedAvgOptions
    options: PerFedAvgOptions
    # Its adaptation before evaluation is one step on one batch: the batch size sets that step's compute.
    budget_keys = ("train.batch_size",)

    def inner_lr(self, ctx: LocalContext) -> float:
        return self.options.inner_lr or ctx.train.lr

    def local_phases(self, model: nn.Module, ctx: LocalContext) -> list[Phase]:
        """Every parameter, by meta steps; each step reads 2 batches (FO) or 3 (HF): an epoch sees every sample once."""
        o = self.options
        step = functools.partial(meta_step, inner_lr=self.inner_lr(ctx), variant=o.variant, delta=o.hf_delta)
        parts = 3 if o.variant == "hf" else 2
        return [Phase(trainable_names(model), ctx.train.local_epochs, step=step, batches_per_step=parts)]

    def finetune_phases(self, model: nn.Module, ctx: LocalContext) -> list[Phase]:
        """Before every evaluation: one inner step on one batch of the client's own training split."""
        one_batch = min(1.0, ctx.train.batch_size / max(1, ctx.data.num_samples(ctx.client)))
        step = functools.partial(adaptation_step, inner_lr=self.inner_lr(ctx))
        return [Phase(trainable_names(model), one_batch, step=step)]

    @classmethod
    def search_space(cls, trial: SearchTrial) -> dict[str, Any]:
        return {"method.inner_lr": trial.suggest_float("method.inner_lr", 0.001, 0.3, log=True)}
