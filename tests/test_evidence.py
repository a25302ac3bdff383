"""The leaderboard's evidence file: the page rebuilt from it alone, byte for byte; a cell rerun from its config."""

from __future__ import annotations

import gzip
import json

import pytest

from pflbench.benchmark.cli import main
from pflbench.benchmark.config import config_hash
from pflbench.benchmark.resolve import RunSpec
from pflbench.benchmark.tracking import find_runs, read_text_artifact
from pflbench.leaderboard import evidence

from conftest import TINY


def _suite(path, body: str) -> str:
    path.write_text(body.replace("OVERRIDES", "[" + ", ".join(f'"{o}"' for o in TINY) + "]"))
    return str(path)


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_store(monkeypatch) -> None:
    """Any attempt to open an MLflow store fails the test."""
    import pflbench.benchmark.tracking as tracking

    def refuse(*args, **kwargs):
        raise AssertionError("the store was read")

    monkeypatch.setattr(tracking, "MlflowClient", refuse)


def test_the_page_rebuilds_byte_for_byte_from_its_evidence_file_alone(capsys, tracking_uri, tmp_path, monkeypatch):
    # fedavg from a tuning study's best config, local from the suite: one table, 2 seeds each.
    fixed = [*TINY, "train.local_epochs=1", "train.momentum=0.0", "train.weight_decay=0.0"]
    assert main(["tune", "--method", "fedavg", "--dataset", "digits", "--preset", "smoke", "--trials", "2",
                 "--study", "fedavg-small", "--quiet", *(a for o in fixed for a in ("--set", o))]) == 0
    parent = capsys.readouterr().out.strip().split("parent_run_id=")[1]
    suite = _suite(tmp_path / "suite.toml", """
seeds = [0, 1]
[[run]]
dataset = "digits"
methods = ["fedavg"]
best_of = "{method}-small"
[[run]]
dataset = "digits"
methods = ["local"]
preset = "smoke"
overrides = OVERRIDES
""")
    data_root = tmp_path / "where-my-data-lies"  # a local path that must not be published
    assert main(["sweep", suite, "--data-root", str(data_root), "--quiet"]) == 0
    first = tmp_path / "first"
    assert main(["leaderboard", "--out", str(first), "--no-pending", "--budget", "2 trials", "--quiet"]) == 0
    assert "sections=1 cells=2 runs=4" in capsys.readouterr().out

    # The evidence: one record per run, everything the issue lists, no local path.
    text = (first / "runs.jsonl").read_text()
    assert str(tmp_path) not in text and "where-my-data-lies" not in text
    head, records = evidence.loads(text)
    assert head["experiment"] == "pflbench" and head["budget"] == "2 trials" and head["pending"] is False
    runs = {r.run_id: r for r in find_runs(tracking_uri, "pflbench", stage="final")}
    assert sorted(r["run_id"] for r in records) == sorted(runs)
    for record in records:
        tags = runs[record["run_id"]].tags
        assert (record["method"], record["seed"], record["stage"]) == (tags["pflbench.method"],
                                                                        int(tags["pflbench.seed"]), "final")
        for key in ("partition_hash", "version", "git_commit", "config_hash"):
            assert record[key] == tags[f"pflbench.{key}"] and record[key]
        # The config is what `bench run --config` accepts, and resolves to the run's own config hash.
        config = tmp_path / f"{record['run_id']}.toml"
        config.write_text(record["config"])
        cfg = RunSpec(config_file=str(config)).resolve(record["method"], "digits")
        assert config_hash(cfg) == record["config_hash"] and cfg.dataset.root == "data"
        assert "dataset.root" not in record["params"]
        # Every round's metrics, and the final values are the last round's.
        assert [step for step, _ in record["history"]["test_acc_mean"]] == [1, 2]
        assert record["history"]["test_acc_mean"][-1][1] == record["metrics"]["test_acc_mean"]
        assert [step for step, _ in record["history"]["train_samples"]] == [1, 2]
        # The per-client accuracies are the run's client_accuracy.csv.
        csv_text = read_text_artifact(tracking_uri, record["run_id"], "client_accuracy.csv")
        assert [f"{c['test_acc']:.6f}" for c in record["clients"]] == [
            line.split(",")[1] for line in csv_text.splitlines()[1:]]
        assert len(record["clients"]) == 4
    tuned = [r["tuning"] for r in records if r["method"] == "fedavg"]
    best_trial = int(next(r for r in find_runs(tracking_uri, "pflbench", stage="tune", status=None)
                          if r.run_id == parent).tags["pflbench.best_trial"])
    assert tuned == [{"study": "fedavg-small", "best_trial": best_trial, "best_val_acc_mean": tuned[0]["best_val_acc_mean"],
                      "trials": 2, "found_by": "tag"}] * 2
    assert 0 <= tuned[0]["best_val_acc_mean"] <= 1
    assert [r["tuning"] for r in records if r["method"] == "local"] == [None, None]  # not tuned

    # Rebuilt from the evidence file alone (no store can be opened): every file byte for byte.
    _no_store(monkeypatch)
    second = tmp_path / "second"
    assert main(["leaderboard", "--from", str(first / "runs.jsonl"), "--out", str(second), "--quiet"]) == 0
    built = _files(first)
    assert sorted(built) == sorted(_files(second))
    assert {"README.md", "results.csv", "index.html", "runs.jsonl"} <= set(built)
    assert sum(name.startswith("configs/") for name in built) == 2 and sum(name.endswith(".png") for name in built) == 1
    for name, data in _files(second).items():
        assert data == built[name], name
    readme = (first / "README.md").read_text()
    assert all(run_id in readme for run_id in runs) and "Evidence: runs.jsonl" in readme
    for name in (n for n in built if n.startswith("configs/")):
        assert str(tmp_path) not in built[name].decode()

    # Past the size limit the evidence is gzip-compressed (no timestamp: the same bytes every time).
    monkeypatch.setattr(evidence, "MAX_PLAIN_BYTES", 1000)
    for out in ("third", "fourth"):
        assert main(["leaderboard", "--from", str(first / "runs.jsonl"), "--out", str(tmp_path / out), "--quiet"]) == 0
        assert not (tmp_path / out / "runs.jsonl").exists()
    packed = (tmp_path / "third" / "runs.jsonl.gz").read_bytes()
    assert gzip.decompress(packed).decode() == text and packed == (tmp_path / "fourth" / "runs.jsonl.gz").read_bytes()
    assert (tmp_path / "third" / "results.csv").read_bytes() == built["results.csv"]
    assert main(["leaderboard", "--from", str(tmp_path / "third" / "runs.jsonl.gz"), "--out", str(tmp_path / "fifth"),
                 "--quiet"]) == 0
    assert _files(tmp_path / "fifth") == _files(tmp_path / "third")


def test_a_published_digits_cell_reruns_to_its_accuracy_from_its_config(capsys, tracking_uri, tmp_path):
    suite = _suite(tmp_path / "suite.toml", """
seeds = [3]
methods = ["fedper"]
[[run]]
dataset = "digits"
preset = "smoke"
overrides = OVERRIDES
""")
    assert main(["sweep", suite, "--quiet"]) == 0
    board = tmp_path / "board"
    assert main(["leaderboard", "--out", str(board), "--no-pending", "--quiet"]) == 0
    _, (record,) = evidence.loads((board / "runs.jsonl").read_text())
    (config,) = (board / "configs").glob("digits-*-fedper.toml")
    assert record["run_id"] in config.read_text()  # the config names the runs it reproduces
    capsys.readouterr()
    # The published config alone, into another store, as a reader would run it.
    other = f"sqlite:///{tmp_path / 'reader.db'}"
    assert main(["run", "--config", str(config), "--seed", "3", "--device", "cpu", "--tracking-uri", other,
                 "--quiet"]) == 0
    (rerun,) = find_runs(other, "pflbench")
    assert rerun.metrics["test_acc_mean"] == record["metrics"]["test_acc_mean"]  # exactly, on the CPU
    assert rerun.metrics["test_acc_weighted"] == record["metrics"]["test_acc_weighted"]
    assert evidence.parse_clients(read_text_artifact(other, rerun.run_id, "client_accuracy.csv")) == record["clients"]
    assert rerun.tags["pflbench.partition_hash"] == record["partition_hash"]


@pytest.mark.parametrize("content, fragment", [
    (None, "evidence file not found"),
    ("not json\n", "line 1 is not JSON"),
    ('{"kind": "run"}\n', "not a leaderboard evidence file"),
    (json.dumps(evidence.header("e", "final")) + '\n{"kind": "run", "run_id": "x"}\n', "line 2 is not a run record"),
])
def test_a_bad_evidence_file_is_one_line_and_exit_2(capsys, tmp_path, content, fragment):
    path = tmp_path / "runs.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["leaderboard", "--from", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_from_refuses_store_options(capsys, tmp_path):
    assert main(["leaderboard", "--from", "runs.jsonl", "--experiment", "x", "--out", str(tmp_path)]) == 2
    assert "drop --experiment" in capsys.readouterr().err


def test_a_run_recorded_without_its_studys_tag_is_matched_to_the_study_by_its_tuned_settings(capsys, tracking_uri,
                                                                                            tmp_path):
    fixed = [*TINY, "train.local_epochs=1", "train.momentum=0.0", "train.weight_decay=0.0"]
    assert main(["tune", "--method", "fedavg", "--dataset", "digits", "--preset", "smoke", "--trials", "2",
                 "--study", "fedavg-small", "--quiet", *(a for o in fixed for a in ("--set", o))]) == 0
    # As runs made before the sweep tagged them: the best config run by hand, and one with another lr.
    best = tmp_path / "fedavg-small.best_config.toml"
    assert main(["run", "--config", str(best), "--seed", "1", "--quiet"]) == 0
    assert main(["run", "--config", str(best), "--seed", "2", "--set", "train.lr=0.1234", "--quiet"]) == 0
    assert main(["leaderboard", "--out", str(tmp_path / "board"), "--stage", "run", "--no-pending", "--quiet"]) == 0
    _, records = evidence.loads((tmp_path / "board" / "runs.jsonl").read_text())
    by_seed = {r["seed"]: r["tuning"] for r in records}
    assert by_seed[1]["study"] == "fedavg-small" and by_seed[1]["found_by"] == "config"
    assert by_seed[2] is None  # its settings are not the study's choice
