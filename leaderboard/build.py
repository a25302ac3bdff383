"""`bench leaderboard`: finished MLflow runs -> README.md, results.csv, index.html and Pareto plots.

Runs are grouped by dataset x setting x method. The setting is what defines
the problem (the `data.*`, `model.*` and `dataset.*` keys, the number of
rounds and the client sampling); the method's own keys and the tuned
optimizer knobs are left out of it, so methods tuned to different learning
rates still share a table. Statistics are in `stats.py`; MLflow is read
through `benchmark/tracking.py` only. The output depends only on the runs:
the date shown is the newest run's end, the version and commit those the
runs recorded, everything is sorted, and the PNGs carry no timestamp.

In the paper's settings (a section whose setting is a `paper-*` preset's) each
method's row also shows the FedPerfix paper's own Table 2 value
(`paper_table2.toml`), and the paper's methods have rows even before they ran.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import math
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Sequence

from ..benchmark.errors import UserError
from ..benchmark.records import Stage
from . import stats

SETTING_PREFIXES = ("data.", "model.", "dataset.")
SETTING_KEYS = ("train.rounds", "train.sample_fraction")
UNSET = ("dataset.root",)  # where the files lie does not change the problem
# Setting keys added since runs were first recorded, at the value older runs had without the key:
# left out at that value, so old and new runs of one problem share a table (and its hash).
ADDED_KEYS = {"data.novel_clients": "0"}
PENDING_NOTE = "not run yet: needs a GPU"
MISSING_NOTE = "no finished run in this setting"
# The paper's settings (FedPerfix, Sun et al. 2023); shown as pending until runs exist.
PAPER_SETTINGS = (
    ("cifar100", "paper-cifar100", "CIFAR-100, 64 clients (8 a round), Dirichlet 0.5, ViT-S/16 at 224 px, 50 rounds"),
    ("organamnist", "paper-organamnist", "OrganAMNIST, 64 clients (8 a round), Dirichlet 0.5, ViT-S/16 at 224 px"),
    ("officehome", "paper-officehome", "Office-Home, 4 domains x 4 clients, Dirichlet 1.0, ViT-S/16 at 224 px"),
)
VISITS_SHOWN = ("pfedhn",)  # methods whose rows say how often each client trained (pFedHN needs ~100 visits)
COLUMNS = ("dataset", "setting_hash", "setting", "method", "status", "n", "seeds", "test_acc_mean", "ci_low",
           "ci_high", "test_acc_weighted", "client_acc_std", "worst10_acc", "novel_test_acc_mean",
           "parameters", "personal_parameters", "bytes_up_per_round", "train_flops_per_round", "train_samples_per_round",
           "train_seconds", "diff_vs_best", "diff_low", "diff_high", "vs_best", "run_ids",
           "paper_test_acc_mean", "paper_client_acc_std", "paper_note")
PAPER_TABLE = "paper_table2.toml"  # the paper's Table 2, beside this module
PAPER_HEAD = "paper reports (%, ± client std)"


@dataclass(frozen=True)
class PaperValue:
    """One cell of the paper's Table 2: accuracy in %, mean ± std over clients."""

    mean: float
    std: float
    merged: bool = False  # † the extraction merged its row: the value was assigned by cell order

    @property
    def text(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}" + (" †" if self.merged else "")


@dataclass
class PaperTable:
    """The paper's Table 2 (`paper_table2.toml`): values by preset and method, with their source."""

    source: str
    merged_note: str
    columns: dict[str, str]  # preset -> the paper's column name
    differs: dict[str, str]  # preset -> where our setting differs from the paper's text
    names: dict[str, str]  # method -> the paper's name for it, in the paper's order
    adapted: dict[str, str]  # method -> how the paper ran it, where that differs from its original
    values: dict[str, dict[str, PaperValue]]  # preset -> method -> value


def load_paper_table(text: str | None = None) -> PaperTable:
    """Parse `paper_table2.toml` (the packaged one unless `text` is given)."""
    if text is None:
        text = (resources.files("pflbench.leaderboard") / PAPER_TABLE).read_text(encoding="utf-8")
    data = tomllib.loads(text)
    settings = data["setting"]
    table = PaperTable(data["source"], data.get("merged_note", ""), {p: v["column"] for p, v in settings.items()},
                       {p: v.get("differs", "") for p, v in settings.items() if v.get("differs")}, {}, {},
                       {p: {} for p in settings})
    for row in data["row"]:
        method = row["method"]
        table.names[method] = row["paper"]
        if row.get("adapted"):
            table.adapted[method] = row["adapted"]
        for preset in settings:
            if preset in row:
                mean, std = row[preset]
                table.values[preset][method] = PaperValue(float(mean), float(std), preset in row.get("merged", []))
    return table


@dataclass
class RunRow:
    """One finished run, as the leaderboard reads it."""

    run_id: str
    method: str
    dataset: str
    seed: int
    start_time: int  # ms since the epoch: the newest of repeated seeds wins
    end_time: int
    params: dict[str, str]
    metrics: dict[str, float]
    client_acc: list[float]  # per-client personalized test accuracy (client_accuracy.csv)
    version: str = ""
    commit: str = ""
    train_samples_per_round: float = math.nan  # mean over the rounds of `train_samples`, fine-tuning included
    train_flops_per_round: float = math.nan  # mean over the rounds of `train_flops`, fine-tuning included
    parameters: float = math.nan  # the model's parameters (tag pflbench.parameters)
    personal_parameters: float = math.nan  # of which never leave the client (tag pflbench.personal_parameters)

    @property
    def seconds(self) -> float:
        return max(0.0, (self.end_time - self.start_time) / 1000)


@dataclass
class Cell:
    """One method in one setting: its runs (one per seed) and their statistics."""

    method: str
    runs: list[RunRow]
    dropped: list[RunRow] = field(default_factory=list)  # older runs of a repeated seed
    acc: stats.Interval = stats.Interval(math.nan, math.nan, math.nan, 0)
    weighted: float = math.nan
    std: float = math.nan
    worst: float = math.nan
    novel: float = math.nan
    bytes_up: float = math.nan
    train_samples: float = math.nan  # per round
    flops: float = math.nan  # training FLOPs per round
    parameters: float = math.nan  # total, as the runs recorded
    personal_parameters: float = math.nan
    seconds: float = math.nan
    visits: float = math.nan  # mean over seeds of `visits_per_client_mean`
    diff: stats.Interval | None = None  # paired difference to the best method (None for the best)
    verdict: str = ""  # best | not distinguishable | worse | better | too few seeds | pending
    note: str = ""
    pending_text: str = PENDING_NOTE  # what a pending row says instead of numbers
    paper: PaperValue | None = None  # the paper's own value, in the paper's settings

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.runs]

    # Texts shared by the README, the page and the terminal.
    @property
    def acc_text(self) -> str:
        if self.verdict == "pending":
            return self.pending_text
        half = self.acc.half_width
        return f"{self.acc.mean:.4f}" + ("" if math.isnan(half) else f" ± {half:.4f}")

    @property
    def vs_best_text(self) -> str:
        if self.verdict in ("best", "pending", ""):
            return self.verdict
        if self.diff is None or self.diff.n < 2:
            return "too few seeds"
        mark = "≈" if self.verdict == "not distinguishable" else ("<" if self.verdict == "worse" else ">")
        return f"{mark} {self.diff.mean:+.4f} [{self.diff.lo:+.4f}, {self.diff.hi:+.4f}]"

    @property
    def worst_text(self) -> str:
        return _num(self.worst, 4)

    @property
    def bytes_text(self) -> str:
        return _count(self.bytes_up)

    @property
    def params_text(self) -> str:
        if math.isnan(self.parameters):
            return ""
        return f"{_si(self.parameters)} / {_si(self.personal_parameters)}"


@dataclass
class Section:
    """One dataset x setting: a table and a Pareto plot."""

    dataset: str
    setting_hash: str
    setting: str
    cells: list[Cell]
    pending: bool = False
    paper_preset: str = ""  # the paper's setting this section is (its preset), if any

    @property
    def slug(self) -> str:
        return f"{self.dataset}-{self.setting_hash}"


@dataclass
class Board:
    """The whole leaderboard."""

    sections: list[Section]
    experiment: str
    stage: str
    runs_used: int
    date: str
    versions: list[str]
    commits: list[str]
    budget: str = ""
    paper: PaperTable | None = None
    evidence: str = ""  # the evidence file written beside the page (evidence.py), if any


def _count(value: float) -> str:
    return "" if value is None or math.isnan(value) else f"{value:,.0f}"


def _si(value: float) -> str:
    """3 significant digits with an SI suffix: 307k, 1.23M, 45.6G, 1.20T."""
    if value is None or math.isnan(value):
        return ""
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


def _num(value: float, digits: int) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------
# Grouping


def setting_of(params: dict[str, str]) -> dict[str, str]:
    """The keys of a run's config that define its problem (not the method nor its tuning)."""
    return {k: v for k, v in sorted(params.items())
            if (k.startswith(SETTING_PREFIXES) or k in SETTING_KEYS) and k not in UNSET and ADDED_KEYS.get(k) != v}


def setting_hash(params: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(setting_of(params), sort_keys=True).encode()).hexdigest()[:8]


def describe_setting(params: dict[str, str]) -> str:
    """The setting in one line."""
    p = params.get
    size = p("model.image_size", "0")
    size_text = "native size" if size == "0" else f"{size} px"
    partition = p("data.partition", "?")
    detail = {"dirichlet": f" alpha={p('data.alpha')}", "shards": f" {p('data.classes_per_client')} classes each",
              "natural": f" {p('data.clients_per_domain')} per domain, alpha={p('data.alpha')}"}.get(partition, "")
    model = p("model.name", "vit")
    arch = (f"ViT {p('model.embed_dim')}x{p('model.depth')} patch {p('model.patch_size')}" if model == "vit"
            else model)
    folder = f"images of {p('dataset.folder')}/, " if p("dataset.folder") else ""  # which image folder
    return (f"{folder}{partition}{detail}, {p('data.num_clients')} clients ({float(p('train.sample_fraction', '1')):.0%}"
            f" a round), {p('train.rounds')} rounds, {arch} at {size_text}, protocol {p('data.protocol')}")


def _cell(method: str, runs: Sequence[RunRow]) -> Cell:
    kept, dropped = stats.newest_per_seed(runs, seed=lambda r: r.seed, started=lambda r: (r.start_time, r.run_id))
    cell = Cell(method, kept, dropped)
    cell.acc = stats.t_interval([r.metrics.get("test_acc_mean", math.nan) for r in kept])

    def mean(values: list[float]) -> float:
        values = [v for v in values if not math.isnan(v)]
        return float(sum(values) / len(values)) if values else math.nan

    cell.weighted = mean([r.metrics.get("test_acc_weighted", math.nan) for r in kept])
    fair = [stats.client_fairness(r.client_acc) for r in kept]
    cell.std = mean([f[0] for f in fair])
    cell.worst = mean([f[1] for f in fair])
    cell.novel = mean([r.metrics.get("novel_test_acc_mean", math.nan) for r in kept])
    cell.bytes_up = mean([r.metrics.get("bytes_up", math.nan) for r in kept])
    cell.train_samples = mean([r.train_samples_per_round for r in kept])
    cell.flops = mean([r.train_flops_per_round for r in kept])
    cell.parameters = mean([r.parameters for r in kept])
    cell.personal_parameters = mean([r.personal_parameters for r in kept])
    cell.seconds = mean([r.seconds for r in kept])
    cell.visits = mean([r.metrics.get("visits_per_client_mean", math.nan) for r in kept])
    if dropped:
        by_seed: dict[int, int] = {}
        for r in dropped:
            by_seed[r.seed] = by_seed.get(r.seed, 0) + 1
        cell.note = "; ".join(f"seed {s} was run {k + 1} times, the newest run is used" for s, k in
                              sorted(by_seed.items()))
    return cell


def _compare(cells: list[Cell]) -> None:
    """Mark the best cell and compare every other one with it, paired by seed."""
    i = stats.best_index([c.acc.mean for c in cells])
    if i is None:
        return
    best = cells[i]
    best.verdict = "best"
    best_by_seed = {r.seed: r.metrics.get("test_acc_mean", math.nan) for r in best.runs}
    for cell in cells:
        if cell is best:
            continue
        mine = {r.seed: r.metrics.get("test_acc_mean", math.nan) for r in cell.runs}
        cell.diff = stats.paired_difference(mine, best_by_seed)
        same = stats.not_distinguishable(cell.diff)
        if same is None:
            cell.verdict = "too few seeds"
        elif same:
            cell.verdict = "not distinguishable"
        else:
            cell.verdict = "worse" if cell.diff.mean < 0 else "better"


def paper_setting(preset: str, dataset: str) -> dict[str, str]:
    """The setting keys of a `paper-*` preset, as its runs record them (params are strings)."""
    from ..benchmark.config import flatten
    from ..benchmark.resolve import resolve_config

    return setting_of({k: str(v) for k, v in flatten(resolve_config("fedavg", dataset, preset=preset)).items()})


def _is_setting(params: dict[str, str], wanted: dict[str, str]) -> bool:
    """True when the run's setting is `wanted` on every key both know (a key added since is not held against it)."""
    mine = setting_of(params)
    return all(mine[k] == v for k, v in wanted.items() if k in mine)


def _add_paper_rows(section: Section, table: PaperTable, methods: Sequence[str]) -> None:
    """The paper's value on each row, and a row "not run yet" for each of its methods that has no run here."""
    values = table.values.get(section.paper_preset, {})
    if section.pending:  # the paper's methods in its order, then ours
        order = [m for m in table.names if m in values] + [m for m in methods if m not in values]
        section.cells = [Cell(m, [], verdict="pending") for m in order]
    else:
        present = {c.method for c in section.cells}
        section.cells += [Cell(m, [], verdict="pending") for m in table.names if m in values and m not in present]
    for cell in section.cells:
        cell.paper = values.get(cell.method)
        if not cell.n:
            cell.pending_text = PENDING_NOTE


def build_board(runs: Sequence[RunRow], *, experiment: str, stage: str = Stage.FINAL, budget: str = "",
                pending: bool = True, paper: PaperTable | None = None) -> Board:
    """Group, deduplicate and compare; add the paper's settings as pending rows when they have no runs.

    In a paper setting every row shows the paper's value (`paper`, default: the packaged Table 2).
    """
    paper = paper if paper is not None else load_paper_table()
    groups: dict[tuple[str, str], dict[str, list[RunRow]]] = {}
    params_of: dict[tuple[str, str], dict[str, str]] = {}
    for run in runs:
        key = (run.dataset, setting_hash(run.params))
        groups.setdefault(key, {}).setdefault(run.method, []).append(run)
        params_of.setdefault(key, run.params)
    sections = []
    methods = sorted({r.method for r in runs})
    for key in sorted(groups):
        cells = [_cell(m, rs) for m, rs in sorted(groups[key].items())]
        _compare(cells)
        cells.sort(key=lambda c: (-c.acc.mean if not math.isnan(c.acc.mean) else math.inf, c.method))
        # A method run elsewhere but not here is a row too: its absence is visible, not silent.
        cells += [Cell(m, [], verdict="pending", pending_text=MISSING_NOTE) for m in methods if m not in groups[key]]
        sections.append(Section(key[0], key[1], describe_setting(params_of[key]), cells))
    for dataset, preset, text in PAPER_SETTINGS:
        wanted = paper_setting(preset, dataset)
        matched = [s for s in sections if s.dataset == dataset and _is_setting(params_of[(dataset, s.setting_hash)],
                                                                               wanted)]
        for section in matched:
            section.paper_preset = preset
            _add_paper_rows(section, paper, methods)
        if pending and not matched:
            section = Section(dataset, preset, f"{text} (preset {preset})", [], pending=True, paper_preset=preset)
            _add_paper_rows(section, paper, methods)
            sections.append(section)
    used = [r for s in sections for c in s.cells for r in c.runs]
    newest = max((r.end_time for r in used), default=0)
    date = datetime.fromtimestamp(newest / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if newest else ""
    return Board(sections, experiment, stage, len(used), date, sorted({r.version for r in used if r.version}),
                 sorted({r.commit for r in used if r.commit}), budget, paper)


# ---------------------------------------------------------------------------
# Reading MLflow


def parse_client_accuracy(text: str | None) -> list[float]:
    """The `test_acc` column of a run's client_accuracy.csv (clients without test samples left out)."""
    if not text:
        return []
    return [float(row["test_acc"]) for row in csv.DictReader(io.StringIO(text)) if row.get("test_acc")]


def collect(tracking_uri: str | None, experiment: str, stage: str = Stage.FINAL) -> list[RunRow]:
    """The finished runs of `stage` in `experiment`, with their per-client accuracy."""
    from .evidence import store_records, to_row  # one reading of the store: the evidence records

    return [to_row(r) for r in store_records(tracking_uri, experiment, stage)]


# ---------------------------------------------------------------------------
# Writing


def _csv_rows(board: Board) -> list[dict[str, str]]:
    rows = []
    for s in board.sections:
        for c in s.cells:
            d = c.diff
            rows.append({
                "dataset": s.dataset, "setting_hash": s.setting_hash, "setting": s.setting, "method": c.method,
                "status": c.pending_text if c.verdict == "pending" else "done", "n": str(c.n),
                "seeds": " ".join(map(str, c.seeds)), "test_acc_mean": _num(c.acc.mean, 6),
                "ci_low": _num(c.acc.lo, 6), "ci_high": _num(c.acc.hi, 6), "test_acc_weighted": _num(c.weighted, 6),
                "client_acc_std": _num(c.std, 6), "worst10_acc": _num(c.worst, 6),
                "novel_test_acc_mean": _num(c.novel, 6), "parameters": _num(c.parameters, 0),
                "personal_parameters": _num(c.personal_parameters, 0), "bytes_up_per_round": _num(c.bytes_up, 0),
                "train_flops_per_round": _num(c.flops, 0), "train_samples_per_round": _num(c.train_samples, 1),
                "train_seconds": _num(c.seconds, 1), "diff_vs_best": _num(d.mean, 6) if d else "",
                "diff_low": _num(d.lo, 6) if d else "", "diff_high": _num(d.hi, 6) if d else "",
                "vs_best": "" if c.verdict == "pending" else c.verdict, "run_ids": " ".join(c.run_ids),
                "paper_test_acc_mean": _num(c.paper.mean / 100, 4) if c.paper else "",
                "paper_client_acc_std": _num(c.paper.std / 100, 4) if c.paper else "",
                "paper_note": "merged row in the extraction" if c.paper and c.paper.merged else "",
            })
    return rows


def results_csv(board: Board) -> str:
    """One row per cell, stable columns (`COLUMNS`)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_csv_rows(board))
    return out.getvalue()


TABLE_HEAD = ("method", "n", "test_acc_mean ± 95% CI", "vs best (paired 95% CI)", "weighted", "client std",
              "worst 10%", "novel", "params (total / personal)", "bytes up/round", "FLOPs/round", "train s")


def _table_cells(c: Cell) -> list[str]:
    if c.verdict == "pending":
        return [c.method, "0", c.pending_text] + [""] * (len(TABLE_HEAD) - 3)
    shown = c.method in VISITS_SHOWN and not math.isnan(c.visits)
    name = f"{c.method} ({c.visits:.0f} visits/client)" if shown else c.method
    return [name, str(c.n), c.acc_text, c.vs_best_text, _num(c.weighted, 4), _num(c.std, 4), c.worst_text,
            _num(c.novel, 4), c.params_text, c.bytes_text, _si(c.flops), _num(c.seconds, 1)]


def _head(s: Section) -> list[str]:
    """The table's columns: a paper setting's has the paper's value after ours."""
    head = list(TABLE_HEAD)
    if s.paper_preset:
        head.insert(3, PAPER_HEAD)
    return head


def _row_cells(s: Section, c: Cell) -> list[str]:
    cells = _table_cells(c)
    if s.paper_preset:
        cells.insert(3, c.paper.text if c.paper else "")
    return cells


def paper_notes(board: Board, s: Section) -> list[str]:
    """What the paper column means in section `s`: source, units, the method mapping, setting differences."""
    table = board.paper
    if table is None or not s.paper_preset:
        return []
    shown = {c.method for c in s.cells if c.paper}
    notes = [f"Paper reports: {table.source}, column {table.columns[s.paper_preset]} (leaderboard/{PAPER_TABLE}): "
             f"accuracy in %, ± the std over clients (ours: a fraction, ± a 95% interval over seeds; our std over "
             f"clients is \"client std\")."]
    notes += [f"{m} = the paper's {table.names[m]}: {table.adapted[m]}." for m in table.names
              if m in shown and m in table.adapted]
    if any(c.paper.merged for c in s.cells if c.paper):
        notes.append(table.merged_note + ".")
    if s.paper_preset in table.differs:
        notes.append(f"Our setting: {table.differs[s.paper_preset]}")
    return notes


def _provenance(board: Board) -> list[str]:
    lines = [f"Generated by `bench leaderboard` from {board.runs_used} finished runs of stage `{board.stage}` in"
             f" MLflow experiment `{board.experiment}`" + (f", the newest ended {board.date}." if board.date else ".")]
    lines.append(f"pflbench {', '.join(board.versions) or 'unknown'}, git commit"
                 f" {', '.join(board.commits) or 'unknown'} (as recorded by the runs).")
    if board.budget:
        lines.append(f"Tuning budget: {board.budget}.")
    if board.evidence:
        lines.append(f"Evidence: {board.evidence} holds every run behind the page (its config, partition hash, "
                     f"per-round metrics, per-client accuracies and tuning study); `bench leaderboard --from "
                     f"{board.evidence} --out DIR` rebuilds the page from it alone. configs/ holds each cell's "
                     f"config: `bench run --config configs/CELL.toml --seed S --device cpu` reruns one of its runs.")
    lines.append(f"Accuracy is the mean over clients of each client's personalized test accuracy, final round; "
                 f"± is the half-width of a {stats.INTERVAL_METHOD} (n = seeds). \"vs best\": "
                 f"{stats.PAIRED_METHOD} (a seed fixes the partition for every method); ≈ = not distinguishable "
                 f"from the best (the interval contains 0), < = worse. Fairness from each run's client_accuracy.csv: "
                 f"std of per-client accuracy and the mean of the worst 10% of clients, averaged over seeds. "
                 f"\"novel\": accuracy on held-out clients where the method reports it. Params: the model's parameters, "
                 f"total / those that never leave the client. FLOPs/round: forward and backward of everything the "
                 f"clients trained in a round (fine-tuning and head-only phases included), mean over rounds and "
                 f"seeds: the compute each method spent (results.csv also has train samples per round). "
                 f"Train s: wall time of a run.")
    return lines


def readme(board: Board, plots: dict[str, str]) -> str:
    """The leaderboard as Markdown: one table per dataset x setting, run ids behind every cell."""
    out = ["# pflbench leaderboard", "", *(line + "\n" for line in _provenance(board)),
           "The page with sortable tables and plots: [index.html](index.html); every cell: [results.csv](results.csv).",
           ""]
    for s in board.sections:
        out += [f"## {s.dataset}", "", f"Setting: {s.setting}" + ("" if s.pending else f" (setting {s.setting_hash})"),
                ""]
        head = _head(s)
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
        for c in s.cells:
            out.append("| " + " | ".join(_row_cells(s, c)) + " |")
        out.append("")
        out += [f"- {note}" for note in paper_notes(board, s)] + ([""] if s.paper_preset else [])
        if s.slug in plots:
            out += [f"![accuracy vs communication and time: {s.dataset}]({plots[s.slug]})", ""]
        ids = [(c.method, c.run_ids) for c in s.cells if c.run_ids]
        if ids:
            out.append("MLflow runs behind each cell (seed order):")
            out.append("")
            out += [f"- {m}: {', '.join(f'`{i}`' for i in rs)}" for m, rs in ids]
            out.append("")
        notes = [f"- {c.method}: {c.note}" for c in s.cells if c.note]
        if notes:
            out += ["Repeated seeds:", "", *notes, ""]
    return "\n".join(out).rstrip() + "\n"


def pareto_png(section: Section) -> bytes:
    """Accuracy (with its interval) against bytes up per round and against training time; deterministic PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in section.cells if c.n]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, cost, label in ((axes[0], "bytes_up", "bytes up per round"), (axes[1], "seconds", "training time (s)")):
        xs = [getattr(c, cost) for c in cells]
        ys = [c.acc.mean for c in cells]
        errs = [0.0 if math.isnan(c.acc.half_width) else c.acc.half_width for c in cells]
        front = set(stats.pareto_front(list(zip(xs, ys))))
        for i, c in enumerate(cells):
            ax.errorbar(xs[i], ys[i], yerr=errs[i], fmt="o", capsize=3,
                        color="tab:red" if i in front else "tab:blue")
            ax.annotate(c.method, (xs[i], ys[i]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel=label, ylabel="test_acc_mean (95% CI)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{section.dataset} ({section.setting_hash}): red = Pareto front", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


_SCRIPT = """
document.querySelectorAll("table.board").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var up = th.dataset.dir !== "asc"; th.dataset.dir = up ? "asc" : "desc";
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v, nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return up ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
document.documentElement.dataset.ready = "yes";
"""

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table.board { border-collapse: collapse; margin: 1em 0; }
table.board th, table.board td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
table.board th { cursor: pointer; background: #f0f0f0; }
table.board td:first-child, table.board th:first-child { text-align: left; }
tr.best td { font-weight: bold; }
tr.pending td { color: #888; }
.ids { font-family: monospace; font-size: 0.8em; color: #555; }
"""


def _sort_value(c: Cell, i: int) -> str:
    numeric = [None, c.n, c.acc.mean, c.diff.mean if c.diff else (0.0 if c.verdict == "best" else None),
               c.weighted, c.std, c.worst, c.novel, c.parameters, c.bytes_up, c.flops, c.seconds]
    v = numeric[i]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return c.method if i == 0 else ""
    return repr(float(v))


def index_html(board: Board, plots_png: dict[str, bytes]) -> str:
    """One self-contained page: tables (sortable by any column), plots inline, the data as JSON."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>pflbench leaderboard</title>", f"<style>{_STYLE}</style></head><body>",
             "<h1>pflbench leaderboard</h1>"]
    parts += [f"<p>{e(line)}</p>" for line in _provenance(board)]
    for s in board.sections:
        parts.append(f'<section id="{e(s.slug)}"><h2>{e(s.dataset)}</h2><p>Setting: {e(s.setting)}</p>')
        parts.append('<table class="board"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in _head(s))
                     + "</tr></thead><tbody>")
        for c in s.cells:
            cls = "cell" + (" best" if c.verdict == "best" else "") + (" pending" if c.verdict == "pending" else "")
            keys = [_sort_value(c, i) for i in range(len(TABLE_HEAD))]
            if s.paper_preset:
                keys.insert(3, repr(c.paper.mean) if c.paper else "")
            tds = "".join(f'<td data-v="{e(key)}">{e(text)}</td>' for key, text in zip(keys, _row_cells(s, c)))
            parts.append(f'<tr class="{cls}" data-method="{e(c.method)}" title="MLflow runs: '
                         f'{e(" ".join(c.run_ids))}">{tds}</tr>')
        parts.append("</tbody></table>")
        notes = paper_notes(board, s)
        if notes:
            parts.append('<ul class="paper">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
        if s.slug in plots_png:
            data = base64.b64encode(plots_png[s.slug]).decode()
            parts.append(f'<img alt="accuracy vs communication and time: {e(s.dataset)}" '
                         f'src="data:image/png;base64,{data}">')
        ids = [(c.method, c.run_ids) for c in s.cells if c.run_ids]
        if ids:
            parts.append('<p class="ids">' + "<br>".join(f"{e(m)}: {e(' '.join(r))}" for m, r in ids) + "</p>")
        parts.append("</section>")
    payload = json.dumps(_csv_rows(board), sort_keys=True, ensure_ascii=True).replace("</", "<\\/")
    parts.append(f'<script type="application/json" id="leaderboard-data">{payload}</script>')
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


def write_board(board: Board, out: str | Path) -> dict[str, Path]:
    """Write README.md, results.csv, index.html and one Pareto PNG per run section into `out`."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out}: {err.strerror}") from None
    pngs = {s.slug: pareto_png(s) for s in board.sections if not s.pending and any(c.n for c in s.cells)}
    names = {slug: f"pareto-{slug}.png" for slug in pngs}
    files = {"README.md": readme(board, names), "results.csv": results_csv(board),
             "index.html": index_html(board, pngs)}
    written = {}
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
        written[name] = out / name
    for slug, data in pngs.items():
        (out / names[slug]).write_bytes(data)
        written[names[slug]] = out / names[slug]
    return written
