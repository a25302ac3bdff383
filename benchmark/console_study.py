"""Terminal rendering (rich) of `bench tune`, `bench sweep` and `bench leaderboard`.

Part of the CLI layer: the commands in cli.py parse arguments and call the
study code; what the user sees while it runs is drawn here.
"""

from __future__ import annotations

from typing import Any, Sequence

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

_STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan", "WAITING": "dim"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trials_table(rows: Sequence[Any], title: str) -> Table:
    """Trials as a table: number, state, val_acc_mean, then each searched setting."""
    keys = sorted({k for r in rows for k in r.params})
    table = Table(title=title, title_justify="left")
    table.add_column("trial", justify="right")
    table.add_column("state")
    table.add_column("val_acc_mean", justify="right")
    for key in keys:
        table.add_column(key, justify="right")
    best = max((r.value for r in rows if r.state == "COMPLETE" and r.value is not None), default=None)
    for r in sorted(rows, key=lambda r: r.number):
        value = "" if r.value is None else f"{r.value:.4f}"
        if best is not None and r.value == best and r.state == "COMPLETE":
            value = f"[bold]{value}[/]"
        table.add_row(str(r.number), f"[{_STATE_STYLE.get(r.state, '')}]{r.state}[/]", value,
                      *(_fmt(r.params[k]) if k in r.params else "" for k in keys))
    return table


class TrialsLive:
    """A live table of a study's trials, redrawn as they finish."""

    def __init__(self, console: Console, title: str):
        self.title = title
        self.live = Live(trials_table([], title), console=console, auto_refresh=False, transient=False)

    def __enter__(self) -> TrialsLive:
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.__exit__(*exc)

    def update(self, rows: Sequence[Any]) -> None:
        self.live.update(trials_table(rows, self.title), refresh=True)


def tune_summary(console: Console, result: Any, method: str, dataset: str) -> None:
    """The study's outcome: counts by state, the best trial and the command that runs its config."""
    states: dict[str, int] = {}
    for r in result.trials:
        states[r.state] = states.get(r.state, 0) + 1
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))
    console.print(f"study [bold]{result.study}[/] ({method} on {dataset}): {len(result.trials)} trials ({counts}),"
                  f" {result.ran_here} run by this command; storage {result.storage.split('@')[-1]}",
                  highlight=False)
    if len(result.per_worker) > 1:
        console.print("trials by worker: " + ", ".join(f"{w} {n}" for w, n in result.per_worker.items()),
                      highlight=False)
    if result.best is None:
        console.print("no trial completed yet: rerun the command to continue the study")
        return
    console.print(f"best: trial {result.best.number}, val_acc_mean {result.best.value:.4f}", highlight=False)
    if result.gain is not None:
        console.print(f"tuning moved it by {result.gain:+.4f} over the defaults (trial 0: val_acc_mean"
                      f" {result.default.value:.4f})", highlight=False)
    table = Table(show_header=False)
    table.add_column(style="cyan")
    table.add_column(justify="right")
    for key, value in sorted(result.best.params.items()):
        table.add_row(key, _fmt(value))
    console.print(table)
    console.print(f"best config: {result.best_config_path} (also best_config.toml on MLflow parent run"
                  f" {result.parent_run_id})", highlight=False, soft_wrap=True)
    console.print(f"run it: [bold]{result.run_command}[/]", soft_wrap=True)


def sweep_progress(console: Console, total: int) -> Progress:
    """One progress bar over a whole sweep."""
    progress = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[last]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console)
    progress.add_task("sweep", total=total, last="")
    return progress


def sweep_summary(console: Console, result: Any) -> None:
    """Runs done, skipped and failed, by dataset and method."""
    table = Table(title="sweep", title_justify="left")
    for column in ("dataset", "method", "seed", "status", "test_acc_mean", "run id"):
        table.add_column(column, justify="right" if column in ("seed", "test_acc_mean") else "left")
    for item in result.items:
        acc = "" if item.test_acc_mean is None else f"{item.test_acc_mean:.4f}"
        status = item.status + (" (resumed)" if getattr(item, "resumed", False) else "")
        table.add_row(item.dataset, item.method, str(item.seed), status, acc, item.run_id or "")
    console.print(table)


def sweep_line(result: Any) -> str:
    """The final line: runs of the suite (or shard) by outcome; `elsewhere`: run by another process."""
    counts = {s: sum(1 for i in result.items if i.status == s) for s in ("finished", "skipped", "failed", "elsewhere")}
    resumed = sum(1 for i in result.items if getattr(i, "resumed", False))
    return (f"sweep {result.path.name} runs={len(result.items)} " + " ".join(f"{k}={v}" for k, v in counts.items())
            + f" resumed={resumed}")


def leaderboard_summary(console: Console, board: Any, out: str) -> None:
    """One table per dataset, as in the written README."""
    for section in board.sections:
        table = Table(title=f"{section.dataset}: {section.setting}", title_justify="left")
        paper = bool(section.paper_preset)
        for column in ("method", "n", "test_acc_mean (95% CI)", *(["paper reports (%)"] if paper else []), "vs best",
                       "worst 10%", "bytes up/round"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for cell in section.cells:
            reported = [cell.paper.text if cell.paper else ""] if paper else []
            table.add_row(cell.method, str(cell.n), cell.acc_text, *reported, cell.vs_best_text, cell.worst_text,
                          cell.bytes_text)
        console.print(table)
    evidence = f", {out}/{board.evidence}, {out}/configs/" if board.evidence else ""
    console.print(f"written: {out}/README.md, {out}/results.csv, {out}/index.html{evidence}", highlight=False)


def show_plan(console: Console, plan: Any) -> None:
    """A suite's runs, grouped by setting and method, with the estimated training compute and GPU hours."""
    groups: dict[tuple, list] = {}
    for run in plan.runs:
        groups.setdefault((run.item.spec.preset or run.item.dataset, run.item.method), []).append(run)
    table = Table(title=f"plan: {plan.suite.path.name} (schedule: rounds x clients a round x epochs x train"
                        " samples a client)", title_justify="left")
    for column in ("setting", "method", "seeds", "to run", "schedule", "GFLOP/sample", "PFLOP/run", "GPU h"):
        table.add_column(column, justify="left" if column in ("setting", "method") else "right")
    sources = {}
    for (setting, method), runs in groups.items():
        first = runs[0]
        todo = [r for r in runs if r.item.status != "skipped"]
        sources[setting] = first.data.source
        table.add_row(setting, method + ("" if first.item.registered else " *"),
                      ",".join(str(r.item.seed) for r in runs), str(len(todo)),
                      f"{first.rounds}x{first.clients_per_round}x{first.local_epochs}x{first.data.train_per_client:,.0f}",
                      f"{first.flops_per_sample / 1e9:.2f}", f"{first.flops / 1e15:.1f}",
                      f"{plan.gpu_hours(sum(r.flops for r in todo)):.2f}")
    console.print(table)
    console.print("train samples a client from: " + "; ".join(f"{k}: {v}" for k, v in sources.items()),
                  highlight=False)
    if plan.unregistered:
        console.print(f"* not registered in this install, planned as the plain model: {', '.join(plan.unregistered)}",
                      highlight=False)
    skipped = len(plan.runs) - len(plan.to_run)
    console.print(f"{len(plan.to_run)} runs to do ({skipped} already finished): {plan.flops / 1e18:.2f} EFLOP of"
                  f" training = {plan.gpu_hours(plan.flops):.1f} GPU hours at {plan.utilization:.0%} of"
                  f" {plan.peak_tflops:g} TFLOPS (bf16 peak); evaluation not counted", highlight=False)
    if plan.trials:
        console.print(f"tuning first: {plan.trials} trials x {plan.tune_rounds} rounds per method and setting ="
                      f" {plan.tuning_flops / 1e18:.2f} EFLOP = {plan.gpu_hours(plan.tuning_flops):.1f} GPU hours"
                      " (at most: pruned trials stop early)", highlight=False)
