"""MLflow records of every run: the only module that imports mlflow.

`RunRecorder` is an engine `Callback`: it opens one MLflow run when the
simulation starts (params = the flattened resolved config, the pflbench.*
tags, the method's `run_info()` numbers as `pflbench.info.<key>` tags, the
config and partition as artifacts), logs metrics each round
(step = round), adds the per-client accuracies and the learning curve at the
end (plus the held-out clients' `novel_*` metrics, at the last round's
step, when the method holds some out), and, used as a context manager, ends the run FINISHED, FAILED (an
exception) or KILLED (Ctrl-C) so no run is left RUNNING.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Mapping

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .config import config_hash, flatten, to_toml
from .engine import METRIC_NAMES, Callback, RunResult, Simulation
from .errors import RunStopped
from .reports import client_accuracy_csv, learning_curve_png, partition_summary_csv

# MLflow and alembic announce schema migrations at INFO on a new store: noise for a CLI user.
for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# Reading a run's small CSV must not draw a download progress bar on the user's terminal.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

DEFAULT_EXPERIMENT = "pflbench"
TAG_PREFIX = "pflbench."


def default_tracking_uri() -> str:
    """`--tracking-uri`'s default: MLFLOW_TRACKING_URI, else `<cwd>/mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def ui_command(tracking_uri: str) -> str:
    """The command that shows a store's runs in a browser."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


@functools.lru_cache(maxsize=1)
def pflbench_version() -> str:
    try:
        return metadata.version("pflbench")
    except metadata.PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The source checkout's commit, `+dirty` when it has uncommitted changes; "unknown" outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        # Next to the database, not wherever the process happens to run.
        db = Path(tracking_uri[len("sqlite:///"):])
        artifact_location = (db.parent / "mlruns").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        # Another worker created it between our lookup and our create.
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class RunRecorder(Callback):
    """Records one simulation as one MLflow run."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        *,
        stage: str = "run",
        run_name: str | None = None,
        parent_run_id: str | None = None,
        extra_tags: Mapping[str, str] | None = None,
    ):
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self.stage = stage
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.extra_tags = dict(extra_tags or {})
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id: str | None = None

    # -- Callback hooks ------------------------------------------------------------
    def on_start(self, sim: Simulation) -> None:
        cfg = sim.cfg
        tags = {
            "method": cfg.method.name,
            "dataset": cfg.dataset.name,
            "seed": str(cfg.seed),
            "config_hash": config_hash(cfg),
            "partition_hash": sim.partition.digest(),
            "version": pflbench_version(),
            "git_commit": git_commit(),
            "stage": self.stage,
            "device": str(sim.device),
            "parameters": str(sim.num_parameters),
            "personal_parameters": str(sim.num_personal_parameters),
        }
        # Tags like the parameter counts above: descriptive numbers, not settings (params are the config).
        tags |= {f"info.{k}": str(v) for k, v in sim.method.run_info().items()}
        all_tags = {TAG_PREFIX + k: v for k, v in tags.items()} | self.extra_tags
        if self.parent_run_id:
            all_tags["mlflow.parentRunId"] = self.parent_run_id
        exp_id = _experiment_id(self.client, self.experiment, self.tracking_uri)
        name = self.run_name or f"{cfg.method.name}-{cfg.dataset.name}-s{cfg.seed}"
        run = self.client.create_run(exp_id, run_name=name, tags=all_tags)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, to_toml(cfg), "config.toml")
        self.client.log_text(self.run_id, sim.partition.to_json(), "partition.json")
        self.client.log_text(
            self.run_id,
            partition_summary_csv(sim.partition, sim.images.labels, sim.images.class_names),
            "partition_summary.csv",
        )

    def on_round(self, round_index: int, metrics: Mapping[str, float]) -> None:
        self.log_metrics(metrics, step=round_index)

    def on_end(self, sim: Simulation, result: RunResult) -> None:
        if result.held_out_metrics:
            self.log_metrics(result.held_out_metrics, step=sim.round_index)
        final = result.final
        self.client.log_text(
            self.run_id,
            client_accuracy_csv(final.test_acc, final.test_count, final.val_acc, final.val_count),
            "client_accuracy.csv",
        )
        with tempfile.TemporaryDirectory() as tmp:
            title = f"{sim.cfg.method.name} on {sim.cfg.dataset.name} (seed {sim.cfg.seed})"
            png = learning_curve_png(result.history, Path(tmp) / "learning_curve.png", title)
            self.client.log_artifact(self.run_id, str(png))

    # -- direct logging ------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log finite metrics at `step` (NaN means "not measured this round")."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if k != "round" and math.isfinite(float(v))]
        if batch and self.run_id:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.run_id:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is not None:
            _end_run(self.client, self.run_id, exc_type, exc)


def _end_run(client: MlflowClient, run_id: str, exc_type, exc) -> None:
    """End a run FINISHED, FAILED (an exception, recorded as a tag) or KILLED (Ctrl-C, or stopped on purpose)."""
    if exc_type is None:
        status = "FINISHED"
    elif issubclass(exc_type, KeyboardInterrupt):
        status = "KILLED"
    elif issubclass(exc_type, RunStopped):
        status = "KILLED"
        client.set_tag(run_id, TAG_PREFIX + exc.reason, "true")
    else:
        status = "FAILED"
        client.set_tag(run_id, TAG_PREFIX + "error", f"{exc_type.__name__}: {exc}"[:5000])
    client.set_terminated(run_id, status=status)


class ParentRun:
    """An MLflow run that groups a study's runs (pass its `run_id` as a `RunRecorder`'s parent).

    Used as a context manager it is created on entry and ended like a `RunRecorder`.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT, *,
                 run_name: str, stage: str, tags: Mapping[str, Any] | None = None,
                 params: Mapping[str, Any] | None = None, run_id: str | None = None):
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self.run_name = run_name
        self.tags = {TAG_PREFIX + "stage": stage, TAG_PREFIX + "version": pflbench_version(),
                     TAG_PREFIX + "git_commit": git_commit()} | {k: str(v) for k, v in (tags or {}).items()}
        self.params = dict(params or {})
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id: str | None = run_id  # given: reopen that run (a resumed study) instead of creating one

    def __enter__(self) -> ParentRun:
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            return self
        exp_id = _experiment_id(self.client, self.experiment, self.tracking_uri)
        self.run_id = self.client.create_run(exp_id, run_name=self.run_name, tags=self.tags).info.run_id
        if self.params:
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in self.params.items()])
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is not None:
            _end_run(self.client, self.run_id, exc_type, exc)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log finite metrics at `step`."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path) -> None:
        """Attach a local file to the run."""
        self.client.log_artifact(self.run_id, str(path))

    def log_text(self, text: str, name: str) -> None:
        """Attach `text` to the run as the artifact `name`."""
        self.client.log_text(self.run_id, text, name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


# ---------------------------------------------------------------------------
# Queries (sweep, tune and leaderboard read MLflow only through these)


@dataclass
class RunRecord:
    """One finished run as the leaderboard and the sweep need it."""

    run_id: str
    start_time: int  # ms since the epoch
    status: str
    end_time: int  # ms since the epoch; 0 while running
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # the latest value of each metric


def _experiment_ids(client: MlflowClient, experiment: str) -> list[str]:
    found = client.get_experiment_by_name(experiment)
    return [found.experiment_id] if found is not None else []


def experiment_exists(tracking_uri: str | None, experiment: str) -> bool:
    """Whether the store holds an experiment of that name."""
    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    return bool(_experiment_ids(client, experiment))


def ensure_experiment(tracking_uri: str | None, experiment: str) -> str:
    """The experiment's id, created (with the store) when missing."""
    uri = tracking_uri or default_tracking_uri()
    return _experiment_id(MlflowClient(tracking_uri=uri), experiment, uri)


def find_runs(tracking_uri: str | None, experiment: str, *, stage: str | None = None,
              status: str | None = "FINISHED", tags: Mapping[str, str] | None = None) -> list[RunRecord]:
    """Runs of `experiment` with the given stage, status and tags, oldest first."""
    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    ids = _experiment_ids(client, experiment)
    if not ids:
        return []
    clauses = [f"tags.`{TAG_PREFIX}stage` = '{stage}'"] if stage else []
    clauses += [f"attributes.status = '{status}'"] if status else []
    clauses += [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items()]
    out, token = [], None
    while True:
        page = client.search_runs(ids, " and ".join(clauses), max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        for run in page:
            out.append(RunRecord(run.info.run_id, int(run.info.start_time or 0), run.info.status,
                                 int(run.info.end_time or 0), dict(run.data.tags), dict(run.data.params), dict(run.data.metrics)))
        token = page.token
        if not token:
            return out


def read_text_artifact(tracking_uri: str | None, run_id: str, name: str) -> str | None:
    """The text of artifact `name` of a run; None when the run has no such artifact."""
    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, name, tmp)
        except (MlflowException, OSError):
            return None
        return Path(path).read_text()


def search_runs(tracking_uri: str | None = None, experiments: list[str] | None = None,
                filter_string: str = "") -> Any:
    """Runs as a pandas DataFrame (all experiments unless named)."""
    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    if experiments:
        return mlflow.search_runs(experiment_names=experiments, filter_string=filter_string)
    return mlflow.search_runs(search_all_experiments=True, filter_string=filter_string)


__all__ = ["METRIC_NAMES", "ParentRun", "RunRecord", "RunRecorder", "default_tracking_uri", "ensure_experiment", "experiment_exists",
           "find_runs", "read_text_artifact", "search_runs", "ui_command"]
