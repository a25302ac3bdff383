"""The leaderboard: statistics on hand-made numbers, a golden output, a real browser, and the command."""

from __future__ import annotations

import csv
import io
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pflbench.benchmark.cli import main
from pflbench.leaderboard import stats
from pflbench.leaderboard.build import (
    RunRow, _si, build_board, load_paper_table, paper_setting, parse_client_accuracy, readme, results_csv,
    write_board,
)

from conftest import TINY

GOLDEN = Path(__file__).parent / "golden" / "leaderboard"


# ---------------------------------------------------------------------------
# statistics


def test_t_interval_by_hand():
    iv = stats.t_interval([1.0, 2.0, 3.0])
    # t(0.975, df=2) = 4.302653; sd = 1; half = 4.302653 / sqrt(3)
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    one = stats.t_interval([0.5])
    assert one.mean == 0.5 and one.n == 1 and math.isnan(one.lo)  # no interval from one seed
    assert stats.t_interval([0.4, math.nan, 0.6]).n == 2


def test_newest_run_per_seed_wins_and_the_older_is_reported():
    runs = [("a", 0, 10), ("b", 1, 11), ("c", 0, 30), ("d", 2, 5)]
    kept, dropped = stats.newest_per_seed(runs, seed=lambda r: r[1], started=lambda r: r[2])
    assert [r[0] for r in kept] == ["c", "b", "d"] and [r[0] for r in dropped] == ["a"]


def test_paired_comparison_uses_the_seed_pairing():
    best = {0: 0.80, 1: 0.60, 2: 0.90}
    # Always 0.05 below the best on the same seed: unpaired intervals overlap, the paired one does not.
    close = {0: 0.75, 1: 0.55, 2: 0.85}
    diff = stats.paired_difference(close, best)
    assert diff.mean == pytest.approx(-0.05) and diff.hi == pytest.approx(-0.05)
    assert stats.not_distinguishable(diff) is False
    assert stats.t_interval(list(close.values())).contains(stats.t_interval(list(best.values())).mean)
    noisy = {0: 0.85, 1: 0.55, 2: 0.90}
    assert stats.not_distinguishable(stats.paired_difference(noisy, best)) is True
    assert stats.not_distinguishable(stats.paired_difference({0: 0.1, 5: 0.2}, best)) is None  # one shared seed


def test_fairness_std_and_worst_ten_percent():
    accs = [i / 10 for i in range(1, 11)]  # 0.1 .. 1.0
    std, worst = stats.client_fairness(accs)
    assert worst == pytest.approx(0.1)  # 10% of 10 clients = the single worst
    assert std == pytest.approx(float(__import__("numpy").std(accs)))
    assert stats.client_fairness([0.2, 0.4, *[0.9] * 9])[1] == pytest.approx(0.3)  # ceil(1.1) = 2 clients
    assert stats.client_fairness([0.5, math.nan])[1] == 0.5


def test_pareto_front_and_best():
    pts = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (0.5, 0.4)]
    assert stats.pareto_front(pts) == [0, 1, 3]
    assert stats.best_index([0.3, math.nan, 0.7, 0.7]) == 2


def test_client_accuracy_csv_is_read_without_empty_clients():
    text = "client,test_acc,test_samples,val_acc,val_samples\n0,0.500000,4,,0\n1,,0,0.1,3\n2,1.000000,2,,0\n"
    assert parse_client_accuracy(text) == [0.5, 1.0]


# ---------------------------------------------------------------------------
# the board, from fixture runs

SETTING = {"data.partition": "dirichlet", "data.alpha": "0.1", "data.num_clients": "4", "data.protocol": "pool",
           "model.name": "vit", "model.embed_dim": "16", "model.depth": "2", "model.patch_size": "4",
           "model.image_size": "0", "train.rounds": "2", "train.sample_fraction": "1.0",
           "dataset.name": "digits", "dataset.root": "data"}


def _run(i: int, method: str, seed: int, acc: float, *, start: int = 0, novel: float | None = None,
         lr: str = "0.05", dataset: str = "digits", clients=(0.5, 0.6, 0.7, 0.9)) -> RunRow:
    metrics = {"test_acc_mean": acc, "test_acc_weighted": acc + 0.01, "bytes_up": 1000.0 * (len(method) % 3),
               "val_acc_mean": acc - 0.02}
    if novel is not None:
        metrics["novel_test_acc_mean"] = novel
    params = {**SETTING, "dataset.name": dataset, "method.name": method, "train.lr": lr, "seed": str(seed)}
    start_ms = 1_790_000_000_000 + 60_000 * i + start
    return RunRow(f"run{i:02d}{method}", method, dataset, seed, start_ms, start_ms + 30_000 + 1000 * i, params,
                  metrics, [c + acc - 0.7 for c in clients], "0.1.0", "abc123", 500.0 + 100 * len(method) + 10 * seed,
                  1.5e9 * len(method) + 1e6 * seed, 30_000.0 + 1000 * len(method), PERSONAL.get(method, 0.0))


PERSONAL = {"fedper": 160.0, "local": 35_000.0, "fedbn": 64.0}  # personal parameters of the fixture runs


def fixture_runs() -> list[RunRow]:
    runs = []
    i = 0
    for method, accs, lr in (("fedavg", (0.70, 0.66, 0.74), "0.05"), ("fedper", (0.80, 0.75, 0.86), "0.1"),
                             ("local", (0.78, 0.76, 0.83), "0.02"), ("fedbn", (0.60, 0.58, 0.63), "0.05")):
        for seed, acc in enumerate(accs):
            runs.append(_run(i, method, seed, acc, lr=lr, novel=0.5 if method == "fedper" else None))
            i += 1
    runs.append(_run(i, "fedavg", 0, 0.10, start=-10**9))  # an older repeat of seed 0: dropped
    runs.append(_run(i + 1, "fedavg", 0, 0.55, dataset="other"))  # another dataset, one seed
    return runs


def _mask(text: str) -> str:
    return re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,PNG", text)


def test_board_groups_dedups_and_compares():
    board = build_board(fixture_runs(), experiment="exp")
    digits = next(s for s in board.sections if s.dataset == "digits")
    # Tuned learning rates differ, the setting is shared: one table for the four methods.
    assert [c.method for c in digits.cells] == ["fedper", "local", "fedavg", "fedbn"]
    fedavg = next(c for c in digits.cells if c.method == "fedavg")
    assert fedavg.seeds == [0, 1, 2] and fedavg.acc.mean == pytest.approx(0.70)
    assert "seed 0 was run 2 times" in fedavg.note and len(fedavg.dropped) == 1
    verdicts = {c.method: c.verdict for c in digits.cells}
    assert verdicts == {"fedper": "best", "local": "not distinguishable", "fedavg": "worse", "fedbn": "worse"}
    assert next(c for c in digits.cells if c.method == "fedper").novel == 0.5
    assert fedavg.train_samples == pytest.approx(1110.0)  # 500 + 100 * 6 + 10 * seed, over seeds 0-2
    assert fedavg.flops == pytest.approx(9.001e9)  # 1.5e9 * 6 + 1e6 * seed, over seeds 0-2
    assert (fedavg.parameters, fedavg.personal_parameters) == (36_000.0, 0.0)
    assert fedavg.params_text == "36k / 0"
    fedper = next(c for c in digits.cells if c.method == "fedper")
    assert fedper.params_text == "36k / 160" and _si(fedper.flops) == "9G"
    assert next(c for c in digits.cells if c.method == "local").params_text == "35k / 35k"
    other = next(s for s in board.sections if s.dataset == "other")
    assert [(c.method, c.verdict) for c in other.cells] == [  # methods not run there are rows, not gaps
        ("fedavg", "best"), ("fedbn", "pending"), ("fedper", "pending"), ("local", "pending")]
    assert other.cells[1].acc_text == "no finished run in this setting"
    pending = [s for s in board.sections if s.pending]
    assert [s.dataset for s in pending] == ["cifar100", "organamnist", "officehome"]
    assert all(c.acc_text == "not run yet: needs a GPU" for s in pending for c in s.cells)


def test_pfedhn_rows_say_how_many_visits_each_client_had():
    runs = fixture_runs()[:3]  # fedavg, seeds 0-2
    for i, seed in enumerate(range(3)):
        run = _run(20 + i, "pfedhn", seed, 0.6)
        run.metrics["visits_per_client_mean"] = 19.0 + seed  # 19, 20, 21: 20 on average
        runs.append(run)
        runs[i].metrics["visits_per_client_mean"] = 20.0  # recorded by every method, shown only for pfedhn
    board = build_board(runs, experiment="exp", pending=False)
    (section,) = board.sections
    assert next(c for c in section.cells if c.method == "pfedhn").visits == pytest.approx(20.0)
    text = readme(board, {})
    assert "| pfedhn (20 visits/client) | 3 |" in text
    assert "| fedavg | 3 |" in text and text.count("visits/client") == 1


def test_output_matches_the_golden_files_and_is_deterministic(tmp_path):
    board = build_board(fixture_runs(), experiment="exp", budget="2 trials per method")
    first = write_board(board, tmp_path / "a")
    second = write_board(build_board(list(reversed(fixture_runs())), experiment="exp",
                                     budget="2 trials per method"), tmp_path / "b")
    assert sorted(first) == sorted(second)
    for name in first:  # byte for byte, PNGs included, whatever the order the runs come in
        assert first[name].read_bytes() == second[name].read_bytes(), name
    if os.environ.get("PFLBENCH_UPDATE_GOLDEN"):
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name in ("README.md", "results.csv"):
            (GOLDEN / name).write_text(first[name].read_text())
        (GOLDEN / "index.html").write_text(_mask(first["index.html"].read_text()))
    for name in ("README.md", "results.csv"):
        assert first[name].read_text() == (GOLDEN / name).read_text(), name
    assert _mask(first["index.html"].read_text()) == (GOLDEN / "index.html").read_text()
    assert first["pareto-digits-" + board.sections[0].setting_hash + ".png"].read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------------------
# the paper's numbers


def test_the_paper_table_holds_every_method_of_table_2_in_every_paper_setting():
    table = load_paper_table()
    assert list(table.columns) == ["paper-cifar100", "paper-organamnist", "paper-officehome"]
    assert list(table.names) == ["fedavg", "local", "apfl", "perfedavg", "fedbn", "fedbabu", "fedper", "attention",
                                 "fedperfix"]
    assert table.names["fedper"] == "FedRep" and table.names["attention"] == "Vanilla Attention"
    for preset, values in table.values.items():
        assert list(values) == list(table.names), preset
        assert all(0 < v.mean < 100 and 0 < v.std < 100 for v in values.values())
    merged = sorted((p, m) for p, vs in table.values.items() for m, v in vs.items() if v.merged)
    assert merged == [("paper-officehome", "fedbabu"), ("paper-officehome", "fedbn"),
                      ("paper-organamnist", "fedbabu"), ("paper-organamnist", "fedbn")]
    assert "0.1" in table.differs["paper-cifar100"] and "0.5" in table.differs["paper-cifar100"]


def _paper_runs(params: dict[str, str]) -> list[RunRow]:
    runs = []
    for i, (method, accs) in enumerate((("fedperfix", (0.47, 0.49)), ("fedavg", (0.22, 0.25)), ("pfedhn", (0.2, 0.3)))):
        for seed, acc in enumerate(accs):
            start = 1_790_000_000_000 + 60_000 * (2 * i + seed)
            runs.append(RunRow(f"p{i}{seed}{method}", method, "cifar100", seed, start, start + 1000,
                               {**params, "method.name": method, "seed": str(seed)}, {"test_acc_mean": acc},
                               [acc - 0.1, acc + 0.1]))
    return runs


def test_a_paper_setting_shows_the_papers_value_beside_ours_and_rows_for_its_methods_not_run():
    params = paper_setting("paper-cifar100", "cifar100")
    assert params["data.alpha"] == "0.5" and params["model.name"] == "vit_small_patch16_224"
    board = build_board(_paper_runs(params), experiment="exp")
    (section,) = [s for s in board.sections if s.dataset == "cifar100"]
    assert section.paper_preset == "paper-cifar100" and not section.pending
    cells = {c.method: c for c in section.cells}
    assert [c.method for c in section.cells][:3] == ["fedperfix", "pfedhn", "fedavg"]  # ours, ranked, come first
    assert cells["fedperfix"].paper.text == "48.10 ± 7.76" and cells["fedperfix"].n == 2
    assert cells["pfedhn"].paper is None and cells["pfedhn"].n == 2  # not in the paper: our row, no value
    # The paper's methods without a run of ours: a row with the paper's value, ours pending.
    assert set(load_paper_table().names) <= set(cells)
    assert cells["apfl"].acc_text == "not run yet: needs a GPU" and cells["apfl"].paper.mean == 44.88
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(results_csv(board))) if r["dataset"] == "cifar100"}
    assert rows["fedperfix"]["paper_test_acc_mean"] == "0.4810" and rows["fedperfix"]["paper_client_acc_std"] == "0.0776"
    assert rows["apfl"]["status"] == "not run yet: needs a GPU" and rows["pfedhn"]["paper_test_acc_mean"] == ""
    # Runs recorded before a setting key existed still match; another alpha is another setting.
    older = {k: v for k, v in params.items() if k != "data.stratify"}
    assert build_board(_paper_runs(older), experiment="exp").sections[0].paper_preset == "paper-cifar100"
    board = build_board(_paper_runs({**params, "data.alpha": "0.1"}), experiment="exp")
    ours, *pending = [s for s in board.sections if s.dataset == "cifar100"]
    assert ours.paper_preset == "" and all(c.paper is None for c in ours.cells)
    assert [s.paper_preset for s in pending] == ["paper-cifar100"] and pending[0].pending


# ---------------------------------------------------------------------------
# the page in a real browser


class _Rows(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.section = ""
        self.ready = False
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "html" and a.get("data-ready") == "yes":
            self.ready = True
        if tag == "section":
            self.section = a["id"]
        if tag == "tr" and "cell" in a.get("class", "").split():
            self.rows.setdefault(self.section, []).append(a["data-method"])
        for key in ("src", "href"):
            if key in a and not a[key].startswith("data:"):
                self.external.append(a[key])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# CI (.ci/run sets PFLBENCH_REQUIRE_SERVICES=1) never skips: there a missing browser fails the test.
@pytest.mark.skipif(CHROMIUM is None and os.environ.get("PFLBENCH_REQUIRE_SERVICES") != "1",
                    reason="no chromium binary on PATH (.ci/run installs Debian's chromium)")
def test_the_page_loads_in_headless_chromium_with_one_row_per_method(tmp_path):
    assert CHROMIUM is not None, "PFLBENCH_REQUIRE_SERVICES=1 but no chromium binary on PATH"
    board = build_board(fixture_runs(), experiment="exp")
    page = write_board(board, tmp_path / "board")["index.html"]
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          page.resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout
    parsed = _Rows()
    parsed.feed(dom)
    assert parsed.ready  # the page's script ran
    assert parsed.external == []  # self-contained: nothing to fetch
    for section in board.sections:
        assert sorted(parsed.rows[section.slug]) == sorted(c.method for c in section.cells)
    assert len(parsed.rows[board.sections[0].slug]) == 4


# ---------------------------------------------------------------------------
# the command, on real runs


def test_bench_leaderboard_from_a_sweep(capsys, tracking_uri, tmp_path):
    overrides = ", ".join(f'"{o}"' for o in TINY)
    suite = tmp_path / "suite.toml"
    suite.write_text(f'seeds = [0, 1]\nmethods = ["fedavg", "local"]\n[[run]]\ndataset = "digits"\n'
                     f'preset = "smoke"\noverrides = [{overrides}]\n')
    assert main(["sweep", str(suite), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["leaderboard", "--out", str(tmp_path / "board"), "--quiet", "--no-pending"]) == 0
    assert "sections=1 cells=2 runs=4" in capsys.readouterr().out
    text = (tmp_path / "board" / "README.md").read_text()
    assert "| fedavg | 2 |" in text and "| local | 2 |" in text
    csv_text = (tmp_path / "board" / "results.csv").read_text()
    assert len(csv_text.strip().splitlines()) == 3
    from pflbench.benchmark.tracking import find_runs

    runs = find_runs(tracking_uri, "pflbench", stage="final")
    for run in runs:
        assert run.run_id in text and run.run_id in csv_text  # every cell traces to its runs
    # The compute column: each run's train_samples averaged over its rounds, then over seeds.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    rows = {row["method"]: row for row in csv.DictReader(io.StringIO(csv_text))}
    for method in ("fedavg", "local"):
        per_run = []
        for run in (r for r in runs if r.tags["pflbench.method"] == method):
            history = [m.value for m in client.get_metric_history(run.run_id, "train_samples")]
            assert len(history) == 2  # logged every round
            per_run.append(sum(history) / len(history))
        assert float(rows[method]["train_samples_per_round"]) == pytest.approx(sum(per_run) / len(per_run), abs=0.05)
        assert float(rows[method]["train_samples_per_round"]) > 0


def test_the_setting_line_names_the_image_folder_and_not_where_it_lies():
    from pflbench.leaderboard.build import describe_setting, setting_hash

    params = {"data.partition": "dirichlet", "data.alpha": "0.1", "data.num_clients": "20", "data.protocol": "pool",
              "train.sample_fraction": "0.25", "train.rounds": "20", "model.name": "vit", "model.image_size": "16",
              "model.embed_dim": "96", "model.depth": "4", "model.patch_size": "4", "dataset.folder": "cifar10-jpeg",
              "dataset.root": "/data"}
    line = describe_setting(params)
    assert line.startswith("images of cifar10-jpeg/, dirichlet alpha=0.1, 20 clients (25% a round), 20 rounds")
    assert "/data" not in line
    assert setting_hash(params) == setting_hash({**params, "dataset.root": "/elsewhere"})
    assert setting_hash(params) != setting_hash({**params, "dataset.folder": "cifar100-jpeg"})
    # A run recorded before data.novel_clients existed is the same problem as one that holds none out.
    assert setting_hash(params) == setting_hash({**params, "data.novel_clients": "0"})
    assert setting_hash(params) != setting_hash({**params, "data.novel_clients": "2"})
