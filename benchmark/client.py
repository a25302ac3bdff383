"""Per-client training: the state swap, the one batch loop, and clients trained together.

A method declares its local update as `Phase`s (parameters, epochs, forward).
`ClientRunner` runs them in one of two ways, with the same batches:

- one client at a time (`train_client`): the client's broadcast and personal
  state are copied into the one worker model, each phase trains it with
  `torch.optim.SGD`, and the shared part is read back;
- several clients at once (`train_together`): the clients' states are stacked
  along a leading client dimension and every step is one batched forward
  (`torch.func.functional_call` under `torch.vmap`) and one ordinary backward,
  with per-client SGD (momentum, weight decay) and per-client gradient
  clipping on the stacked tensors. Clients with fewer batches are padded with
  masked steps that change nothing, momentum included (FedJAX's pattern).
  Each client draws its batches from its own generator in the same order as
  the sequential path, so both give the same parameters within float error.
  Under autocast the stacked weights of linear and convolution layers are
  cast to its dtype inside the graph (autocast does not reach inside vmap),
  so activations are bf16 as in the sequential path while the trained
  leaves, their gradients and the optimizer stay fp32.

Personal state lives in `PersonalStore`: on the device up to a byte budget,
in (pinned, on CUDA) host memory beyond it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import ClientUpdate, Phase, TrainStats
from ..methods.base import BatchStep, Penalty
from .config import TrainConfig
from .device import to_device
from .errors import TrainingDiverged, UserError
from .flops import FlopMeter, count_flops

if TYPE_CHECKING:
    from .engine import Simulation


FINETUNE_STREAM = 1  # batch-seed stream of the fine-tuning before evaluation (0 = local training)

# Below this share of clients with a batch left, a step runs only those clients (gathered) instead of
# padding the rest with masked steps: padded steps cost a full forward and backward each.
COMPACT_BELOW = 0.5
# Modules whose weights (and bias) the batched step casts to the autocast dtype: what autocast itself
# lowers. Under `torch.vmap` autocast does not apply (vmap's dispatch key ranks above it), so the
# batched step casts these itself; norm parameters and everything else stay fp32.
LOW_PRECISION_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Share of free device memory that `auto` fills with clients trained together (the rest: fragmentation).
MEMORY_HEADROOM = 0.8


class PersonalStore:
    """Each client's personal entries, kept aside between its visits.

    A client that never trained reads the shared initial state. A stored
    client holds one flat buffer per dtype (one allocation, no per-tensor
    overhead: with 1,000 clients memory grows by the personal parameters
    themselves); `get` hands out views into it. Stored clients stay on the
    model's device while their total fits `device_budget` bytes; later ones
    go to host memory, pinned when the device is a GPU so the copy in is fast.
    """

    def __init__(self, initial: Mapping[str, torch.Tensor], device: torch.device, device_budget: float):
        self.initial = {n: t.detach().clone() for n, t in initial.items()}
        self.device = device
        self.device_budget = device_budget  # bytes
        self.client_bytes = sum(t.numel() * t.element_size() for t in self.initial.values())
        # Where each entry lives: (dtype, offset, shape) in that dtype's flat buffer.
        self._layout: dict[str, tuple[torch.dtype, int, torch.Size]] = {}
        self._sizes: dict[torch.dtype, int] = {}
        for name, t in self.initial.items():
            self._layout[name] = (t.dtype, self._sizes.get(t.dtype, 0), t.shape)
            self._sizes[t.dtype] = self._sizes.get(t.dtype, 0) + t.numel()
        self._states: dict[int, dict[torch.dtype, torch.Tensor]] = {}
        self.on_device = 0  # clients whose state is on the device

    def __contains__(self, client: object) -> bool:
        return client in self._states

    def __iter__(self) -> Iterator[int]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def get(self, client: int) -> dict[str, torch.Tensor]:
        """The client's personal entries (the initial ones until it first trains)."""
        flats = self._states.get(client)
        if flats is None:
            return self.initial
        return {name: flats[dtype][start : start + shape.numel()].view(shape)
                for name, (dtype, start, shape) in self._layout.items()}

    def is_on_device(self, client: int) -> bool:
        flats = self._states.get(client)
        return flats is None or all(t.device == self.device for t in flats.values())

    @torch.no_grad()
    def put(self, client: int, state: Mapping[str, torch.Tensor]) -> None:
        """Store (a copy of) the client's personal entries."""
        if client not in self._states:
            if (self.on_device + 1) * self.client_bytes <= self.device_budget or self.device.type == "cpu":
                flats = {d: torch.empty(n, dtype=d, device=self.device) for d, n in self._sizes.items()}
                self.on_device += 1
            else:
                pin = self.device.type == "cuda"
                flats = {d: torch.empty(n, dtype=d, pin_memory=pin) for d, n in self._sizes.items()}
            self._states[client] = flats
        stored = self.get(client)
        for name, value in state.items():
            stored[name].copy_(value)


def step_kind(params: Sequence[nn.Parameter], forward, features) -> tuple:
    """What makes two training steps cost the same per sample: what trains, and through which forward."""
    return tuple(id(p) for p in params), forward, features is not None


class _ClientContext:
    """The `LocalContext` of one client's update; `train_epochs` is the one batch loop."""

    def __init__(self, sim: Simulation, client: int, round_index: int, stream: int = 0, final: bool = False):
        self.client = client
        self.round_index = round_index
        self.final = final
        self.train: TrainConfig = sim.cfg.train
        self.data = sim.data
        self.device = sim.device
        self.generator = sim.batch_generator(round_index, client, stream)
        self._autocast = sim.autocast
        self._model = sim.model  # the plain (not compiled) model: FLOPs are counted on it
        self._flops = sim.clients.flops

    def train_epochs(self, model: nn.Module, params: Sequence[nn.Parameter], epochs: float, forward=None,
                     features=None, *, penalty: Penalty | None = None, step: BatchStep | None = None,
                     batches_per_step: int = 1) -> TrainStats:
        """SGD on `params` only, for `epochs` passes over the client's training data (a fraction ends early).

        With `features`, the passes run over `features(model, x)` of the unaugmented
        images, computed once here. `penalty` and `step` are a `Phase`'s: a term
        added to each batch's loss, and a step that replaces the plain one (see `Phase`).
        """
        params = list(params)
        cfg = self.train
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

        def apply() -> None:
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()

        loop = None
        if step is not None:
            ids = {id(p) for p in params}
            named = {n: p for n, p in model.named_parameters() if id(p) in ids}
            loop = _StepLoop(named, cfg.batch_size, self._autocast, apply)
            own_step = step_kind(params, step, None)  # built once, not per batch
        loss_sum = torch.zeros((), device=self.device)
        samples, flops = 0, 0.0
        if features is not None:
            batches, flops = self._feature_batches(model, features, epochs)
        else:
            batches = self.data.train_batches(self.client, epochs, cfg.batch_size * batches_per_step, self.generator)
        step_flops = None
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            if loop is not None:
                # A method's own step: its first batch runs under the counter, the rest reuse the count per sample.
                kind = (own_step, tuple(x.shape[1:]))
                per_sample = self._flops.known(kind)
                if per_sample is None:
                    (batch_loss, n), counted = count_flops(step, model, x, y, loop)
                    self._flops.remember(kind, counted / max(n, 1))
                    flops += counted
                else:
                    batch_loss, n = step(model, x, y, loop)
                    flops += per_sample * n
                loss_sum += batch_loss.detach()
                samples += n
                continue
            if step_flops is None:  # counted once per kind of step and input shape, on a probe of one sample
                step_flops = self._flops.per_sample(step_kind(params, forward, features), self._model, forward, x[:1])
            with self._autocast():
                logits = forward(model, x) if forward is not None else model(x)
                loss = F.cross_entropy(logits.float(), y)
            (loss + penalty(model) if penalty is not None else loss).backward()
            apply()
            loss_sum += loss.detach() * len(y)
            samples += len(y)  # every sample here goes through a backward pass
            flops += step_flops * len(y)
        model.zero_grad(set_to_none=True)  # grads of params outside `params` must not linger
        return TrainStats(loss_sum, samples, flops=flops)

    def _feature_batches(self, model: nn.Module, features, epochs: float):
        """(batches over the client's features, FLOPs of computing them): one pass, no augmentation."""
        cfg = self.train
        with torch.no_grad(), self._autocast():
            pairs = [(features(model, x), y) for x, y in self.data.eval_batches(self.client, "train", cfg.eval_batch_size)]
        feats, labels = torch.cat([f for f, _ in pairs]), torch.cat([y for _, y in pairs])
        first = next(self.data.eval_batches(self.client, "train", 1))[0]
        flops = self._flops.per_sample(("features", features), self._model, features, first, backward=False)
        positions = self.data.shuffled_positions(len(labels), epochs, cfg.batch_size, self.generator)
        return ((feats[p], labels[p]) for p in positions), flops * len(labels)


@dataclass
class _StepLoop:
    """The `StepLoop` a phase's own step gets: its parameters, the autocast and the optimizer step."""

    params: dict[str, nn.Parameter]
    batch_size: int
    autocast: Callable[[], contextlib.AbstractContextManager]
    apply: Callable[[], None]


@contextlib.contextmanager
def _frozen_except(model: nn.Module, names: Sequence[str]):
    """Only `names` take gradients inside the block; the flags are restored after."""
    keep = set(names)
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and n not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


@contextlib.contextmanager
def _unfused_attention(model: nn.Module, enabled: bool):
    """timm's math attention path: SDPA under vmap on the CPU falls back to a per-sample loop."""
    modules = [m for m in model.modules() if getattr(m, "fused_attn", False)] if enabled else []
    for m in modules:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in modules:
            m.fused_attn = True


class _PhaseForward(nn.Module):
    """`phase.forward(model, x)` as a module, so `functional_call` can swap the model's tensors."""

    def __init__(self, model: nn.Module, forward):
        super().__init__()
        self.model = model
        self.fn = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, x) if self.fn is not None else self.model(x)


@torch.no_grad()
def stacked_sgd_step(
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    active: torch.Tensor,
    cfg: TrainConfig,
) -> dict[str, torch.Tensor]:
    """One SGD step for K clients at once (dim 0), as `torch.optim.SGD` and `clip_grad_norm_` per client.

    A client whose `active` flag is False keeps its parameters and momentum
    exactly (its padded step changes nothing). Returns the new parameters;
    `buffers` (momentum, zero at the start of a phase) are updated in place.
    Every tensor op is one `torch._foreach_*` call over all parameters; an
    `active` on the CPU that is all True skips the masking.
    """
    names = list(params)
    if not names:
        return {}
    ps, gs = [params[n] for n in names], [grads[n] for n in names]
    k = active.shape[0]

    def per_client(values: torch.Tensor) -> list[torch.Tensor]:  # (K,) broadcast against each parameter
        return [values.view(-1, *([1] * (p.dim() - 1))).to(p.dtype) for p in ps]

    if cfg.max_grad_norm > 0:
        squares = torch.stack([g.reshape(k, -1).float().pow(2).sum(1) for g in gs]).sum(0)
        coef = (cfg.max_grad_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        gs = torch._foreach_mul(gs, per_client(coef))
    if cfg.weight_decay:
        gs = torch._foreach_add(gs, ps, alpha=cfg.weight_decay)
    everyone = active.device.type == "cpu" and bool(active.all())
    masks = None
    if not everyone:
        active = to_device(active, ps[0].device) if active.device != ps[0].device else active
        masks = per_client(active)  # 1 = steps, 0 = padded: its gradient becomes exactly zero
        gs = torch._foreach_mul(gs, masks)
    if cfg.momentum:
        bufs = [buffers[n] for n in names]
        if masks is None:
            torch._foreach_mul_(bufs, cfg.momentum)
        else:  # a padded client's momentum is multiplied by 1 and gets 0 added: unchanged
            torch._foreach_mul_(bufs, per_client(torch.where(active, cfg.momentum, 1.0)))
        torch._foreach_add_(bufs, gs)
        gs = bufs if masks is None else torch._foreach_mul(bufs, masks)
    return dict(zip(names, torch._foreach_add(ps, gs, alpha=-cfg.lr)))


def fit_parallel(k: int, free_bytes: int, per_client_bytes: int, headroom: float = MEMORY_HEADROOM) -> int:
    """Clients that fit together in `headroom` of the free device memory (at least 1, at most `k`)."""
    return max(1, min(k, int(free_bytes * headroom // max(per_client_bytes, 1))))


def _cast_input_to_weight(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: an fp32 input meets the bf16/fp16 weights of the batched step in their dtype.

    A no-op wherever weights are fp32 (one client at a time, evaluation).
    """
    x, weight = args[0] if args else None, getattr(module, "weight", None)
    if (isinstance(x, torch.Tensor) and weight is not None and weight.dtype in (torch.bfloat16, torch.float16)
            and x.dtype == torch.float32):
        return (x.to(weight.dtype), *args[1:])
    return None


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of the autocast active on `device` now, or None."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


class ClientRunner:
    """Runs the local phases of a round's clients, one at a time or several together."""

    def __init__(self, sim: Simulation):
        self.sim = sim
        self._steps: dict = {}  # the batched step of each phase forward, built (and compiled) once
        self.low_precision: set[str] = set()  # entries the batched step casts to the autocast dtype
        for prefix, module in sim.model.named_modules():
            if isinstance(module, LOW_PRECISION_MODULES):
                module.register_forward_pre_hook(_cast_input_to_weight)
                self.low_precision |= {f"{prefix}.{n}" for n, t in module.named_parameters(recurse=False)
                                       if t.is_floating_point()}
        self.flops = FlopMeter()  # FLOPs per sample of each kind of step, counted once per run

    # -- the state swap --------------------------------------------------------------
    @torch.no_grad()
    def load_client(self, client: int) -> Mapping[str, torch.Tensor]:
        """Copy the server's broadcast and the client's personal state into the model."""
        sim = self.sim
        sent = sim.server_work(sim.method.broadcast, client)
        for name, value in sent.items():
            sim._entries[name].copy_(value)
        for name, value in sim._personal.get(client).items():
            sim._entries[name].copy_(value)
        return sent

    @torch.no_grad()
    def load_trained(self, update: ClientUpdate) -> None:
        """Put a client's model as its local training left it into the worker model."""
        sim = self.sim
        for name, value in update.params.items():
            sim._entries[name].copy_(value)
        for name, value in sim._personal.get(update.client).items():
            sim._entries[name].copy_(value)

    def _check_loss(self, client: int, round_index: int, loss_sum: torch.Tensor) -> None:
        loss = float(loss_sum)  # one sync per client
        if not math.isfinite(loss):
            raise TrainingDiverged(round_index, client, loss)

    # -- one client ------------------------------------------------------------------
    def run_phases(self, ctx: _ClientContext, phases: Sequence[Phase]) -> TrainStats:
        """Run `phases` on the loaded model, each training only its own parameters; the loss is checked."""
        sim = self.sim
        sim.model.train()
        named = dict(sim.model.named_parameters())
        stats = TrainStats(torch.zeros((), device=sim.device), 0)
        for phase in phases:
            # Only a phase that changes the step passes those options (train_epochs' plain signature stays).
            changes_step = phase.penalty is not None or phase.step is not None or phase.batches_per_step != 1
            extra = {"penalty": phase.penalty, "step": phase.step,
                     "batches_per_step": phase.batches_per_step} if changes_step else {}
            with _frozen_except(sim.model, phase.params):
                stats = stats + ctx.train_epochs(
                    sim.forward_model, [named[n] for n in phase.params], phase.epochs, phase.forward, phase.features,
                    **extra
                )
        self._check_loss(ctx.client, ctx.round_index, stats.loss_sum)
        return stats

    def train_client(self, client: int, round_index: int,
                     personal_only: bool = False) -> tuple[ClientUpdate, TrainStats]:
        """One client's local step: load its state, run its phases, read the shared part back.

        `personal_only`: the phases train only the personal parameters (a held-out client's adaptation).
        """
        sim = self.sim
        sent = self.load_client(client)
        ctx = _ClientContext(sim, client, round_index)
        phases = sim.method.local_phases(sim.model, ctx)
        if personal_only:
            phases = personal_phases(phases, sim.personal_names)
        stats = self.run_phases(ctx, phases)
        with torch.no_grad():
            params = {n: sim._entries[n].detach().clone() for n in sent}
        sim._personal.put(client, {n: sim._entries[n] for n in sim.personal_names})
        return ClientUpdate(client, sim.data.num_samples(client), sent, params), stats

    # -- several clients at once -----------------------------------------------------
    def train_together(self, clients: Sequence[int], round_index: int) -> list[tuple[ClientUpdate, TrainStats]]:
        """Train `clients` as one batch of models; the result equals `train_client` for each.

        Falls back to one client at a time when their phases differ or change the step (`Phase.batchable`).
        """
        sim = self.sim
        model = sim.model
        ctxs = [_ClientContext(sim, c, round_index) for c in clients]
        phases = [sim.method.local_phases(model, ctx) for ctx in ctxs]
        # Phases on precomputed features (a head on a few thousand vectors) or with their own step run one
        # client at a time (`Phase.batchable`).
        if (len(clients) < 2 or any(p != phases[0] for p in phases[1:])
                or not all(phase.batchable for phase in phases[0])):
            return [self.train_client(c, round_index) for c in clients]
        sents = [sim.server_work(sim.method.broadcast, c) for c in clients]
        with torch.no_grad():
            state = {}
            for name, live in sim._entries.items():
                rows = []
                for c, sent in zip(clients, sents):
                    personal = sim._personal.get(c)
                    value = sent[name] if name in sent else personal.get(name, live)
                    rows.append(value.detach().to(sim.device))
                state[name] = torch.stack(rows)
        model.train()
        loss_sums = torch.zeros(len(clients), device=sim.device)
        samples = [0] * len(clients)
        flops = [0.0] * len(clients)
        with _unfused_attention(model, enabled=sim.device.type == "cpu"):
            for phase in phases[0]:
                n = self._phase_together(state, phase, ctxs, loss_sums)
                samples = [a + b for a, b in zip(samples, n)]
                per_sample = self._phase_flops(phase, ctxs[0])
                flops = [f + per_sample * b for f, b in zip(flops, n)]
        results = []
        for k, (c, sent) in enumerate(zip(clients, sents)):
            self._check_loss(c, round_index, loss_sums[k])
            with torch.no_grad():
                params = {n: state[n][k].clone() for n in sent}
            sim._personal.put(c, {n: state[n][k] for n in sim.personal_names})
            update = ClientUpdate(c, sim.data.num_samples(c), sent, params)
            results.append((update, TrainStats(loss_sums[k].clone(), samples[k], flops=flops[k])))
        return results

    def _batched_step(self, forward):
        """`params, x -> logits` of K clients at once (vmap over `functional_call`), compiled with `model.compile`."""
        step = self._steps.get(forward)
        if step is None:
            module = _PhaseForward(self.sim.model, forward)

            def one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
                return torch.func.functional_call(module, params, (x,))

            step = torch.vmap(one, randomness="different")
            if self.sim.cfg.model.compile:
                step = torch.compile(step)
            self._steps[forward] = step
        return step

    def _batched_grads(self, step, state: Mapping[str, torch.Tensor], trained: Sequence[str], x: torch.Tensor,
                       y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each client's mean loss over its masked batch (dim 0) and the gradients of `trained` (fp32 leaves)."""
        k, bs = mask.shape
        leaves = {n: state[n].detach().requires_grad_(True) for n in trained}
        with self.sim.autocast():
            low = _autocast_dtype(self.sim.device)
            params = {}
            for n, t in state.items():
                t = leaves.get(n, t)
                # Cast inside the graph: the leaves (and so the gradients) stay fp32.
                params["model." + n] = t.to(low) if low is not None and n in self.low_precision else t
            logits = step(params, x)
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(k, bs)
        per_client = (losses * mask).sum(1) / mask.sum(1).clamp_min(1)
        grads = torch.autograd.grad(per_client.sum(), [leaves[n] for n in trained], allow_unused=True)
        return per_client, {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(trained, grads)}

    def _phase_flops(self, phase: Phase, ctx: _ClientContext) -> float:
        """FLOPs per sample of `phase`'s step, as the one-client path counts them (same key, same probe)."""
        sim = self.sim
        named = dict(sim.model.named_parameters())
        params = [named[n] for n in phase.params]
        sample = next(sim.data.eval_batches(ctx.client, "train", 1))[0]
        with _frozen_except(sim.model, phase.params):
            return self.flops.per_sample(step_kind(params, phase.forward, None), sim.model, phase.forward, sample)

    def _phase_together(self, state: dict[str, torch.Tensor], phase: Phase, ctxs: Sequence[_ClientContext],
                        loss_sums: torch.Tensor) -> list[int]:
        """One phase for every client in `state` (dim 0); updates `state` and `loss_sums` in place."""
        sim = self.sim
        cfg = sim.cfg.train
        k, bs = len(ctxs), cfg.batch_size
        step = self._batched_step(phase.forward)
        trained = list(phase.params)
        buffers = {n: torch.zeros_like(state[n]) for n in trained} if cfg.momentum else {}
        batches = [sim.data.train_batches(ctx.client, phase.epochs, bs, ctx.generator) for ctx in ctxs]
        samples = [0] * k
        while True:
            drawn = [next(it, None) for it in batches]
            rows = [i for i, b in enumerate(drawn) if b is not None]
            if not rows:
                break
            # Few clients left: step only those; otherwise pad the finished ones with masked steps.
            if len(rows) > COMPACT_BELOW * k:
                rows = list(range(k))
            first = next(b for b in drawn if b is not None)
            x = first[0].new_zeros((len(rows), bs, *first[0].shape[1:]))
            y = first[1].new_zeros((len(rows), bs))
            mask = torch.zeros((len(rows), bs), device=sim.device)
            for j, i in enumerate(rows):
                if drawn[i] is not None:
                    m = len(drawn[i][1])
                    x[j, :m], y[j, :m], mask[j, :m] = drawn[i][0], drawn[i][1], 1.0
                    samples[i] += m
            active = torch.tensor([drawn[i] is not None for i in rows])  # known on the host: no sync
            if len(rows) == k:
                part, part_buffers = state, buffers
            else:
                index = to_device(torch.tensor(rows), sim.device)
                part = {n: t[index] for n, t in state.items()}
                part_buffers = {n: t[index] for n, t in buffers.items()}
            counts = mask.sum(1)
            per_client, grads = self._batched_grads(step, part, trained, x, y, mask)
            new = stacked_sgd_step({n: part[n] for n in trained}, grads, part_buffers, active, cfg)
            if len(rows) == k:
                state.update(new)
                loss_sums += per_client.detach() * counts
            else:
                for n, t in new.items():
                    state[n] = state[n].index_copy(0, index, t)
                for n, t in part_buffers.items():
                    buffers[n].index_copy_(0, index, t)
                loss_sums.index_add_(0, index, per_client.detach() * counts)
        return samples

    def probe_parallel(self, k: int) -> int:
        """How many of `k` clients fit together in free device memory, from one batched step of one client.

        The step (forward and backward on a zero batch, nothing updated) gives
        the peak memory a client adds; each also holds its stacked state,
        momentum and updated parameters (three copies of the parameters).
        """
        sim = self.sim
        device, cfg = sim.device, sim.cfg.train
        trained = [n for n, p in sim.model.named_parameters() if p.requires_grad]
        state = {n: t.detach().unsqueeze(0) for n, t in sim._entries.items()}
        size = sim.data.image_size
        x = torch.zeros((1, cfg.batch_size, sim.data.in_chans, size, size), device=device)
        y = torch.zeros((1, cfg.batch_size), dtype=torch.long, device=device)
        mask = torch.ones((1, cfg.batch_size), device=device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        sim.model.train()
        with _unfused_attention(sim.model, enabled=device.type == "cpu"):
            _, grads = self._batched_grads(self._batched_step(None), state, trained, x, y, mask)
        peak = torch.cuda.max_memory_allocated(device) - before
        del grads
        params = sum(sim._entries[n].numel() * sim._entries[n].element_size() for n in trained)
        free, _ = torch.cuda.mem_get_info(device)
        # Memory PyTorch's allocator holds but does not use (the probe's own, now freed) is free to it too.
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return fit_parallel(k, free, peak + 3 * params)


def personal_phases(phases: Sequence[Phase], personal: Sequence[str]) -> list[Phase]:
    """`phases` restricted to the `personal` parameters (the shared part frozen); emptied phases are dropped."""
    keep = set(personal)
    out = []
    for phase in phases:
        params = tuple(n for n in phase.params if n in keep)
        if params:
            out.append(dataclasses.replace(phase, params=params))
    return out


def resolve_parallel(setting: str, device: torch.device, sampled: int) -> int:
    """How many clients train together: `train.parallel_clients` as an integer, or `auto`.

    `auto` batches a whole round (at most 16 clients) on a GPU, where one
    small model per step leaves it idle; on the CPU it trains one client at a
    time, which `bench perf together` measured to be as fast or faster there.
    On a GPU the engine then lowers `auto` to what fits in free memory
    (`ClientRunner.probe_parallel`) and halves it on an out-of-memory error.
    """
    if setting == "auto":
        return min(sampled, 16) if device.type == "cuda" else 1
    try:
        value = int(setting)
    except ValueError:
        raise UserError(f"bad value for train.parallel_clients: {setting!r} (an integer >= 1, or auto)") from None
    return max(1, min(value, sampled))
