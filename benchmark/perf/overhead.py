"""Engine overhead: federated training through the engine vs one tight training loop.

Both train the same model (same init) on the same samples for the same
number of passes, without augmentation or evaluation:

(a) the engine with FedAvg over K clients and full participation: state
    swaps, per-client batch generators, aggregation, byte accounting;
(b) a tight loop: the union of the clients' training samples, normalized
    once up front, shuffled each epoch, batch after batch.

`bench perf overhead` prints samples/s of each and the ratio (a)/(b),
each the median of `--repeats` alternating runs. The target is >= 0.95.
Each side first runs one untimed round (an epoch for the loop), so
neither is timed cold (allocator, kernel selection, compilation).

    bench perf overhead [--clients 4] [--rounds 3] [--dataset digits]
    python -m pflbench.benchmark.perf.overhead [same options]
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..engine import Simulation
from ..resolve import RunSpec


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a timer reads finished work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(sizes: list[int], batch_size: int) -> int:
    return sum(-(-n // batch_size) for n in sizes)


def _engine(cfg) -> tuple[float, int, int]:
    sim = Simulation(cfg)
    rounds = cfg.train.rounds - 2  # one warm-up round first; the last round evaluates: time only training rounds
    sim.run_round()  # warm-up, untimed
    sizes = [sim.data.num_samples(c) for c in range(sim.data.num_clients)]
    samples = rounds * cfg.train.local_epochs * sum(sizes)
    sync(sim.device)
    start = time.perf_counter()
    for _ in range(rounds):
        sim.run_round()
    sync(sim.device)
    steps = rounds * cfg.train.local_epochs * _steps(sizes, cfg.train.batch_size)
    return samples / (time.perf_counter() - start), samples, steps


def _tight(cfg, epochs: int) -> tuple[float, int, int]:
    sim = Simulation(cfg)  # same data, partition and model init as the engine run
    model, data = sim.model, sim.data
    index = torch.cat([data.indices(c, "train") for c in range(data.num_clients)])
    x_all, y_all = data.prepare(index)
    generator = torch.Generator().manual_seed(0)
    bs, t = cfg.train.batch_size, cfg.train
    model.train()

    def epoch() -> None:
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        order = torch.randperm(len(index), generator=generator).to(data.device)
        for s in range(0, len(index), bs):
            batch = order[s : s + bs]
            with sim.autocast():  # the engine's precision (bf16 on a GPU)
                loss = F.cross_entropy(model(x_all[batch]).float(), y_all[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    epoch()  # warm-up, untimed
    sync(sim.device)
    start = time.perf_counter()
    for _ in range(epochs):
        epoch()
    sync(sim.device)
    samples = epochs * len(index)
    return samples / (time.perf_counter() - start), samples, epochs * _steps([len(index)], bs)


@dataclass
class OverheadResult:
    """Samples/s of each side per repeat, and the optimizer steps each took."""

    clients: int
    engine: list[float] = field(default_factory=list)  # engine samples/s, one per repeat
    tight: list[float] = field(default_factory=list)  # tight-loop samples/s, one per repeat
    samples: int = 0  # samples trained by each side per repeat
    engine_steps: int = 0  # optimizer steps of the engine per repeat
    tight_steps: int = 0  # optimizer steps of the tight loop per repeat

    @property
    def ratio(self) -> float:
        """Median engine rate over median tight-loop rate."""
        return statistics.median(self.engine) / statistics.median(self.tight)


def measure(
    spec: RunSpec = RunSpec(device="cpu"), *, clients: int = 4, rounds: int = 3, repeats: int = 3,
    dataset: str = "digits", on_repeat=None,
) -> OverheadResult:
    """Alternate engine and tight-loop runs `repeats` times; `on_repeat(i, result)` after each pair.

    The benchmark's own settings come first; `spec`'s overrides, device and data root apply over them.
    """
    # ViT 96 wide x 4 deep, batch 64, plain SGD: the setting of DESIGN.md's performance target.
    settings = [
        "model.embed_dim=96", "model.depth=4", "model.num_heads=4", "model.patch_size=2",
        "data.partition=iid", f"data.num_clients={clients}", "data.augment=false",
        "train.batch_size=64", "train.lr=0.01", "train.momentum=0.0", "train.sample_fraction=1.0",
        f"train.rounds={rounds + 2}", f"train.eval_every={rounds + 2}", "train.local_epochs=1",
    ]
    spec = RunSpec(preset="smoke", overrides=(*settings, *spec.overrides), device=spec.device, data_root=spec.data_root)
    cfg = spec.resolve("fedavg", dataset)
    result = OverheadResult(clients)
    for i in range(repeats):
        rate, n, result.engine_steps = _engine(cfg)
        rate_t, n_t, result.tight_steps = _tight(cfg, rounds)
        if n != n_t:
            raise RuntimeError("both sides must train the same number of samples")
        result.engine.append(rate)
        result.tight.append(rate_t)
        result.samples = n
        if on_repeat is not None:
            on_repeat(i, result)
    return result


if __name__ == "__main__":
    import sys

    from ..cli import main

    sys.exit(main(["perf", "overhead", *sys.argv[1:]]))
