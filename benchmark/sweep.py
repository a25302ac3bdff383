"""`bench sweep SUITE.toml`: the final runs behind a leaderboard (datasets x methods x seeds).

A suite file:

    experiment = "leaderboard"        # MLflow experiment of the runs (default: --experiment)
    seeds = [0, 1, 2]                 # default [0, 1, 2]
    methods = ["fedavg", "fedper"]    # default: every registered method

    [[run]]                           # one table per dataset setting
    dataset = "digits"
    preset = "demo"                   # default: the dataset's own preset
    overrides = ["train.rounds=10"]   # `--set` settings, applied last
    best_of = "{method}-digits"       # optional: start from the best config of this tuning study
    methods = ["fedavg"]              # optional: this setting's methods
    data_root = "/data"               # optional

Runs are stage `final` (test split). A run whose (config hash, seed) already
FINISHED in the experiment is skipped; a run left unfinished by a killed sweep
(SIGKILL, SIGTERM, a lost node) is continued from its checkpoint in the same
MLflow run. Each run is claimed before it starts (see claims.py), so sweeps on
several machines sharing one store never run a (config hash, seed) twice; a
sweep ends when every run of its suite (or `shard`) has finished or failed,
waiting for those held by other processes and taking over any whose holder
dies. `shard=(i, n)` keeps the i-th of n parts (0 <= i < n) of the suite:
every n-th run, starting at the i-th, in the suite's order.
With `workers` > 1 the runs go to that many processes: one GPU each (worker
i gets the i-th entry, modulo the list, of the parent's CUDA_VISIBLE_DEVICES,
or of `range(device_count)` when it is unset) when there are GPUs, the CPU
threads split otherwise. A run that raises anything (an out-of-memory error
too) is recorded FAILED with the error as a tag; the other runs go on.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import tomllib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..methods import METHODS
from .config import config_hash
from .device import check_workers, worker_devices
from .errors import TrainingDiverged, UserError, error_summary
from .records import Artifact, Stage, Tag
from .resolve import RunSpec
from .tracking import default_tracking_uri, ensure_experiment, find_runs, read_text_artifact

STAGE = Stage.FINAL
DEFAULT_SEEDS = (0, 1, 2)
_RUN_KEYS = {"dataset", "preset", "overrides", "best_of", "methods", "data_root"}
_TOP_KEYS = {"description", "experiment", "seeds", "methods", "run", "tune_experiment"}


@dataclass
class SweepItem:
    """One run of the suite and what became of it."""

    method: str
    dataset: str
    seed: int
    spec: RunSpec
    config_hash: str
    status: str = "pending"  # pending, skipped (finished before), finished (here), elsewhere (by another), failed
    resumed: bool = False  # continued from a checkpoint of an unfinished run
    registered: bool = True  # False: a plan's run of a method not registered here (resolved as the plain model)
    run_id: str | None = None
    test_acc_mean: float | None = None
    error: str = ""
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags: the tuning study it started from


@dataclass
class Suite:
    """A parsed suite file."""

    path: Path
    experiment: str | None
    items: list[SweepItem] = field(default_factory=list)


def _list(value: Any, key: str, kind: type) -> list:
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise UserError(f"suite key {key!r} must be a list of {kind.__name__}s")
    return value


def _nonempty(values: list, key: str) -> list:
    if not values:
        raise UserError(f"suite key {key!r} is empty: nothing would run; list at least one")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise UserError(f"suite key {key!r} lists {twice[0]!r} twice")
    return values


def _best_config(tracking_uri: str, experiment: str, study: str, folder: Path) -> tuple[str, str]:
    """The `best_config.toml` of a tuning study's parent run, saved under `folder`: its path and that run's id."""
    parents = [r for r in find_runs(tracking_uri, experiment, stage=Stage.TUNE, status=None,
                                    tags={Tag.STUDY: study}) if Tag.PARENT not in r.tags]
    for parent in reversed(parents):
        text = read_text_artifact(tracking_uri, parent.run_id, Artifact.BEST_CONFIG)
        if text is not None:
            path = folder / f"{study}.toml"
            path.write_text(text)
            return str(path), parent.run_id
    raise UserError(f"best_of: no best config of tuning study {study!r} in experiment {experiment!r};"
                    f" run `bench tune ... --study {study}` first")


def load_suite(path: str | Path, *, tracking_uri: str, experiment: str, config_folder: Path,
               data_root: str | None = None, allow_unregistered: bool = False, best_of: str | None = None) -> Suite:
    """Parse and resolve every run of a suite (a bad name or key fails here, before anything runs).

    `allow_unregistered` (for a plan): a method this install does not register is kept, its runs
    resolved as the plain model (`registered` False), instead of refused. `best_of` replaces every
    run's own `best_of` study pattern.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"suite file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"suite file {path} is not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise UserError(f"suite file {path} is not UTF-8 text (TOML files are UTF-8)") from None
    except OSError as err:
        raise UserError(f"cannot read suite file {path}: {err.strerror}") from None
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise UserError(f"unknown suite key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    seeds = _nonempty(_list(data.get("seeds", list(DEFAULT_SEEDS)), "seeds", int), "seeds")
    methods = _nonempty(_list(data.get("methods", METHODS.names()), "methods", str), "methods")
    for key in ("experiment", "tune_experiment"):
        if not isinstance(data.get(key, ""), str):
            raise UserError(f"suite key {key!r} must be a string (an MLflow experiment name)")
    runs = data.get("run", [])
    if not isinstance(runs, list) or not runs:
        raise UserError(f"suite file {path} has no [[run]] table (one per dataset setting)")
    seen: dict[tuple[str, str, str, int], str] = {}  # (method, dataset, config hash, seed) -> where it is
    suite = Suite(path, data.get("experiment"))
    tune_experiment = str(data.get("tune_experiment", suite.experiment or experiment))
    for i, run in enumerate(runs):
        where = f"[[run]] #{i + 1}"
        if not isinstance(run, dict):
            raise UserError(f"{where} is {run!r}, not a table; write each as [[run]] with dataset = ...")
        unknown = set(run) - _RUN_KEYS
        if unknown:
            raise UserError(f"unknown key {sorted(unknown)[0]!r} in {where}; allowed: {', '.join(sorted(_RUN_KEYS))}")
        if "dataset" not in run:
            raise UserError(f"{where} names no dataset")
        dataset = str(run["dataset"])
        overrides = tuple(_list(run.get("overrides", []), "overrides", str))
        for method in _nonempty(_list(run.get("methods", methods), "methods", str), "methods"):
            registered = method in METHODS.names()
            if not (registered or allow_unregistered):
                METHODS.get(method)  # an unknown name lists the valid ones
            config_file, tags = None, {}
            pattern = best_of or run.get("best_of")
            if pattern:
                study = str(pattern).format(method=method, dataset=dataset)
                config_file, parent = _best_config(tracking_uri, tune_experiment, study, config_folder)
                tags = {Tag.TUNED_BY: study, Tag.TUNED_RUN: parent}  # the leaderboard's evidence names the study
            for seed in seeds:
                spec = RunSpec(preset=run.get("preset"), config_file=config_file, overrides=overrides, seed=seed,
                               data_root=run.get("data_root", data_root))
                cfg = spec.resolve(method if registered else "fedavg", dataset)
                key = (method, dataset, config_hash(cfg), seed)
                if key in seen:  # the same run twice would be recorded twice and counted twice
                    raise UserError(f"{where} repeats {seen[key]}: {method} on {dataset}, seed {seed}, the same"
                                    " settings; remove one")
                seen[key] = where
                suite.items.append(SweepItem(method, dataset, seed, spec, config_hash(cfg), registered=registered,
                                             tags=tags))
    return suite


def skip_finished(suite: Suite, tracking_uri: str, experiment: str) -> list[SweepItem]:
    """Mark the items whose (config hash, seed) already FINISHED in `experiment` skipped; the rest, to run."""
    done = {(r.tags.get(Tag.CONFIG_HASH), r.tags.get(Tag.SEED))
            for r in find_runs(tracking_uri, experiment, stage=STAGE)}
    todo = []
    for item in suite.items:
        if item.registered and (item.config_hash, str(item.seed)) in done:
            item.status = "skipped"
        else:
            todo.append(item)
    return todo


def _run_one(method: str, dataset: str, spec: RunSpec, config_hash: str, tracking_uri: str, experiment: str,
             timeout: float, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Claim one final run and run (or continue) it, recorded in MLflow with the extra `tags`; used in this
    process or in a worker."""
    from .claims import claim, heartbeat_interval
    from .experiment import Recording, run_experiment

    key = {Tag.STAGE: STAGE, Tag.CONFIG_HASH: config_hash, Tag.SEED: str(spec.seed)}
    got = claim(tracking_uri, experiment, key, timeout=timeout, tags={Tag.METHOD: method, Tag.DATASET: dataset})
    if got.kind in ("finished", "elsewhere"):  # run by another process, or held by one now
        return {"status": "elsewhere" if got.kind == "finished" else "held", "run_id": got.run_id}
    resume = got.run_id if got.kind == "resume" else None
    try:
        done = run_experiment(spec, method, dataset,
                              recording=Recording(tracking_uri, experiment, stage=STAGE, tags=dict(tags or {})),
                              resume=resume, claimed_run_id=got.run_id if resume is None else None,
                              heartbeat=heartbeat_interval(timeout))
    except TrainingDiverged as err:
        return {"status": "failed", "run_id": got.run_id, "error": str(err)}
    except UserError:
        raise
    except Exception as err:  # one run's failure (out of memory, a bug) must not stop the others
        return {"status": "failed", "run_id": got.run_id, "error": error_summary(err)}
    return {"status": "finished", "run_id": done.run_id, "resumed": resume is not None,
            "test_acc_mean": done.result.final.metrics()["test_acc_mean"]}


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (0 <= I < N, 0-based like Slurm's `--array=0-(N-1)` ids and Kubernetes' completion index)."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise UserError(f"bad --shard {text!r}: expected I/N with 0 <= I < N (0-based), e.g. 0/4;"
                        " with Slurm: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT and --array=0-(N-1)")
    return i, n


def _init_worker(devices, threads: int) -> None:
    """Pin a worker process to one GPU (when there are GPUs) or to its share of the CPU threads."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())
    import torch

    torch.set_num_threads(threads)


def run_sweep(
    suite_path: str | Path, *, workers: int = 1, tracking_uri: str | None = None, experiment: str = "pflbench",
    data_root: str | None = None, best_of: str | None = None, shard: tuple[int, int] | None = None,
    heartbeat_timeout: float | None = None,
    on_start: Callable[[int, int], None] | None = None, on_item: Callable[[SweepItem], None] | None = None,
) -> Suite:
    """Run every item of the suite not yet FINISHED; `on_start(total, skipped)`, then `on_item` per run.

    `data_root` applies to the suite's runs that set none of their own; `best_of` (a study name
    pattern with {method} and {dataset}) starts every run from that study's best config; `shard`
    (i, n) keeps the i-th of n parts; `heartbeat_timeout` (seconds) is how old a claim's heartbeat
    may be before the run is taken over (`claims.HEARTBEAT_TIMEOUT` by default).
    """
    from .claims import HEARTBEAT_TIMEOUT, failed, heartbeat_interval

    check_workers(workers)
    timeout = HEARTBEAT_TIMEOUT if heartbeat_timeout is None else heartbeat_timeout
    if not timeout > 0:
        raise UserError(f"bad --heartbeat-timeout {timeout}: must be > 0 seconds")
    uri = tracking_uri or default_tracking_uri()
    with tempfile.TemporaryDirectory() as tmp:
        suite = load_suite(suite_path, tracking_uri=uri, experiment=experiment, config_folder=Path(tmp),
                           data_root=data_root, best_of=best_of)
        if shard is not None:
            suite.items = suite.items[shard[0]::shard[1]]
        exp = suite.experiment or experiment
        todo = skip_finished(suite, uri, exp)
        if on_start is not None:
            on_start(len(suite.items), len(suite.items) - len(todo))
        held: list[SweepItem] = []

        def finish(item: SweepItem, outcome: dict[str, Any]) -> None:
            item.status = outcome["status"]
            item.run_id = outcome.get("run_id")
            item.resumed = outcome.get("resumed", False)
            item.test_acc_mean = outcome.get("test_acc_mean")
            item.error = outcome.get("error", "")
            if item.status == "held":  # another process runs it: wait for it below
                held.append(item)
            elif on_item is not None:
                on_item(item)

        def run(item: SweepItem) -> dict[str, Any]:
            return _run_one(item.method, item.dataset, item.spec, item.config_hash, uri, exp, timeout, item.tags)

        if workers == 1 or len(todo) <= 1:
            for item in todo:
                finish(item, run(item))
        else:
            _run_pool(todo, workers, uri, exp, timeout, finish)
        # Runs held by other processes: wait until they finish, or take them over if their holder dies.
        while held:
            time.sleep(heartbeat_interval(timeout))
            waiting, held[:] = list(held), []
            for item in waiting:
                error = failed(uri, item.run_id) if item.run_id else None
                finish(item, {"status": "failed", "run_id": item.run_id, "error": error} if error else run(item))
    return suite


def _run_pool(todo: list[SweepItem], workers: int, uri: str, exp: str, timeout: float,
              finish: Callable[[SweepItem, dict[str, Any]], None]) -> None:
    """The items in `workers` processes: one GPU each where there are GPUs, the CPU threads split otherwise."""
    ensure_experiment(uri, exp)  # before the workers race to create store and experiment
    ctx = multiprocessing.get_context("spawn")
    devices = None
    visible = worker_devices(workers)
    if visible is not None:
        devices = ctx.Manager().Queue()
        for entry in visible:  # each worker process takes one as it starts
            devices.put(entry)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(devices, threads)) as pool:
        pending = {pool.submit(_run_one, it.method, it.dataset, it.spec, it.config_hash, uri, exp, timeout, it.tags): it
                   for it in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                item = pending.pop(future)
                try:
                    outcome = future.result()
                except UserError as err:
                    outcome = {"status": "failed", "error": str(err)}
                except Exception as err:  # the worker process itself died: fail this run, keep the loop
                    outcome = {"status": "failed", "error": error_summary(err)}
                finish(item, outcome)
