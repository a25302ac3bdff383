"""Engine overhead: federated training through the engine vs one tight training loop.

Both train the same model (same init) on the same samples for the same
number of passes, without augmentation or evaluation:

(a) the engine with FedAvg over K clients and full participation: state
    swaps, per-client batch generators, aggregation, byte accounting;
(b) a tight loop: the union of the clients' training samples, normalized
    once up front, shuffled each epoch, batch after batch.

Prints samples/s of each and the ratio (a)/(b), each the median of
`--repeats` alternating runs. The target is >= 0.95.

    python -m pflbench.benchmark.perf.overhead [--clients 4] [--rounds 3] [--dataset digits]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ..config import resolve_config
from ..engine import Simulation


def _steps(sizes: list[int], batch_size: int) -> int:
    return sum(-(-n // batch_size) for n in sizes)


def _engine(cfg) -> tuple[float, int, int]:
    sim = Simulation(cfg)
    rounds = cfg.train.rounds - 1  # the last round evaluates; time only training rounds
    sizes = [sim.data.num_samples(c) for c in range(sim.data.num_clients)]
    samples = rounds * cfg.train.local_epochs * sum(sizes)
    start = time.perf_counter()
    for _ in range(rounds):
        sim.run_round()
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
    start = time.perf_counter()
    for _ in range(epochs):
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        order = torch.randperm(len(index), generator=generator).to(data.device)
        for s in range(0, len(index), bs):
            batch = order[s : s + bs]
            loss = F.cross_entropy(model(x_all[batch]), y_all[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    samples = epochs * len(index)
    return samples / (time.perf_counter() - start), samples, epochs * _steps([len(index)], bs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (one untimed evaluation round is added)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # ViT 96 wide x 4 deep, batch 64, plain SGD: the setting of DESIGN.md's performance target.
    overrides = [
        "model.embed_dim=96", "model.depth=4", "model.num_heads=4", "model.patch_size=2",
        "data.partition=iid", f"data.num_clients={args.clients}", "data.augment=false",
        "train.batch_size=64", "train.lr=0.01", "train.momentum=0.0", "train.sample_fraction=1.0",
        f"train.rounds={args.rounds + 1}", f"train.eval_every={args.rounds + 1}", "train.local_epochs=1",
        *args.overrides,
    ]
    cfg = resolve_config("fedavg", args.dataset, preset="smoke", overrides=overrides, device=args.device,
                         data_root=args.data_root)
    engine, tight = [], []
    for i in range(args.repeats):
        rate, n, steps = _engine(cfg)
        engine.append(rate)
        rate_t, n_t, steps_t = _tight(cfg, args.rounds)
        tight.append(rate_t)
        assert n == n_t, "both sides must train the same number of samples"
        print(f"repeat {i + 1}: engine {rate:8.1f} samples/s   tight loop {rate_t:8.1f} samples/s   ({n} samples)")
    a, b = statistics.median(engine), statistics.median(tight)
    ratios = [e / t for e, t in zip(engine, tight)]
    print(f"engine (FedAvg, {args.clients} clients): {a:.1f} samples/s (median of {args.repeats})")
    print(f"tight loop:                   {b:.1f} samples/s (median of {args.repeats})")
    print(f"ratio engine / tight loop:    {a / b:.3f}  (per-repeat ratios: {', '.join(f'{r:.3f}' for r in ratios)})")
    # Each client ends its epoch on a partial batch, so the engine takes more (smaller) steps.
    print(f"optimizer steps: engine {steps}, tight loop {steps_t} (batch {cfg.train.batch_size})")


if __name__ == "__main__":
    main()
