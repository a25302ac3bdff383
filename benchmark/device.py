"""Device decisions as small functions: worker GPUs, compute capability, determinism, host copies.

`worker_devices` takes what it decides from (environment, device count) as
arguments, so it is tested on a machine without a GPU; the precision decision
from the compute capability is `engine.autocast_dtype`.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from .errors import UserError

CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs to be deterministic (PyTorch's reproducibility notes)


def worker_devices(workers: int, environ: Mapping[str, str] | None = None,
                   device_count: int | None = None) -> list[str] | None:
    """The `CUDA_VISIBLE_DEVICES` value of each of `workers` processes; None without a GPU.

    Worker i gets the i-th entry, modulo the list, of the parent's own
    `CUDA_VISIBLE_DEVICES` (ids, UUIDs or MIG names, kept as written), so a
    parent limited to `2,3` puts its workers on GPUs 2 and 3, not 0 and 1.
    With the variable unset, the entries are `range(device_count)`.
    """
    environ = os.environ if environ is None else environ
    if device_count is None:
        device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device_count <= 0:
        return None
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        entries = [str(i) for i in range(device_count)]
    else:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
    if not entries:
        return None
    return [entries[i % len(entries)] for i in range(workers)]


def check_workers(workers: int, option: str = "--workers", cpu_count: int | None = None,
                  device_count: int | None = None) -> None:
    """Refuse a worker count this machine cannot run: each worker is a process that needs a CPU core
    (or, with GPUs, its own GPU); at most max(CPU cores, GPUs)."""
    cpus = (os.cpu_count() or 1) if cpu_count is None else cpu_count
    if device_count is None:
        device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cap = max(cpus, device_count)
    if workers < 1:
        raise UserError(f"bad {option} {workers}: must be >= 1")
    if workers > cap:
        what = f"{cpus} CPU cores" + (f", {device_count} GPUs" if device_count else "")
        raise UserError(f"bad {option} {workers}: this machine runs at most {cap} worker processes ({what})")


def capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of `device`; None for any other device."""
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def set_deterministic(enabled: bool) -> None:
    """PyTorch's deterministic algorithms, with the cuBLAS workspace setting they require on a GPU.

    Only turns the mode on: a run without it leaves the process as it found it.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: pinned and copied without blocking the host on a GPU."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
