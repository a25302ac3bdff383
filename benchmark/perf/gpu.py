"""The GPU benchmark: paper-scale throughput of the engine, in one command, within about 8 minutes on an H100.

Three measurements, each printed as soon as it is done:

1. the engine vs a tight single-model loop (`perf.overhead`) at ViT-S/16,
   224 px, batch 64, bf16: samples/s of each and the ratio;
2. sequential vs clients-together training (`perf.together`) at the same
   model, with a round shaped like `paper-cifar100` (8 of 64 clients) and
   one local epoch: samples/s of each and the ratio;
3. one whole `paper-cifar100`-shaped round (10 local epochs, every client
   evaluated) on the CIFAR-10 (JPEG) image folder resized to 224, timed after
   one untimed warm-up round, and the 50-round paper run extrapolated from it:
   exactly 50 x that warm round's wall time (training, aggregation and the
   evaluation of every client). Not included: loading and decoding the data,
   building the model, the warm-up round itself (kernel selection,
   compilation), checkpoints and tracking.

Measurements 1 and 2 also run one untimed round per side first.

`--tiny` runs all three end to end on the CPU with a digits-sized model on
the bundled digits (seconds), so the script is known to work before a GPU is
lent.

    bench perf gpu [--data-root ../shared/data] [--folder cifar10-jpeg] [--tiny]
    python -m pflbench.benchmark.perf.gpu [same options]
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..resolve import RunSpec
from ..engine import Simulation
from . import overhead, together

# ViT-S/16 at 224 px, bf16 on CUDA (the engine's autocast), batch 64: the paper's model.
PAPER_MODEL = ["model.name=vit_small_patch16_224", "model.image_size=224", "train.batch_size=64"]
# A digits-sized stand-in for --tiny: the same code paths in seconds on a CPU.
TINY_MODEL = ["model.name=vit", "model.image_size=0", "model.patch_size=4", "model.embed_dim=16", "model.depth=2",
              "model.num_heads=2", "train.batch_size=32", "data.min_samples=10"]


@dataclass
class GPUReport:
    """What `bench perf gpu` measured."""

    tight: float  # samples/s of the tight loop (median)
    engine: float  # samples/s of the engine, one client at a time (median)
    sequential: float  # samples/s, a paper-shaped round one client at a time (median)
    together: float  # samples/s, the same round's clients trained together (median)
    parallel: int  # clients trained together in the paper round (1 if together was not faster)
    round_seconds: float  # one warm paper-shaped round (after an untimed one), evaluation included
    rounds: int  # rounds of the full run
    seconds: float  # wall time of the whole benchmark

    @property
    def paper_run_seconds(self) -> float:
        """The whole run extrapolated: `rounds` x one warm round (data loading and model build excluded)."""
        return self.round_seconds * self.rounds


def run(*, tiny: bool = False, data_root: str | None = None, folder: str = "cifar10-jpeg", device: str = "auto",
        repeats: int = 2, say: Callable[[str], None] = print) -> GPUReport:
    """All three measurements; `say` gets one line per finished measurement."""
    start = time.perf_counter()
    if tiny:
        dataset, model, data, device = "digits", TINY_MODEL, [], "cpu"
    else:
        dataset, model, data = "imagefolder", PAPER_MODEL, [f"dataset.folder={folder}"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"

    # 1. engine (one client at a time) vs the tight loop, same model and samples.
    clients = 2 if tiny else 4
    # 10% of the images train (6,000 of CIFAR-10's 60,000): seconds per side on a GPU, not minutes.
    extra = ["data.val_fraction=0.45", "data.test_fraction=0.45"]
    spec = RunSpec(overrides=(*model, *data, *extra, "train.parallel_clients=1"), device=device, data_root=data_root)
    ov = overhead.measure(spec, clients=clients, rounds=1, repeats=repeats, dataset=dataset)
    tight, engine = statistics.median(ov.tight), statistics.median(ov.engine)
    say(f"tight loop {tight:.1f} samples/s, engine {engine:.1f} samples/s, ratio {ov.ratio:.3f}"
        f" ({ov.samples} samples a side per repeat)")

    # 2. a paper-shaped round (8 of 64 clients), one local epoch: sequential vs together.
    shape = ["data.num_clients=64", "train.sample_fraction=0.125", "train.local_epochs=1"]
    if tiny:
        shape = ["data.num_clients=16", "train.sample_fraction=0.25", "train.local_epochs=1"]
    try:
        spec = RunSpec(preset="paper-cifar100", overrides=(*model, *data, *shape), device=device, data_root=data_root)
        tg = together.measure(spec, method="fedavg", dataset=dataset, rounds=1, repeats=repeats)
    except Exception as err:  # report and go on: the paper round below still runs sequentially
        say(f"clients together FAILED: {type(err).__name__}: {err}")
        seq = tog = math.nan
        parallel = 1
    else:
        seq, tog = statistics.median(tg.sequential), statistics.median(tg.together)
        parallel = tg.parallel if tog > seq else 1
        say(f"sequential {seq:.1f} samples/s, {tg.parallel} clients together {tog:.1f} samples/s,"
            f" ratio {statistics.median(tg.ratios):.3f} (per repeat: {', '.join(f'{r:.3f}' for r in tg.ratios)})")

    # 3. one whole paper-cifar100 round, its clients trained the faster way measured above.
    paper = [*model, *data, f"train.parallel_clients={parallel}"]
    if tiny:
        paper += ["data.num_clients=16", "train.local_epochs=1", "data.min_samples=10"]
    cfg = RunSpec(preset="paper-cifar100", overrides=tuple(paper), device=device, data_root=data_root).resolve(
        "fedperfix", dataset)
    sim = Simulation(cfg)
    sim.run_round()  # warm-up, untimed: the first round pays for kernel selection and compilation
    metrics = sim.run_round()  # eval_every=1 in the preset: every client is evaluated
    parallel = sim.parallel_clients  # after the first round: `auto` lowered to what fits in memory
    round_seconds = metrics["round_seconds"]
    say(f"paper-cifar100 round (fedperfix, {int(metrics['clients'])} clients x {cfg.train.local_epochs} epochs,"
        f" {parallel} at a time, evaluation included, after one warm-up round): {round_seconds:.1f} s;"
        f" {cfg.train.rounds} rounds extrapolated = {cfg.train.rounds} x this round"
        f" ~ {round_seconds * cfg.train.rounds / 60:.1f} min (data loading and model build not included)")
    return GPUReport(tight, engine, seq, tog, parallel, round_seconds, cfg.train.rounds, time.perf_counter() - start)


if __name__ == "__main__":
    import sys

    from ..cli import main

    sys.exit(main(["perf", "gpu", *sys.argv[1:]]))
