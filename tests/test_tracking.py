"""MLflow records: params, per-round metrics, tags and artifacts of every run; no run left RUNNING."""

from __future__ import annotations

import csv
import io
import json

import pytest
from mlflow.tracking import MlflowClient

from pflbench.benchmark.config import config_hash, flatten
from pflbench.benchmark.engine import Callback, Simulation
from pflbench.benchmark.tracking import RunRecorder

from conftest import tiny_config

TAGS = ["method", "dataset", "seed", "config_hash", "partition_hash", "version", "git_commit", "stage"]


def _only_run(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("pflbench")
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


def test_a_run_records_params_metrics_tags_and_artifacts(tracking_uri):
    cfg = tiny_config("fedavg", "train.rounds=3", seed=5)
    sim = Simulation(cfg)
    with RunRecorder(tracking_uri) as recorder:
        result = sim.run([recorder])
    client, run = _only_run(tracking_uri)
    assert run.info.status == "FINISHED" and run.info.run_id == recorder.run_id
    assert run.data.params == {k: str(v) for k, v in flatten(cfg).items()}
    tags = run.data.tags
    assert all(f"pflbench.{t}" in tags for t in TAGS)
    assert tags["pflbench.method"] == "fedavg" and tags["pflbench.seed"] == "5"
    assert tags["pflbench.config_hash"] == config_hash(cfg)
    assert tags["pflbench.partition_hash"] == sim.partition.digest()
    assert tags["pflbench.stage"] == "run"
    history = client.get_metric_history(run.info.run_id, "test_acc_mean")
    assert [m.step for m in history] == [1, 2, 3]
    assert history[-1].value == pytest.approx(result.history[-1]["test_acc_mean"])
    for key in ("test_acc_weighted", "val_acc_mean", "train_loss", "bytes_up", "bytes_down", "round_seconds",
                "train_flops", "server_flops"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 3, key
    # Capacity on record: every parameter, none personal, all of them sent after each visit (FedAvg).
    total = sum(p.numel() for p in sim.model.parameters())
    assert tags["pflbench.parameters"] == tags["pflbench.communicated_parameters"] == str(total)
    assert tags["pflbench.personal_parameters"] == "0"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.toml", "partition.json", "partition_summary.csv", "client_accuracy.csv",
            "learning_curve.png"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "partition.json")
    saved = json.loads(open(local).read())
    assert [len(ix) for ix in saved["train"]] == [len(ix) for ix in sim.partition.train]
    rows = list(csv.DictReader(io.StringIO(open(client.download_artifacts(run.info.run_id, "client_accuracy.csv")).read())))
    assert len(rows) == sim.data.num_clients
    assert float(rows[0]["test_acc"]) == pytest.approx(result.final.test_acc[0])


class _Boom(Callback):
    def __init__(self, exc):
        self.exc = exc

    def on_round(self, round_index, metrics):
        raise self.exc


@pytest.mark.parametrize("exc, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_crashed_or_interrupted_run_is_ended_not_left_running(tracking_uri, exc, status):
    sim = Simulation(tiny_config("fedavg"))
    with pytest.raises(type(exc)):
        with RunRecorder(tracking_uri) as recorder:
            sim.run([recorder, _Boom(exc)])
    client, run = _only_run(tracking_uri)
    assert run.info.status == status
    assert len(client.get_metric_history(run.info.run_id, "test_acc_mean")) == 1  # what was logged stays


def test_experiment_created_by_another_worker_meanwhile_is_reused(tracking_uri, monkeypatch):
    from pflbench.benchmark import tracking

    client = MlflowClient(tracking_uri)
    existing = client.create_experiment("shared")
    real_get = client.get_experiment_by_name
    calls = []

    def racy_get(name):  # the first lookup misses: the other worker creates it right after
        calls.append(name)
        return None if len(calls) == 1 else real_get(name)

    monkeypatch.setattr(client, "get_experiment_by_name", racy_get)
    assert tracking._experiment_id(client, "shared", tracking_uri) == existing
    assert len(calls) == 2


def test_a_run_records_its_dataset_input_process_and_name_and_tags(tracking_uri, capsys):
    import os
    import socket
    import sys
    from pathlib import Path

    from pflbench.benchmark.cli import main
    from conftest import TINY

    args = ["run", "--method", "fedavg", "--dataset", "digits", "--preset", "smoke", "--device", "cpu",
            "--run-name", "my-baseline", "--tag", "purpose=check", "--tag", "owner=lab"]
    for s in TINY:
        args += ["--set", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    client, run = _only_run(tracking_uri)
    assert run.info.run_name == "my-baseline"
    assert run.data.tags["purpose"] == "check" and run.data.tags["owner"] == "lab"
    assert run.data.tags["pflbench.host"] == socket.gethostname()
    assert run.data.tags["pflbench.pid"] == str(os.getpid())
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "digits"
    assert dataset_input.dataset.digest == run.data.tags["pflbench.partition_hash"]
    # The printed command names the mlflow beside this interpreter, and the run's own page.
    beside = Path(sys.executable).parent / "mlflow"
    program = beside if beside.exists() else f"{sys.executable} -m mlflow"
    assert f"{program} ui --backend-store-uri {tracking_uri}" in out
    assert (f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
            "?workflowType=machine_learning") in out


def test_run_url_and_ui_command_for_a_server():
    from pflbench.benchmark.tracking import run_url, ui_command

    assert run_url("http://host:5000/", "3", "abc") == \
        "http://host:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert ui_command("https://host") == "open https://host"


def test_every_experiment_pflbench_creates_or_uses_is_tagged_as_model_training(tracking_uri):
    from pflbench.benchmark.tracking import ensure_experiment

    client = MlflowClient(tracking_uri)
    before = client.create_experiment("made-elsewhere")  # untagged, as by hand or an older pflbench
    client.create_experiment("chosen-as-genai", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("new", "made-elsewhere", "chosen-as-genai"):
        exp_id = ensure_experiment(tracking_uri, name)
        assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development", name
    assert ensure_experiment(tracking_uri, "made-elsewhere") == before
