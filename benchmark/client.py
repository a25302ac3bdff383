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
from .errors import TrainingDiverged, UserError
from .flops import FlopMeter, count_flops

if TYPE_CHECKING:
    from .engine import Simulation


FINETUNE_STREAM = 1  # batch-seed stream of the fine-tuning before evaluation (0 = local training)

# Below this share of clients with a batch left, a step runs only those clients (gathered) instead of
# padding the rest with masked steps: padded steps cost a full forward and backward each.
COMPACT_BELOW = 0.5


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
                kind = (step_kind(params, step, None), tuple(x.shape[1:]))
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
    """
    k = active.shape[0]
    if cfg.max_grad_norm > 0:
        squares = torch.stack([g.reshape(k, -1).float().pow(2).sum(1) for g in grads.values()]).sum(0)
        coef = (cfg.max_grad_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        grads = {n: g * coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype) for n, g in grads.items()}
    out = {}
    for name, p in params.items():
        g = grads[name]
        mask = active.view(-1, *([1] * (p.dim() - 1)))
        if cfg.weight_decay:
            g = g.add(p, alpha=cfg.weight_decay)
        if cfg.momentum:
            buf = buffers[name]
            g = torch.where(mask, buf * cfg.momentum + g, buf)
            buf.copy_(g)
        out[name] = torch.where(mask, p - cfg.lr * g, p)
    return out


class ClientRunner:
    """Runs the local phases of a round's clients, one at a time or several together."""

    def __init__(self, sim: Simulation):
        self.sim = sim
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
        module = _PhaseForward(sim.model, phase.forward)
        trained = list(phase.params)
        buffers = {n: torch.zeros_like(state[n]) for n in trained} if cfg.momentum else {}
        batches = [sim.data.train_batches(ctx.client, phase.epochs, bs, ctx.generator) for ctx in ctxs]

        def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(module, params, (x,))

        batched_forward = torch.vmap(forward, randomness="different")
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
            if len(rows) == k:
                part, part_buffers = state, buffers
            else:
                index = torch.tensor(rows, device=sim.device)
                part = {n: t[index] for n, t in state.items()}
                part_buffers = {n: t[index] for n, t in buffers.items()}
            counts = mask.sum(1)
            leaves = {n: part[n].detach().requires_grad_(True) for n in trained}
            params = {("model." + n): leaves.get(n, part[n]) for n in part}
            with sim.autocast():
                logits = batched_forward(params, x)
                losses = F.cross_entropy(
                    logits.float().flatten(0, 1), y.flatten(), reduction="none"
                ).view(len(rows), bs)
            per_client = (losses * mask).sum(1) / counts.clamp_min(1)
            grads = torch.autograd.grad(per_client.sum(), [leaves[n] for n in trained], allow_unused=True)
            grads = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(trained, grads)}
            new = stacked_sgd_step({n: part[n] for n in trained}, grads, part_buffers, counts > 0, cfg)
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
    """
    if setting == "auto":
        return min(sampled, 16) if device.type == "cuda" else 1
    try:
        value = int(setting)
    except ValueError:
        raise UserError(f"bad value for train.parallel_clients: {setting!r} (an integer >= 1, or auto)") from None
    return max(1, min(value, sampled))
