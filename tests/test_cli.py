"""The `bench` command as a user meets it: exit codes, one-line errors, dry runs, records."""

from __future__ import annotations

import tomllib

import pytest
from mlflow.tracking import MlflowClient

from pflbench.benchmark.cli import main

from conftest import TINY


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, fragment", [
    (["run", "--method", "nope", "--dataset", "digits"], "unknown method 'nope'; choose one of:"),
    (["run", "--method", "fedavg", "--dataset", "nope"], "unknown dataset 'nope'; choose one of:"),
    (["run", "--method", "fedavg", "--dataset", "digits", "--set", "no.such.key=1"], "no.such.key"),
    (["run", "--method", "fedavg", "--dataset", "digits", "--set", "train.lr=x"], "train.lr"),
    (["run", "--method", "fedavg", "--dataset", "digits", "--preset", "nope"], "unknown preset 'nope'"),
    (["run", "--method", "fedavg", "--dataset", "digits", "--config", "missing.toml"], "config file not found"),
    (["run", "--method", "fedavg"], "--dataset"),
    (["frobnicate"], "invalid choice"),
])
def test_user_errors_exit_2_with_one_line(capsys, tracking_uri, argv, fragment):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert fragment in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out


def test_dry_run_prints_the_resolved_config_and_trains_nothing(capsys, tracking_uri, tmp_path):
    code, out, _ = _run(capsys, "run", "--method", "local", "--dataset", "digits", "--set", "train.lr=0.3",
                        "--seed", "4", "--dry-run")
    assert code == 0
    cfg = tomllib.loads(out)
    assert cfg["train"]["lr"] == 0.3 and cfg["seed"] == 4 and cfg["method"]["name"] == "local"
    assert MlflowClient(tracking_uri).get_experiment_by_name("pflbench") is None  # nothing recorded


def test_run_quiet_prints_one_line_and_records_in_the_default_store(capsys, tracking_uri, tmp_path):
    args = ["run", "--method", "fedavg", "--dataset", "digits", "--preset", "smoke", "--quiet", "--device", "cpu"]
    for s in TINY:
        args += ["--set", s]
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedavg digits seed=0 test_acc_mean=")
    run_id = lines[0].rsplit("run_id=", 1)[1]
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and "test_acc_mean" in run.data.metrics


def test_diverging_run_is_a_clear_error_and_marked_failed(capsys, tracking_uri):
    args = ["run", "--method", "fedavg", "--dataset", "digits", "--preset", "smoke", "--quiet",
            "--set", "train.lr=1e30", "--set", "data.augment=false"]
    code, _, err = _run(capsys, *args)
    assert code == 2 and "non-finite loss" in err and "marked FAILED" in err
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pflbench").experiment_id])
    assert run.info.status == "FAILED"


def test_list_shows_methods_datasets_presets(capsys):
    code, out, _ = _run(capsys, "list")
    assert code == 0
    for name in ("fedavg", "local", "digits", "smoke", "demo", "dirichlet"):
        assert name in out


def test_run_shows_results_table_run_id_and_the_ui_command(capsys, tracking_uri):
    args = ["run", "--method", "local", "--dataset", "digits", "--preset", "smoke", "--device", "cpu"]
    for s in TINY:
        args += ["--set", s]
    code, out, _ = _run(capsys, *args)
    assert code == 0
    for fragment in ("test_acc_mean", "bytes_up per round", "MLflow run", f"mlflow ui --backend-store-uri {tracking_uri}"):
        assert fragment in out, fragment


def test_perf_overhead_reports_both_rates_and_their_ratio(capsys):
    code, out, _ = _run(capsys, "perf", "overhead", "--clients", "2", "--rounds", "1", "--repeats", "1",
                        "--threads", "1", "--set", "model.embed_dim=16", "--set", "model.depth=1",
                        "--set", "model.patch_size=4")
    assert code == 0
    assert "engine" in out and "tight loop" in out
    ratio = float(out.strip().splitlines()[-1].split("ratio engine / tight loop: ")[1].split()[0])
    assert 0 < ratio < 10


def test_version_and_run_help_with_examples(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("pflbench ")
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    examples = out.split("examples:", 1)[1]
    assert examples.count("bench run --method") == 2
    for option in ("--resume", "--run-name", "--tag", "--explain"):
        assert option in out


def test_dry_run_explain_describes_every_key_and_its_sentinels(capsys, tracking_uri):
    from pflbench.benchmark.config import flatten
    from pflbench.benchmark.resolve import resolve_config

    code, out, _ = _run(capsys, "run", "--method", "fedrep", "--dataset", "digits", "--dry-run", "--explain")
    assert code == 0
    lines = {line.split(" = ", 1)[0]: line for line in out.splitlines() if " = " in line}
    assert set(lines) == set(flatten(resolve_config("fedrep", "digits")))  # every key, each once
    assert all("  # " in line for line in lines.values())  # each with its description
    assert "token width" in lines["model.embed_dim"]
    assert "[here: the dataset's native size]" in lines["model.image_size"]
    assert "Collins" not in lines["method.head_epochs"] and "reference: 10" in lines["method.head_epochs"]
    assert "[here: the run's seed]" in lines["data.partition_seed"]


def test_a_runs_own_config_toml_repeats_it_without_method_or_dataset(capsys, tracking_uri, tmp_path):
    args = ["run", "--method", "local", "--dataset", "digits", "--preset", "smoke", "--seed", "3", "--quiet"]
    for s in TINY:
        args += ["--set", s]
    code, out, _ = _run(capsys, *args)
    run_id = out.strip().rsplit("run_id=", 1)[1]
    saved = MlflowClient(tracking_uri).download_artifacts(run_id, "config.toml", str(tmp_path))
    code, again, _ = _run(capsys, "run", "--config", saved, "--quiet")
    assert code == 0
    assert again.split(" run_id=")[0] == out.split(" run_id=")[0]  # same method, dataset, seed and accuracy
