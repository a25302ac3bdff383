"""The `Method` hooks every personalized-FL method may override.

A method answers three questions, and a subclass answers only those where it
differs from FedAvg (the base behaviour here):

1. Which parameters are personal?  `personal_entries` (or, name by name, `is_personal`)
2. How does a client train?        `local_phases`: a list of `Phase`s the engine runs
3. What does the server compute?   `server_init`, `broadcast`, and the streaming aggregation
                                   `start_aggregation` / `add_update` / `finish_aggregation`

Optional: `adapt_model` (add modules before training), `evaluate`,
`finetune_phases` (train on the client's own data before evaluating),
`global_view` (the one model the server holds, for `global_test_acc_mean`),
`search_space` (the method's tuning space, duck-typed over an Optuna trial),
`run_info` (numbers logged at run start), and `fit_held_out` (how a client
held out of training, `data.novel_clients`, adapts after the last round).
The engine owns data, devices, the round loop, per-client personal state and
metrics; a method never does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from ..benchmark.config import MethodConfig, TrainConfig
from ..benchmark.registry import Registry
from .aggregation import RunningWeightedMean

if TYPE_CHECKING:
    from ..datasets.base import FederatedData


@dataclass
class TrainStats:
    """The summed loss (a device tensor, so no sync per batch) over `samples` samples.

    `samples` went through a backward pass; `forward_samples` were only forwarded;
    `flops` is the training work itself (forward and backward of what ran).
    The engine sums them over a round (`train_samples`, `forward_samples`,
    `train_flops`) so that each method's compute is on record.
    """

    loss_sum: torch.Tensor
    samples: int
    forward_samples: int = 0
    flops: float = 0.0

    def __add__(self, other: TrainStats) -> TrainStats:
        return TrainStats(
            self.loss_sum + other.loss_sum, self.samples + other.samples, self.forward_samples + other.forward_samples,
            self.flops + other.flops,
        )

    def mean(self) -> float:
        return float(self.loss_sum) / max(self.samples, 1)


@dataclass
class ClientUpdate:
    """What one client returns to the server after local training."""

    client: int  # client index
    num_samples: int  # training samples it holds (the aggregation weight)
    sent: Mapping[str, torch.Tensor]  # the shared state it was sent
    params: dict[str, torch.Tensor]  # its shared state after local training


Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Penalty = Callable[[nn.Module], torch.Tensor]


class StepLoop(Protocol):
    """What the engine's batch loop lends a phase's own `step`."""

    params: dict[str, nn.Parameter]  # the phase's parameters by name (every other one is frozen)
    batch_size: int  # train.batch_size

    def autocast(self) -> ContextManager[None]:
        """The run's autocast (bf16 on CUDA), to wrap forward passes in."""
        ...

    def apply(self) -> None:
        """Clip the gradients now in the parameters' `.grad` and take the phase's optimizer step."""
        ...


# (model, x, y, loop) -> (summed loss, samples that went through a backward pass)
BatchStep = Callable[[nn.Module, torch.Tensor, torch.Tensor, StepLoop], tuple[torch.Tensor, int]]


@dataclass(frozen=True)
class Phase:
    """One stage of a client's local update, run by the engine: SGD on `params` for `epochs` passes.

    Every other parameter is frozen during the phase (no gradient is computed
    for it). `forward(model, x)` returns logits (default: `model(x)`). With
    `features`, the phase first maps the client's training images, without
    augmentation, through `features(model, x)` once (no gradient), and its
    epochs then train `forward(model, features)` on those: FedRep's head epochs
    on a frozen body cost one body pass, not one per epoch. Because a phase is
    data, the engine can run it for one client or for several clients at once.

    Two optional changes to the engine's one batch loop: `penalty(model)` is
    added to each batch's loss (Ditto's proximal term), and `step` replaces the
    per-batch step (loss, backward, optimizer step) where a method's authors
    step differently (APFL's two models, Per-FedAvg's meta step); it receives
    `batch_size * batches_per_step` samples at a time, computes its own loss
    (`forward` and `penalty` are then unused) and calls `loop.apply()` to step.
    Phases with either run one client at a time.
    """

    params: tuple[str, ...]  # names of the parameters trained in this phase
    epochs: float  # passes over the client's training data (a fraction ends part-way through one)
    forward: Forward | None = None  # logits of a batch (of features, with `features`); None = model(x)
    features: Forward | None = None  # computed once per phase from the unaugmented images; None = train on images
    penalty: Penalty | None = None  # a term added to every batch's loss; None = none
    step: BatchStep | None = None  # the per-batch step; None = SGD on the loss of forward(model, x)
    batches_per_step: int = 1  # a `step` receives batch_size * this many samples per call

    @property
    def batchable(self) -> bool:
        """True when clients can run this phase together (the batched path knows plain steps on images only)."""
        return self.penalty is None and self.step is None and self.batches_per_step == 1 and self.features is None


class LocalContext(Protocol):
    """What the engine tells a method about one client's local update."""

    client: int  # the client being trained
    round_index: int  # the current round, from 1
    final: bool  # fine-tuning only: this is the run's last evaluation (held-out clients' too)
    train: TrainConfig  # local schedule and optimizer settings
    data: FederatedData  # the client's data
    device: torch.device


def trainable_names(model: nn.Module) -> tuple[str, ...]:
    """Names of `model`'s parameters that take gradients."""
    return tuple(n for n, p in model.named_parameters() if p.requires_grad)


class ClientTrainer(Protocol):
    """The engine's one-client step, given to `Method.fit_held_out`."""

    def __call__(self, client: int, step: int, personal_only: bool = False) -> ClientUpdate:
        """Load `client`'s broadcast and personal state, run its `local_phases` on its training
        data (batches seeded by `step`, counted from 1), keep its personal state, and
        return the update. `personal_only`: the phases train only the personal parameters
        (the shared part frozen). Nothing reaches the server unless the method uses the update."""
        ...


class SearchTrial(Protocol):
    """The part of an Optuna trial a search space uses (methods never import optuna)."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...
    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int: ...
    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


# Keys that set how much every method trains: tuning never searches them unless asked to by name.
COMMON_BUDGET_KEYS = ("train.rounds", "train.local_epochs")


class Method:
    """FedAvg (McMahan et al., 2017): every parameter is shared, the server averages them."""

    name: ClassVar[str] = ""  # registry key, set by @register
    Options: ClassVar[type[MethodConfig]] = MethodConfig  # the `method.*` config section
    # The method's own options that set its compute or capacity (epochs, steps, fine-tuning length,
    # module widths): fixed by its authors' schedule, never bought by tuning.
    budget_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: MethodConfig | None = None):
        self.options = options if options is not None else self.Options(name=self.name)
        self.global_state: dict[str, torch.Tensor] = {}
        self._running: RunningWeightedMean | None = None

    @classmethod
    def budget(cls) -> tuple[str, ...]:
        """Every key that sets this method's compute: the common ones and its own `budget_keys`."""
        return COMMON_BUDGET_KEYS + tuple(k for k in cls.budget_keys if k not in COMMON_BUDGET_KEYS)

    @classmethod
    def description(cls) -> str:
        """The first line of the class docstring: shown by `bench list`."""
        lines = (cls.__doc__ or "").strip().splitlines()
        return lines[0] if lines else ""  # a plug-in without a docstring is listed all the same

    # -- 0. the model -------------------------------------------------------
    def adapt_model(self, model: nn.Module) -> nn.Module:
        """Add method-specific modules (e.g. FedPerfix's plugins) before training."""
        return model

    # -- 1. which parameters are personal ----------------------------------
    def is_personal(self, name: str, model: nn.Module) -> bool:
        """True if the state entry `name` of `model` never leaves the client."""
        return False

    def personal_entries(self, model: nn.Module) -> set[str]:
        """Every state entry of `model` that never leaves the client; the engine asks once per run.

        Override this when the set comes from the model's structure (the head,
        the norm layers); override `is_personal` for a rule on one name.
        """
        return {n for n in model.state_dict(keep_vars=True) if self.is_personal(n, model)}

    # -- 2. how a client trains ----------------------------------------------
    def local_phases(self, model: nn.Module, ctx: LocalContext) -> list[Phase]:
        """One phase: joint SGD over every trainable parameter for `train.local_epochs`."""
        return [Phase(trainable_names(model), ctx.train.local_epochs)]

    # -- 3. what the server computes ----------------------------------------
    def server_init(self, model: nn.Module, shared: Mapping[str, torch.Tensor], num_clients: int) -> None:
        """Set up server state from the initial model's shared entries."""
        self.global_state = {n: t.detach().clone() for n, t in shared.items()}

    def broadcast(self, client: int) -> Mapping[str, torch.Tensor]:
        """The shared state sent to `client` (read-only for the caller)."""
        return self.global_state

    def start_aggregation(self) -> None:
        """A round's aggregation begins; `add_update` follows once per client, as each finishes."""
        self._running = RunningWeightedMean()

    def add_update(self, update: ClientUpdate) -> None:
        """Fold one client's update in: a running sample-weighted sum of its shared state.

        The engine drops the update afterwards, so a round holds one upload at a time.
        """
        if self.global_state:
            self._running.add({n: update.params[n] for n in self.global_state}, update.num_samples)

    def finish_aggregation(self) -> None:
        """The round's clients are all in: the new server state is their sample-weighted mean."""
        running, self._running = self._running, None
        if running is not None and running.count:
            self.global_state = running.result()

    def aggregate(self, updates: Sequence[ClientUpdate]) -> None:
        """The whole round at once: the streaming hooks over `updates` in order."""
        self.start_aggregation()
        for update in updates:
            self.add_update(update)
        self.finish_aggregation()

    def global_view(self) -> Mapping[str, torch.Tensor] | None:
        """The server's complete shared state, when one model serves every client.

        The engine evaluates it on each client's test split (`global_test_acc_mean`)
        when the method keeps nothing personal; a method whose server generates a
        different state per client returns None.
        """
        return self.global_state

    def finetune_phases(self, model: nn.Module, ctx: LocalContext) -> list[Phase]:
        """Phases each client trains from its loaded model on its own training split
        before its personalized evaluation (none = evaluate as loaded).

        `ctx.final` tells the run's last evaluation from an intermediate one. The
        fine-tuned weights are evaluated and dropped: they reach neither the
        server nor the client's next round.
        """
        return []

    # -- checkpoints ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The server state a checkpoint keeps: plain dicts and lists of tensors and numbers.

        A method whose server holds more than `global_state` (models, optimizers)
        overrides this pair; a checkpoint is loaded with `weights_only=True`.
        """
        return {"global_state": {n: t.detach().clone() for n, t in self.global_state.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned; called after `server_init` on an identical set-up."""
        self.global_state = _restore_tensors(self.global_state, state["global_state"], "global_state")

    # -- optional -------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[int | torch.Tensor, int]:
        """(correct, total) of the loaded personalized model on the given batches.

        `correct` may stay a 0-dim tensor on the device: the engine reads every
        client's count in one transfer at the end of the evaluation.
        """
        correct = torch.zeros((), dtype=torch.long)
        total = 0
        for x, y in batches:
            correct = correct.to(y.device) + (model(x).argmax(dim=1) == y).sum()
            total += len(y)
        return correct, total

    @classmethod
    def search_space(cls, trial: SearchTrial) -> dict[str, Any]:
        """`{"method.key": value}` suggestions for this method's own options."""
        return {}

    def run_info(self) -> dict[str, int | float | str]:
        """Numbers worth recording at run start (e.g. the size of server-side models)."""
        return {}

    # -- held-out (novel) clients ----------------------------------------------
    def fit_held_out(self, clients: Sequence[int], train_client: ClientTrainer) -> None:
        """How clients held out of training (`data.novel_clients`) adapt after the last round.

        Default: the way the method personalizes. Each client trains its personal
        part on its own training split with the shared part frozen, as its
        `local_phases` train it (one local update); with nothing personal
        (FedAvg) nothing is trained. The engine then evaluates them, running
        `finetune_phases` first (`ctx.final` is True). Nothing here may reach
        the server's aggregate.
        """
        for client in clients:
            train_client(client, 1, personal_only=True)


def _restore_tensors(current: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor],
                     what: str) -> dict[str, torch.Tensor]:
    """`saved` checked against `current` (names, shapes, dtypes) and moved to its devices."""
    if set(saved) != set(current):
        raise ValueError(f"{what}: the saved entries differ from this model's")
    out = {}
    for name, value in current.items():
        loaded = saved[name]
        if loaded.shape != value.shape or loaded.dtype != value.dtype:
            raise ValueError(f"{what}: {name} is {tuple(loaded.shape)} {loaded.dtype}, expected "
                             f"{tuple(value.shape)} {value.dtype}")
        out[name] = loaded.to(value.device)
    return out


def _adopt_method(name: str, obj: object) -> None:
    """A plug-in's entry point naming a Method subclass it did not register: register it under that name."""
    if isinstance(obj, type) and issubclass(obj, Method):
        register(name)(obj)


# Installed packages add methods through the entry-point group `pflbench.methods` (README: Add your own method).
METHODS: Registry[type[Method]] = Registry("method", group="pflbench.methods", adopt=_adopt_method)


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a Method subclass as `name` (once)."""

    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.add(name, cls)

    return wrap
