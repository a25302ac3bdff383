"""The whole paper in one command (`leaderboard/publish.sh paper`), end to end at a tiny scale.

The real suite (`leaderboard/suites/paper.toml`) with a digits-sized model, one round and one seed, on
generated files in each dataset's real format: the plan is printed first, every run is recorded, and the
board holds our runs, the paper's pending settings with the paper's numbers, and the novel column.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from pflbench.benchmark.cli import main
from pflbench.benchmark.tracking import find_runs
from pflbench.leaderboard.build import load_paper_table
from pflbench.methods import METHODS

from fileformats import cifar100_batches, write_cifar100_folder, write_medmnist_npz, write_officehome

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "leaderboard" / "suites" / "paper.toml"
# The paper's methods still to be registered (issue 17's new methods); any other unknown name is a typo.
COMING = {"apfl", "perfedavg", "fedbabu", "ditto", "attention"}
TINY_PAPER = ["model.name=vit", "model.image_size=16", "model.patch_size=4", "model.embed_dim=16", "model.depth=2",
              "model.num_heads=2", "data.num_clients=4", "data.clients_per_domain=1", "data.min_samples=6",
              "data.novel_clients=1", "train.rounds=1", "train.sample_fraction=0.5", "train.batch_size=16",
              "train.local_epochs=1", "run.checkpoint_every=0"]


def test_the_paper_suite_names_every_method_of_the_table_and_ours_on_the_three_paper_settings():
    suite = tomllib.loads(SUITE.read_text())
    methods = suite["methods"]
    paper = list(load_paper_table().names)
    assert methods[: len(paper)] == paper  # the paper's rows, in its order
    assert set(methods) >= set(METHODS.names())  # then every method of ours
    assert set(methods) - set(METHODS.names()) <= COMING
    assert [(r["dataset"], r["preset"]) for r in suite["run"]] == [
        ("cifar100", "paper-cifar100"), ("organamnist", "paper-organamnist"), ("officehome", "paper-officehome")]
    assert suite["seeds"] == [0, 1, 2]


def _tiny_suite(path: Path) -> tuple[Path, list[str]]:
    """paper.toml with its registered methods, one seed and the tiny settings appended to each run."""
    text = SUITE.read_text()
    suite = tomllib.loads(text)
    methods = [m for m in suite["methods"] if m in METHODS.names()]
    lines = [f'experiment = "{suite["experiment"]}"', "seeds = [0]",
             "methods = [" + ", ".join(f'"{m}"' for m in methods) + "]"]
    for run in suite["run"]:
        overrides = ", ".join(f'"{o}"' for o in [*run["overrides"], *TINY_PAPER])
        lines += ["[[run]]", f'dataset = "{run["dataset"]}"', f'preset = "{run["preset"]}"',
                  f"overrides = [{overrides}]"]
    path.write_text("\n".join(lines) + "\n")
    return path, methods


def _write_data(root: Path) -> None:
    write_cifar100_folder(root, cifar100_batches(n_train=72, n_test=24))
    write_medmnist_npz(root / "organamnist.npz", counts=(60, 12, 24))
    write_officehome(root / "OfficeHome", per_class=6)


def test_publish_paper_plans_runs_and_builds_the_board_in_one_command(capsys, tracking_uri, tmp_path):
    data = tmp_path / "data"
    _write_data(data)
    suite, methods = _tiny_suite(tmp_path / "paper-tiny.toml")
    out = tmp_path / "board"
    env = {**os.environ, "TRIALS": "0", "WORKERS": "1", "DATA_ROOT": str(data), "PAPER_SUITE": str(suite),
           "OUT": str(out), "BENCH": str(Path(sys.executable).parent / "bench"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "leaderboard" / "publish.sh"), "paper"], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = 3 * len(methods)
    # The plan comes first, then the sweep.
    plan = done.stdout.index(f"plan paper-tiny.toml runs={runs} to_run={runs}")
    assert plan < done.stdout.index(f"sweep paper-tiny.toml runs={runs} finished={runs} skipped=0 failed=0")
    recorded = find_runs(tracking_uri, "leaderboard", stage="final")
    assert sorted((r.tags["pflbench.method"], r.tags["pflbench.dataset"]) for r in recorded) == sorted(
        (m, d) for m in methods for d in ("cifar100", "organamnist", "officehome"))
    assert all("novel_test_acc_mean" in r.metrics for r in recorded)  # every method reports its unseen client
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    ours = [r for r in rows if r["status"] == "done"]
    assert len(ours) == runs and all(r["novel_test_acc_mean"] for r in ours)
    # Our tiny settings are not the paper's: its three settings stay pending, with the paper's numbers.
    pending = [r for r in rows if r["setting_hash"].startswith("paper-")]
    table = load_paper_table()
    assert {r["setting_hash"] for r in pending} == set(table.columns)
    assert {r["method"] for r in pending} == set(table.names) | set(methods)
    assert all(r["status"] == "not run yet: needs a GPU" for r in pending)
    fedperfix = next(r for r in pending if r["setting_hash"] == "paper-cifar100" and r["method"] == "fedperfix")
    assert fedperfix["paper_test_acc_mean"] == "0.4810"
    readme = (out / "README.md").read_text()
    assert readme.count("paper reports (%, ± client std)") == 3 and "The paper's settings (paper-* presets" in readme
    # Rerunning skips what finished: the plan has nothing left to run.
    assert main(["plan", str(suite), "--data-root", str(data), "--experiment", "leaderboard", "--quiet"]) == 0
    assert f"runs={runs} to_run=0 " in capsys.readouterr().out
