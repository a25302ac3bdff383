"""The layout of a run's MLflow record: tag, stage and artifact names, defined once.

Every writer (tracking, tuning, sweep, sensitivity) and every reader (sweep,
plan, leaderboard) imports these names; a name typed by hand in one of them
would silently read nothing. Metric names are the engine's (`METRIC_NAMES`);
params are the flattened resolved config (`config.flatten`).
"""

from __future__ import annotations

TAG_PREFIX = "pflbench."


def tag(name: str) -> str:
    """The full tag key of a pflbench tag: `tag("method")` is "pflbench.method"."""
    return TAG_PREFIX + name


class Stage:
    """Values of the `pflbench.stage` tag: what a run was for."""

    RUN = "run"  # `bench run`
    TUNE = "tune"  # a tuning trial (validation only) or a study's parent
    FINAL = "final"  # a sweep's run: what the leaderboard reads
    SENSITIVITY = "sensitivity"  # an arm of `bench sensitivity`


class Tag:
    """Tag keys of a run."""

    METHOD = tag("method")
    DATASET = tag("dataset")
    SEED = tag("seed")
    CONFIG_HASH = tag("config_hash")
    PARTITION_HASH = tag("partition_hash")
    VERSION = tag("version")
    GIT_COMMIT = tag("git_commit")
    STAGE = tag("stage")
    DEVICE = tag("device")
    PARAMETERS = tag("parameters")
    PERSONAL_PARAMETERS = tag("personal_parameters")
    COMMUNICATED_PARAMETERS = tag("communicated_parameters")
    INFO_PREFIX = tag("info.")  # + a key of the method's `run_info()`
    CHECKPOINT = tag("checkpoint")  # the checkpoint file's path
    RESUMES = tag("resumes")  # how many times the run was continued
    ERROR = tag("error")  # one line: why the run FAILED
    STUDY = tag("study")  # the tuning study of a trial or parent
    TRIAL = tag("trial")
    BEST_TRIAL = tag("best_trial")
    BEST_RUN_ID = tag("best_run_id")
    TUNED_BY = tag("tuned_by")  # a final run started from a study's best config: the study's name
    TUNED_RUN = tag("tuned_run")  # and the id of the study's MLflow parent run
    SENSITIVITY_PART = tag("sensitivity.part")
    SENSITIVITY_GROUP = tag("sensitivity.group")
    # The process holding a RUNNING run (its claim): see `claims.py`.
    HOST = tag("host")
    PID = tag("pid")
    PID_START = tag("pid_start")  # the pid's start time in clock ticks since boot (pids are reused)
    HEARTBEAT = tag("heartbeat")  # seconds since the epoch, refreshed while the run is held
    CLAIM_PREFIX = tag("claim.")  # + "<generation>.<token>": a takeover's claim (see `claims.py`)
    PARENT = "mlflow.parentRunId"  # MLflow's own: a trial's or an arm's parent run


class Artifact:
    """Artifact names of a run."""

    CONFIG = "config.toml"  # the resolved config; `bench run --config` repeats the run
    PARTITION = "partition.json"
    PARTITION_SUMMARY = "partition_summary.csv"
    CLIENT_ACCURACY = "client_accuracy.csv"
    LEARNING_CURVE = "learning_curve.png"
    BEST_CONFIG = "best_config.toml"  # a study parent's best trial config


class Metric:
    """Metric names read back by name (the per-round ones are `engine.METRIC_NAMES`)."""

    TEST_ACC_MEAN = "test_acc_mean"
    VAL_ACC_MEAN = "val_acc_mean"
    ROUND_SECONDS = "round_seconds"  # logged every round: how far a run got
    TRAIN_SAMPLES = "train_samples"
    TRAIN_FLOPS = "train_flops"
