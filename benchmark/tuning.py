"""`bench tune`: a seeded TPE study on validation data; the only module that imports optuna.

One trial = one run of stage `tune`, evaluated only on the clients'
validation splits (the engine never reads the test split in this stage).
Each evaluation round reports `val_acc_mean` to the trial so the pruner can
stop it; the objective is the last round's `val_acc_mean`.

The search space is the same for every method: the common training knobs
(`COMMON_SPACE`) plus the method's own `search_space`; keys fixed with `--set`
are left out of it. The resolved defaults are enqueued as trial 0.

Storage: an Optuna journal file beside the MLflow store by default (several
processes on one machine), or an RDB URL (`postgresql://...`) shared by
machines, with heartbeats so a dead worker's trial is failed and retried.
The study counts finished, pruned, running and waiting trials (and diverged
ones) towards `--trials`: rerunning the command tops the study up to N.
A trial that raises (out of memory, a bug) is failed with the error's first
line on the trial and its MLflow run; the others go on, and the command
exits with status 1 at the end. `--workers K` gives worker i the i-th entry,
modulo the list, of CUDA_VISIBLE_DEVICES (or of the GPUs when it is unset).

MLflow: one parent run per study (its id is kept in the study), one child run
per trial, the best config as `best_config.toml` on the parent.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from ..datasets import DATASETS
from ..methods import METHODS
from .config import RunConfig, config_hash, to_toml
from .device import check_workers, worker_devices
from .engine import Callback
from .errors import RunStopped, TrainingDiverged, UserError, error_summary
from .resolve import RunSpec
from .experiment import Recording, run_experiment
from .records import Artifact, Stage, Tag
from .tracking import ParentRun, default_tracking_uri

STAGE = Stage.TUNE
PRUNERS = ("median", "hyperband", "none")
PARENT_ATTR = "pflbench.parent_run_id"
CLAIM_SUFFIX = ".parent-claim"  # a study whose creation elects the worker that makes the MLflow parent
DIVERGED_ATTR = "pflbench.diverged"
ERROR_ATTR = "pflbench.error"  # a trial that raised: the error's one-line summary
WORKER_ATTR = "pflbench.worker"
RUN_ATTR = "pflbench.run_id"
OVER_ATTR = "pflbench.over_budget"  # a trial two workers started at once past --trials: closed unrun
HEARTBEAT_SECONDS = 10  # RDB storage: a trial without a heartbeat for GRACE_SECONDS is stale
GRACE_SECONDS = 60

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Heartbeats and the retry callback are "experimental" in Optuna 5; they are the documented way to recover.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def common_space(trial: Any) -> dict[str, Any]:
    """The knobs every method is tuned over (`train.*`), with the same ranges for all."""
    return {
        "train.lr": trial.suggest_float("train.lr", 1e-3, 0.3, log=True),
        "train.local_epochs": trial.suggest_int("train.local_epochs", 1, 5),
        "train.momentum": trial.suggest_categorical("train.momentum", [0.0, 0.5, 0.9]),
        "train.weight_decay": trial.suggest_categorical("train.weight_decay", [0.0, 1e-4, 1e-3]),
        "train.batch_size": trial.suggest_categorical("train.batch_size", [16, 32, 64]),
    }


def startup_trials(trials: int) -> int:
    """TPE's random start: about a third of the budget, at least 2, so most trials are TPE's own."""
    return max(2, round(trials / 3))


def budget_keys(method: str, opted_in: Sequence[str] = ()) -> set[str]:
    """The keys tuning leaves out for `method`: its budget (`Method.budget`) less those named with
    `--search-budget`; a named key that is not in its budget, or that no space searches, is refused."""
    budget = set(METHODS.get(method).budget())
    probe = _Probe()
    suggest(probe, method, set())
    for key in opted_in:
        if key not in budget:
            raise UserError(f"bad --search-budget {key!r}: not a budget key of {method};"
                            f" its budget keys are: {', '.join(sorted(budget))}")
        if key not in probe.ranges:
            raise UserError(f"bad --search-budget {key!r}: no search space of {method} has a range for it")
    return budget - set(opted_in)


class _Skip:
    """Wraps a trial: names in `fixed` are not suggested (the caller drops their None)."""

    def __init__(self, trial: Any, fixed: set[str]):
        self.trial, self.fixed = trial, fixed

    def suggest_float(self, name, low, high, *, log=False):
        return None if name in self.fixed else self.trial.suggest_float(name, low, high, log=log)

    def suggest_int(self, name, low, high, *, log=False):
        return None if name in self.fixed else self.trial.suggest_int(name, low, high, log=log)

    def suggest_categorical(self, name, choices):
        return None if name in self.fixed else self.trial.suggest_categorical(name, choices)


class _Probe:
    """A stand-in trial that records each suggestion's name and range (to enqueue the defaults)."""

    def __init__(self):
        self.ranges: dict[str, tuple[str, Any]] = {}

    def suggest_float(self, name, low, high, *, log=False):
        self.ranges[name] = ("range", (low, high))
        return low

    suggest_int = suggest_float

    def suggest_categorical(self, name, choices):
        self.ranges[name] = ("choices", tuple(choices))
        return choices[0]


def suggest(trial: Any, method: str, fixed: set[str]) -> dict[str, Any]:
    """A trial's settings: the common knobs, then the method's own; keys in `fixed` (the keys set
    with `--set` and the budget, see `budget_keys`) left out."""
    skip = _Skip(trial, fixed)
    chosen = {**common_space(skip), **METHODS.get(method).search_space(skip)}
    return {k: v for k, v in chosen.items() if v is not None}


def default_params(cfg: RunConfig, fixed: set[str]) -> dict[str, Any]:
    """The resolved config's values of the searched keys that lie inside their ranges (trial 0)."""
    probe = _Probe()
    suggest(probe, cfg.method.name, fixed)
    out = {}
    for key, (kind, spec) in probe.ranges.items():
        if key in fixed:
            continue
        section, name = key.split(".", 1)
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, list):  # a list option is searched as its comma-joined form
            value = ",".join(value)
        inside = value in spec if kind == "choices" else spec[0] <= value <= spec[1]
        if inside:
            out[key] = value
    return out


def _fixed_keys(spec: RunSpec) -> set[str]:
    return {o.partition("=")[0].strip() for o in spec.overrides}


def _as_override(key: str, value: Any) -> str:
    return f"{key}={'true' if value is True else 'false' if value is False else value}"


# ---------------------------------------------------------------------------
# Storage


def default_storage(tracking_uri: str) -> str:
    """The journal file beside a local MLflow store (else in the working directory)."""
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///"):]).parent
    else:
        folder = Path.cwd()
    return f"journal:///{(folder / 'optuna-journal.log').resolve()}"


def open_storage(url: str, create: bool = True) -> optuna.storages.BaseStorage | None:
    """A journal file (`journal:///PATH` or a plain path) or an RDB store (postgresql, mysql, sqlite).

    `create=False` only checks: a journal file that does not exist yet is not made (None).
    """
    if url.startswith("journal:///") or "://" not in url:
        path = Path(url[len("journal://"):] if url.startswith("journal:///") else url)
        if not path.parent.is_dir():
            raise UserError(f"bad --storage {url!r}: folder {path.parent} does not exist")
        if path.is_dir():
            raise UserError(f"bad --storage {url!r}: {path} is a folder; give a journal file's path")
        if path.exists():
            _check_journal(path, url)
        elif not create:
            return None
        return JournalStorage(JournalFileBackend(str(path)))
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme not in ("postgresql", "mysql", "sqlite"):
        raise UserError(f"unknown storage scheme {scheme!r} in --storage; use postgresql://USER@HOST/DB, "
                        "sqlite:///PATH, or journal:///PATH (the default is a journal file beside the MLflow store)")
    if scheme == "sqlite" and not create and not Path(url.split(":///", 1)[-1]).exists():
        return None
    # Workers starting together on a fresh database race to create Optuna's tables: the loser retries.
    for attempt in range(3):
        try:
            return RDBStorage(
                url, engine_kwargs={"pool_pre_ping": True} if scheme != "sqlite" else None,
                heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
            )
        except Exception as err:  # sqlalchemy's OperationalError, a missing driver, a bad URL
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            time.sleep(0.5 + attempt)
    safe = url.split("@")[-1] if "@" in url else url
    raise UserError(f"cannot open study storage {scheme}://...{safe}: {first}") from None


def _check_journal(path: Path, url: str) -> None:
    """Refuse a file that is not an Optuna journal (Optuna itself fails on it only mid-study)."""
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    break  # a last entry cut short by a crash: Optuna skips it
                try:
                    entry = json.loads(line)
                except ValueError:  # not JSON, or not UTF-8
                    entry = None
                if not isinstance(entry, dict) or "op_code" not in entry:
                    raise UserError(f"bad --storage {url!r}: not an Optuna journal file (line {number} is not a"
                                    " journal entry); give another path")
    except OSError as err:
        raise UserError(f"bad --storage {url!r}: {err.strerror}") from None


def _pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"unknown pruner {name!r}; choose one of: {', '.join(PRUNERS)}")


def _counted(t: optuna.trial.FrozenTrial) -> bool:
    """Trials that used up budget: started ones, but not the failures of a dead worker (diverged and errored count).

    A WAITING trial (trial 0's defaults, a stale trial's retry) is not counted: it is run within the budget.
    """
    if t.state == TrialState.WAITING or t.user_attrs.get(OVER_ATTR):
        return False
    return t.state != TrialState.FAIL or bool(t.user_attrs.get(DIVERGED_ATTR) or t.user_attrs.get(ERROR_ATTR))


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _fail_dead_local_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> int:
    """Journal store: fail RUNNING trials whose worker process on this machine is gone."""
    host, failed = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(t.user_attrs.get(WORKER_ATTR, ""))
        name, _, pid = owner.rpartition(":")
        if name != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)  # FrozenTrial has no public id
            failed += 1
        except PermissionError:
            pass  # alive, someone else's
    return failed


# ---------------------------------------------------------------------------
# The study


@dataclass(frozen=True)
class TuneRequest:
    """Everything `bench tune` was asked for; plain values, so workers receive it as JSON."""

    method: str
    dataset: str
    spec: RunSpec
    trials: int  # the study's target number of trials (a rerun tops it up)
    storage: str | None = None  # None = the journal file beside the MLflow store
    study: str | None = None  # None = "<method>-<dataset>-<config hash>"
    pruner: str = "median"
    timeout: float | None = None  # seconds for this command's trials; None = no limit
    workers: int = 1  # worker processes on this machine
    search_budget: tuple[str, ...] = ()  # budget keys searched all the same (`--search-budget`)
    tracking_uri: str | None = None
    experiment: str = "pflbench"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TuneRequest:
        data = json.loads(text)
        return cls(**{**data, "spec": RunSpec(**data["spec"]), "search_budget": tuple(data["search_budget"])})


def check_request(req: TuneRequest) -> set[str]:
    """Refuse a request that cannot run or would do nothing useful, before any work; the fixed keys."""
    if req.trials < 1:
        raise UserError(f"bad --trials {req.trials}: must be >= 1")
    check_workers(req.workers)
    if req.timeout is not None and not (math.isfinite(req.timeout) and req.timeout > 0):
        raise UserError(f"bad --timeout {req.timeout}: must be a finite number of seconds > 0")
    if req.study is not None:
        name = req.study
        if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise UserError(f"bad --study {name!r}: it names a file (NAME.best_config.toml), so it cannot be"
                            " empty or hold '/' or '\\'")
    fixed = _fixed_keys(req.spec) | budget_keys(req.method, req.search_budget)
    probe = _Probe()
    suggest(probe, req.method, set())
    if not set(probe.ranges) - fixed:
        raise UserError(f"nothing to tune: every key searched for {req.method} ({', '.join(sorted(probe.ranges))})"
                        " is fixed by --set or as a budget key; drop a --set")
    # A bad storage is refused now, creating nothing.
    open_storage(req.storage or default_storage(req.tracking_uri or default_tracking_uri()), create=False)
    return fixed


@dataclass
class TrialRow:
    """One trial as the live table shows it."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    value: float | None  # final val_acc_mean
    params: dict[str, Any]
    worker: str
    run_id: str
    error: str = ""  # the one-line error of a trial that raised


@dataclass
class TuneResult:
    """A study's outcome after this command."""

    study: str
    storage: str
    trials: list[TrialRow]
    best: TrialRow | None
    best_config: str  # TOML; `bench run --config` accepts it
    best_config_path: Path | None
    parent_run_id: str
    run_command: str = ""
    ran_here: int = 0  # trials started by this command
    per_worker: dict[str, int] = field(default_factory=dict)
    default: TrialRow | None = None  # trial 0 (the defaults), when it completed: how far tuning moved
    errors: list[TrialRow] = field(default_factory=list)  # trials of this command that raised (exit status 1)

    @property
    def gain(self) -> float | None:
        """Best val_acc_mean minus the defaults' (trial 0's)."""
        if self.best is None or self.default is None:
            return None
        return self.best.value - self.default.value


def _rows(study: optuna.Study) -> list[TrialRow]:
    return [TrialRow(t.number, t.state.name, t.value, dict(t.params), str(t.user_attrs.get(WORKER_ATTR, "")),
                     str(t.user_attrs.get(RUN_ATTR, "")), str(t.user_attrs.get(ERROR_ATTR, "")))
            for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(OVER_ATTR)]


class _Report(Callback):
    """Reports each evaluation's val_acc_mean to the trial; stops the run when the pruner says so."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_round(self, round_index: int, metrics: Mapping[str, float]) -> None:
        value = metrics.get("val_acc_mean", math.nan)
        if math.isnan(value):
            return
        self.trial.report(value, round_index)
        if self.trial.should_prune():
            raise RunStopped("pruned", round_index)


class _Study:
    """A loaded study with what its trials need: base settings, images, MLflow parent."""

    def __init__(self, req: TuneRequest, parent_run_id: str | None = None):
        self.req = req
        self.tracking_uri = req.tracking_uri or default_tracking_uri()
        self.base = req.spec.resolve(req.method, req.dataset)
        if self.base.data.val_fraction <= 0:
            raise UserError("tuning needs validation data but data.val_fraction is 0; "
                            "set it, e.g. --set data.val_fraction=0.15")
        self.fixed = check_request(req)
        self.name = req.study or f"{req.method}-{req.dataset}-{config_hash(self.base)[:8]}"
        self.storage_url = req.storage or default_storage(self.tracking_uri)
        self.storage = open_storage(self.storage_url)
        pruner = _pruner(req.pruner)
        # One worker alone is reproducible; parallel workers get distinct streams (their order is not).
        seed = self.base.seed if req.workers == 1 and req.storage is None else \
            int(np.random.SeedSequence([self.base.seed, os.getpid()]).generate_state(1)[0])
        self.study = optuna.create_study(
            study_name=self.name, storage=self.storage, direction="maximize", load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(req.trials)), pruner=pruner,
        )
        self.parent_run_id = parent_run_id
        self._images = None

    # -- the MLflow parent, shared by every worker of the study ------------------
    def claim_parent(self) -> ParentRun:
        """The study's parent run: reopened when the study has one, else created (and trial 0 enqueued)."""
        known = self.study.user_attrs.get(PARENT_ATTR)
        common = dict(experiment=self.req.experiment, run_name=f"tune-{self.name}", stage=STAGE,
                      tags={Tag.STUDY: self.name, Tag.METHOD: self.req.method, Tag.DATASET: self.req.dataset})
        if known:
            return ParentRun(self.tracking_uri, run_id=known, **common)
        # Creating a study is atomic in every storage: the worker that creates the claim study makes the parent.
        try:
            optuna.create_study(study_name=self.name + CLAIM_SUFFIX, storage=self.storage)
        except optuna.exceptions.DuplicatedStudyError:
            return ParentRun(self.tracking_uri, run_id=self._wait_for_parent(), **common)
        mine = ParentRun(self.tracking_uri, params={"trials": self.req.trials, "pruner": self.req.pruner,
                                                    "storage": self.storage_url.split("@")[-1]}, **common)
        mine.__enter__()
        defaults = default_params(self.base, self.fixed)
        if defaults and not self.study.trials:
            self.study.enqueue_trial(defaults)
        self.study.set_user_attr(PARENT_ATTR, mine.run_id)
        return mine

    def _wait_for_parent(self, seconds: float = 120.0) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = optuna.load_study(study_name=self.name, storage=self.storage).user_attrs.get(PARENT_ATTR)
            if found:
                return found
            time.sleep(0.5)
        raise UserError(f"study {self.name!r}: the worker that started it never recorded its MLflow parent run;"
                        f" delete the study {self.name + CLAIM_SUFFIX!r} from the storage and rerun")

    # -- trials ----------------------------------------------------------------------
    def images(self):
        if self._images is None:
            self._images = DATASETS.get(self.base.dataset.name).load(self.base.dataset)
        return self._images

    def objective(self, trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, _worker_id())
        # Two workers may each start a trial when one was left: the budget goes by trial number, so
        # the later one is closed at once, without training or an MLflow run, and not counted.
        earlier = [t for t in self.study.get_trials(deepcopy=False) if t.number < trial.number and _counted(t)]
        if len(earlier) >= self.req.trials:
            trial.set_user_attr(OVER_ATTR, True)
            self.study.stop()
            raise optuna.TrialPruned()
        params = suggest(trial, self.req.method, self.fixed)
        spec = self.req.spec.with_overrides(*(_as_override(k, v) for k, v in params.items()))
        recording = Recording(self.tracking_uri, self.req.experiment, stage=STAGE,
                              run_name=f"{self.name}-t{trial.number}", parent_run_id=self.parent_run_id,
                              tags={Tag.STUDY: self.name, Tag.TRIAL: str(trial.number)})

        class _Link(Callback):
            def __init__(self, recorder):
                self.recorder = recorder

            def on_start(self, sim) -> None:
                trial.set_user_attr(RUN_ATTR, self.recorder.run_id)

        try:
            result = run_experiment(spec, self.req.method, self.req.dataset, recording=recording,
                                    images=self.images(), eval_splits=("val",),
                                    callbacks=lambda sim, recorder: [_Link(recorder), _Report(trial)]).result
        except RunStopped:
            raise optuna.TrialPruned() from None
        except TrainingDiverged:
            trial.set_user_attr(DIVERGED_ATTR, True)
            raise
        except Exception as err:  # the run is already FAILED with this tag; the trial fails, the study goes on
            trial.set_user_attr(ERROR_ATTR, error_summary(err))
            raise
        return result.final.metrics()["val_acc_mean"]

    def remaining(self) -> int:
        return self.req.trials - sum(_counted(t) for t in self.study.get_trials(deepcopy=False))

    def optimize(self, on_trial: Callable[[list[TrialRow]], None] | None = None) -> None:
        """Run trials in this process until the study holds `trials` of them (or the timeout)."""
        target = self.req.trials

        def stop_at_target(study: optuna.Study, _trial) -> None:
            if sum(_counted(t) for t in study.get_trials(deepcopy=False)) >= target:
                study.stop()
            if on_trial is not None:
                on_trial(_rows(study))

        left = self.remaining()
        if left > 0:
            self.study.optimize(self.objective, n_trials=left, timeout=self.req.timeout,
                                callbacks=[stop_at_target], catch=(Exception,))


def run_tune(req: TuneRequest, on_update: Callable[[list[TrialRow]], None] | None = None) -> TuneResult:
    """Create or resume the study, run its remaining trials (in `req.workers` processes), log the best."""
    st = _Study(req)
    if isinstance(st.storage, JournalStorage):
        _fail_dead_local_trials(st.study, st.storage)
    before = {t.number for t in st.study.get_trials(deepcopy=False)}
    with st.claim_parent() as parent:
        st.parent_run_id = parent.run_id
        if req.workers == 1:
            st.optimize(on_update)
        else:
            _run_workers(st, on_update)
        rows = _rows(st.study)
        done = [r for r in rows if r.state == "COMPLETE" and r.value is not None]
        best = max(done, key=lambda r: (r.value, -r.number)) if done else None
        default = next((r for r in done if r.number == 0), None)  # trial 0 runs the defaults
        best_config, path = "", None
        if best is not None:
            spec = req.spec.with_overrides(*(_as_override(k, v) for k, v in best.params.items()))
            best_config = to_toml(spec.resolve(req.method, req.dataset))
            parent.log_text(best_config, Artifact.BEST_CONFIG)
            moved = {"default_val_acc_mean": default.value, "tuning_gain": best.value - default.value} \
                if default is not None else {}
            parent.log_metrics({"best_val_acc_mean": best.value, "trials": len(rows), **moved})
            parent.set_tags({Tag.BEST_TRIAL: best.number, Tag.BEST_RUN_ID: best.run_id})
            path = Path(f"{st.name}.best_config.toml").resolve()
            path.write_text(best_config)
    per_worker: dict[str, int] = {}
    for r in rows:
        if r.number not in before and r.worker:
            per_worker[r.worker] = per_worker.get(r.worker, 0) + 1
    command = (f"bench run --method {req.method} --dataset {req.dataset} --config {path.name}" if path else "")
    errors = [r for r in rows if r.number not in before and r.error]
    return TuneResult(st.name, st.storage_url, rows, best, best_config, path, parent.run_id or "", command,
                      sum(1 for r in rows if r.number not in before), dict(sorted(per_worker.items())), default, errors)


def worker_environments(k: int) -> list[dict[str, str]]:
    """The environment of each of `k` worker processes: its own GPU where there are GPUs, a share of the threads."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // k)))
    devices = worker_devices(k)
    if devices is None:
        return [dict(env) for _ in range(k)]
    return [{**env, "CUDA_VISIBLE_DEVICES": device} for device in devices]


def _run_workers(st: _Study, on_update) -> None:
    """K worker processes on this machine, one GPU or a share of the CPU threads each; poll the study meanwhile."""
    k = st.req.workers
    req = dataclasses.replace(st.req, workers=1, storage=st.storage_url, study=st.name,
                              tracking_uri=st.tracking_uri)
    payload = json.dumps({"request": json.loads(req.to_json()), "parent": st.parent_run_id})
    procs = [subprocess.Popen([sys.executable, "-m", "pflbench.benchmark.tuning", payload], env=env)
             for env in worker_environments(k)]
    seen = None
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(1.0)
            rows = _rows(optuna.load_study(study_name=st.name, storage=st.storage))
            if on_update is not None and rows != seen:
                on_update(rows)
                seen = rows
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            p.wait()
    failed = [p.returncode for p in procs if p.returncode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} tuning worker(s) exited with status {failed}")
    st.study = optuna.load_study(study_name=st.name, storage=st.storage)


def _worker_main(argv: Sequence[str]) -> int:
    """Entry point of a worker process started by `--workers K`."""
    import torch

    data = json.loads(argv[0])
    req = TuneRequest.from_json(json.dumps(data["request"]))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    st = _Study(req, parent_run_id=data["parent"])
    st.optimize()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
