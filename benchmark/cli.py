"""The `bench` command: argument parsing and the commands (what they print lives in console.py).

Exit status: 0 success, 2 a user error (one line on stderr, no traceback),
1 an internal failure, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import traceback
from importlib import metadata
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from . import console as show
from .errors import Terminated, TrainingDiverged, UserError
from .registry import report_plugin_errors


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line, like every other user error."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


# ---------------------------------------------------------------------------
# Output paths: checked before any work, so a finished study is never lost to a typo


def _check_output_file(path: str, option: str, suffixes: Sequence[str] = ()) -> Path:
    target = Path(path)
    if suffixes and target.suffix.lower() not in suffixes:
        raise UserError(f"{option} {path}: expected a file name ending in {' or '.join(suffixes)}")
    if target.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    folder = target.parent
    if not folder.is_dir():
        raise UserError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or target.exists() and not os.access(target, os.W_OK):
        raise UserError(f"{option} {path}: not writable")
    existed = target.exists()
    try:  # permissions do not tell everything (root, /proc, a read-only mount): try it
        with open(target, "ab"):
            pass
    except OSError as err:
        raise UserError(f"{option} {path}: cannot write there ({err.strerror})") from None
    finally:
        if not existed:
            target.unlink(missing_ok=True)
    return target


def _check_output_dir(path: str, option: str) -> Path:
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder")
    existing = target
    while not existing.exists():  # the folder is created later; its nearest existing parent must allow it
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise UserError(f"{option} {path}: {existing} is not writable")
    return target


# ---------------------------------------------------------------------------
# bench list


def cmd_list(args: argparse.Namespace) -> int:
    from ..datasets import DATASETS, PARTITIONERS
    from ..methods import METHODS
    from .config import list_presets

    def origin(registry, name: str) -> str:
        return f" (plug-in from {registry.plugins[name]})" if name in registry.plugins else ""

    show.show_list([
        ("methods", {n: METHODS.get(n).description() + origin(METHODS, n) for n in METHODS}),
        ("datasets", {n: DATASETS.get(n).description + origin(DATASETS, n) for n in DATASETS}),
        ("presets", list_presets()),
        ("partitions", {n: PARTITIONERS.get(n).description for n in PARTITIONERS}),
    ])
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


def _names(args: argparse.Namespace, method: str | None, dataset: str | None) -> tuple[str, str]:
    """--method/--dataset, or the names in the --config file (a run's own config.toml names both)."""
    if (method is None or dataset is None) and getattr(args, "config", None):
        from .config import names_in_config_file

        in_file = names_in_config_file(args.config)
        method, dataset = method or in_file[0], dataset or in_file[1]
    missing = [flag for flag, v in (("--method", method), ("--dataset", dataset)) if v is None]
    if missing:
        raise UserError(f"the following arguments are required: {', '.join(missing)}"
                        " (or a --config file that names them)")
    return method, dataset


def _spec(args: argparse.Namespace):
    """The command's settings layers as one value (built once per command)."""
    from .resolve import RunSpec

    return RunSpec(preset=args.preset, config_file=args.config, overrides=tuple(args.overrides),
                   seed=args.seed, device=args.device, data_root=args.data_root)


def _load_images(cfg, quiet: bool = False):
    """The run's dataset, with a progress bar while images are decoded (first use only)."""
    from .experiment import load_images

    bar = None if quiet else show.LoadProgress(f"decoding {cfg.dataset.name} images (cached afterwards)")
    try:
        return load_images(cfg, progress=bar)
    finally:
        if bar is not None:
            bar.stop()


def cmd_run(args: argparse.Namespace) -> int:
    from .config import to_toml
    from .experiment import Recording, run_experiment
    from .resolve import RunSpec
    from .tracking import DEFAULT_EXPERIMENT, ui_command

    if args.explain and not args.dry_run:
        raise UserError("--explain goes with --dry-run")
    if args.resume:
        given = [flag for flag, v in (("--method", args.method), ("--dataset", args.dataset),
                                      ("--preset", args.preset), ("--config", args.config), ("--seed", args.seed),
                                      ("--set", args.overrides), ("--run-name", args.run_name), ("--tag", args.tags),
                                      ("--dry-run", args.dry_run), ("--experiment", args.experiment))
                 if v is not None and v != [] and v is not False]
        if given:
            raise UserError(f"--resume continues the run with its own config; drop {', '.join(given)}")
        spec, names = RunSpec(device=args.device, data_root=args.data_root), (None, None)
    else:
        spec, names = _spec(args), _names(args, args.method, args.dataset)
        if args.dry_run:
            cfg = spec.resolve(*names)
            if args.explain:
                from .config import explain

                show.show_explained(explain(cfg))
            else:
                show.print_plain(to_toml(cfg), end="")
            return 0
    progress: list = []

    def callbacks(sim, recorder):
        if args.quiet:
            return ()
        show.show_run_header(sim)
        progress.append(show.round_progress(sim.cfg.train.rounds, f"{sim.cfg.method.name}/{sim.cfg.dataset.name}"))
        return progress

    try:
        done = run_experiment(
            spec, *names, resume=args.resume,
            recording=Recording(args.tracking_uri, DEFAULT_EXPERIMENT if args.experiment is None else args.experiment,
                                run_name=args.run_name, tags=dict(args.tags)),
            loader=lambda cfg: _load_images(cfg, args.quiet),
            building=lambda: show.building_status(args.quiet), callbacks=callbacks)
    except TrainingDiverged as err:
        raise UserError(f"{err}; MLflow run {err.run_id} marked FAILED") from None
    finally:
        for bar in progress:
            bar.stop()
    rec = done.recorder
    if not args.quiet:
        show.show_run_result(done.sim, done.result, rec.run_id, rec.experiment, rec.url, ui_command(rec.tracking_uri))
    print(show.final_line(done.sim, done.result, rec.run_id))
    return 0


RUN_EXAMPLES = """examples:
  bench run --method fedperfix --dataset digits
  bench run --method fedavg --dataset imagefolder --preset cpu-cifar10 --data-root /data \\
            --set train.rounds=50 --set run.checkpoint_every=5 --tag purpose=baseline
"""


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="train one federated experiment and record it in MLflow", epilog=RUN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", help="method name (`bench list`); optional with a --config that names it")
    p.add_argument("--dataset", help="dataset name (`bench list`); optional with a --config that names it")
    _add_config_arguments(p)
    _add_tracking_arguments(p)
    p.set_defaults(experiment=None)  # None = pflbench; with --resume it is refused (the run keeps its own)
    p.add_argument("--run-name", metavar="NAME", help="MLflow run name (default METHOD-DATASET-sSEED)")
    p.add_argument("--tag", dest="tags", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="an extra MLflow tag on the run (repeatable)")
    p.add_argument("--resume", metavar="RUN_ID",
                   help="continue a killed run from its last checkpoint, in the same MLflow run")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--explain", action="store_true", help="with --dry-run: each key with its one-line description")
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
    from ..datasets import partition_for
    from .reports import label_skew, partition_heatmap_png

    cfg = _spec(args).resolve("fedavg", args.dataset)
    if args.plot:
        _check_output_file(args.plot, "--plot", (".png",))
    if args.save:
        _check_output_file(args.save, "--save", (".json",))
    images = _load_images(cfg)
    partition = partition_for(images, cfg.data, cfg.seed)
    counts = partition.class_counts(images.labels, images.num_classes)
    show.show_partition(partition, images, label_skew(counts), label_skew(counts.sum(axis=0, keepdims=True)), counts,
                        f"{cfg.dataset.name}: {partition.num_clients} clients, {_scheme(cfg)}")
    if args.plot:
        try:
            path = partition_heatmap_png(counts, images.class_names, args.plot,
                                         f"{cfg.dataset.name}: {_scheme(cfg)}")
        except OSError as err:
            raise UserError(f"cannot write {args.plot}: {err.strerror}") from None
        show.print_plain(f"heatmap: {path}")
    if args.save:
        try:
            Path(args.save).write_text(partition.to_json())
        except OSError as err:
            raise UserError(f"cannot write {args.save}: {err.strerror}") from None
        show.print_plain(f"partition saved: {args.save} (reuse it with --set data.partition_file={args.save})")
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
    from .tracking import default_tracking_uri, ui_command

    if args.out is not None:
        _check_output_dir(args.out, "--out")
    progress: list = []

    def callbacks(part, cfg):
        if args.quiet:
            return ()
        progress.append(show.round_progress(cfg.train.rounds, f"{part.label}"))
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
        show.show_sensitivity(study, args.experiment, ui_command(args.tracking_uri or default_tracking_uri()))
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

    from .resolve import RunSpec

    spec = RunSpec(overrides=tuple(args.overrides), device=args.device, data_root=args.data_root)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = measure(spec, clients=args.clients, rounds=args.rounds, repeats=args.repeats, dataset=args.dataset,
                         on_repeat=None if args.quiet else show.show_perf_repeat)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process keeps its own setting
    if not args.quiet:
        show.show_perf_overhead(result)
    print(show.perf_overhead_line(result))
    return 0


def cmd_perf_together(args: argparse.Namespace) -> int:
    import torch

    from .perf.together import measure

    from .resolve import RunSpec

    torch.set_num_threads(args.threads)
    spec = RunSpec(preset=args.preset, overrides=tuple(args.overrides), device=args.device, data_root=args.data_root)
    result = measure(spec, method=args.method, dataset=args.dataset, parallel=args.parallel, rounds=args.rounds,
                     repeats=args.repeats, on_repeat=None if args.quiet else show.show_perf_together_repeat)
    print(show.perf_together_line(args.method, result))
    return 0


def cmd_perf_pfedhn_step(args: argparse.Namespace) -> int:
    from .perf.pfedhn_step import measure
    from .resolve import RunSpec

    spec = RunSpec(preset=args.preset, overrides=tuple(args.overrides), device="cpu")
    for r in measure(spec, args.dataset, args.classes, scale=args.scale,
                     say=(lambda line: None) if args.quiet else show.print_flushed):
        show.show_pfedhn_step(args.preset or args.dataset, r)
    return 0


def cmd_perf_memory(args: argparse.Namespace) -> int:
    from ..methods import METHODS
    from .perf.memory import measure

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UserError("bad --methods: give at least one method name")
    for method in methods:
        METHODS.get(method)  # an unknown name lists the valid ones
    try:
        clients = sorted({int(n) for n in args.clients.split(",")})
    except ValueError:
        raise UserError(f"bad --clients {args.clients!r}: expected integers, e.g. 10,1000") from None
    if not clients or clients[0] < 1:
        raise UserError(f"bad --clients {args.clients!r}: every count must be >= 1")
    results = measure(methods=methods, clients=clients, device=args.device, overrides=args.overrides,
                      on_result=None if args.quiet else show.show_perf_memory_result)
    for method in methods:
        mine = [r for r in results if r.method == method]
        if len(mine) >= 2:
            print(show.perf_memory_line(method, mine[0], mine[-1]))
    return 0


def cmd_perf_gpu(args: argparse.Namespace) -> int:
    import torch

    from .perf.gpu import run

    if not args.tiny and args.data_root is None:
        raise UserError("bench perf gpu needs --data-root (the folder holding the CIFAR-10 (JPEG) tree), or --tiny")
    torch.set_num_threads(args.threads)
    report = run(tiny=args.tiny, data_root=args.data_root, folder=args.folder, device=args.device,
                 repeats=args.repeats, say=show.print_flushed)
    print(show.perf_gpu_line(report))
    return 0


def cmd_perf_flops(args: argparse.Namespace) -> int:
    from ..methods import METHODS
    from .perf.flops import measure
    from .resolve import RunSpec

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else \
        [m for m in METHODS.names() if m != "partial"]
    if not methods:
        raise UserError("bad --methods: give at least one method name")
    for m in methods:
        METHODS.get(m)  # an unknown name is refused, listing the valid ones
    spec = RunSpec(preset=args.preset, overrides=tuple(args.overrides), device="cpu")
    costs = measure(methods, spec, args.dataset, classes=args.classes, channels=args.channels,
                    client_samples=args.client_samples, native_size=args.native_size)
    show.show_perf_flops(costs, quiet=args.quiet)
    return 0


def _add_perf(sub) -> None:
    p = sub.add_parser("perf", help="benchmarks of the engine itself (not tests)")
    perf = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK", parser_class=_Parser)

    def timed(name: str, summary: str, repeats: str, quiet: str) -> argparse.ArgumentParser:
        """A timing benchmark's parser with the options every one of them takes."""
        b = perf.add_parser(name, help=summary)
        b.add_argument("--dataset", default="digits", help="dataset name (default digits, bundled)")
        b.add_argument("--data-root", metavar="DIR", help="folder holding the datasets")
        b.add_argument("--repeats", type=_positive_int, default=3, help=f"alternating repeats; {repeats} (default 3)")
        b.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads (default 2)")
        b.add_argument("--device", default="cpu", help="cpu (default) or cuda")
        b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting of the benchmarked run")
        b.add_argument("--quiet", action="store_true", help=f"print only the {quiet} line")
        return b

    o = timed("overhead", "samples/s through the engine vs a tight training loop, and their ratio",
              "medians are reported", "ratio")
    o.add_argument("--clients", type=_positive_int, default=4, help="FedAvg clients, all trained every round (default 4)")
    o.add_argument("--rounds", type=_positive_int, default=3, help="timed rounds = tight-loop epochs (default 3)")
    o.set_defaults(func=cmd_perf_overhead)

    t = timed("together", "samples/s of a round's clients trained together vs one after another",
              "ratio per repeat", "summary")
    t.add_argument("--method", default="fedavg", help="method (default fedavg)")
    t.add_argument("--preset", help="preset (default: the dataset's own)")
    t.add_argument("--parallel", type=int, default=0, help="clients trained together; 0 = a whole round (default)")
    t.add_argument("--rounds", type=_positive_int, default=1, help="timed rounds per side and repeat (default 1)")
    t.set_defaults(func=cmd_perf_together)

    m = perf.add_parser("memory", help="peak memory with few vs many clients, each measured in its own process")
    m.add_argument("--methods", default="fedper,local", help="comma-separated methods (default fedper,local)")
    m.add_argument("--clients", default="10,1000", help="comma-separated client counts (default 10,1000)")
    m.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting of the measured runs")
    m.add_argument("--quiet", action="store_true", help="print only the summary lines")
    m.set_defaults(func=cmd_perf_memory)

    h = perf.add_parser("pfedhn-step", help="how one pFedHN server step moves each client's generated weights")
    h.add_argument("--dataset", default="imagefolder", help="dataset whose preset is built (default imagefolder)")
    h.add_argument("--preset", default="cpu-cifar10", help="preset giving the model and clients (default cpu-cifar10)")
    h.add_argument("--classes", type=_positive_int, default=10, help="classifier outputs (default 10)")
    h.add_argument("--scale", type=_positive_float, default=1e-3, help="std of the clients' random changes (1e-3)")
    h.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (after the plain step's no momentum/decay/clipping)")
    h.add_argument("--quiet", action="store_true", help="print only the results")
    h.set_defaults(func=cmd_perf_pfedhn_step)

    f = perf.add_parser("flops", help="each method's parameters and training FLOPs per round at a preset's"
                                      " full model size, counted without data or training")
    f.add_argument("--dataset", default="cifar100", help="dataset whose preset is built (default cifar100)")
    f.add_argument("--preset", default="paper-cifar100", help="preset giving the model and clients"
                                                              " (default paper-cifar100)")
    f.add_argument("--methods", help="comma-separated methods (default: every registered one)")
    f.add_argument("--classes", type=_positive_int, default=100, help="classifier outputs (default 100)")
    f.add_argument("--channels", type=_positive_int, default=3, help="image channels (default 3)")
    f.add_argument("--native-size", type=_positive_int, default=32,
                   help="image side in pixels where the preset leaves model.image_size at 0 (default 32)")
    f.add_argument("--client-samples", type=_positive_float, default=703.0,
                   help="training samples of a client (default 703: CIFAR-100's 60,000 pooled, 75%% train, 64 clients)")
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting")
    f.add_argument("--quiet", action="store_true", help="print one plain line per method")
    f.set_defaults(func=cmd_perf_flops)

    g = perf.add_parser("gpu", help="paper-scale throughput on one GPU: tight loop vs engine, clients together,"
                                    " a paper-cifar100 round and the whole run extrapolated")
    g.add_argument("--data-root", metavar="DIR", help="folder holding the CIFAR-10 (JPEG) tree")
    g.add_argument("--folder", default="cifar10-jpeg", help="the image folder below --data-root (default cifar10-jpeg)")
    g.add_argument("--device", default="auto", help="auto (default), cuda or cpu")
    g.add_argument("--repeats", type=_positive_int, default=2,
                   help="alternating repeats of each comparison (default 2)")
    g.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads (default 2)")
    g.add_argument("--tiny", action="store_true", help="a digits-sized model on the bundled digits, on the CPU:"
                                                         " checks the whole script in seconds")
    g.set_defaults(func=cmd_perf_gpu)


# ---------------------------------------------------------------------------
# bench runs


def cmd_runs(args: argparse.Namespace) -> int:
    from .tracking import default_tracking_uri, list_runs, mark_killed, require_store

    if args.mark_killed and not args.stale:
        raise UserError("--mark-killed goes with --stale")
    uri = args.tracking_uri or default_tracking_uri()
    require_store(uri)  # reading (or closing runs in) a store: a mistyped path is not created
    runs = list_runs(uri, stale=args.stale, limit=args.limit)
    show.show_runs(runs, stale=args.stale)
    if args.mark_killed and runs:
        mark_killed(uri, [r.run_id for r in runs])
        show.print_plain(f"marked {len(runs)} run(s) KILLED")
    elif args.stale and runs:
        show.print_plain(f"{len(runs)} stale run(s); continue one with bench run --resume RUN_ID"
                         " (if it checkpointed), or close them with --mark-killed")
    return 0


def _add_runs(sub) -> None:
    p = sub.add_parser("runs", help="list recorded runs; --stale: those left RUNNING by a process that is gone")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--stale", action="store_true",
                   help="only runs left RUNNING whose process (on this host) is gone; other hosts are not judged")
    p.add_argument("--mark-killed", action="store_true", help="with --stale: end those runs KILLED")
    p.add_argument("--limit", type=_positive_int, default=50, help="at most this many runs (default 50)")
    p.set_defaults(func=cmd_runs)


# ---------------------------------------------------------------------------
# bench tune


def cmd_tune(args: argparse.Namespace) -> int:
    from .console_study import TrialsLive, tune_summary
    from .tuning import TuneRequest, budget_keys, check_request, run_tune

    budget_keys(args.method, args.search_budget)  # a bad --search-budget is refused before any work

    req = TuneRequest(args.method, args.dataset, _spec(args), args.trials, storage=args.storage, study=args.study,
                      pruner=args.pruner, timeout=args.timeout, workers=args.workers,
                      search_budget=tuple(args.search_budget), tracking_uri=args.tracking_uri,
                      experiment=args.experiment)
    check_request(req)  # before the live table starts
    if args.quiet:
        result = run_tune(req)
    else:
        with TrialsLive(show.console, f"tuning {args.method} on {args.dataset} (val_acc_mean)") as live:
            result = run_tune(req, on_update=live.update)
        show.console.print()
        tune_summary(show.console, result, args.method, args.dataset)
    best = f"{result.best.value:.4f}" if result.best else "none"
    gain = f"{result.gain:+.4f}" if result.gain is not None else "none"
    print(f"tune {result.study} trials={len(result.trials)} ran={result.ran_here} best_val_acc_mean={best} "
          f"tuning_gain={gain} parent_run_id={result.parent_run_id}")
    for row in result.errors:
        show.err_console.print(f"failed: trial {row.number}: {row.error}", markup=False)
    return 1 if result.errors else 0


def _add_tune(sub) -> None:
    from .tuning import PRUNERS

    p = sub.add_parser("tune", help="tune a method's settings on validation data (Optuna TPE), recorded in MLflow")
    p.add_argument("--method", required=True, help="method name (`bench list`)")
    p.add_argument("--dataset", required=True, help="dataset name (`bench list`)")
    p.add_argument("--trials", type=int, required=True, help="the study's total number of trials (a rerun tops it up)")
    _add_config_arguments(p)
    _add_tracking_arguments(p)
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage: postgresql://USER@HOST/DB to share a study between machines;"
                        " default: a journal file beside the MLflow store")
    p.add_argument("--study", metavar="NAME", help="study name (default: METHOD-DATASET-<config hash>)")
    p.add_argument("--pruner", choices=PRUNERS, default="median", help="stop bad trials early (default median)")
    p.add_argument("--timeout", type=_positive_float, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--workers", type=int, default=1, metavar="K", help="worker processes on this machine (default 1)")
    p.add_argument("--search-budget", action="append", default=[], metavar="KEY",
                   help="search a budget key all the same (e.g. train.local_epochs); repeatable."
                        " Budget keys (epochs, fine-tuning length, widths) are not searched by default")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    p.set_defaults(func=cmd_tune)


# ---------------------------------------------------------------------------
# bench sweep


def cmd_sweep(args: argparse.Namespace) -> int:
    from .console_study import sweep_line, sweep_progress, sweep_summary
    from .sweep import parse_shard, run_sweep

    shard = parse_shard(args.shard) if args.shard is not None else None
    progress = None if args.quiet else sweep_progress(show.console, 0)

    def on_start(total: int, skipped: int) -> None:
        if progress is not None:
            progress.update(0, total=total, completed=skipped, last=f"{skipped} already finished, skipped")
            progress.start()

    def on_item(item) -> None:
        if progress is not None:
            acc = "" if item.test_acc_mean is None else f" {item.test_acc_mean:.4f}"
            done = f"{item.status}{' (resumed)' if item.resumed else ''}"
            progress.update(0, advance=1, last=f"{item.method}/{item.dataset} seed {item.seed}: {done}{acc}")

    try:
        suite = run_sweep(args.suite, workers=args.workers, tracking_uri=args.tracking_uri,
                          experiment=args.experiment, data_root=args.data_root, best_of=args.best_of,
                          shard=shard, heartbeat_timeout=args.heartbeat_timeout, on_start=on_start, on_item=on_item)
    finally:
        if progress is not None:
            progress.stop()
    if not args.quiet:
        sweep_summary(show.console, suite)
    print(sweep_line(suite))
    failed = [item for item in suite.items if item.status == "failed"]
    for item in failed:
        show.err_console.print(f"failed: {item.method}/{item.dataset} seed {item.seed}: {item.error}", markup=False)
    return 1 if failed else 0


def _add_sweep(sub) -> None:
    from .claims import HEARTBEAT_TIMEOUT

    p = sub.add_parser("sweep", help="run a suite of final runs (datasets x methods x seeds), skipping finished ones")
    p.add_argument("suite", metavar="SUITE.toml", help="the suite file (see README: bench sweep)")
    _add_tracking_arguments(p)
    p.add_argument("--data-root", metavar="DIR", help="folder holding the datasets, for runs whose suite sets none")
    p.add_argument("--workers", type=int, default=1, metavar="K",
                   help="parallel worker processes: one GPU each, or the CPU threads split (default 1)")
    p.add_argument("--best-of", metavar="PATTERN",
                   help="start every run from this tuning study's best config, e.g. '{method}-{dataset}-paper'")
    p.add_argument("--shard", metavar="I/N",
                   help="run only the I-th of N parts of the suite, 0 <= I < N (0-based: Slurm's --array=0-(N-1),"
                        " Kubernetes' JOB_COMPLETION_INDEX)")
    p.add_argument("--heartbeat-timeout", type=_positive_float, metavar="S",
                   help=f"take over a run whose claim's heartbeat is older than S seconds (default {HEARTBEAT_TIMEOUT:g})")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    p.set_defaults(func=cmd_sweep)


# ---------------------------------------------------------------------------
# bench plan


def cmd_plan(args: argparse.Namespace) -> int:
    from .console_study import show_plan
    from .plan import plan_suite, suite_studies

    if args.studies:
        for method, dataset, preset in suite_studies(args.suite, tracking_uri=args.tracking_uri,
                                                     experiment=args.experiment):
            show.print_plain(f"{method} {dataset} {preset}")
        return 0
    plan = plan_suite(args.suite, tracking_uri=args.tracking_uri, experiment=args.experiment,
                      data_root=args.data_root, peak_tflops=args.peak_tflops, utilization=args.utilization,
                      trials=args.trials, tune_rounds=args.tune_rounds)
    if not args.quiet:
        show_plan(show.console, plan)
    hours = plan.gpu_hours(plan.flops + plan.tuning_flops)
    print(f"plan {plan.suite.path.name} runs={len(plan.runs)} to_run={len(plan.to_run)} "
          f"train_pflop={(plan.flops + plan.tuning_flops) / 1e15:.1f} gpu_hours={hours:.1f}")
    if plan.unregistered:
        raise UserError(f"the suite names methods this install does not register: {', '.join(plan.unregistered)};"
                        " `bench sweep` refuses it until they are")
    return 0


def _add_plan(sub) -> None:
    from .plan import H100_BF16_TFLOPS, UTILIZATION

    p = sub.add_parser("plan", help="the runs a suite will do and an estimate of their GPU hours from FLOP counts")
    p.add_argument("suite", metavar="SUITE.toml", help="the suite file (see README: bench sweep)")
    _add_tracking_arguments(p)
    p.add_argument("--data-root", metavar="DIR", help="folder holding the datasets, for runs whose suite sets none")
    p.add_argument("--peak-tflops", type=_positive_float, default=H100_BF16_TFLOPS,
                   help=f"the GPU's peak throughput in TFLOPS (default {H100_BF16_TFLOPS:g}: an H100's bf16 peak)")
    p.add_argument("--utilization", type=_positive_float, default=UTILIZATION,
                   help=f"share of the peak a training step sustains, in (0, 1] (default {UTILIZATION})")
    p.add_argument("--trials", type=int, default=0, help="tuning trials per method and setting first (default 0)")
    p.add_argument("--tune-rounds", type=int, default=0, metavar="R", help="rounds of one tuning trial")
    p.add_argument("--studies", action="store_true",
                   help="only list the tuning studies the suite needs, one 'METHOD DATASET PRESET' line each")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    p.set_defaults(func=cmd_plan)


# ---------------------------------------------------------------------------
# bench leaderboard


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from ..leaderboard import evidence
    from .console_study import leaderboard_summary
    from .records import Stage
    from .tracking import DEFAULT_EXPERIMENT, default_tracking_uri, require_store

    if not args.out.strip():
        raise UserError("--out is empty; give the folder to write the leaderboard to")
    _check_output_dir(args.out, "--out")
    if args.source:  # the evidence file alone: no store is read
        given = [flag for flag, value in (("--tracking-uri", args.tracking_uri), ("--experiment", args.experiment),
                                          ("--stage", args.stage)) if value is not None]
        if given:
            raise UserError(f"--from builds from the evidence file alone; drop {', '.join(given)}")
        text = evidence.read_text(args.source)
        board, _ = evidence.publish(text, args.out, budget=args.budget,
                                    pending=False if args.no_pending else None)
    else:
        require_store(args.tracking_uri or default_tracking_uri())  # reading only: a mistyped path is not created
        experiment = DEFAULT_EXPERIMENT if args.experiment is None else args.experiment
        stage = Stage.FINAL if args.stage is None else args.stage
        records = evidence.store_records(args.tracking_uri, experiment, stage)
        text = evidence.dumps(evidence.header(experiment, stage, args.budget or "", not args.no_pending), records)
        board, _ = evidence.publish(text, args.out)
    if not args.quiet:
        leaderboard_summary(show.console, board, args.out)
    cells = sum(1 for s in board.sections for c in s.cells if c.n)
    print(f"leaderboard {args.out} sections={len(board.sections)} cells={cells} runs={board.runs_used}")
    return 0


def _add_leaderboard(sub) -> None:
    p = sub.add_parser("leaderboard", help="build the leaderboard (README.md, results.csv, index.html) from MLflow runs")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder to write README.md, results.csv, index.html, runs.jsonl and configs/")
    p.add_argument("--from", dest="source", metavar="RUNS.jsonl",
                   help="rebuild from a leaderboard's evidence file alone (runs.jsonl or runs.jsonl.gz), no store")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default pflbench)")
    p.add_argument("--stage", help="which runs to read (default final: the sweep's runs)")
    p.add_argument("--budget", metavar="TEXT", help="the tuning budget, stated on the page")
    p.add_argument("--no-pending", action="store_true", help="leave out the paper's settings that have no runs")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    p.set_defaults(func=cmd_leaderboard)


# ---------------------------------------------------------------------------
# entry point

COMMANDS: list[Callable] = [_add_run, _add_partition, _add_sensitivity, _add_perf, _add_runs, _add_tune, _add_sweep, _add_plan,
                            _add_leaderboard]


def _version() -> str:
    try:
        return metadata.version("pflbench")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bench", description="pflbench: personalized federated learning on Vision Transformers")
    parser.add_argument("--version", action="version", version=f"pflbench {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("list", help="list methods, datasets, presets and partition schemes")
    p.set_defaults(func=cmd_list)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .experiment import sigterm_as_interrupt

    # SIGTERM (kill, timeout, Slurm, docker stop) takes Ctrl-C's path: the run ends KILLED, its records kept.
    report_plugin_errors(show.print_warning)  # a broken plug-in: one line, and the rest keep working
    try:
        with sigterm_as_interrupt():
            args = build_parser().parse_args(argv)
            return args.func(args)
    except UserError as err:
        show.print_error(str(err))
        return 2
    except Terminated as err:
        show.err_console.print(f"terminated ({signal.Signals(err.signum).name})", markup=False)
        return 128 + err.signum
    except KeyboardInterrupt:
        show.err_console.print("interrupted", markup=False)
        return 130
    except Exception:  # an internal failure: keep the traceback for the bug report
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
