"""MLflow records of every run: the only module that imports mlflow.

`RunRecorder` is an engine `Callback`: `prepare()` checks the store before any
work starts (its URI, that it is reachable and writable, the experiment),
then it opens one MLflow run when the
simulation starts (params = the flattened resolved config, the pflbench.*
tags, the method's `run_info()` numbers as `pflbench.info.<key>` tags, the
config and partition as artifacts), logs metrics each round
(step = round), adds the per-client accuracies and the learning curve at the
end (plus the held-out clients' `novel_*` metrics, at the last round's
step, when the method holds some out), and, used as a context manager, ends the run FINISHED, FAILED (an
exception) or KILLED (Ctrl-C) so no run is left RUNNING.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import math
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .config import config_hash, flatten, to_toml
from .engine import METRIC_NAMES, Callback, RunResult, Simulation
from .errors import RunStopped, UserError, error_summary
from .records import TAG_PREFIX, Artifact, Metric as MetricName, Stage, Tag
from .reports import client_accuracy_csv, learning_curve_png, partition_summary_csv

# MLflow and alembic announce schema migrations at INFO on a new store: noise for a CLI user.
for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# Nor is a progress bar per downloaded artifact (it would break one-line errors on stderr).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

DEFAULT_EXPERIMENT = "pflbench"


def default_tracking_uri() -> str:
    """`--tracking-uri`'s default: MLFLOW_TRACKING_URI, else `<cwd>/mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def ui_command(tracking_uri: str) -> str:
    """The command that shows a store's runs in a browser.

    It names the `mlflow` beside the running interpreter, so it works as
    printed when the virtualenv is not activated.
    """
    if _is_http(tracking_uri):
        return f"open {tracking_uri}"
    beside = Path(sys.executable).parent / "mlflow"
    program = str(beside) if beside.exists() else f"{sys.executable} -m mlflow"  # works without a script
    return f"{program} ui --backend-store-uri {tracking_uri}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's own page in the MLflow UI (`ui_command`'s default address for a local store).

    MLflow 3.17's UI picks its view from its workflow switch (this parameter, else the browser's
    last choice, else GenAI), not from the experiment's kind tag: the link asks for model training.
    """
    base = tracking_uri.rstrip("/") if _is_http(tracking_uri) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


# ---------------------------------------------------------------------------
# The store: checked before any work, set up under a lock

# Schemes MLflow can track to; anything else is a typo.
KNOWN_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")
SQLITE_HEADER = b"SQLite format 3\x00"
MAX_EXPERIMENT_NAME = 256  # the store's column width
# A tracking server that does not answer fails fast (MLflow's defaults retry for minutes);
# applied only while the store is first probed, and only where the user has set nothing.
_PROBE_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI; None for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])


def check_tracking_uri(tracking_uri: str) -> None:
    """Refuse a store URI that cannot work, before anything is created (UserError naming it)."""
    scheme = tracking_uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in tracking_uri else ""
    if scheme not in KNOWN_SCHEMES or "://" not in tracking_uri and scheme != "databricks":
        raise UserError(f"unknown tracking URI {tracking_uri!r}; use sqlite:///PATH/mlflow.db, http(s)://HOST:PORT,"
                        f" or another MLflow store ({', '.join(KNOWN_SCHEMES)})")
    db = sqlite_path(tracking_uri)
    if scheme == "sqlite":
        if db is None or not db.name or db.name == ":memory:":
            raise UserError(f"bad tracking URI {tracking_uri!r}: expected sqlite:///PATH/mlflow.db")
        folder = db.parent
        if not folder.exists():
            raise UserError(f"tracking store folder {folder} does not exist (a typo?); create it first")
        if not folder.is_dir():
            raise UserError(f"tracking store folder {folder} is a file, not a folder")
        if db.is_dir():
            raise UserError(f"tracking store {db} is a folder, not an SQLite file")
        if db.exists() and db.stat().st_size > 0:
            with open(db, "rb") as f:
                if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                    raise UserError(f"tracking store {db} is not an SQLite database; point --tracking-uri elsewhere")
        writable = os.access(db, os.W_OK) if db.exists() else os.access(folder, os.W_OK)
        if not writable:
            raise UserError(f"tracking store {db if db.exists() else folder} is read-only")


def require_store(tracking_uri: str) -> None:
    """For a command that only reads a store: refuse an SQLite store that does not exist yet
    (a mistyped path), instead of creating an empty one."""
    check_tracking_uri(tracking_uri)
    db = sqlite_path(tracking_uri)
    if db is not None and not db.exists():
        raise UserError(f"no MLflow store at {db} (nothing was recorded there); check --tracking-uri")


def check_experiment_name(name: str) -> None:
    if not name or not name.strip():
        raise UserError("the experiment name is empty; pass --experiment NAME")
    if len(name) > MAX_EXPERIMENT_NAME:
        raise UserError(f"the experiment name is {len(name)} characters long; at most {MAX_EXPERIMENT_NAME}")


@contextlib.contextmanager
def _store_lock(tracking_uri: str) -> Iterator[None]:
    """Serialize a sqlite store's set-up (creation, migration, experiments) across processes."""
    db = sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _probe_settings(tracking_uri: str) -> Iterator[None]:
    if not _is_http(tracking_uri):
        yield
        return
    added = {k: v for k, v in _PROBE_HTTP_SETTINGS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _store_problem(err: BaseException, tracking_uri: str) -> UserError | None:
    """A store failure the user can fix, as a one-line UserError; None for anything else."""
    text = str(err).lower()
    where = sqlite_path(tracking_uri) or tracking_uri
    if isinstance(err, OSError) and err.errno == errno.ENOSPC or "disk is full" in text \
            or "no space left" in text:
        return UserError(f"the disk holding the tracking store {where} is full; free space and rerun")
    if "readonly database" in text or "read-only file system" in text or \
            isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES):
        return UserError(f"tracking store {where} is read-only")
    if "file is not a database" in text or "file is encrypted or is not a database" in text:
        return UserError(f"tracking store {where} is not an SQLite database; point --tracking-uri elsewhere")
    if _is_http(tracking_uri) and any(w in text for w in ("max retries", "connection", "timed out", "timeout",
                                                         "name or service not known", "refused")):
        return UserError(f"cannot reach the tracking server {tracking_uri}; is it running?"
                         " (check --tracking-uri or MLFLOW_TRACKING_URI)")
    if _is_http(tracking_uri) and "failed with error code 404" in text:  # a web server, but not MLflow's API
        return UserError(f"{tracking_uri} does not answer as an MLflow tracking server (HTTP 404);"
                         " check --tracking-uri or MLFLOW_TRACKING_URI")
    return None


@contextlib.contextmanager
def store_errors(tracking_uri: str) -> Iterator[None]:
    """Turn the store failures a user can fix (full disk, read-only, unreachable) into UserErrors."""
    try:
        yield
    except (MlflowException, OSError, sqlite3.Error) as err:
        problem = _store_problem(err, tracking_uri)
        if problem is None:
            raise
        raise problem from None
    except Exception as err:  # SQLAlchemy and requests errors, without importing either here
        problem = _store_problem(err, tracking_uri)
        if problem is None:
            raise
        raise problem from None


def open_store(tracking_uri: str, experiment: str | None = None) -> tuple[MlflowClient, str | None]:
    """A client on a checked, reachable, set-up store, and the experiment's id (created if new).

    Concurrent first starts on one fresh sqlite store wait for each other here.
    """
    check_tracking_uri(tracking_uri)
    if experiment is not None:
        check_experiment_name(experiment)
    with store_errors(tracking_uri), _probe_settings(tracking_uri), _store_lock(tracking_uri):
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)  # creates and migrates a new store; probes a server
        exp_id = _experiment_id(client, experiment, tracking_uri) if experiment is not None else None
    return client, exp_id


# ---------------------------------------------------------------------------
# Which process runs a run (to find runs left RUNNING by a dead one)


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" where /proc does not say)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """Tags naming the current process: host, pid and its start time (pids are reused)."""
    pid = os.getpid()
    return {Tag.HOST: socket.gethostname(), Tag.PID: str(pid), Tag.PID_START: _process_start(pid),
            Tag.HEARTBEAT: f"{time.time():.0f}"}


def process_alive(pid: int, start: str = "") -> bool:
    """True while `pid` runs and, when `start` is known, is still the process that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return not start or _process_start(pid) in ("", start)


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


# MLflow 3's UI opens an experiment in its GenAI view (traces, prompts, "Evaluation runs") unless this
# experiment tag says it holds model training; every experiment pflbench creates or uses carries it.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise UserError(f"experiment {name!r} is deleted; restore it (mlflow experiments restore"
                            f" --experiment-id {found.experiment_id}) or choose another --experiment")
        for key, value in EXPERIMENT_KIND.items():
            if found.tags.get(key) != value:  # made by an older pflbench, by hand, or inferred by the UI
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        # Next to the database, not wherever the process happens to run.
        db = Path(tracking_uri[len("sqlite:///"):])
        artifact_location = (db.parent / "mlruns").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
    except MlflowException:
        # Another worker created it between our lookup and our create.
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class RunRecorder(Callback):
    """Records one simulation as one MLflow run (or continues one: `resume_run_id`)."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        *,
        stage: str = Stage.RUN,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        extra_tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
        claimed_run_id: str | None = None,
    ):
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self.stage = stage
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.extra_tags = dict(extra_tags or {})
        self.client: MlflowClient | None = None
        self.experiment_id: str | None = None
        self.run_id: str | None = resume_run_id or claimed_run_id
        self.resuming = resume_run_id is not None
        self.claimed_run_id = claimed_run_id  # a run already created as a sweep's claim: filled, not created
        self.logged_through = 0  # rounds already in the run (a resumed run logs none of them again)

    def prepare(self) -> RunRecorder:
        """Check and set up the store and the experiment; call it before any work starts."""
        if self.client is None:
            experiment = None if self.resuming else self.experiment
            self.client, self.experiment_id = open_store(self.tracking_uri, experiment)
        return self

    @property
    def url(self) -> str | None:
        """The run's page in the MLflow UI."""
        if self.run_id is None or self.experiment_id is None:
            return None
        return run_url(self.tracking_uri, self.experiment_id, self.run_id)

    def checkpoint_path(self) -> Path:
        """Where this run's checkpoint lives: beside a sqlite store, else under ./checkpoints."""
        assert self.run_id is not None
        db = sqlite_path(self.tracking_uri)
        folder = db.parent / "checkpoints" if db is not None else Path.cwd() / "checkpoints"
        return (folder / f"{self.run_id}.pt").resolve()

    # -- Callback hooks ------------------------------------------------------------
    def on_start(self, sim: Simulation) -> None:
        self.prepare()
        with store_errors(self.tracking_uri):
            if self.resuming:
                self._continue(sim)
            else:
                self._create(sim)

    def _create(self, sim: Simulation) -> None:
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
            "communicated_parameters": str(sim.num_communicated_parameters),
        }
        # Tags like the parameter counts above: descriptive numbers, not settings (params are the config).
        tags |= {f"info.{k}": str(v) for k, v in sim.method.run_info().items()}
        all_tags = {TAG_PREFIX + k: v for k, v in tags.items()} | process_tags() | self.extra_tags
        if self.parent_run_id:
            all_tags[Tag.PARENT] = self.parent_run_id
        name = self.run_name or f"{cfg.method.name}-{cfg.dataset.name}-s{cfg.seed}"
        if self.claimed_run_id is not None:
            self.run_id = self.claimed_run_id
            self.client.update_run(self.run_id, name=name)
            self.set_tags(all_tags)
        else:
            self.run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
        if cfg.run.checkpoint_every:
            self.client.set_tag(self.run_id, Tag.CHECKPOINT, str(self.checkpoint_path()))
        params = [Param(k, str(v)) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self._log_dataset(sim)
        self.client.log_text(self.run_id, to_toml(cfg), Artifact.CONFIG)
        self.client.log_text(self.run_id, sim.partition.to_json(), Artifact.PARTITION)
        self.client.log_text(
            self.run_id,
            partition_summary_csv(sim.partition, sim.images.labels, sim.images.class_names),
            Artifact.PARTITION_SUMMARY,
        )

    def _log_dataset(self, sim: Simulation) -> None:
        """The dataset as an MLflow dataset input: the runs table's Dataset column, digest = partition hash."""
        cfg = sim.cfg
        profile = {"samples": int(len(sim.images.labels)), "classes": sim.images.num_classes,
                   "clients": sim.data.num_clients, "partition": cfg.data.partition}
        dataset = Dataset(name=cfg.dataset.name, digest=sim.partition.digest(), source_type="local",
                          source=json.dumps({"uri": str(Path(cfg.dataset.root).resolve())}),
                          profile=json.dumps(profile))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])])

    def _continue(self, sim: Simulation) -> None:
        run = self.client.get_run(self.run_id)
        self.experiment_id = run.info.experiment_id
        history = self.client.get_metric_history(self.run_id, MetricName.ROUND_SECONDS)  # logged every round
        self.logged_through = max((m.step for m in history), default=0)
        resumes = int(run.data.tags.get(Tag.RESUMES, "0")) + 1
        self.client.update_run(self.run_id, status="RUNNING")
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in
                                                 (process_tags() | {Tag.RESUMES: str(resumes)}).items()])

    def on_round(self, round_index: int, metrics: Mapping[str, float]) -> None:
        if round_index > self.logged_through:  # MLflow metrics are append-only: never log a round twice
            self.log_metrics(metrics, step=round_index)

    def on_end(self, sim: Simulation, result: RunResult) -> None:
        with store_errors(self.tracking_uri):
            if result.held_out_metrics:
                self.log_metrics(result.held_out_metrics, step=sim.round_index)
            final = result.final
            self.client.log_text(
                self.run_id,
                client_accuracy_csv(final.test_acc, final.test_count, final.val_acc, final.val_count),
                Artifact.CLIENT_ACCURACY,
            )
            with tempfile.TemporaryDirectory() as tmp:
                title = f"{sim.cfg.method.name} on {sim.cfg.dataset.name} (seed {sim.cfg.seed})"
                png = learning_curve_png(result.history, Path(tmp) / Artifact.LEARNING_CURVE, title)
                self.client.log_artifact(self.run_id, str(png))

    # -- direct logging ------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log finite metrics at `step` (NaN means "not measured this round")."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if k != "round" and math.isfinite(float(v))]
        if batch and self.run_id:
            with store_errors(self.tracking_uri):
                self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.run_id:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is not None and self.client is not None:
            _end_run(self.client, self.run_id, exc_type, exc)


def _end_run(client: MlflowClient, run_id: str, exc_type, exc) -> None:
    """End a run FINISHED, FAILED (an exception, recorded as a tag) or KILLED (Ctrl-C, SIGTERM, stopped on purpose)."""
    if exc_type is None:
        status = "FINISHED"
    elif issubclass(exc_type, KeyboardInterrupt):
        status = "KILLED"
    elif issubclass(exc_type, RunStopped):
        status = "KILLED"
        client.set_tag(run_id, TAG_PREFIX + exc.reason, "true")
    else:
        status = "FAILED"
    try:
        if status == "FAILED":  # one line: a CUDA out-of-memory message runs to several
            client.set_tag(run_id, Tag.ERROR, error_summary(exc)[:5000])
        client.set_terminated(run_id, status=status)
    except Exception:
        if exc_type is None:
            raise
        # The store itself failed (full disk, server gone): the original error is the one to report;
        # `bench runs --stale` finds the run later.


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
        self.tags = {Tag.STAGE: stage, Tag.VERSION: pflbench_version(), Tag.GIT_COMMIT: git_commit()} | {k: str(v) for k, v in (tags or {}).items()}
        self.params = dict(params or {})
        self.client: MlflowClient | None = None
        self.experiment_id: str | None = None
        self.run_id: str | None = run_id  # given: reopen that run (a resumed study) instead of creating one

    def prepare(self) -> ParentRun:
        """Check and set up the store and the experiment; call it before any work starts."""
        if self.client is None:
            self.client, self.experiment_id = open_store(self.tracking_uri, self.experiment)
        return self

    @property
    def url(self) -> str | None:
        """The run's page in the MLflow UI."""
        return None if self.run_id is None else run_url(self.tracking_uri, self.experiment_id, self.run_id)

    def __enter__(self) -> ParentRun:
        self.prepare()
        if self.run_id is not None:
            with store_errors(self.tracking_uri):
                self.client.update_run(self.run_id, status="RUNNING")
            return self
        with store_errors(self.tracking_uri):
            tags = self.tags | process_tags()
            self.run_id = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags).info.run_id
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
    clauses = [f"tags.`{Tag.STAGE}` = '{stage}'"] if stage else []
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


def metric_mean(tracking_uri: str | None, run_id: str, key: str) -> float:
    """The mean of a run's metric over every step it was logged at (NaN when it never was)."""
    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    values = [m.value for m in client.get_metric_history(run_id, key)]
    return sum(values) / len(values) if values else math.nan


def metric_histories(tracking_uri: str | None, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Every logged value of each metric in `keys` as (step, value), by step, then in the order logged."""
    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    out = {}
    for key in sorted(keys):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        out[key] = [(int(m.step), float(m.value)) for m in history]
    return out


def get_run_record(tracking_uri: str | None, run_id: str) -> RunRecord | None:
    """One run by its id, whatever its experiment, stage or status; None when the store has no such run."""
    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return RunRecord(run.info.run_id, int(run.info.start_time or 0), run.info.status, int(run.info.end_time or 0),
                     dict(run.data.tags), dict(run.data.params), dict(run.data.metrics))


def read_text_artifact(tracking_uri: str | None, run_id: str, name: str) -> str | None:
    """The text of artifact `name` of a run; None when the run has no such artifact."""
    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, name, tmp)
        except (MlflowException, OSError):
            return None
        return Path(path).read_text()


# ---------------------------------------------------------------------------
# Reading runs back: resume, stale runs


@dataclass
class ResumableRun:
    """What `bench run --resume` needs from a recorded run."""

    run_id: str
    experiment: str  # the experiment's name
    status: str
    config_toml: str  # the run's config.toml artifact
    partition_json: str  # its partition.json artifact
    checkpoint: Path | None  # where its checkpoint was written (None: never checkpointed)
    alive: bool  # still running in another live process on this host (a sweep's takeover holds it itself)


def resumable_run(tracking_uri: str, run_id: str) -> ResumableRun:
    """The run `run_id`, with its config and partition, or a UserError saying why it cannot be resumed."""
    client, _ = open_store(tracking_uri)
    with store_errors(tracking_uri):
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise UserError(f"no run {run_id!r} in {tracking_uri} (bench runs lists them)") from None
        tags = run.data.tags
        texts = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in (Artifact.CONFIG, Artifact.PARTITION):
                try:
                    texts[name] = Path(client.download_artifacts(run_id, name, tmp)).read_text()
                except (MlflowException, OSError):
                    raise UserError(f"run {run_id} has no {name} artifact; it was not recorded by bench run") from None
        experiment = client.get_experiment(run.info.experiment_id).name
    path = tags.get(Tag.CHECKPOINT)
    return ResumableRun(run_id, experiment, run.info.status, texts[Artifact.CONFIG], texts[Artifact.PARTITION],
                        Path(path) if path else None,
                        run.info.status == "RUNNING" and _judge(tags) == "alive" and tags.get(Tag.PID) != str(os.getpid()))


def _judge(tags: Mapping[str, str]) -> str:
    """"alive", "dead" (its process is gone from this host) or "unknown" (another host, or no pid)."""
    host, pid = tags.get(Tag.HOST), tags.get(Tag.PID, "")
    if host != socket.gethostname() or not pid.isdigit():
        return "unknown"
    return "alive" if process_alive(int(pid), tags.get(Tag.PID_START, "")) else "dead"


@dataclass
class RecordedRun:
    """One run as `bench runs` lists it."""

    run_id: str
    experiment: str
    name: str
    status: str
    start: float  # seconds since the epoch
    tags: dict[str, str]
    metrics: dict[str, float]
    process: str  # "alive", "dead" or "unknown" for RUNNING runs (see `_judge`); "" otherwise


def list_runs(tracking_uri: str, *, stale: bool = False, limit: int = 50) -> list[RecordedRun]:
    """Recent runs of every experiment, newest first; `stale`: only RUNNING ones whose process is gone.

    A run started on another host cannot be checked from here: it is never called stale.
    """
    client, _ = open_store(tracking_uri)
    with store_errors(tracking_uri):
        experiments = {e.experiment_id: e.name for e in client.search_experiments()}
        found = client.search_runs(list(experiments), "attributes.status = 'RUNNING'" if stale else "",
                                   max_results=None if stale else limit, order_by=["attributes.start_time DESC"]) \
            if experiments else []
    out = []
    for run in found:
        process = _judge(run.data.tags) if run.info.status == "RUNNING" else ""
        if stale and process != "dead":
            continue
        out.append(RecordedRun(run.info.run_id, experiments[run.info.experiment_id], run.info.run_name or "",
                               run.info.status, run.info.start_time / 1000, dict(run.data.tags),
                               dict(run.data.metrics), process))
    return out


def mark_killed(tracking_uri: str, run_ids: list[str]) -> None:
    """End the given runs KILLED (what a run interrupted by Ctrl-C or SIGTERM ends as)."""
    client, _ = open_store(tracking_uri)
    with store_errors(tracking_uri):
        for run_id in run_ids:
            client.set_tag(run_id, Tag.ERROR, "its process died without ending the run")
            client.set_terminated(run_id, status="KILLED")


# ---------------------------------------------------------------------------
# Claims: the store operations a sweep's claims are made of (the protocol is in claims.py)


def holder_alive(tags: Mapping[str, str], timeout: float, now: float | None = None) -> bool:
    """Whether the process holding a RUNNING run still holds it.

    Gone: its pid no longer runs (judged on its own host only), or, on any
    host, its heartbeat is older than `timeout` seconds (by this machine's
    clock: hosts are assumed synchronized to well under the timeout).
    """
    if _judge(tags) == "dead":
        return False
    try:
        beat = float(tags.get(Tag.HEARTBEAT, ""))
    except ValueError:
        return True  # a run from before heartbeats: nothing says it is gone
    return (time.time() if now is None else now) - beat <= timeout


def create_claim_run(tracking_uri: str, experiment: str, tags: Mapping[str, str]) -> str:
    """A new RUNNING run holding only `tags` and this process's tags (a sweep's claim); its id."""
    client, exp_id = open_store(tracking_uri, experiment)
    with store_errors(tracking_uri):
        return client.create_run(exp_id, tags=dict(tags) | process_tags()).info.run_id


def delete_run(tracking_uri: str, run_id: str) -> None:
    """Delete a run (a claim given up); deleted runs are invisible to every search here."""
    with store_errors(tracking_uri):
        MlflowClient(tracking_uri=tracking_uri).delete_run(run_id)


def run_tags(tracking_uri: str, run_id: str) -> tuple[str, dict[str, str]]:
    """A run's status and tags."""
    with store_errors(tracking_uri):
        run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    return run.info.status, dict(run.data.tags)


def set_run_tags(tracking_uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    with store_errors(tracking_uri):
        MlflowClient(tracking_uri=tracking_uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def hold_run(tracking_uri: str, run_id: str) -> None:
    """Mark a taken-over run RUNNING in this process's name (a live claim from now on)."""
    with store_errors(tracking_uri):
        client = MlflowClient(tracking_uri=tracking_uri)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in process_tags().items()])
        client.update_run(run_id, status="RUNNING")


def delete_run_tag(tracking_uri: str, run_id: str, key: str) -> None:
    with store_errors(tracking_uri):
        MlflowClient(tracking_uri=tracking_uri).delete_tag(run_id, key)


class Heartbeat:
    """Refreshes a run's heartbeat tag every `interval` seconds from a background thread.

    A missed beat (a store briefly unreachable) is not an error: only a
    heartbeat older than the claim timeout gives the run away.
    """

    def __init__(self, tracking_uri: str, interval: float):
        import threading

        self.tracking_uri, self.interval = tracking_uri, interval
        self.run_id: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="pflbench-heartbeat", daemon=True)

    def start(self, run_id: str) -> None:
        self.run_id = run_id
        self._thread.start()

    def _beat(self) -> None:
        client = MlflowClient(tracking_uri=self.tracking_uri)
        while not self._stop.wait(self.interval):
            try:
                client.set_tag(self.run_id, Tag.HEARTBEAT, f"{time.time():.0f}")
            except Exception:  # noqa: BLE001 - the next beat tries again
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


def search_runs(tracking_uri: str | None = None, experiments: list[str] | None = None,
                filter_string: str = "") -> Any:
    """Runs as a pandas DataFrame (all experiments unless named)."""
    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    if experiments:
        return mlflow.search_runs(experiment_names=experiments, filter_string=filter_string)
    return mlflow.search_runs(search_all_experiments=True, filter_string=filter_string)


__all__ = [
    "Heartbeat", "create_claim_run", "delete_run", "delete_run_tag", "hold_run", "holder_alive", "run_tags", "set_run_tags",
    "METRIC_NAMES", "ParentRun", "RecordedRun", "ResumableRun", "RunRecord", "RunRecorder", "check_tracking_uri",
    "default_tracking_uri", "ensure_experiment", "experiment_exists", "find_runs", "get_run_record", "list_runs",
    "mark_killed", "metric_histories", "open_store", "read_text_artifact", "require_store", "resumable_run", "run_url", "search_runs",
    "ui_command",
]
