"""`bench tune`: studies on validation data that resume, prune, share storage, and record to MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections import Counter

import pytest

from pflbench.benchmark import tuning
from pflbench.benchmark.cli import main
from pflbench.benchmark.engine import Simulation
from pflbench.benchmark.errors import UserError
from pflbench.benchmark.tracking import experiment_exists, find_runs, read_text_artifact
from pflbench.datasets import FederatedData

from conftest import TINY, tiny_config

# Fixed with --set, so left out of the search: each trial is a 2-round tiny run.
FAST = [*TINY, "train.local_epochs=1", "train.batch_size=32"]
BASE = ["tune", "--method", "fedavg", "--dataset", "digits", "--preset", "smoke",
        *(a for o in FAST for a in ("--set", o))]


def _tune(capsys, *argv):
    code = main([*BASE, "--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _study(out: str) -> str:
    return out.split()[1]


def test_a_study_completes_then_a_rerun_tops_it_up(capsys, tracking_uri, tmp_path):
    code, out, err = _tune(capsys, "--trials", "3")
    assert code == 0, err
    name = _study(out)
    assert "trials=3 ran=3" in out
    assert "tuning_gain=" in out  # the best against the defaults' trial 0
    journal = tmp_path / "optuna-journal.log"
    assert journal.is_file()  # default storage: beside the MLflow store
    parent = out.strip().split("parent_run_id=")[1]

    code, out, err = _tune(capsys, "--trials", "5")
    assert code == 0, err
    assert "trials=5 ran=2" in out and out.strip().endswith(parent)  # resumed, same parent run
    assert "trials=5 ran=0" in _tune(capsys, "--trials", "5")[1]  # nothing left to do

    children = find_runs(tracking_uri, "pflbench", stage="tune", status=None, tags={"pflbench.study": name})
    trials = [r for r in children if "mlflow.parentRunId" in r.tags]
    assert sorted(int(r.tags["pflbench.trial"]) for r in trials) == [0, 1, 2, 3, 4]
    assert {r.tags["mlflow.parentRunId"] for r in trials} == {parent}
    # How far tuning moved the method, on the parent run: the best val_acc_mean against trial 0's.
    parent_run = next(r for r in children if r.run_id == parent)
    gain = float(out.split("tuning_gain=")[1].split()[0])
    assert parent_run.metrics["tuning_gain"] == pytest.approx(gain, abs=1e-4) and gain >= 0
    assert parent_run.metrics["default_val_acc_mean"] == pytest.approx(
        parent_run.metrics["best_val_acc_mean"] - parent_run.metrics["tuning_gain"])
    # Trial 0 ran the preset's own settings: the smoke preset's lr.
    first = next(r for r in trials if r.tags["pflbench.trial"] == "0")
    assert float(first.params["train.lr"]) == 0.05
    # The best config is a run config that `bench run --config` accepts as it is.
    text = read_text_artifact(tracking_uri, parent, "best_config.toml")
    assert tomllib.loads(text)["method"]["name"] == "fedavg"
    best_file = tmp_path / f"{name}.best_config.toml"
    assert best_file.read_text() == text
    code = main(["run", "--method", "fedavg", "--dataset", "digits", "--config", str(best_file), "--dry-run"])
    assert code == 0 and capsys.readouterr().out == text


def test_the_test_split_is_never_read_while_tuning(capsys, tracking_uri, monkeypatch):
    # Every way evaluation reads a split: batch by batch, or all of a client's indices at once.
    seen: list[str] = []

    def spy_on(name):
        original = getattr(FederatedData, name)

        def spy(self, client, split, *args, **kwargs):
            if split != "train":
                seen.append(split)
            return original(self, client, split, *args, **kwargs)

        monkeypatch.setattr(FederatedData, name, spy)

    spy_on("eval_batches")
    spy_on("indices")
    code, out, err = _tune(capsys, "--trials", "2")
    assert code == 0, err
    assert seen and set(seen) == {"val"}
    for run in find_runs(tracking_uri, "pflbench", stage="tune"):
        if "mlflow.parentRunId" in run.tags:
            assert "val_acc_mean" in run.metrics and not any(k.startswith("test_") for k in run.metrics)
    # The same spies see both splits in ordinary runs, down either evaluation path: they would catch a test read.
    for method in ("fedavg", "fedbn"):  # a shared body evaluated at once; per-client models
        seen.clear()
        Simulation(tiny_config(method)).run()
        assert set(seen) == {"val", "test"}, method


def test_a_pruned_trial_ends_killed_and_tagged_not_failed(capsys, tracking_uri, monkeypatch):
    # A real Optuna pruner that stops every trial at its first report: pruning must happen.
    monkeypatch.setattr(tuning, "_pruner", lambda name: tuning.optuna.pruners.ThresholdPruner(lower=2.0))
    code, out, err = _tune(capsys, "--trials", "2", "--set", "train.rounds=3")
    assert code == 0, err
    trials = [r for r in find_runs(tracking_uri, "pflbench", stage="tune", status=None)
              if "mlflow.parentRunId" in r.tags]
    assert len(trials) == 2
    assert {r.status for r in trials} == {"KILLED"}
    assert all(r.tags.get("pflbench.pruned") == "true" for r in trials)
    assert "best_val_acc_mean=none" in out  # no trial completed


def test_workers_are_processes_that_share_one_journal_study(capsys, tracking_uri):
    code, out, err = _tune(capsys, "--trials", "4", "--workers", "2")
    assert code == 0, err
    name = _study(out)
    trials = [r for r in find_runs(tracking_uri, "pflbench", stage="tune", status=None,
                                   tags={"pflbench.study": name}) if "mlflow.parentRunId" in r.tags]
    numbers = [int(r.tags["pflbench.trial"]) for r in trials]
    assert sorted(numbers) == [0, 1, 2, 3]  # exactly N, none twice, each in MLflow once


def _two_workers(uri: str, tmp_path, env) -> Counter:
    """Two `bench tune` processes on one study, as on two machines; returns trials per worker."""
    cmd = [sys.executable, "-m", "pflbench.benchmark.cli", *BASE, "--trials", "6", "--storage", uri,
           "--study", "shared", "--pruner", "none", "--quiet"]
    # A shared MLflow store exists before the workers start (two processes must not create one sqlite schema).
    experiment_exists(env["MLFLOW_TRACKING_URI"], "pflbench")
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    storage = tuning.open_storage(uri)
    study = tuning.optuna.load_study(study_name="shared", storage=storage)
    # Two workers that both start a trial when one is left close the later one unrun (not counted).
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(tuning.OVER_ATTR)]
    assert sorted(t.number for t in trials) == list(range(6))  # exactly N, no number twice
    assert {t.state.name for t in trials} == {"COMPLETE"}
    runs = [r for r in find_runs(env["MLFLOW_TRACKING_URI"], "pflbench", stage="tune",
                                 tags={"pflbench.study": "shared"}) if "mlflow.parentRunId" in r.tags]
    assert sorted(int(r.tags["pflbench.trial"]) for r in runs) == list(range(6))  # each once in MLflow
    assert {t.user_attrs[tuning.RUN_ATTR] for t in trials} == {r.run_id for r in runs}
    assert len({r.tags["mlflow.parentRunId"] for r in runs}) == 1  # one parent for both workers
    per_worker = Counter(t.user_attrs[tuning.WORKER_ATTR] for t in trials)
    print(f"trials per worker: {dict(per_worker)}")
    return per_worker


def _env(tracking_uri):
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, OMP_NUM_THREADS="1")
    return env


def test_two_tune_processes_share_a_journal_study(tracking_uri, tmp_path):
    per_worker = _two_workers(f"journal:///{tmp_path / 'shared.log'}", tmp_path, _env(tracking_uri))
    assert sum(per_worker.values()) == 6


POSTGRES = os.environ.get("PFLBENCH_TEST_POSTGRES")


# CI (.ci/run sets PFLBENCH_REQUIRE_SERVICES=1) never skips: there a missing server fails the test.
@pytest.mark.skipif(not POSTGRES and os.environ.get("PFLBENCH_REQUIRE_SERVICES") != "1",
                    reason="no PostgreSQL server: PFLBENCH_TEST_POSTGRES is not set (.ci/run starts one and sets it)")
def test_two_tune_processes_share_a_postgresql_study(tracking_uri, tmp_path):
    assert POSTGRES, "PFLBENCH_REQUIRE_SERVICES=1 but PFLBENCH_TEST_POSTGRES is not set"
    # A fresh database per test run, so the study starts empty.
    import psycopg

    db = f"pflbench_test_{os.getpid()}"
    admin = psycopg.connect(POSTGRES, autocommit=True)
    admin.execute(f"CREATE DATABASE {db}")
    try:
        url = POSTGRES.rsplit("/", 1)[0] + "/" + db
        per_worker = _two_workers(url, tmp_path, _env(tracking_uri))
        assert sum(per_worker.values()) == 6
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.close()


def test_default_trial_lies_inside_the_search_space():
    cfg = tiny_config("fedperfix", "train.lr=0.05", "train.momentum=0.9")
    defaults = tuning.default_params(cfg, fixed={"train.batch_size"})
    assert defaults["train.lr"] == 0.05 and defaults["train.momentum"] == 0.9
    assert "train.batch_size" not in defaults
    probe = tuning._Probe()
    keys = tuning.suggest(probe, "fedperfix", set())
    assert {"train.lr", "train.local_epochs", "method.scale"} <= set(keys)


@pytest.mark.parametrize("method", ["fedavg", "fedrep", "fedavg_ft", "fedperfix"])
def test_budget_keys_are_never_searched_unless_named(method):
    budget = tuning.budget_keys(method)
    probe = tuning._Probe()
    searched = tuning.suggest(probe, method, budget)
    assert "train.local_epochs" in budget and not set(searched) & budget
    assert {"train.lr", "train.momentum"} <= set(searched)
    # Named with --search-budget, a budget key is searched again.
    again = tuning.suggest(tuning._Probe(), method, tuning.budget_keys(method, ["train.local_epochs"]))
    assert "train.local_epochs" in again
    with pytest.raises(UserError, match="not a budget key"):
        tuning.budget_keys(method, ["train.lr"])


def test_a_budget_key_without_a_range_cannot_be_searched():
    with pytest.raises(UserError, match="no search space"):
        tuning.budget_keys("fedperfix", ["method.mid_dim"])


def test_the_summary_says_how_far_tuning_moved_the_method():
    from rich.console import Console

    from pflbench.benchmark.console_study import tune_summary

    rows = [tuning.TrialRow(0, "COMPLETE", 0.61, {"train.lr": 0.05}, "w", "r0"),
            tuning.TrialRow(1, "COMPLETE", 0.70, {"train.lr": 0.1}, "w", "r1")]
    result = tuning.TuneResult("s", "journal", rows, rows[1], "", None, "p", "bench run ...", 2, {}, rows[0])
    console = Console(record=True, width=200)
    tune_summary(console, result, "fedavg", "digits")
    assert "tuning moved it by +0.0900 over the defaults (trial 0: val_acc_mean 0.6100)" in console.export_text()


@pytest.mark.parametrize("trials,startup", [(1, 2), (3, 2), (12, 4), (24, 8), (30, 10)])
def test_tpe_starts_from_about_a_third_of_the_budget(trials, startup):
    assert tuning.startup_trials(trials) == startup


def test_a_list_option_default_is_enqueued_in_its_searched_form():
    defaults = tuning.default_params(tiny_config("partial"), fixed=set())
    assert defaults["method.personal"] == "head.*"  # the default, as the search space spells it
    outside = tuning.default_params(tiny_config("partial", "method.personal=blocks.0.*"), fixed=set())
    assert "method.personal" not in outside  # not among the choices: left to the sampler


def test_a_dead_local_workers_trial_is_failed_and_replaced_on_rerun(capsys, tracking_uri, tmp_path):
    import socket

    code, out, err = _tune(capsys, "--trials", "1", "--pruner", "none")
    assert code == 0, err
    name = _study(out)
    storage = tuning.open_storage(f"journal:///{tmp_path / 'optuna-journal.log'}")
    study = tuning.optuna.load_study(study_name=name, storage=storage)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = study.ask()  # a trial left RUNNING by a worker process that no longer exists
    orphan.set_user_attr(tuning.WORKER_ATTR, f"{socket.gethostname()}:{dead.pid}")

    code, out, err = _tune(capsys, "--trials", "2", "--pruner", "none")
    assert code == 0, err
    states = {t.number: t.state.name for t in tuning.optuna.load_study(study_name=name, storage=storage).trials}
    assert states[orphan.number] == "FAIL"  # no longer blocks the study
    assert sorted(states.values()) == ["COMPLETE", "COMPLETE", "FAIL"]  # and did not use up the budget
