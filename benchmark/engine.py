"""The federated simulation: one round loop for every method.

One model instance lives on the device. For each sampled client the engine
copies the server's broadcast and that client's personal state into it (in
place), lets the method train it, reads the shared part back as the client's
update, and keeps the personal part aside. The method's server hooks then
aggregate. Nothing is deep-copied per client, and data never leaves the
device. Progress is reported through `Callback`s; this module does no I/O.

`data.novel_clients = K` holds K clients (drawn by the run's seed) out of
training: they are never sampled and the round metrics leave them out; after
the last round the method adapts to them (`Method.fit_held_out`, through the
same one-client step the rounds use) and their accuracy is reported with the
`novel_` prefix (`novel_test_acc_mean`, ...).

The engine counts how many times each training client has trained so far
(`visits`); every round reports their mean and minimum over the training
clients (`visits_per_client_mean`, `visits_per_client_min`), so a run's last
round records the whole run's.

Each round records its compute: `train_samples` (through a backward pass,
fine-tuning before evaluation included) and `forward_samples` (only forwarded:
evaluation). Where the server holds one complete model, that model is also
evaluated on every client's test split (`global_test_acc_mean`). Accuracy is
measured after aggregation on every client; with `train.eval_timing =
"after-local"` on the round's sampled clients right after local training; with
"reference" (the FedPerfix code's) on every client, the sampled ones right
after local training and the others with the round's broadcast and their own
personal part. Each round also logs `train_flops` (forward and backward of
what trained, fine-tuning included) and `server_flops` (the method's server
hooks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch

from ..datasets import DATASETS, FederatedData, ImageSet, Partition, partition_for
from ..methods import METHODS, ClientUpdate, Method, TrainStats
from ..methods.aggregation import state_bytes
from ..methods.structure import head_entries
from .client import FINETUNE_STREAM, ClientRunner, PersonalStore, _ClientContext, resolve_parallel
from .config import RunConfig
from .device import capability, set_deterministic
from .errors import UserError
from .flops import count_flops
from .models import build_model

METRIC_NAMES = (  # logged by every run, at the last round at least
    "test_acc_mean", "test_acc_weighted", "val_acc_mean", "train_loss", "bytes_up", "bytes_down", "round_seconds",
    "train_samples", "forward_samples", "train_flops",
)
T = TypeVar("T")
HELD_OUT_PREFIX = "novel_"  # held-out clients' metrics: novel_test_acc_mean, ...
GLOBAL_PREFIX = "global_"  # the server's one model on every client's test split: global_test_acc_mean, ...


def autocast_dtype(precision: str, device: torch.device,
                   capability: tuple[int, int] | None = None) -> torch.dtype | None:
    """The autocast dtype of `train.precision` on `device`; None = plain fp32.

    A GPU below compute capability 8.0 (Ampere), when `capability` is known,
    passes `torch.cuda.is_bf16_supported()` through emulation and runs bf16
    very slowly: it trains in fp32 instead (exact, and unlike fp16 it needs no
    gradient scaler).
    """
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and capability is not None and tuple(capability) < (8, 0):
        return None
    return torch.bfloat16


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a user error.

    CUDA always resolves with its index (`cuda:<n>`, the current device unless
    one is named), so memory queries and RNG states address one GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but no CUDA device is available; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class Callback:
    """Receives progress from a running simulation; every hook is optional."""

    def on_start(self, sim: Simulation) -> None: ...

    def on_progress(self, round_index: int, done: int, total: int) -> None:
        """`done` of `total` sampled clients have trained in this round."""

    def on_round(self, round_index: int, metrics: Mapping[str, float]) -> None: ...

    def on_end(self, sim: Simulation, result: RunResult) -> None: ...


@dataclass
class EvalResult:
    """Each client's accuracy with its own personalized model."""

    test_correct: np.ndarray  # per client
    test_count: np.ndarray
    val_correct: np.ndarray
    val_count: np.ndarray
    train_samples: int = 0  # samples trained on before evaluating (`Method.finetune_phases`)
    train_flops: float = 0.0  # FLOPs of that training
    forward_samples: int = 0  # samples the evaluation forwarded
    # (split, client, correct) whose count is still a device tensor: read in one sync by `settle`
    pending: list = dataclasses.field(default_factory=list, repr=False, compare=False)

    @classmethod
    def empty(cls, num_clients: int) -> EvalResult:
        """No client evaluated yet (count 0 everywhere)."""
        return cls(*(np.zeros(num_clients, dtype=np.int64) for _ in range(4)))

    def record(self, split: str, client: int, correct: int | torch.Tensor, total: int) -> None:
        """One client's count on a split; a device tensor stays there until `settle`."""
        getattr(self, f"{split}_count")[client] = total
        if isinstance(correct, torch.Tensor):
            self.pending.append((split, client, correct))
        else:
            getattr(self, f"{split}_correct")[client] = correct

    def settle(self) -> EvalResult:
        """Copy the counts still on the device to the host, all in one transfer."""
        if self.pending:
            values = torch.stack([c.reshape(()).to(torch.long) for _, _, c in self.pending]).tolist()
            for (split, client, _), value in zip(self.pending, values):
                getattr(self, f"{split}_correct")[client] = value
            self.pending.clear()
        return self

    def absorb(self, other: EvalResult) -> None:
        """Add `other`'s counts (of other clients) and its compute into this result."""
        self.pending.extend(other.pending)  # counts still on the device: set when this result settles
        for f in ("test_correct", "test_count", "val_correct", "val_count"):
            getattr(self, f).__iadd__(getattr(other, f))
        self.train_samples += other.train_samples
        self.forward_samples += other.forward_samples
        self.train_flops += other.train_flops

    def test_only(self) -> EvalResult:
        """This result's test split alone (no validation counts)."""
        self.settle()
        zeros = np.zeros_like(self.val_count)
        return EvalResult(self.test_correct.copy(), self.test_count.copy(), zeros, zeros.copy())

    @staticmethod
    def _mean(correct: np.ndarray, count: np.ndarray) -> float:
        has = count > 0
        return float(np.mean(correct[has] / count[has])) if has.any() else math.nan

    @property
    def test_acc(self) -> np.ndarray:
        self.settle()
        return np.where(self.test_count > 0, self.test_correct / np.maximum(self.test_count, 1), np.nan)

    @property
    def val_acc(self) -> np.ndarray:
        self.settle()
        return np.where(self.val_count > 0, self.val_correct / np.maximum(self.val_count, 1), np.nan)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Mean and sample-weighted accuracy over the evaluated clients (count > 0)."""
        self.settle()
        out = {
            "test_acc_mean": self._mean(self.test_correct, self.test_count),
            "test_acc_weighted": (float(self.test_correct.sum() / self.test_count.sum())
                                  if self.test_count.sum() > 0 else math.nan),
        }
        if self.val_count.sum() > 0:
            out["val_acc_mean"] = self._mean(self.val_correct, self.val_count)
        return {prefix + k: v for k, v in out.items()}


@dataclass
class RunResult:
    """What a finished simulation reports."""

    history: list[dict[str, float]]  # metrics of each round, in order (with "round")
    final: EvalResult  # the last evaluation
    seconds: float  # wall time of the round loop
    held_out: EvalResult | None = None  # held-out clients after `fit_held_out`, if any

    @property
    def held_out_metrics(self) -> dict[str, float]:
        """`novel_test_acc_mean`, ... of the held-out clients; empty without them."""
        return self.held_out.metrics(HELD_OUT_PREFIX) if self.held_out is not None else {}

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def derive_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for each random stream, all fixed by the run's seed."""
    # generate_state is prefix-stable: adding a stream at the end leaves the others unchanged.
    init, sampling, batches, held_out, failures = np.random.SeedSequence(seed).generate_state(5)
    return {"init": int(init), "sampling": int(sampling), "batches": int(batches), "held_out": int(held_out),
            "failures": int(failures)}


class Simulation:
    """One federated experiment: data, model, method and the round loop."""

    def __init__(self, cfg: RunConfig, *, images: ImageSet | None = None, partition: Partition | None = None,
                 eval_splits: Sequence[str] = ("test", "val")):
        self.cfg = cfg
        # Tuning passes ("val",): the test split is then never read.
        self.eval_splits = tuple(eval_splits)
        self.device = resolve_device(cfg.device)
        set_deterministic(cfg.run.deterministic)
        # `train.precision`, with bf16 on CUDA only from compute capability 8.0 (fp32 before it).
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device, capability(self.device))
        self.seeds = derive_seeds(cfg.seed)
        self.images = images if images is not None else DATASETS.get(cfg.dataset.name).load(cfg.dataset)
        self.partition = partition if partition is not None else self._make_partition()
        self.data = FederatedData(
            self.images, self.partition, device=self.device, image_size=cfg.model.image_size,
            augment=cfg.data.augment, normalize=cfg.data.normalize,
        )
        self.method: Method = METHODS.get(cfg.method.name)(cfg.method)

        torch.manual_seed(self.seeds["init"])  # timm and the method's modules init from the global RNG
        model = build_model(
            cfg.model, image_size=self.data.image_size, in_chans=self.data.in_chans, num_classes=self.data.num_classes
        )
        self.model = self.method.adapt_model(model).to(self.device)
        # Training and evaluation call this one; state is read and written on `model`.
        self.forward_model = torch.compile(self.model) if cfg.model.compile else self.model

        # Parameters and persistent buffers, by name, as the live tensors of the model.
        self._entries: dict[str, torch.Tensor] = dict(self.model.state_dict(keep_vars=True))
        personal = self.method.personal_entries(self.model)
        self.personal_names = [n for n in self._entries if n in personal]
        self.shared_names = [n for n in self._entries if n not in personal]
        self._personal = PersonalStore(
            {n: self._entries[n] for n in self.personal_names}, self.device, cfg.train.personal_device_mb * 2**20
        )
        self.clients = ClientRunner(self)
        self._parallel_cap: int | None = None  # `auto` lowered to what fits in device memory (GPU)
        k = self.data.num_clients
        novel = cfg.data.novel_clients
        if novel >= k:
            raise UserError(f"bad value for data.novel_clients: {novel} (must be < the {k} clients of the partition)")
        held_out = np.random.default_rng(self.seeds["held_out"]).choice(k, size=novel, replace=False)
        self.held_out: list[int] = sorted(int(c) for c in held_out)
        self.training_clients: list[int] = sorted(set(range(k)) - set(self.held_out))
        self.method.server_init(self.model, {n: self._entries[n] for n in self.shared_names}, self.data.num_clients)

        self.server_flops = 0.0  # FLOPs of the method's server hooks since the round began (`server_work`)
        self._sampler = np.random.default_rng(self.seeds["sampling"])
        self.round_index = 0
        self.history: list[dict[str, float]] = []
        self.last_eval: EvalResult | None = None
        self.visits = np.zeros(self.data.num_clients, dtype=np.int64)  # local trainings per client (a run's record)

    # -- set-up helpers ----------------------------------------------------------
    def _make_partition(self) -> Partition:
        return partition_for(self.images, self.cfg.data, self.cfg.seed)

    def autocast(self):
        """Autocast to `amp_dtype` (`train.precision`, see `autocast_dtype`); a no-op in fp32."""
        if self.amp_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def batch_generator(self, round_index: int, client: int, stream: int = 0) -> torch.Generator:
        """The generator behind a client's batches in a round: independent of the visiting order.

        `stream` 0 drives local training; another stream (fine-tuning before
        evaluation) gets batches of its own.
        """
        key = [self.seeds["batches"], round_index, client] + ([stream] if stream else [])
        seed = np.random.SeedSequence(key).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def num_personal_parameters(self) -> int:
        return sum(self._entries[n].numel() for n in self.personal_names)

    @property
    def num_communicated_parameters(self) -> int:
        """Values a client sends the server after each visit: its shared entries (0 for `local`)."""
        return sum(self._entries[n].numel() for n in self.shared_names)

    def server_work(self, hook: Callable[..., T], *args: Any) -> T:
        """Call one of the method's server hooks, adding the FLOPs it runs to `server_flops`."""
        out, flops = count_flops(hook, *args)
        self.server_flops += flops
        return out

    # -- state swapping (benchmark/client.py) -------------------------------------------
    def load_client(self, client: int) -> Mapping[str, torch.Tensor]:
        """Copy the server's broadcast and the client's personal state into the model."""
        return self.clients.load_client(client)

    def personal_state(self, client: int) -> dict[str, torch.Tensor]:
        """The personal entries the client keeps (the initial ones until it first trains)."""
        return self._personal.get(client)

    # -- the round loop ----------------------------------------------------------
    def sample_clients(self) -> list[int]:
        """This round's clients, drawn from the training (not held-out) clients."""
        pool = self.training_clients
        m = max(1, int(round(self.cfg.train.sample_fraction * len(pool))))
        return sorted(int(pool[i]) for i in self._sampler.choice(len(pool), size=m, replace=False))

    def train_client(self, client: int, round_index: int) -> tuple[ClientUpdate, TrainStats]:
        """One client's local step: load its state, run its phases, read the shared part back."""
        return self.clients.train_client(client, round_index)

    @property
    def parallel_clients(self) -> int:
        """Clients trained together per group this round (`train.parallel_clients`, resolved)."""
        sampled = max(1, int(round(self.cfg.train.sample_fraction * len(self.training_clients))))
        k = resolve_parallel(self.cfg.train.parallel_clients, self.device, sampled)
        return k if self._parallel_cap is None else min(k, self._parallel_cap)

    def _train_round(self, selected: Sequence[int], r: int) -> Iterator[tuple[ClientUpdate, TrainStats]]:
        auto = self.cfg.train.parallel_clients == "auto"
        if auto and self._parallel_cap is None and self.device.type == "cuda" and self.parallel_clients > 1:
            self._parallel_cap = self.clients.probe_parallel(self.parallel_clients)
        start = 0
        while start < len(selected):
            group = selected[start : start + self.parallel_clients]
            if len(group) == 1:
                yield self.clients.train_client(group[0], r)
            else:
                try:
                    results = self.clients.train_together(group, r)
                except torch.OutOfMemoryError:
                    if not auto:
                        raise
                    # Nothing of the group was kept: train it again as two halves, and so on from here.
                    self._parallel_cap = len(group) // 2
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                yield from results
            start += len(group)

    def failing_clients(self, round_index: int, selected: Sequence[int]) -> set[int]:
        """The sampled clients that fail mid-round (`train.client_failure_rate`), from a per-round seed.

        Drawn apart from client sampling, so a rate of 0 changes nothing else in the run.
        """
        rate = self.cfg.train.client_failure_rate
        if rate <= 0:
            return set()
        draws = np.random.default_rng([self.seeds["failures"], round_index]).random(len(selected))
        return {c for c, u in zip(selected, draws) if u < rate}

    def run_round(self, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
        """Train the sampled clients, aggregate as they finish, and evaluate when due; returns the metrics."""
        start = time.perf_counter()
        self.server_flops = 0.0
        self.round_index += 1
        r = self.round_index
        selected = self.sample_clients()
        failed = self.failing_clients(r, selected)
        loss_sum = torch.zeros((), device=self.device)
        loss_samples, forward_samples, bytes_up, bytes_down, train_flops = 0, 0, 0, 0, 0.0
        due = r % self.cfg.train.eval_every == 0 or r == self.cfg.train.rounds
        # after-local and reference: each sampled client as its local training left it.
        after_local = EvalResult.empty(self.data.num_clients) if due and self._after_local else None
        for client in failed:
            # It received the broadcast, then failed: nothing comes back and its state is unchanged.
            bytes_down += state_bytes(self.server_work(self.method.broadcast, client))
        trained = [c for c in selected if c not in failed]
        if after_local is not None and self.cfg.train.eval_timing == "reference":
            # Every other client with this round's broadcast and its own personal part, before any update lands.
            untrained = sorted(set(self.training_clients) - set(trained))
            if untrained:
                after_local.absorb(self.evaluate(untrained, final=r == self.cfg.train.rounds))
        received = 0
        self.method.start_aggregation()
        for done, (update, stats) in enumerate(self._train_round(trained, r), len(failed) + 1):
            received += 1
            self.visits[update.client] += 1
            bytes_down += state_bytes(update.sent)
            bytes_up += state_bytes(update.params)
            loss_sum += stats.loss_sum  # already checked finite
            loss_samples += stats.samples
            forward_samples += stats.forward_samples
            train_flops += stats.flops
            if after_local is not None:
                self.clients.load_trained(update)
                self._evaluate_loaded(update.client, after_local)
            self.server_work(self.method.add_update, update)  # a running sum: the update is dropped here
            del update
            for cb in callbacks:
                cb.on_progress(r, done, len(selected))
        if received:  # a round in which every client failed keeps the previous server state
            self.server_work(self.method.finish_aggregation)
        metrics: dict[str, float] = {
            "train_loss": float(loss_sum) / loss_samples if loss_samples else math.nan,
            "bytes_up": float(bytes_up),
            "bytes_down": float(bytes_down),
            "clients": float(len(selected)),
            "visits_per_client_mean": float(self.visits[self.training_clients].mean()),
            "visits_per_client_min": float(self.visits[self.training_clients].min()),
        }
        if self.cfg.train.client_failure_rate > 0:
            metrics["failed_clients"] = float(len(failed))
        if due:
            self.last_eval = (after_local.settle() if after_local is not None
                              else self.evaluate(self.training_clients, final=r == self.cfg.train.rounds))
            metrics.update(self.last_eval.metrics())
            loss_samples += self.last_eval.train_samples
            forward_samples += self.last_eval.forward_samples
            train_flops += self.last_eval.train_flops
            if self.has_global_view and "test" in self.eval_splits:
                # Where every client was just evaluated on the server's model itself, that was the global view.
                reuse = not self._after_local and self._evaluates_the_global_model(final=r == self.cfg.train.rounds)
                view = self.last_eval.test_only() if reuse else self.evaluate_global(self.training_clients)
                metrics.update(view.metrics(GLOBAL_PREFIX))
        metrics["train_samples"] = float(loss_samples)
        metrics["forward_samples"] = float(forward_samples)
        metrics["train_flops"] = train_flops
        metrics["server_flops"] = self.server_flops
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        metrics["round_seconds"] = time.perf_counter() - start
        return metrics

    def evaluate(self, clients: Iterable[int] | None = None, final: bool = True) -> EvalResult:
        """Every client's val and test accuracy with its own personalized model.

        A method with `finetune_phases` first trains each client's loaded model
        on its own training split (`final`: this is the run's last evaluation);
        the next `load_client` overwrites those weights.
        Where every client holds the same body and only the head may be personal
        (FedAvg, FedPer, FedRep, ...), the body runs once over all the clients'
        images and each client's head is applied to its own features.
        """
        clients = list(range(self.data.num_clients) if clients is None else clients)
        result = EvalResult.empty(self.data.num_clients)
        if clients and self._shared_body_evaluation(final):
            self._evaluate_shared_body(clients, result)
            return result.settle()
        for client in clients:
            self.load_client(client)
            tuned = self._finetune(client, final)
            result.train_samples += tuned.samples
            result.train_flops += tuned.flops
            self._evaluate_loaded(client, result)
        return result.settle()

    def _finetune_context(self, client: int, final: bool) -> _ClientContext:
        return _ClientContext(self, client, self.round_index, stream=FINETUNE_STREAM, final=final)

    def _fine_tunes(self, final: bool) -> bool:
        """True when the method trains clients before this evaluation (`Method.finetune_phases`)."""
        ctx = self._finetune_context(self.training_clients[0], final)
        return bool(self.method.finetune_phases(self.model, ctx))

    def _shared_body_evaluation(self, final: bool = True) -> bool:
        """True when clients differ at most in the head and the method evaluates in the default way."""
        method = type(self.method)
        if (method.evaluate is not Method.evaluate or method.broadcast is not Method.broadcast
                or self._fine_tunes(final)):
            return False
        try:
            head = head_entries(self.model)
        except ValueError:
            return False
        return set(self.personal_names) <= head

    def _evaluate_shared_body(self, clients: Sequence[int], result: EvalResult) -> None:
        """One body pass over every client's images, then each client's own head on its features."""
        model, bs = self.model, self.cfg.train.eval_batch_size
        head = model.get_classifier()
        prefix = next(name for name, m in model.named_modules() if m is head) + "."
        self.load_client(clients[0])  # the shared body; heads are applied per client below
        model.eval()
        for split in (s for s in ("test", "val") if s in self.eval_splits):  # tuning never reads "test"
            sizes = [self.data.num_samples(c, split) for c in clients]
            if not sum(sizes):
                continue
            index = torch.cat([self.data.indices(c, split) for c in clients])
            with torch.inference_mode(), self.autocast():
                features = torch.cat([
                    model.forward_head(model.forward_features(self.data.prepare(index[i : i + bs])[0]), pre_logits=True)
                    for i in range(0, len(index), bs)
                ])
                labels = self.data.labels[index]
                correct = []
                for c, f, y in zip(clients, features.split(sizes), labels.split(sizes)):
                    own = {n[len(prefix):]: t.to(f.device) for n, t in self.personal_state(c).items()}
                    logits = torch.func.functional_call(head, own, (f,)) if own else head(f)
                    correct.append((logits.argmax(dim=1) == y).sum())
            for c, n, hits in zip(clients, sizes, correct):  # read when the evaluation settles
                result.record(split, c, hits, n)
            result.forward_samples += sum(sizes)

    @property
    def _after_local(self) -> bool:
        """The round's trained clients are scored as their local training left them."""
        return self.cfg.train.eval_timing in ("after-local", "reference")

    @property
    def has_global_view(self) -> bool:
        """The server holds one complete model: nothing is personal and the method exposes it."""
        return not self.personal_names and self.method.global_view() is not None

    def _evaluates_the_global_model(self, final: bool = True) -> bool:
        """True when each client's personalized evaluation runs exactly the server's global view."""
        method = type(self.method)
        return (method.broadcast is Method.broadcast and method.global_view is Method.global_view
                and method.evaluate is Method.evaluate and not self._fine_tunes(final))

    def _finetune(self, client: int, final: bool) -> TrainStats:
        """Train the loaded model on `client`'s own data through the one phase loop."""
        ctx = self._finetune_context(client, final)
        phases = self.method.finetune_phases(self.model, ctx)
        return self.clients.run_phases(ctx, phases) if phases else TrainStats(torch.zeros(()), 0)

    @torch.inference_mode()
    def _evaluate_loaded(self, client: int, result: EvalResult, splits: Sequence[str] = ("test", "val")) -> None:
        """Accuracy of the model as loaded now on `client`'s splits, written into `result`."""
        self.model.eval()
        bs = self.cfg.train.eval_batch_size
        with self.autocast():
            for split in (s for s in splits if s in self.eval_splits):  # tuning never reads "test"
                correct, total = self.method.evaluate(self.forward_model, self.data.eval_batches(client, split, bs))
                result.record(split, client, correct, total)  # a device count stays there until settled
                result.forward_samples += total

    def evaluate_global(self, clients: Iterable[int]) -> EvalResult:
        """The server's one model (`Method.global_view`) on each client's test split."""
        view = self.method.global_view()
        assert view is not None and not self.personal_names, "only for methods with one global model"
        with torch.no_grad():
            for name, value in view.items():
                self._entries[name].copy_(value)
        result = EvalResult.empty(self.data.num_clients)
        for client in clients:
            self._evaluate_loaded(client, result, splits=("test",))
        return result.settle()

    def fit_and_evaluate_held_out(self) -> EvalResult:
        """Let the method adapt to the held-out clients, then evaluate only them."""
        rounds = self.cfg.train.rounds

        def train_held_out(client: int, step: int, personal_only: bool = False) -> ClientUpdate:
            # Batches seeded past the training rounds, so they never repeat a round's.
            return self.clients.train_client(client, rounds + step, personal_only)[0]

        self.method.fit_held_out(list(self.held_out), train_held_out)
        return self.evaluate(self.held_out)

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the remaining rounds depend on, as plain dicts of tensors and numbers.

        Shared state lives in the method's server state; personal state per client
        here. Batches and failures are seeded per round, so the sampler and torch's
        generators (the CPU's, and the GPU's on CUDA) are the only random state that carries over.
        """
        last = self.last_eval
        return {
            "round": self.round_index,
            "history": [dict(h) for h in self.history],
            "sampler": json.dumps(self._sampler.bit_generator.state),  # 128-bit ints, kept exact as text
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "initial_personal": {n: t.detach().clone() for n, t in self._personal.initial.items()},
            "personal": {int(c): {n: t.detach().cpu().clone() for n, t in self._personal.get(c).items()}
                         for c in self._personal},
            "method": self.method.state_dict(),
            "visits": torch.from_numpy(self.visits.copy()),
            "last_eval": None if last is None else {
                f.name: torch.from_numpy(v.copy()) if isinstance(v := getattr(last, f.name), np.ndarray) else v
                for f in dataclasses.fields(last) if f.name != "pending"},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict()` of a simulation built from the same config."""
        self.round_index = int(state["round"])
        self.history = [{k: float(v) for k, v in h.items()} for h in state["history"]]
        self._sampler.bit_generator.state = json.loads(state["sampler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and self.device.type == "cuda":  # absent from older checkpoints
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        with torch.no_grad():
            for name, value in state["initial_personal"].items():
                self._personal.initial[name].copy_(value)
        for client, personal in state["personal"].items():
            self._personal.put(int(client), personal)
        self.method.load_state_dict(state["method"])
        if "visits" in state:  # absent from checkpoints written before visits were counted
            self.visits = state["visits"].numpy().astype(np.int64)
        last = state["last_eval"]
        self.last_eval = None if last is None else EvalResult(
            **{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in last.items()})

    def run(self, callbacks: Sequence[Callback] = ()) -> RunResult:
        """All remaining rounds (from `round_index`, after a resume); the last one is always evaluated."""
        start = time.perf_counter()
        for cb in callbacks:
            cb.on_start(self)
        while self.round_index < self.cfg.train.rounds:
            metrics = self.run_round(callbacks)
            metrics = {"round": float(self.round_index), **metrics}
            self.history.append(metrics)
            for cb in callbacks:
                cb.on_round(self.round_index, metrics)
        if self.last_eval is None:
            self.last_eval = self.evaluate(self.training_clients)
        held_out = self.fit_and_evaluate_held_out() if self.held_out else None
        result = RunResult(self.history, self.last_eval, time.perf_counter() - start, held_out)
        for cb in callbacks:
            cb.on_end(self, result)
        return result
