"""What `bench` shows: progress, tables and summary lines (rich lives here and in cli.py only).

On a terminal, progress is a rich bar. When stdout is not a terminal (nohup,
Slurm, a pipe) a bar would print nothing until the end, so each round is one
plain line on stderr instead.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
from datetime import datetime
from typing import Any, Iterator, Mapping, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .records import Metric, Tag

console = Console()
err_console = Console(stderr=True)


# ---------------------------------------------------------------------------
# Progress


class RichProgress:
    """Engine callback: a progress bar over rounds showing the latest accuracy."""

    def __init__(self, total_rounds: int, label: str):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("round {task.fields[round_text]}"), TextColumn("acc {task.fields[acc]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = self.progress.add_task(label, total=total_rounds, acc="-", round_text="")
        self.total_rounds = total_rounds

    def on_start(self, sim) -> None:
        self.progress.update(self.task, completed=sim.round_index)  # a resumed run starts part-way
        self.progress.start()

    def on_progress(self, round_index: int, done: int, total: int) -> None:
        self.progress.update(self.task, round_text=f"{round_index} ({done}/{total} clients)")

    def on_round(self, round_index: int, metrics: Mapping[str, float]) -> None:
        acc = metrics.get("test_acc_mean", math.nan)
        fields = {"acc": f"{acc:.4f}"} if not math.isnan(acc) else {}
        self.progress.update(self.task, completed=round_index, round_text=str(round_index), **fields)

    def on_end(self, sim, result) -> None:
        self.progress.stop()

    def stop(self) -> None:
        self.progress.stop()


class PlainProgress:
    """Engine callback: one line per round on stderr (round, accuracy when evaluated, seconds)."""

    def __init__(self, total_rounds: int, label: str, stream=None):
        self.total_rounds = total_rounds
        self.label = label
        self.stream = stream

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def on_start(self, sim) -> None:
        if sim.round_index:
            self._print(f"{self.label}: continuing after round {sim.round_index}/{self.total_rounds}")

    def on_progress(self, round_index: int, done: int, total: int) -> None: ...

    def on_round(self, round_index: int, metrics: Mapping[str, float]) -> None:
        acc = metrics.get("test_acc_mean", math.nan)
        parts = [f"{self.label} round {round_index}/{self.total_rounds}"]
        if not math.isnan(acc):
            parts.append(f"test_acc_mean {acc:.4f}")
        if "failed_clients" in metrics:
            parts.append(f"failed_clients {metrics['failed_clients']:.0f}")
        parts.append(f"{metrics.get('round_seconds', math.nan):.1f} s")
        self._print("  ".join(parts))

    def on_end(self, sim, result) -> None: ...

    def stop(self) -> None: ...


def round_progress(total_rounds: int, label: str) -> RichProgress | PlainProgress:
    """A bar on a terminal, plain lines on stderr otherwise."""
    return RichProgress(total_rounds, label) if console.is_terminal else PlainProgress(total_rounds, label)


class LoadProgress:
    """A dataset loader's progress callback: a bar that appears once slow work (decoding) starts."""

    def __init__(self, label: str):
        self.label = label
        self.progress: Progress | None = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=total)
        self.progress.update(self.task, completed=done, total=total)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@contextlib.contextmanager
def building_status(quiet: bool = False) -> Iterator[None]:
    """A spinner while the simulation is built (the data moved to the device, the model made)."""
    if quiet:
        yield
        return
    with console.status("loading data and building the model"):
        yield


def print_error(message: str) -> None:
    """A user error: one line on stderr."""
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


def print_warning(message: str) -> None:
    """Something skipped that the user should know of (a plug-in that failed to load): one line on stderr."""
    err_console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)


def print_plain(text: str, **kwargs: Any) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True, **kwargs)


# ---------------------------------------------------------------------------
# bench list


def show_list(sections: Sequence[tuple[str, Mapping[str, str]]]) -> None:
    for title, rows in sections:
        table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for name, text in rows.items():
            table.add_row(name, text)
        console.print(table)
        console.print()


# ---------------------------------------------------------------------------
# bench run


def show_run_header(sim) -> None:
    cfg = sim.cfg
    info = "".join(f", {k} {v:,}" if isinstance(v, (int, float)) else f", {k} {v}"
                   for k, v in sim.method.run_info().items())
    console.print(
        f"[bold]{cfg.method.name}[/] on [bold]{cfg.dataset.name}[/]: {sim.data.num_clients} clients,"
        f" {sim.num_parameters:,} parameters ({sim.num_personal_parameters:,} personal), device {sim.device}"
        + info
    )


def results_table(sim, result) -> Table:
    table = Table(title=f"{sim.cfg.method.name} on {sim.cfg.dataset.name}, seed {sim.cfg.seed}",
                  title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    final = result.final.metrics()
    for key in ("test_acc_mean", "test_acc_weighted", "val_acc_mean"):
        if key in final:
            table.add_row(key, f"{final[key]:.4f}")
    last = result.history[-1]
    for key, value in result.held_out_metrics.items():
        table.add_row(key, f"{value:.4f}")
    table.add_row("train_loss (last round)", f"{last['train_loss']:.4f}")
    table.add_row("bytes_up per round", f"{last['bytes_up']:,.0f}")
    table.add_row("bytes_down per round", f"{last['bytes_down']:,.0f}")
    failed = sum(h.get("failed_clients", 0) for h in result.history)
    if failed:
        table.add_row("failed client updates (all rounds)", f"{failed:.0f}")
    table.add_row("parameters (personal)", f"{sim.num_parameters:,} ({sim.num_personal_parameters:,})")
    table.add_row("rounds, wall time", f"{len(result.history)}, {result.seconds:.1f} s")
    return table


def show_run_result(sim, result, run_id: str, experiment: str, url: str | None, ui_command: str) -> None:
    console.print(results_table(sim, result))
    console.print(f"MLflow run [bold]{run_id}[/] in experiment '{experiment}'")
    console.print(f"view it: [bold]{ui_command}[/]", soft_wrap=True)
    if url:
        console.print(f"then open {url}", soft_wrap=True, highlight=False)


def final_line(sim, result, run_id: str | None) -> str:
    m = result.final.metrics()
    return (f"{sim.cfg.method.name} {sim.cfg.dataset.name} seed={sim.cfg.seed} "
            f"test_acc_mean={m['test_acc_mean']:.4f} test_acc_weighted={m['test_acc_weighted']:.4f} "
            f"run_id={run_id}")


def show_explained(rows: Sequence[tuple[str, str, str]]) -> None:
    """`key = value  # description` lines, grouped by section, as `--dry-run --explain` prints them."""
    section = None
    width = max((len(f"{k} = {v}") for k, v, _ in rows), default=0)
    for key, value, text in rows:
        head = key.split(".", 1)[0] if "." in key else ""
        if head != section:
            if head:
                console.print(f"\n[{head}]", markup=False, highlight=False)
            section = head
        line = f"{key} = {value}"
        console.print(f"{line:<{width}}  # {text}" if text else line, markup=False, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------
# bench partition


def show_partition(partition, images, skew, overall, counts, title: str) -> None:
    import numpy as np

    table = Table(title=title, title_justify="left")
    for name in ("client", "train", "val", "test", "classes", "top class share", "entropy (bits)"):
        table.add_column(name, justify="right")
    show_domains = images.domains is not None
    if show_domains:
        table.add_column("domain")
    for c in range(partition.num_clients):
        row = [str(c), str(len(partition.train[c])), str(len(partition.val[c])), str(len(partition.test[c])),
               str(skew["classes"][c]), f"{skew['dominant'][c]:.2f}", f"{skew['entropy'][c]:.2f}"]
        if show_domains:
            held = np.concatenate([partition.train[c], partition.val[c], partition.test[c]])
            row.append(", ".join(images.domain_names[d] for d in np.unique(images.domains[held])))
        table.add_row(*row)
    table.add_section()
    sizes = {s: np.array([len(ix) for ix in getattr(partition, s)]) for s in ("train", "val", "test")}
    for label, fn in (("mean", np.mean), ("min", np.min), ("max", np.max)):
        row = [label, *(f"{fn(sizes[s]):.0f}" for s in ("train", "val", "test")),
               f"{fn(skew['classes']):.1f}", f"{fn(skew['dominant']):.2f}", f"{fn(skew['entropy']):.2f}"]
        table.add_row(*row, *([""] if show_domains else []))
    console.print(table)
    used = int(skew["samples"].sum())
    console.print(
        f"{used:,} of {len(images.labels):,} samples used; label entropy per client {skew['entropy'].mean():.2f} bits"
        f" on average vs {overall['entropy'][0]:.2f} for the whole set (lower = more skew);"
        f" the top class holds {skew['dominant'].mean():.0%} of a client's samples on average;"
        f" partition hash {partition.digest()}",
        highlight=False,
    )


# ---------------------------------------------------------------------------
# bench sensitivity


def show_sensitivity(study, experiment: str, ui_command: str) -> None:
    table = Table(title=f"where to personalize: {study.dataset}, seed {study.seed} (personalized test accuracy)",
                  title_justify="left")
    for column, justify in (("part", "left"), ("group", "left"), ("personal params", "right"),
                            ("test_acc_mean", "right"), ("vs FedAvg", "right")):
        table.add_column(column, justify=justify)
    for row in study.rows():
        delta = "" if row["group"] == "baseline" else f"{row['delta_vs_fedavg']:+.4f}"
        table.add_row(str(row["part"]), str(row["group"]), f"{row['personal_parameters']:,}",
                      f"{row['test_acc_mean']:.4f}", delta)
    console.print(table)
    for kind, path in study.files.items():
        console.print(f"{kind}: {path}")
    console.print(f"MLflow parent run [bold]{study.parent_run_id}[/] in experiment '{experiment}'")
    console.print(f"view it: [bold]{ui_command}[/]", soft_wrap=True)


# ---------------------------------------------------------------------------
# bench perf


def show_perf_repeat(i: int, result) -> None:
    console.print(f"repeat {i + 1}: engine {result.engine[-1]:8.1f} samples/s   tight loop"
                  f" {result.tight[-1]:8.1f} samples/s   ({result.samples} samples)", highlight=False)


def show_perf_overhead(result) -> None:
    table = Table(title=f"engine overhead: FedAvg with {result.clients} clients vs a tight loop", title_justify="left")
    for column in ("", "samples/s (median)", "per repeat", "optimizer steps"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("engine", f"{statistics.median(result.engine):.1f}", ", ".join(f"{r:.1f}" for r in result.engine),
                  str(result.engine_steps))
    table.add_row("tight loop", f"{statistics.median(result.tight):.1f}", ", ".join(f"{r:.1f}" for r in result.tight),
                  str(result.tight_steps))
    table.caption = "each client ends its epoch on a partial batch: more, smaller steps for the same samples"
    console.print(table)


def perf_overhead_line(result) -> str:
    ratios = ", ".join(f"{e / t:.3f}" for e, t in zip(result.engine, result.tight))
    return f"ratio engine / tight loop: {result.ratio:.3f} (per repeat: {ratios})"


def print_flushed(line: str) -> None:
    """A benchmark's progress line, shown at once (long benchmarks print as they go)."""
    print(line, flush=True)


def show_perf_together_repeat(i: int, result) -> None:
    console.print(f"repeat {i + 1}: sequential {result.sequential[-1]:8.1f} samples/s   together"
                  f" {result.together[-1]:8.1f} samples/s   ratio {result.ratios[-1]:.3f}", highlight=False)


def perf_together_line(method: str, result) -> str:
    ratios = result.ratios
    return (f"{method}: sequential {statistics.median(result.sequential):.1f} samples/s, {result.parallel} clients"
            f" together {statistics.median(result.together):.1f} samples/s; ratio together / sequential"
            f" {statistics.median(ratios):.3f} (per repeat: {', '.join(f'{r:.3f}' for r in ratios)};"
            f" {result.samples} samples a side per repeat)")


def show_pfedhn_step(label: str, r) -> None:
    outputs = f"{r.chunks} chunks" if r.chunks else "one output layer per tensor"
    print(f"{label} {r.mode}: {r.clients} clients a round, {outputs},"
          f" {r.generated:,} generated values, hypernetwork {r.hn_parameters:,} parameters")
    print(f"  whole move vs the client's change: cosine {r.cosine:.3f}, size {r.size_ratio:.3f}x")
    print(f"  hypernetwork's part vs the client's residual: cosine {r.deviation_cosine:.3f},"
          f" size {r.deviation_size_ratio:.3f}x")


_MIB = 2.0**20


def show_perf_memory_result(r) -> None:
    cuda = f"   peak CUDA {r.cuda_peak / _MIB:7.1f} MiB" if r.cuda_peak else ""
    print(f"{r.method:>9} {r.clients:>6} clients: peak RSS {r.peak_rss / _MIB:7.1f} MiB (before the simulation"
          f" {r.base_rss / _MIB:6.1f} MiB){cuda}; model {r.model_bytes / 1024:.1f} KiB, personal per client"
          f" {r.personal_bytes / 1024:.2f} KiB, {r.trained} clients stored")


def perf_memory_line(method: str, low, high) -> str:
    """Peak memory at the most vs the fewest clients, and the growth per added client."""
    grown = (high.peak_rss - high.base_rss) - (low.peak_rss - low.base_rss)
    per_client = grown / max(high.trained - low.trained, 1)
    return (f"{method}: peak RSS {high.clients} / {low.clients} clients = {high.peak_rss / low.peak_rss:.3f};"
            f" growth {per_client / 1024:.2f} KiB per added client"
            f" (personal entries: {high.personal_bytes / 1024:.2f} KiB per client)")


def perf_gpu_line(report) -> str:
    return (f"paper run ({report.rounds} rounds) extrapolated: {report.rounds} x one warm round"
            f" ({report.round_seconds:.1f} s) = {report.paper_run_seconds / 60:.1f} min (data loading and model build"
            f" not included); benchmark wall time {report.seconds:.0f} s")


def show_perf_flops(costs, *, quiet: bool = False) -> None:
    """Each method's capacity and training FLOPs per round, with ratios to FedAvg's where it is listed."""
    base = next((c for c in costs if c.method == "fedavg"), None)

    def ratio(value: float, of: float) -> str:
        return f" ({value / of:.0%})" if base is not None and of else ""

    if quiet:
        for c in costs:
            print(f"{c.method} parameters={c.parameters} personal={c.personal_parameters}"
                  f" forward_flops_per_sample={c.forward_per_sample} train_flops_per_round={c.round_flops:.6g}"
                  f" final_finetune_flops={c.final_finetune_flops:.6g}")
        return
    table = Table(title="training FLOPs per round at the preset's size (counted, not timed)", title_justify="left")
    for column in ("method", "parameters", "personal", "forward FLOPs/sample", "train FLOPs/round",
                   "final fine-tune FLOPs"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for c in costs:
        table.add_row(c.method, f"{c.parameters:,}" + ratio(c.parameters, base.parameters if base else 0),
                      f"{c.personal_parameters:,}", f"{c.forward_per_sample / 1e9:.3f} G"
                      + ratio(c.forward_per_sample, base.forward_per_sample if base else 0),
                      f"{c.round_flops / 1e12:.2f} T" + ratio(c.round_flops, base.round_flops if base else 0),
                      f"{c.final_finetune_flops / 1e12:.2f} T" if c.final_finetune_flops else "")
    console.print(table)


# ---------------------------------------------------------------------------
# bench runs


def show_runs(runs, *, stale: bool) -> None:
    title = "runs left RUNNING by a process that is gone" if stale else "recent runs, newest first"
    table = Table(title=title, title_justify="left")
    table.add_column("run id", no_wrap=True, min_width=32)  # whole: it is what --resume takes
    for column in ("experiment", "name", "status", "started", "host / pid", "test_acc_mean"):
        table.add_column(column, justify="right" if column == "test_acc_mean" else "left")
    for run in runs:
        status = run.status + (f" ({run.process})" if run.process and run.process != "alive" else "")
        acc = run.metrics.get(Metric.TEST_ACC_MEAN)
        host = f"{run.tags.get(Tag.HOST, '?')} / {run.tags.get(Tag.PID, '?')}"
        table.add_row(run.run_id, run.experiment, run.name, status,
                      datetime.fromtimestamp(run.start).strftime("%Y-%m-%d %H:%M"), host,
                      "" if acc is None else f"{acc:.4f}")
    console.print(table)

