"""The `bench` command: the only module that uses argparse and rich.

Exit status: 0 success, 2 a user error (one line on stderr, no traceback),
1 an internal failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import traceback
from pathlib import Path
from typing import Callable, Mapping, NoReturn, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import TrainingDiverged, UserError

console = Console()
err_console = Console(stderr=True)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line, like every other user error."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------
# bench list


def cmd_list(args: argparse.Namespace) -> int:
    from ..datasets import DATASETS, PARTITIONERS
    from ..methods import METHODS
    from .config import list_presets

    sections: list[tuple[str, Mapping[str, str]]] = [
        ("methods", {n: METHODS.get(n).description() for n in METHODS}),
        ("datasets", {n: DATASETS.get(n).description for n in DATASETS}),
        ("presets", list_presets()),
        ("partitions", {n: PARTITIONERS.get(n).description for n in PARTITIONERS}),
    ]
    for title, rows in sections:
        table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for name, text in rows.items():
            table.add_row(name, text)
        console.print(table)
        console.print()
    return 0


# ---------------------------------------------------------------------------
# bench run


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that resolves a run config."""
    p.add_argument("--preset", help="preset name (`bench list`); default: the dataset's own")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of settings (same layout as --dry-run prints)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set train.lr=0.05 (repeatable)")
    p.add_argument("--seed", type=int, help="seed of partition, init, sampling and batches")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--data-root", metavar="DIR", help="folder holding the datasets (default ./data)")


def _spec(args: argparse.Namespace):
    """The command's settings layers as one value (built once per command)."""
    from .resolve import RunSpec

    return RunSpec(preset=args.preset, config_file=args.config, overrides=tuple(args.overrides),
                   seed=args.seed, device=args.device, data_root=args.data_root)


class _RichProgress:
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


def _results_table(sim, result, run_id: str | None) -> Table:
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
    table.add_row("parameters (personal)", f"{sim.num_parameters:,} ({sim.num_personal_parameters:,})")
    table.add_row("rounds, wall time", f"{len(result.history)}, {result.seconds:.1f} s")
    return table


def _final_line(sim, result, run_id: str | None) -> str:
    m = result.final.metrics()
    return (f"{sim.cfg.method.name} {sim.cfg.dataset.name} seed={sim.cfg.seed} "
            f"test_acc_mean={m['test_acc_mean']:.4f} test_acc_weighted={m['test_acc_weighted']:.4f} "
            f"run_id={run_id}")


class _LoadProgress:
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


def _load_images(cfg, quiet: bool = False):
    """The run's dataset, with a progress bar while images are decoded (first use only)."""
    from ..datasets import DATASETS

    bar = None if quiet else _LoadProgress(f"decoding {cfg.dataset.name} images (cached afterwards)")
    try:
        return DATASETS.get(cfg.dataset.name).load(cfg.dataset, progress=bar)
    finally:
        if bar is not None:
            bar.stop()


def cmd_run(args: argparse.Namespace) -> int:
    from .config import to_toml

    cfg = _spec(args).resolve(args.method, args.dataset)
    if args.dry_run:
        console.print(to_toml(cfg), markup=False, highlight=False, end="")
        return 0
    from .engine import Simulation
    from .tracking import RunRecorder, ui_command

    images = _load_images(cfg, args.quiet)
    status = None if args.quiet else console.status("loading data and building the model")
    if status:
        status.start()
    try:
        sim = Simulation(cfg, images=images)
    finally:
        if status:
            status.stop()
    recorder = RunRecorder(args.tracking_uri, args.experiment)
    callbacks: list = [recorder]
    progress = None
    if not args.quiet:
        info = "".join(f", {k} {v:,}" if isinstance(v, (int, float)) else f", {k} {v}"
                       for k, v in sim.method.run_info().items())
        console.print(
            f"[bold]{cfg.method.name}[/] on [bold]{cfg.dataset.name}[/]: {sim.data.num_clients} clients,"
            f" {sim.num_parameters:,} parameters ({sim.num_personal_parameters:,} personal), device {sim.device}"
            + info
        )
        progress = _RichProgress(cfg.train.rounds, f"{cfg.method.name}/{cfg.dataset.name}")
        callbacks.append(progress)
    try:
        with recorder:
            result = sim.run(callbacks)
    except TrainingDiverged as err:
        raise UserError(f"{err}; MLflow run {recorder.run_id} marked FAILED") from None
    finally:
        if progress:
            progress.stop()
    if not args.quiet:
        console.print(_results_table(sim, result, recorder.run_id))
        console.print(f"MLflow run [bold]{recorder.run_id}[/] in experiment '{args.experiment}'")
        console.print(f"view it: [bold]{ui_command(recorder.tracking_uri)}[/]", soft_wrap=True)
    print(_final_line(sim, result, recorder.run_id))
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="train one federated experiment and record it in MLflow")
    p.add_argument("--method", required=True, help="method name (`bench list`)")
    p.add_argument("--dataset", required=True, help="dataset name (`bench list`)")
    _add_config_arguments(p)
    _add_tracking_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    p.set_defaults(func=cmd_run)


def _add_tracking_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--experiment", default="pflbench", metavar="NAME", help="MLflow experiment (default pflbench)")


# ---------------------------------------------------------------------------
# bench partition


def _scheme(cfg) -> str:
    d = cfg.data
    if d.partition_file:
        return f"saved partition {d.partition_file}"
    detail = {"dirichlet": f"alpha={d.alpha}", "shards": f"classes_per_client={d.classes_per_client}",
              "natural": f"clients_per_domain={d.clients_per_domain}, alpha={d.alpha}"}.get(d.partition, "")
    seed = d.partition_seed if d.partition_seed >= 0 else cfg.seed
    return f"{d.partition}({detail}), protocol={d.protocol}, seed={seed}"


def cmd_partition(args: argparse.Namespace) -> int:
    import numpy as np

    from ..datasets import partition_for
    from .reports import label_skew, partition_heatmap_png

    cfg = _spec(args).resolve("fedavg", args.dataset)
    images = _load_images(cfg)
    partition = partition_for(images, cfg.data, cfg.seed)
    counts = partition.class_counts(images.labels, images.num_classes)
    skew = label_skew(counts)
    overall = label_skew(counts.sum(axis=0, keepdims=True))

    table = Table(title=f"{cfg.dataset.name}: {partition.num_clients} clients, {_scheme(cfg)}", title_justify="left")
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
    if args.plot:
        path = partition_heatmap_png(counts, images.class_names, args.plot,
                                     f"{cfg.dataset.name}: {_scheme(cfg)}")
        console.print(f"heatmap: {path}", highlight=False)
    if args.save:
        try:
            Path(args.save).write_text(partition.to_json())
        except OSError as err:
            raise UserError(f"cannot write {args.save}: {err.strerror}") from None
        console.print(f"partition saved: {args.save} (reuse it with --set data.partition_file={args.save})",
                      highlight=False)
    return 0


def _add_partition(sub) -> None:
    p = sub.add_parser("partition", help="build a dataset's client partition without training and show its skew")
    p.add_argument("--dataset", required=True, help="dataset name (`bench list`)")
    _add_config_arguments(p)
    p.add_argument("--plot", metavar="OUT.png", help="write a clients x classes heatmap PNG")
    p.add_argument("--save", metavar="FILE.json", help="save the partition (reuse: --set data.partition_file=FILE)")
    p.set_defaults(func=cmd_partition)

# bench sensitivity


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from .sensitivity import run_sensitivity
    from .tracking import ui_command, default_tracking_uri

    progress: list[_RichProgress] = []

    def callbacks(part, cfg):
        if args.quiet:
            return ()
        progress.append(_RichProgress(cfg.train.rounds, f"{part.label}"))
        return (progress[-1],)

    try:
        study = run_sensitivity(
            args.dataset, _spec(args), tracking_uri=args.tracking_uri,
            experiment=args.experiment, out_dir=args.out, callbacks=callbacks,
        )
    finally:
        for bar in progress:
            bar.stop()
    if not args.quiet:
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
        uri = args.tracking_uri or default_tracking_uri()
        console.print(f"MLflow parent run [bold]{study.parent_run_id}[/] in experiment '{args.experiment}'")
        console.print(f"view it: [bold]{ui_command(uri)}[/]", soft_wrap=True)
    best = max(study.results[1:], key=lambda r: r.test_acc_mean)
    print(f"sensitivity {study.dataset} seed={study.seed} fedavg={study.baseline.test_acc_mean:.4f} "
          f"best={best.part.label!r}:{best.test_acc_mean:.4f} parent_run_id={study.parent_run_id}")
    return 0


def _add_sensitivity(sub) -> None:
    p = sub.add_parser("sensitivity", help="personalize one layer type or block at a time and compare with FedAvg")
    p.add_argument("--dataset", required=True, help="dataset name (`bench list`)")
    _add_config_arguments(p)
    _add_tracking_arguments(p)
    p.add_argument("--out", default=".", metavar="DIR", help="folder for the table (CSV) and bar chart (PNG)")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    p.set_defaults(func=cmd_sensitivity)


# ---------------------------------------------------------------------------
# bench perf


def cmd_perf_overhead(args: argparse.Namespace) -> int:
    import torch

    from .perf.overhead import measure

    torch.set_num_threads(args.threads)

    def show(i: int, result) -> None:
        if not args.quiet:
            console.print(f"repeat {i + 1}: engine {result.engine[-1]:8.1f} samples/s   tight loop"
                          f" {result.tight[-1]:8.1f} samples/s   ({result.samples} samples)", highlight=False)

    from .resolve import RunSpec

    spec = RunSpec(overrides=tuple(args.overrides), device=args.device, data_root=args.data_root)
    result = measure(spec, clients=args.clients, rounds=args.rounds, repeats=args.repeats, dataset=args.dataset,
                     on_repeat=show)
    table = Table(title=f"engine overhead: FedAvg with {result.clients} clients vs a tight loop", title_justify="left")
    for column in ("", "samples/s (median)", "per repeat", "optimizer steps"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("engine", f"{statistics.median(result.engine):.1f}", ", ".join(f"{r:.1f}" for r in result.engine),
                  str(result.engine_steps))
    table.add_row("tight loop", f"{statistics.median(result.tight):.1f}", ", ".join(f"{r:.1f}" for r in result.tight),
                  str(result.tight_steps))
    table.caption = "each client ends its epoch on a partial batch: more, smaller steps for the same samples"
    if not args.quiet:
        console.print(table)
    ratios = ", ".join(f"{e / t:.3f}" for e, t in zip(result.engine, result.tight))
    print(f"ratio engine / tight loop: {result.ratio:.3f} (per repeat: {ratios})")
    return 0


def _add_perf(sub) -> None:
    p = sub.add_parser("perf", help="benchmarks of the engine itself (not tests)")
    perf = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK", parser_class=_Parser)
    o = perf.add_parser("overhead", help="samples/s through the engine vs a tight training loop, and their ratio")
    o.add_argument("--dataset", default="digits", help="dataset name (default digits, bundled)")
    o.add_argument("--data-root", metavar="DIR", help="folder holding the datasets")
    o.add_argument("--clients", type=int, default=4, help="FedAvg clients, all trained every round (default 4)")
    o.add_argument("--rounds", type=int, default=3, help="timed rounds = tight-loop epochs (default 3)")
    o.add_argument("--repeats", type=int, default=3, help="alternating repeats; medians are reported (default 3)")
    o.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    o.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    o.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting of the benchmarked run")
    o.add_argument("--quiet", action="store_true", help="print only the ratio line")
    o.set_defaults(func=cmd_perf_overhead)


# ---------------------------------------------------------------------------
# entry point

COMMANDS: list[Callable] = [_add_run, _add_partition, _add_sensitivity, _add_perf]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bench", description="pflbench: personalized federated learning on Vision Transformers")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("list", help="list methods, datasets, presets and partition schemes")
    p.set_defaults(func=cmd_list)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        return 130
    except Exception:  # an internal failure: keep the traceback for the bug report
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
