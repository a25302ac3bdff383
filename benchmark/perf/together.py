"""Clients trained together vs one after another, through the engine.

Both sides run the same configuration (same partition, init, sampled clients
and batches) and differ only in `train.parallel_clients`: 1 (sequential) or
K (a round's clients stacked, one batched step). Evaluation is left out of
the timed rounds, and each side first runs one untimed round (warm-up). The
two sides alternate, `repeats` times, and the ratio is taken per repeat, so a
shared machine's noise hits both alike.

    bench perf together [--method fedavg] [--preset smoke] [--parallel 0] [--rounds 1]
    python -m pflbench.benchmark.perf.together [same options]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..resolve import RunSpec
from ..engine import Simulation
from .overhead import sync


def time_rounds(cfg, rounds: int) -> tuple[float, int]:
    """Samples/s over `rounds` training rounds of a fresh simulation after one untimed round, and the samples."""
    sim = Simulation(cfg)
    sim.run_round()  # warm-up, untimed
    drawn: list[int] = []
    draw = sim.sample_clients

    def sample_clients() -> list[int]:
        chosen = draw()
        drawn.extend(chosen)
        return chosen

    sim.sample_clients = sample_clients
    sync(sim.device)
    start = time.perf_counter()
    for _ in range(rounds):
        sim.run_round()
    sync(sim.device)
    seconds = time.perf_counter() - start
    samples = cfg.train.local_epochs * sum(sim.data.num_samples(c) for c in drawn)
    return samples / seconds, samples


@dataclass
class TogetherResult:
    """Samples/s of each side per repeat."""

    parallel: int  # clients trained together on the batched side
    sequential: list[float] = field(default_factory=list)  # samples/s, one per repeat
    together: list[float] = field(default_factory=list)
    samples: int = 0  # samples trained per side per repeat

    @property
    def ratios(self) -> list[float]:
        """Together over sequential, per repeat."""
        return [t / s for s, t in zip(self.sequential, self.together)]


def measure(
    spec: RunSpec = RunSpec(device="cpu"), *, method: str = "fedavg", dataset: str = "digits", parallel: int = 0,
    rounds: int = 1, repeats: int = 3, on_repeat=None,
) -> TogetherResult:
    """Alternate sequential and together runs of `spec`; `parallel` 0 = all of a round's sampled clients."""
    base = spec.resolve(method, dataset)
    # A warm-up round, the timed rounds, and an evaluation only after them.
    timed = spec.with_overrides(f"train.rounds={rounds + 2}", f"train.eval_every={rounds + 2}")
    k = parallel or max(1, int(round(base.train.sample_fraction * base.data.num_clients)))
    seq = timed.with_overrides("train.parallel_clients=1").resolve(method, dataset)
    tog = timed.with_overrides(f"train.parallel_clients={k}").resolve(method, dataset)
    result = TogetherResult(k)
    for i in range(repeats):
        rate, result.samples = time_rounds(seq, rounds)
        result.sequential.append(rate)
        rate, _ = time_rounds(tog, rounds)
        result.together.append(rate)
        if on_repeat is not None:
            on_repeat(i, result)
    return result


if __name__ == "__main__":
    import sys

    from ..cli import main

    sys.exit(main(["perf", "together", *sys.argv[1:]]))
