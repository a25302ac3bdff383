"""One recorded experiment, the only place a run is built, recorded, checkpointed and finished.

`run_experiment` resolves the settings, builds the simulation (or restores it
from a checkpoint, continuing the same MLflow run), records it, checkpoints it
every `run.checkpoint_every` rounds, ends the run FINISHED, FAILED (diverged
or an error) or KILLED (Ctrl-C, SIGTERM), and deletes the checkpoint of a
finished run. `bench run`, `bench run --resume`, `bench sweep` (each run),
`bench tune` (each trial) and `bench sensitivity` (each arm) all go through it.
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, NoReturn, Sequence

from .checkpoint import Checkpointer, read_checkpoint, restore
from .config import RunConfig, names_in_config_file
from .engine import Callback, RunResult, Simulation
from .errors import Terminated, TrainingDiverged, UserError
from .records import Stage
from .resolve import RunSpec
from .tracking import DEFAULT_EXPERIMENT, Heartbeat, RunRecorder, default_tracking_uri, resumable_run


@dataclass(frozen=True)
class Recording:
    """Where and how a run is recorded."""

    tracking_uri: str | None = None  # None = `default_tracking_uri()`
    experiment: str = DEFAULT_EXPERIMENT  # MLflow experiment (a resumed run keeps its own)
    stage: str = Stage.RUN  # the `pflbench.stage` tag
    run_name: str | None = None  # None = METHOD-DATASET-sSEED
    parent_run_id: str | None = None  # a study's parent run
    tags: Mapping[str, str] = field(default_factory=dict)  # extra tags


@dataclass
class Experiment:
    """A run that went to its last round."""

    recorder: RunRecorder  # its run id, store, experiment and page
    sim: Simulation
    result: RunResult
    resumed_from: int = 0  # the checkpoint's round (0: started from scratch)

    @property
    def run_id(self) -> str:
        assert self.recorder.run_id is not None
        return self.recorder.run_id


def _terminate(signum, frame) -> NoReturn:
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, timeout, Slurm, Kubernetes, docker stop) takes Ctrl-C's path: the run ends KILLED.

    Only the main thread can install a handler; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def load_images(cfg: RunConfig, progress: Any = None):
    """The run's dataset (decoded once, cached afterwards)."""
    from ..datasets import DATASETS

    return DATASETS.get(cfg.dataset.name).load(cfg.dataset, progress=progress)


def resumed_config(config_toml: str, spec: RunSpec) -> RunConfig:
    """A recorded run's own config (its config.toml), with only `spec`'s device and data root applied."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(config_toml)
        method, dataset = names_in_config_file(path)
        return RunSpec(config_file=str(path), device=spec.device, data_root=spec.data_root).resolve(method, dataset)


def run_experiment(
    spec: RunSpec,
    method: str | None = None,
    dataset: str | None = None,
    *,
    recording: Recording = Recording(),
    resume: str | None = None,
    claimed_run_id: str | None = None,
    heartbeat: float | None = None,
    images: Any = None,
    partition: Any = None,
    eval_splits: Sequence[str] | None = None,
    loader: Callable[[RunConfig], Any] = load_images,
    building: Callable[[], ContextManager] = contextlib.nullcontext,
    callbacks: Callable[[Simulation, RunRecorder], Sequence[Callback]] = lambda sim, recorder: (),
) -> Experiment:
    """Run one experiment to its end and record it; see the module docstring.

    `resume` (a run id): continue that run from its checkpoint, with its own
    config (only `spec`'s device and data root apply) and partition.
    `claimed_run_id`: fill this already created run (a sweep's claim) instead of
    creating one. `heartbeat`: refresh the run's heartbeat tag every so many
    seconds while it runs. `images` and `partition` reuse data already loaded
    (else `loader(cfg)` loads it); `building()` wraps the simulation's build;
    `callbacks(sim, recorder)` adds progress reporters and the like after the
    recorder and the checkpointer (the recorder's run exists from their `on_start`). TrainingDiverged propagates, with `run_id` set, after
    the run is marked FAILED.
    """
    with sigterm_as_interrupt():
        uri = recording.tracking_uri or default_tracking_uri()
        state = None
        if resume is not None:
            run = resumable_run(uri, resume)
            if run.status == "FINISHED":
                raise UserError(f"run {run.run_id} has already finished")
            if run.alive:
                raise UserError(f"run {run.run_id} is still running in another process on this host")
            if run.checkpoint is None:
                raise UserError(f"run {run.run_id} was started without checkpoints (run.checkpoint_every=0);"
                                " it cannot be resumed")
            from ..datasets import Partition

            cfg = resumed_config(run.config_toml, spec)
            partition = Partition.from_json(run.partition_json, f"run {run.run_id}'s partition.json")
            state = read_checkpoint(run.checkpoint, "cpu")
            recorder = RunRecorder(uri, run.experiment, resume_run_id=run.run_id).prepare()
        else:
            if method is None or dataset is None:
                raise UserError("a run needs a method and a dataset")
            cfg = spec.resolve(method, dataset)
            recorder = RunRecorder(uri, recording.experiment, stage=recording.stage, run_name=recording.run_name,
                                   parent_run_id=recording.parent_run_id, extra_tags=recording.tags,
                                   claimed_run_id=claimed_run_id).prepare()
        beat = Heartbeat(uri, heartbeat) if heartbeat else None
        try:
            with contextlib.ExitStack() as stack:
                if claimed_run_id is not None:  # the run exists already: a failure while building ends it too
                    stack.enter_context(recorder)
                    if beat is not None:
                        beat.start(claimed_run_id)
                if images is None:
                    images = loader(cfg)
                with building():
                    kwargs = {} if eval_splits is None else {"eval_splits": tuple(eval_splits)}
                    sim = Simulation(cfg, images=images, partition=partition, **kwargs)
                    if state is not None:
                        restore(sim, state, run.checkpoint)
                checkpointer = Checkpointer(recorder.checkpoint_path, cfg.run.checkpoint_every)

                class _Beat(Callback):  # starts once the recorder's on_start has made (or reopened) the run
                    def on_start(self, sim: Simulation) -> None:
                        if beat is not None and claimed_run_id is None:
                            beat.start(recorder.run_id)

                # The round is logged before it is checkpointed: a resumed run never misses a logged round.
                hooks: list[Callback] = [recorder, checkpointer, _Beat(), *callbacks(sim, recorder)]
                resumed_from = sim.round_index
                if claimed_run_id is None:
                    stack.enter_context(recorder)
                result = sim.run(hooks)
        except TrainingDiverged as err:
            err.run_id = recorder.run_id
            raise
        finally:
            if beat is not None:
                beat.stop()
        if checkpointer.saved is not None and not cfg.run.keep_checkpoint:
            checkpointer.saved.unlink(missing_ok=True)  # finished: nothing is left to resume
        return Experiment(recorder, sim, result, resumed_from)
