"""`bench sweep`: final runs over datasets x methods x seeds that resume by skipping finished runs."""

from __future__ import annotations

from pflbench.benchmark.cli import main
from pflbench.benchmark.tracking import find_runs, read_text_artifact

from conftest import TINY


def _suite(path, body: str, overrides=TINY):
    listed = ", ".join(f'"{o}"' for o in overrides)
    path.write_text(body.replace("OVERRIDES", f"[{listed}]"))
    return str(path)


def _sweep(capsys, *argv):
    code = main(["sweep", *argv, "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_sweep_runs_every_cell_and_a_rerun_skips_the_finished_ones(capsys, tracking_uri, tmp_path):
    suite = _suite(tmp_path / "suite.toml", """
experiment = "board"
seeds = [0, 1]
methods = ["fedavg", "local"]
[[run]]
dataset = "digits"
preset = "smoke"
overrides = OVERRIDES
""")
    # One cell ran before (as after a killed sweep): same config, same seed, stage final.
    code, out, err = _sweep(capsys, suite)
    assert code == 0, err
    assert "runs=4 finished=4 skipped=0 failed=0" in out
    runs = find_runs(tracking_uri, "board", stage="final")
    assert sorted((r.tags["pflbench.method"], r.tags["pflbench.seed"]) for r in runs) == [
        ("fedavg", "0"), ("fedavg", "1"), ("local", "0"), ("local", "1")]
    assert all("test_acc_mean" in r.metrics for r in runs)

    code, out, err = _sweep(capsys, suite)
    assert code == 0 and "runs=4 finished=0 skipped=4" in out
    assert len(find_runs(tracking_uri, "board", stage="final", status=None)) == 4  # nothing ran twice


def test_workers_run_the_remaining_cells_in_parallel_processes(capsys, tracking_uri, tmp_path):
    body = """
seeds = SEEDS
methods = ["fedavg"]
[[run]]
dataset = "digits"
preset = "smoke"
overrides = OVERRIDES
"""
    # A sweep killed after seed 0: rerunning the whole suite leaves that run alone.
    assert _sweep(capsys, _suite(tmp_path / "first.toml", body.replace("SEEDS", "[0]")))[0] == 0
    suite = _suite(tmp_path / "suite.toml", body.replace("SEEDS", "[0, 1, 2]"))
    code, out, err = _sweep(capsys, suite, "--workers", "2")
    assert code == 0, err
    assert "runs=3 finished=2 skipped=1" in out
    runs = find_runs(tracking_uri, "pflbench", stage="final", status=None)
    assert sorted(r.tags["pflbench.seed"] for r in runs) == ["0", "1", "2"]
    assert {r.status for r in runs} == {"FINISHED"}


def test_best_of_starts_from_a_tuning_studys_best_config(capsys, tracking_uri, tmp_path):
    fixed = [*TINY, "train.local_epochs=1", "train.batch_size=32", "train.momentum=0.0", "train.weight_decay=0.0"]
    assert main(["tune", "--method", "fedavg", "--dataset", "digits", "--preset", "smoke", "--trials", "2",
                 "--study", "fedavg-small", "--quiet", *(a for o in fixed for a in ("--set", o))]) == 0
    parent = capsys.readouterr().out.strip().split("parent_run_id=")[1]
    best = read_text_artifact(tracking_uri, parent, "best_config.toml")
    suite = _suite(tmp_path / "suite.toml", """
seeds = [5]
methods = ["fedavg"]
[[run]]
dataset = "digits"
best_of = "{method}-small"
""")
    code, out, err = _sweep(capsys, suite)
    assert code == 0, err
    (run,) = find_runs(tracking_uri, "pflbench", stage="final")
    assert read_text_artifact(tracking_uri, run.run_id, "config.toml") == best.replace("seed = 0", "seed = 5")
    # The run names the study it started from (the leaderboard's evidence file reports it).
    assert run.tags["pflbench.tuned_by"] == "fedavg-small" and run.tags["pflbench.tuned_run"] == parent
