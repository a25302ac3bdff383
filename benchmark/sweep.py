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
FINISHED in the experiment is skipped, so rerunning a killed sweep resumes it.
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
import tomllib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..methods import METHODS
from .config import config_hash
from .device import check_workers, worker_devices
from .errors import TrainingDiverged, UserError, error_summary
from .resolve import RunSpec
from .tracking import RunRecorder, default_tracking_uri, ensure_experiment, find_runs, read_text_artifact

STAGE = "final"
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
    status: str = "pending"  # pending, skipped (already finished), finished, failed
    registered: bool = True  # False: a plan's run of a method not registered here (resolved as the plain model)
    run_id: str | None = None
    test_acc_mean: float | None = None
    error: str = ""


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


def _best_config(tracking_uri: str, experiment: str, study: str, folder: Path) -> str:
    """The `best_config.toml` of a tuning study's parent run, saved under `folder`; its path."""
    parents = [r for r in find_runs(tracking_uri, experiment, stage="tune", status=None,
                                    tags={"pflbench.study": study}) if "mlflow.parentRunId" not in r.tags]
    for parent in reversed(parents):
        text = read_text_artifact(tracking_uri, parent.run_id, "best_config.toml")
        if text is not None:
            path = folder / f"{study}.toml"
            path.write_text(text)
            return str(path)
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
            config_file = None
            pattern = best_of or run.get("best_of")
            if pattern:
                study = str(pattern).format(method=method, dataset=dataset)
                config_file = _best_config(tracking_uri, tune_experiment, study, config_folder)
            for seed in seeds:
                spec = RunSpec(preset=run.get("preset"), config_file=config_file, overrides=overrides, seed=seed,
                               data_root=run.get("data_root", data_root))
                cfg = spec.resolve(method if registered else "fedavg", dataset)
                key = (method, dataset, config_hash(cfg), seed)
                if key in seen:  # the same run twice would be recorded twice and counted twice
                    raise UserError(f"{where} repeats {seen[key]}: {method} on {dataset}, seed {seed}, the same"
                                    " settings; remove one")
                seen[key] = where
                suite.items.append(SweepItem(method, dataset, seed, spec, config_hash(cfg), registered=registered))
    return suite


def skip_finished(suite: Suite, tracking_uri: str, experiment: str) -> list[SweepItem]:
    """Mark the items whose (config hash, seed) already FINISHED in `experiment` skipped; the rest, to run."""
    done = {(r.tags.get("pflbench.config_hash"), r.tags.get("pflbench.seed"))
            for r in find_runs(tracking_uri, experiment, stage=STAGE)}
    todo = []
    for item in suite.items:
        if item.registered and (item.config_hash, str(item.seed)) in done:
            item.status = "skipped"
        else:
            todo.append(item)
    return todo


def _run_one(method: str, dataset: str, spec: RunSpec, tracking_uri: str, experiment: str) -> dict[str, Any]:
    """One final run, recorded in MLflow; used in this process or in a worker."""
    from .engine import Simulation

    cfg = spec.resolve(method, dataset)
    recorder = RunRecorder(tracking_uri, experiment, stage=STAGE)
    try:
        with recorder:  # ends the MLflow run FAILED, with the error as a tag, on any exception
            result = Simulation(cfg).run([recorder])
    except TrainingDiverged as err:
        return {"status": "failed", "run_id": recorder.run_id, "error": str(err)}
    except UserError:
        raise
    except Exception as err:  # one run's failure (out of memory, a bug) must not stop the others
        return {"status": "failed", "run_id": recorder.run_id, "error": error_summary(err)}
    return {"status": "finished", "run_id": recorder.run_id,
            "test_acc_mean": result.final.metrics()["test_acc_mean"]}


def _init_worker(devices, threads: int) -> None:
    """Pin a worker process to one GPU (when there are GPUs) or to its share of the CPU threads."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())
    import torch

    torch.set_num_threads(threads)


def run_sweep(
    suite_path: str | Path, *, workers: int = 1, tracking_uri: str | None = None, experiment: str = "pflbench",
    data_root: str | None = None, best_of: str | None = None,
    on_start: Callable[[int, int], None] | None = None, on_item: Callable[[SweepItem], None] | None = None,
) -> Suite:
    """Run every item of the suite not yet FINISHED; `on_start(total, skipped)`, then `on_item` per run.

    `data_root` applies to the suite's runs that set none of their own; `best_of` (a study name
    pattern with {method} and {dataset}) starts every run from that study's best config.
    """
    check_workers(workers)
    uri = tracking_uri or default_tracking_uri()
    with tempfile.TemporaryDirectory() as tmp:
        suite = load_suite(suite_path, tracking_uri=uri, experiment=experiment, config_folder=Path(tmp),
                           data_root=data_root, best_of=best_of)
        exp = suite.experiment or experiment
        todo = skip_finished(suite, uri, exp)
        if on_start is not None:
            on_start(len(suite.items), len(suite.items) - len(todo))

        def finish(item: SweepItem, outcome: dict[str, Any]) -> None:
            item.status = outcome["status"]
            item.run_id = outcome.get("run_id")
            item.test_acc_mean = outcome.get("test_acc_mean")
            item.error = outcome.get("error", "")
            if on_item is not None:
                on_item(item)

        if workers == 1 or len(todo) <= 1:
            for item in todo:
                finish(item, _run_one(item.method, item.dataset, item.spec, uri, exp))
            return suite
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
            pending = {pool.submit(_run_one, it.method, it.dataset, it.spec, uri, exp): it for it in todo}
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
    return suite
