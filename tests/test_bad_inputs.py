"""Every bad input a user can give: exit 2, one line on stderr, no traceback, nothing left behind.

One table, one row per case, grouped by command; a new command adds its rows here. Each row is
(id, argv, a fragment the one line must contain, an optional set-up). `{tmp}` in argv is the
test's own folder, which is also the working directory and holds the default tracking store.
After each case: no MLflow run is left RUNNING, and no file appeared that a later run would trust
(only the store's lock file may be new).
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from mlflow.tracking import MlflowClient

from pflbench.benchmark.cli import main

RUN = ["run", "--method", "fedavg", "--dataset", "digits", "--preset", "smoke", "--device", "cpu"]
PARTITION = ["partition", "--dataset", "digits", "--preset", "smoke", "--set", "data.num_clients=4"]
SENSITIVITY = ["sensitivity", "--dataset", "digits", "--preset", "smoke", "--device", "cpu"]
PERF = ["perf", "overhead", "--set", "model.embed_dim=16", "--set", "model.depth=1"]
TUNE = ["tune", "--method", "fedavg", "--dataset", "digits", "--preset", "smoke", "--trials", "2"]
WITH_FILE = ["--set", "data.partition_file={tmp}/p.json"]

Setup = Callable[[Path, pytest.MonkeyPatch], None]


# -- set-ups ---------------------------------------------------------------------------


def valid_partition(clients: int = 4) -> dict[str, list[list[int]]]:
    """A partition of the digits' first 30 x `clients` samples: disjoint, in range."""
    return {"train": [list(range(30 * c, 30 * c + 20)) for c in range(clients)],
            "val": [list(range(30 * c + 20, 30 * c + 25)) for c in range(clients)],
            "test": [list(range(30 * c + 25, 30 * c + 30)) for c in range(clients)]}


def partition_file(change: Callable[[dict], object] | None = None, text: str | None = None) -> Setup:
    def setup(tmp: Path, monkeypatch) -> None:
        if text is not None:
            (tmp / "p.json").write_text(text)
            return
        data = valid_partition()
        replaced = change(data) if change is not None else None
        (tmp / "p.json").write_text(json.dumps(replaced if isinstance(replaced, dict) else data))

    return setup


def file_at(name: str, content: bytes = b"just text\n") -> Setup:
    def setup(tmp: Path, monkeypatch) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(content)

    return setup


def folder_at(name: str) -> Setup:
    return lambda tmp, monkeypatch: (tmp / name).mkdir(parents=True)


def deleted_experiment(tmp: Path, monkeypatch) -> None:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    client.delete_experiment(client.create_experiment("gone"))


def read_only_store(tmp: Path, monkeypatch) -> None:
    # The tests run as root, which writes anywhere: make the store read-only as a user's account sees it.
    import pflbench.benchmark.tracking as tracking

    real = tracking.os.access
    monkeypatch.setattr(tracking.os, "access",
                        lambda path, mode: False if str(path).endswith("mlflow.db") else real(path, mode))


def full_disk(tmp: Path, monkeypatch) -> None:
    from mlflow.exceptions import MlflowException

    def no_space(*args, **kwargs):
        raise MlflowException("(sqlite3.OperationalError) database or disk is full")

    monkeypatch.setattr(MlflowClient, "create_experiment", no_space)


def full_disk_oserror(tmp: Path, monkeypatch) -> None:
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MlflowClient, "create_run", no_space)


def config_file(text: str) -> Setup:
    return file_at("c.toml", text.encode())


def suite_file(text: str) -> Setup:
    return file_at("s.toml", text.encode())


def empty_experiment(tmp: Path, monkeypatch) -> None:
    from pflbench.benchmark.tracking import ensure_experiment

    ensure_experiment(f"sqlite:///{tmp / 'mlflow.db'}", "pflbench")


LATIN1 = "[train]\nlr = 0.1  # taux d'apprentissage élevé\n".encode("latin-1")  # not UTF-8
SUITE_RUN = '[[run]]\ndataset = "digits"\npreset = "smoke"\n'
SUITE = 'seeds = [0]\nmethods = ["fedavg"]\n' + SUITE_RUN


def item(index, value):
    def change(data):
        data["train"][0][index] = value

    return change


# -- the table -------------------------------------------------------------------------

CASES: list[tuple[str, list[str], str, Setup | None]] = [
    # bench run: names, keys and values
    ("run-unknown-method", ["run", "--method", "nope", "--dataset", "digits"], "unknown method 'nope'", None),
    ("run-unknown-dataset", ["run", "--method", "fedavg", "--dataset", "nope"], "unknown dataset 'nope'", None),
    ("run-unknown-key", [*RUN, "--set", "no.such.key=1"], "no.such.key", None),
    ("run-unknown-section-key", [*RUN, "--set", "train.nope=1"], "allowed in train", None),
    ("run-section-as-key", [*RUN, "--set", "train=1"], "is a section", None),
    ("run-set-without-equals", [*RUN, "--set", "train.lr"], "expected key=value", None),
    ("run-bad-float", [*RUN, "--set", "train.lr=fast"], "train.lr", None),
    ("run-bad-int", [*RUN, "--set", "train.rounds=2.5"], "train.rounds", None),
    ("run-bad-bool", [*RUN, "--set", "data.augment=maybe"], "data.augment", None),
    ("run-unknown-preset", [*RUN[:5], "--preset", "nope"], "unknown preset 'nope'", None),
    ("run-missing-config", [*RUN, "--config", "missing.toml"], "config file not found", None),
    ("run-config-not-toml", [*RUN, "--config", "{tmp}/c.toml"], "not valid TOML", config_file("[train\n")),
    ("run-config-other-method", [*RUN, "--config", "{tmp}/c.toml"], "method.name = 'local'",
     config_file('[method]\nname = "local"\n')),
    ("run-config-without-names", ["run", "--config", "{tmp}/c.toml"], "--method, --dataset",
     config_file("[train]\nrounds = 2\n")),
    ("run-config-name-not-a-string", ["run", "--config", "{tmp}/c.toml"], "method.name",
     config_file("[method]\nname = 3\n")),
    ("run-missing-dataset", ["run", "--method", "fedavg"], "--dataset", None),
    ("unknown-command", ["frobnicate"], "invalid choice", None),
    ("run-unknown-option", [*RUN, "--frobnicate"], "unrecognized arguments", None),
    # numeric ranges
    ("run-seed-negative", [*RUN, "--seed", "-1"], "bad value for seed", None),
    ("run-seed-huge", [*RUN, "--seed", str(2**64)], "bad value for seed", None),
    ("run-seed-not-a-number", [*RUN, "--seed", "abc"], "--seed", None),
    ("run-image-size-huge", [*RUN, "--set", "model.image_size=100000"], "model.image_size", None),
    ("run-image-size-negative", [*RUN, "--set", "model.image_size=-4"], "model.image_size", None),
    ("run-lr-nan", [*RUN, "--set", "train.lr=nan"], "bad value for train.lr: 'nan' (expected a finite number)", None),
    ("run-lr-inf", [*RUN, "--set", "train.lr=inf"], "bad value for train.lr", None),
    ("run-lr-negative", [*RUN, "--set", "train.lr=-1"], "bad value for train.lr", None),
    ("run-fraction-nan", [*RUN, "--set", "train.sample_fraction=nan"], "train.sample_fraction", None),
    ("run-alpha-minus-inf", [*RUN, "--set", "data.alpha=-inf"], "data.alpha", None),
    ("run-val-fraction-too-big", [*RUN, "--set", "data.val_fraction=1.5"], "data.val_fraction", None),
    ("run-method-option-nan", ["run", "--method", "fedperfix", "--dataset", "digits", "--set", "method.scale=nan"],
     "bad value for method.scale", None),
    ("run-method-option-inf", ["run", "--method", "pfedhn", "--dataset", "digits", "--set", "method.hn_lr=inf"],
     "bad value for method.hn_lr", None),
    ("run-method-option-of-another-method", [*RUN, "--set", "method.scale=1"], "unknown config key 'method.scale'",
     None),
    ("run-failure-rate-above-1", [*RUN, "--set", "train.client_failure_rate=1.5"], "train.client_failure_rate",
     None),
    ("run-checkpoint-every-negative", [*RUN, "--set", "run.checkpoint_every=-1"], "run.checkpoint_every", None),
    ("run-zero-rounds", [*RUN, "--set", "train.rounds=0"], "train.rounds", None),
    ("run-zero-clients", [*RUN, "--set", "data.num_clients=0"], "data.num_clients", None),
    ("run-heads-do-not-divide", [*RUN, "--set", "model.num_heads=3"], "model.embed_dim", None),
    ("run-partition-seed-below-minus-1", [*RUN, "--set", "data.partition_seed=-5"], "data.partition_seed", None),
    ("run-novel-clients-negative", [*RUN, "--set", "data.novel_clients=-1"], "data.novel_clients", None),
    ("run-novel-clients-all", [*RUN, "--set", "data.num_clients=5", "--set", "data.novel_clients=5"],
     "data.novel_clients", None),
    ("plan-bad-utilization", ["plan", "{tmp}/s.toml", "--utilization", "2"], "--utilization", None),
    # models
    ("run-model-wildcard", [*RUN, "--set", "model.name=vit_*"], "not a pattern", None),
    ("run-model-unknown", [*RUN, "--set", "model.name=vit_nope_nope"], "unknown model.name", None),
    ("run-model-not-a-vit", [*RUN, "--set", "model.name=resnet18"], "not a Vision Transformer", None),
    ("run-model-does-not-fit-images", [*RUN, "--set", "model.name=vit_tiny_patch16_224"], "do not tile", None),
    ("run-patch-does-not-divide", [*RUN, "--set", "model.patch_size=3"], "model.patch_size", None),
    ("run-pretrained-path-missing", [*RUN, "--set", "model.pretrained_path={tmp}/w.pt"], "not found", None),
    ("run-pretrained-path-not-weights", [*RUN, "--set", "model.pretrained_path={tmp}/w.pt"], "refusing",
     file_at("w.pt")),
    # devices and flags
    ("run-device-unknown", [*RUN[:-2], "--device", "tpu"], "bad value for device", None),
    ("run-device-cuda-absent", [*RUN[:-2], "--device", "cuda"], "no CUDA device", None),
    ("run-explain-without-dry-run", [*RUN, "--explain"], "--explain goes with --dry-run", None),
    ("run-tag-without-equals", [*RUN, "--tag", "novalue"], "expected KEY=VALUE", None),
    # tracking stores
    ("run-tracking-unknown-scheme", [*RUN, "--tracking-uri", "foo://x"], "unknown tracking URI", None),
    ("run-tracking-no-scheme", [*RUN, "--tracking-uri", "mlflow.db"], "unknown tracking URI", None),
    ("run-tracking-folder-missing", [*RUN, "--tracking-uri", "sqlite:///{tmp}/typo/mlflow.db"], "does not exist",
     None),
    ("run-tracking-folder-is-a-file", [*RUN, "--tracking-uri", "sqlite:///{tmp}/afile/mlflow.db"],
     "is a file, not a folder", file_at("afile")),
    ("run-tracking-not-a-database", [*RUN, "--tracking-uri", "sqlite:///{tmp}/notes.db"], "not an SQLite database",
     file_at("notes.db")),
    ("run-tracking-db-is-a-folder", [*RUN, "--tracking-uri", "sqlite:///{tmp}/dbdir"], "is a folder",
     folder_at("dbdir")),
    ("run-tracking-read-only", RUN, "read-only", read_only_store),
    ("run-tracking-disk-full", RUN, "is full", full_disk),
    ("run-tracking-disk-full-oserror", RUN, "is full", full_disk_oserror),
    ("run-tracking-unreachable-server", [*RUN, "--tracking-uri", "http://127.0.0.1:9"], "cannot reach", None),
    ("run-experiment-empty", [*RUN, "--experiment", ""], "experiment name is empty", None),
    ("run-experiment-too-long", [*RUN, "--experiment", "x" * 300], "at most 256", None),
    ("run-experiment-deleted", [*RUN, "--experiment", "gone"], "experiment 'gone' is deleted", deleted_experiment),
    # resume
    ("run-resume-unknown-run", ["run", "--resume", "0" * 32], "no run", None),
    ("run-resume-with-settings", ["run", "--resume", "0" * 32, "--set", "train.lr=1"], "drop --set", None),
    # saved partition files, through bench run and bench partition
    ("run-partition-file-test-equals-train", [*RUN, "--set", "data.num_clients=4", *WITH_FILE],
     "appears more than once", partition_file(lambda d: d.update(test=d["train"]))),
    ("partition-file-missing", [*PARTITION, *WITH_FILE], "partition file not found", None),
    ("partition-file-empty", [*PARTITION, *WITH_FILE], "not JSON", partition_file(text="")),
    ("partition-file-not-json", [*PARTITION, *WITH_FILE], "not JSON", partition_file(text="{train: [")),
    ("partition-file-a-list", [*PARTITION, *WITH_FILE], "not a saved pflbench partition", partition_file(text="[]")),
    ("partition-file-missing-split", [*PARTITION, *WITH_FILE], "not a saved pflbench partition",
     partition_file(lambda d: d.pop("val"))),
    ("partition-file-split-not-a-list", [*PARTITION, *WITH_FILE], "one list of sample indices per client",
     partition_file(lambda d: d.update(val=3))),
    ("partition-file-wrong-client-count", [*PARTITION, *WITH_FILE], "has 3 clients, but data.num_clients=4",
     partition_file(lambda d: valid_partition(3))),
    ("partition-file-splits-disagree", [*PARTITION, *WITH_FILE], "different numbers of clients",
     partition_file(lambda d: d["val"].pop())),
    ("partition-file-float-index", [*PARTITION, *WITH_FILE], "integer sample indices", partition_file(item(0, 1.5))),
    ("partition-file-string-index", [*PARTITION, *WITH_FILE], "integer sample indices", partition_file(item(0, "7"))),
    ("partition-file-bool-index", [*PARTITION, *WITH_FILE], "integer sample indices",
     partition_file(lambda d: d["train"].__setitem__(0, [True, False]))),
    ("partition-file-null-client", [*PARTITION, *WITH_FILE], "integer sample indices",
     partition_file(lambda d: d["test"].__setitem__(1, None))),
    ("partition-file-nested", [*PARTITION, *WITH_FILE], "integer sample indices",
     partition_file(lambda d: d["train"].__setitem__(0, [[1, 2], [3, 4]]))),
    ("partition-file-negative-index", [*PARTITION, *WITH_FILE], "out of range", partition_file(item(0, -1))),
    ("partition-file-index-too-large", [*PARTITION, *WITH_FILE], "out of range", partition_file(item(0, 10**6))),
    ("partition-file-test-equals-train", [*PARTITION, *WITH_FILE], "appears more than once",
     partition_file(lambda d: d.update(test=d["train"]))),
    ("partition-file-sample-in-two-clients", [*PARTITION, *WITH_FILE], "client 0 train and client 1 train",
     partition_file(lambda d: d["train"][1].append(0))),
    ("partition-file-index-twice-in-a-split", [*PARTITION, *WITH_FILE], "appears more than once",
     partition_file(lambda d: d["val"][2].append(d["val"][2][0]))),
    ("partition-file-client-without-training", [*PARTITION, *WITH_FILE], "client 2 has no training samples",
     partition_file(lambda d: d["train"].__setitem__(2, []))),
    # bench partition: outputs and settings
    ("partition-plot-folder-missing", [*PARTITION, "--plot", "{tmp}/nope/skew.png"], "does not exist", None),
    ("partition-plot-is-a-folder", [*PARTITION, "--plot", "{tmp}/d.png"], "is a folder", folder_at("d.png")),
    ("partition-plot-not-png", [*PARTITION, "--plot", "{tmp}/skew.txt"], "ending in .png", None),
    ("partition-save-folder-missing", [*PARTITION, "--save", "{tmp}/nope/p.json"], "does not exist", None),
    ("partition-save-is-a-folder", [*PARTITION, "--save", "{tmp}/out.json"], "is a folder", folder_at("out.json")),
    ("partition-unknown-dataset", ["partition", "--dataset", "nope"], "unknown dataset", None),
    ("partition-unknown-scheme", [*PARTITION, "--set", "data.partition=nope"], "data.partition", None),
    ("partition-too-many-clients", [*PARTITION[:-1], "data.num_clients=100000"], "data.num_clients", None),
    # bench sensitivity
    ("sensitivity-out-is-a-file", [*SENSITIVITY, "--out", "{tmp}/taken"], "is a file, not a folder",
     file_at("taken")),
    ("sensitivity-out-below-a-file", [*SENSITIVITY, "--out", "{tmp}/taken/sub"], "is a file, not a folder",
     file_at("taken")),
    ("sensitivity-method-setting", [*SENSITIVITY, "--set", "method.personal=head.*"], "chooses the method settings",
     None),
    ("sensitivity-unknown-dataset", ["sensitivity", "--dataset", "nope"], "unknown dataset", None),
    ("sensitivity-bad-value", [*SENSITIVITY, "--set", "train.lr=nan"], "train.lr", None),
    ("sensitivity-tracking-unknown-scheme", [*SENSITIVITY, "--tracking-uri", "foo://x"], "unknown tracking URI",
     None),
    ("sensitivity-experiment-empty", [*SENSITIVITY, "--experiment", " "], "experiment name is empty", None),
    # bench perf
    ("perf-zero-clients", [*PERF, "--clients", "0"], "--clients", None),
    ("perf-zero-rounds", [*PERF, "--rounds", "0"], "--rounds", None),
    ("perf-zero-repeats", [*PERF, "--repeats", "0"], "--repeats", None),
    ("perf-zero-threads", [*PERF, "--threads", "0"], "--threads", None),
    ("perf-negative-clients", [*PERF, "--clients", "-3"], "--clients", None),
    ("perf-rounds-not-a-number", [*PERF, "--rounds", "abc"], "--rounds", None),
    ("perf-unknown-benchmark", ["perf", "nope"], "invalid choice", None),
    ("perf-unknown-dataset", [*PERF, "--dataset", "nope"], "unknown dataset", None),
    ("perf-bad-setting", [*PERF, "--set", "train.lr=nan"], "train.lr", None),
    # bench runs
    ("runs-mark-killed-without-stale", ["runs", "--mark-killed"], "--mark-killed goes with --stale", None),
    ("runs-tracking-unknown-scheme", ["runs", "--tracking-uri", "foo://x"], "unknown tracking URI", None),
    ("runs-zero-limit", ["runs", "--limit", "0"], "--limit", None),
    # bench tune
    ("tune-unknown-storage-scheme", [*TUNE, "--storage", "redis://localhost/0"], "unknown storage scheme 'redis'",
     None),
    ("tune-unreachable-postgresql", [*TUNE, "--storage", "postgresql://nobody@127.0.0.1:1/none"],
     "cannot open study storage", None),
    ("tune-no-validation-data", [*TUNE, "--set", "data.val_fraction=0"], "data.val_fraction", None),
    ("tune-zero-trials", [*TUNE[:-2], "--trials", "0"], "--trials", None),
    ("tune-search-budget-not-a-budget-key", [*TUNE, "--search-budget", "train.lr"], "not a budget key of fedavg",
     None),
    ("tune-search-budget-without-a-range", [*TUNE[:2], "fedperfix", *TUNE[3:], "--search-budget", "method.mid_dim"],
     "no search space of fedperfix", None),
    ("run-bad-precision", [*RUN, "--set", "train.precision=fp16"], "train.precision", None),
    ("run-bad-eval-timing", [*RUN, "--set", "train.eval_timing=sometimes"], "train.eval_timing", None),
    ("perf-flops-unknown-method", ["perf", "flops", "--methods", "nope"], "unknown method 'nope'", None),
    ("tune-zero-workers", [*TUNE, "--workers", "0"], "--workers", None),
    ("tune-unknown-pruner", [*TUNE, "--pruner", "nope"], "--pruner", None),
    ("tune-unknown-method", ["tune", "--method", "nope", "--dataset", "digits", "--trials", "2"],
     "unknown method 'nope'", None),
    # bench sweep
    ("sweep-missing-suite", ["sweep", "{tmp}/missing.toml"], "suite file not found", None),
    ("sweep-unknown-method", ["sweep", "{tmp}/s.toml"], "unknown method 'nope'; choose one of:",
     suite_file('methods = ["fedavg", "nope"]\n[[run]]\ndataset = "digits"\n')),
    ("sweep-unknown-dataset", ["sweep", "{tmp}/s.toml"], "unknown dataset 'nope'",
     suite_file('[[run]]\ndataset = "nope"\n')),
    ("sweep-unknown-key", ["sweep", "{tmp}/s.toml"], "unknown key 'colour'",
     suite_file('[[run]]\ndataset = "digits"\ncolour = 1\n')),
    ("sweep-seeds-not-a-list", ["sweep", "{tmp}/s.toml"], "'seeds' must be a list",
     suite_file('seeds = "0"\n[[run]]\ndataset = "digits"\n')),
    ("sweep-no-run-table", ["sweep", "{tmp}/s.toml"], "no [[run]] table", suite_file('methods = ["fedavg"]\n')),
    ("sweep-bad-override", ["sweep", "{tmp}/s.toml"], "train.lr",
     suite_file('[[run]]\ndataset = "digits"\noverrides = ["train.lr=x"]\n')),
    ("sweep-best-of-unknown-study", ["sweep", "{tmp}/s.toml"], "never-tuned",
     suite_file('methods = ["fedavg"]\n[[run]]\ndataset = "digits"\nbest_of = "never-tuned"\n')),
    ("sweep-not-toml", ["sweep", "{tmp}/s.toml"], "not valid TOML", suite_file("[[run]\n")),
    ("sweep-zero-workers", ["sweep", "{tmp}/s.toml", "--workers", "0"], "--workers",
     suite_file('methods = ["fedavg"]\n[[run]]\ndataset = "digits"\n')),
    # files that are not UTF-8, values where tables belong
    ("run-config-not-utf8", [*RUN, "--config", "{tmp}/c.toml"], "not UTF-8 text", file_at("c.toml", LATIN1)),
    ("run-config-names-not-utf8", ["run", "--config", "{tmp}/c.toml"], "not UTF-8 text", file_at("c.toml", LATIN1)),
    ("run-config-is-a-folder", [*RUN, "--config", "{tmp}/conf"], "config file not found", folder_at("conf")),
    ("run-config-name-a-table", ["run", "--config", "{tmp}/c.toml"], "method.name",
     config_file("[method]\nname = { a = 1 }\n")),
    ("run-config-value-for-a-section", [*RUN, "--config", "{tmp}/c.toml"], "is a section", config_file("train = 3\n")),
    ("sweep-not-utf8", ["sweep", "{tmp}/s.toml"], "not UTF-8 text", file_at("s.toml", LATIN1)),
    ("plan-not-utf8", ["plan", "{tmp}/s.toml"], "not UTF-8 text", file_at("s.toml", LATIN1)),
    ("sweep-run-not-a-table", ["sweep", "{tmp}/s.toml"], "[[run]] #1 is 1, not a table", suite_file("run = [1, 2]\n")),
    ("sweep-experiment-not-a-string", ["sweep", "{tmp}/s.toml"], "'experiment' must be a string",
     suite_file('experiment = 3\n[[run]]\ndataset = "digits"\n')),
    ("sweep-methods-a-table", ["sweep", "{tmp}/s.toml"], "'methods' must be a list",
     suite_file('[methods]\na = 1\n[[run]]\ndataset = "digits"\n')),
    # silent no-ops and duplicates in suites
    ("sweep-seeds-empty", ["sweep", "{tmp}/s.toml"], "'seeds' is empty", suite_file(SUITE.replace("[0]", "[]"))),
    ("sweep-methods-empty", ["sweep", "{tmp}/s.toml"], "'methods' is empty",
     suite_file(SUITE.replace('["fedavg"]', "[]"))),
    ("sweep-run-methods-empty", ["sweep", "{tmp}/s.toml"], "'methods' is empty",
     suite_file(SUITE + "methods = []\n")),
    ("sweep-seed-twice", ["sweep", "{tmp}/s.toml"], "'seeds' lists 0 twice", suite_file(SUITE.replace("[0]", "[0, 0]"))),
    ("sweep-method-twice", ["sweep", "{tmp}/s.toml"], "'methods' lists 'fedavg' twice",
     suite_file(SUITE.replace('["fedavg"]', '["fedavg", "fedavg"]'))),
    ("sweep-identical-runs", ["sweep", "{tmp}/s.toml"], "[[run]] #2 repeats [[run]] #1", suite_file(SUITE + SUITE_RUN)),
    ("sweep-runs-identical-once-resolved", ["sweep", "{tmp}/s.toml"], "[[run]] #2 repeats [[run]] #1",
     suite_file(SUITE + SUITE_RUN + 'overrides = ["train.rounds=2"]\n')),  # smoke's own value: the same run
    ("plan-identical-runs", ["plan", "{tmp}/s.toml"], "[[run]] #2 repeats [[run]] #1", suite_file(SUITE + SUITE_RUN)),
    # worker counts and other counts
    ("tune-workers-past-the-machine", [*TUNE, "--workers", "100000"], "this machine runs at most", None),
    ("sweep-workers-past-the-machine", ["sweep", "{tmp}/s.toml", "--workers", "100000"], "this machine runs at most",
     suite_file(SUITE)),
    ("sweep-negative-workers", ["sweep", "{tmp}/s.toml", "--workers", "-2"], "--workers", suite_file(SUITE)),
    ("tune-timeout-negative", [*TUNE, "--timeout", "-1"], "--timeout", None),
    ("tune-timeout-nan", [*TUNE, "--timeout", "nan"], "--timeout", None),
    ("tune-timeout-zero", [*TUNE, "--timeout", "0"], "--timeout", None),
    ("perf-together-zero-rounds", ["perf", "together", "--rounds", "0"], "--rounds", None),
    ("perf-together-negative-parallel", ["perf", "together", "--parallel", "-1"], "train.parallel_clients", None),
    ("perf-gpu-zero-repeats", ["perf", "gpu", "--tiny", "--repeats", "0"], "--repeats", None),
    ("perf-gpu-zero-threads", ["perf", "gpu", "--tiny", "--threads", "0"], "--threads", None),
    ("perf-memory-no-methods", ["perf", "memory", "--methods", ""], "give at least one method", None),
    ("perf-memory-only-commas", ["perf", "memory", "--methods", ",,"], "give at least one method", None),
    ("perf-flops-only-commas", ["perf", "flops", "--methods", ","], "give at least one method", None),
    # tuning: nothing to search, storages, names used as paths
    ("tune-every-searched-key-fixed", [*TUNE, *[a for k in ("lr=0.1", "momentum=0", "weight_decay=0", "batch_size=32")
                                              for a in ("--set", f"train.{k}")]], "nothing to tune", None),
    ("tune-storage-a-folder", [*TUNE, "--storage", "{tmp}/journal"], "is a folder", folder_at("journal")),
    ("tune-storage-journal-a-folder", [*TUNE, "--storage", "journal:///{tmp}/journal"], "is a folder",
     folder_at("journal")),
    ("tune-storage-garbage", [*TUNE, "--storage", "{tmp}/j.log"], "not an Optuna journal file",
     file_at("j.log", b"\x00\x01 not a journal\n{{{\n")),
    ("tune-storage-text-garbage", [*TUNE, "--storage", "journal:///{tmp}/j.log"], "not an Optuna journal file",
     file_at("j.log", b"hello\n")),
    ("tune-storage-folder-missing", [*TUNE, "--storage", "{tmp}/nope/j.log"], "does not exist", None),
    ("tune-study-with-slash", [*TUNE, "--study", "a/b"], "bad --study 'a/b'", None),
    ("tune-study-with-backslash", [*TUNE, "--study", "a\\b"], "bad --study", None),
    ("tune-study-dot-dot", [*TUNE, "--study", ".."], "bad --study", None),
    ("tune-study-blank", [*TUNE, "--study", " "], "bad --study", None),
    # output paths
    ("partition-plot-unwritable", [*PARTITION, "--plot", "/proc/skew.png"], "cannot write there", None),
    ("partition-save-unwritable", [*PARTITION, "--save", "/proc/p.json"], "cannot write there", None),
    ("leaderboard-out-empty", ["leaderboard", "--out", ""], "--out is empty", empty_experiment),
    ("leaderboard-out-blank", ["leaderboard", "--out", "  "], "--out is empty", empty_experiment),
    ("leaderboard-out-is-a-file", ["leaderboard", "--out", "{tmp}/taken"], "is a file, not a folder",
     file_at("taken")),
    # flags that would be ignored
    ("run-resume-with-experiment", ["run", "--resume", "0" * 32, "--experiment", "other"], "drop --experiment", None),
    ("run-resume-with-default-experiment", ["run", "--resume", "0" * 32, "--experiment", "pflbench"],
     "drop --experiment", None),
    # read-only commands on a mistyped store create nothing
    ("runs-stale-store-missing", ["runs", "--stale", "--tracking-uri", "sqlite:///{tmp}/typo.db"], "no MLflow store",
     None),
    ("runs-store-missing", ["runs", "--tracking-uri", "sqlite:///{tmp}/typo.db"], "no MLflow store", None),
    ("runs-mark-killed-store-missing", ["runs", "--stale", "--mark-killed", "--tracking-uri",
                                       "sqlite:///{tmp}/typo.db"], "no MLflow store", None),
    ("leaderboard-store-missing", ["leaderboard", "--out", "{tmp}/b", "--tracking-uri", "sqlite:///{tmp}/typo.db"],
     "no MLflow store", None),
    # bench leaderboard
    ("leaderboard-no-experiment", ["leaderboard", "--out", "{tmp}/b", "--experiment", "nope"],
     "no MLflow experiment 'nope'", None),
    ("leaderboard-empty-experiment", ["leaderboard", "--out", "{tmp}/b"], "has no finished runs of stage 'final'",
     empty_experiment),
    ("leaderboard-no-runs-of-stage", ["leaderboard", "--out", "{tmp}/b", "--stage", "tune"],
     "has no finished runs of stage 'tune'", empty_experiment),
]

# Store files a refused command may touch: the lock that serializes set-up, sqlite's journal.
HARMLESS = (".lock", "-journal", "-wal", "-shm")


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def _running(uri: str) -> list[str]:
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(ids, "attributes.status = 'RUNNING'")] if ids else []


def test_the_table_covers_each_command_and_has_enough_cases():
    commands = {argv[0] for _, argv, _, _ in CASES}
    assert {"run", "partition", "sensitivity", "perf", "runs", "tune", "sweep", "leaderboard"} <= commands
    assert len(CASES) >= 60 and len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("argv, fragment, setup", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(argv, fragment, setup, tracking_uri, tmp_path,
                                                            monkeypatch, capsys):
    if setup is not None:
        setup(tmp_path, monkeypatch)
    before = _files(tmp_path)
    started = time.monotonic()
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    seconds = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert seconds < 10  # refused before any work (an unreachable server included)
    monkeypatch.undo()  # the store itself is read back below, without the faults the set-up planted
    assert _running(tracking_uri) == []
    new = [p for p in _files(tmp_path) - before if not p.name.endswith(HARMLESS)]
    assert new == [], new


@pytest.mark.parametrize("argv, fragment", [
    (["run", "--method", "nope", "--dataset", "digits"], "unknown method 'nope'"),
    ([*RUN, "--tracking-uri", "sqlite:///{tmp}/typo/mlflow.db"], "does not exist"),
    ([*PARTITION, *WITH_FILE], "appears more than once"),
])
def test_bad_input_through_a_real_process(argv, fragment, tmp_path):
    partition_file(lambda d: d.update(test=d["train"]))(tmp_path, None)
    done = subprocess.run([sys.executable, "-m", "pflbench.benchmark.cli",
                           *[a.replace("{tmp}", str(tmp_path)) for a in argv]],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "typo").exists()  # a typo in the store's path creates nothing
