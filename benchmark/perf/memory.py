"""Peak memory against the number of clients: the model once, plus each client's personal part.

Each measurement runs in its own process (so peaks never mix): a simulation
on the bundled digits with N clients, every client trained once (one round,
full participation) and evaluated. Reported: the peak resident memory of the
process (and the peak CUDA memory on a GPU), the memory before the simulation
was built (interpreter, torch), the peak ratio between the largest and the
smallest N, and the growth per added client next to the size of one client's
personal entries: flat memory means the two match.

    bench perf memory [--methods fedper,local] [--clients 10,1000]
    python -m pflbench.benchmark.perf.memory [same options]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass

# A digits-sized ViT; 1,000 clients leave one or two training images each.
SETTINGS = [
    "data.partition=iid", "data.min_samples=1", "data.val_fraction=0.0", "train.rounds=1",
    "train.sample_fraction=1.0", "train.parallel_clients=1",
]


@dataclass
class MemoryResult:
    """One process's peak memory for one (method, clients) run."""

    method: str
    clients: int
    peak_rss: int  # bytes, the process's peak resident set
    base_rss: int  # bytes, resident before the simulation was built (the peak mark is reset there)
    cuda_peak: int  # bytes, peak CUDA memory allocated (0 on the CPU)
    model_bytes: int  # the model's parameters and buffers
    personal_bytes: int  # one client's personal entries
    trained: int  # clients whose personal state is stored


def _status(field: str) -> int:
    """A memory figure of this process from /proc (bytes); 0 where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    """Restart the peak-RSS mark at the current RSS (Linux), so import-time peaks don't count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def run_child(method: str, clients: int, device: str, overrides: list[str]) -> MemoryResult:
    """The measurement itself (inside the child process)."""
    import torch

    from ..resolve import resolve_config
    from ..engine import Simulation

    torch.set_num_threads(1)
    cfg = resolve_config(method, "digits", preset="smoke", overrides=[*SETTINGS, f"data.num_clients={clients}",
                                                                        *overrides], device=device)
    _reset_peak()
    base = _status("VmRSS") or _peak_rss()
    sim = Simulation(cfg)
    if sim.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(sim.device)
    sim.run()
    cuda_peak = torch.cuda.max_memory_allocated(sim.device) if sim.device.type == "cuda" else 0
    model_bytes = sum(t.numel() * t.element_size() for t in sim.model.state_dict().values())
    personal = sum(t.numel() * t.element_size() for t in sim.personal_state(0).values())
    return MemoryResult(method, clients, _peak_rss(), base, cuda_peak, model_bytes, personal, len(sim._personal))


def measure(*, methods: list[str], clients: list[int], device: str = "cpu", overrides: list[str] | None = None,
            on_result=None) -> list[MemoryResult]:
    """One child process per (method, clients); results in that order."""
    results = []
    for method in methods:
        for n in clients:
            cmd = [sys.executable, "-m", "pflbench.benchmark.perf.memory", "--child", method, str(n), device,
                   json.dumps(overrides or [])]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"memory child {method} {n} failed:\n{out.stderr[-2000:]}")
            result = MemoryResult(**json.loads(out.stdout.strip().splitlines()[-1]))
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        import dataclasses

        method, n, device, overrides = sys.argv[2], int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
        print(json.dumps(dataclasses.asdict(run_child(method, n, device, overrides))))
        sys.exit(0)

    from ..cli import main

    sys.exit(main(["perf", "memory", *sys.argv[1:]]))
