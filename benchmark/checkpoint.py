"""Checkpoints of a whole simulation, written atomically and read back without unpickling code.

A checkpoint is `torch.save` of plain dicts, lists, tensors, numbers and
strings (`Simulation.state_dict()` plus what identifies the run), so it loads
with `weights_only=True`: a file that holds anything else is refused, never
executed. It is written to a temporary name beside the target, flushed to
disk, then renamed over it, so a kill at any moment leaves either the previous
checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .config import config_hash
from .engine import Callback, Simulation
from .errors import UserError

FORMAT = 1  # bump when the layout changes


def save_checkpoint(path: str | Path, sim: Simulation) -> Path:
    """Write `sim`'s complete state to `path` (write to a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "seed": sim.cfg.seed,
        "config_hash": config_hash(sim.cfg),
        "partition_hash": sim.partition.digest(),
        "simulation": sim.state_dict(),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's contents; a UserError when it is missing, damaged or holds anything but data."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError):
        # torch's message suggests turning weights_only off: exactly what must not be done with this file.
        raise UserError(f"checkpoint {path} is damaged, not a pflbench checkpoint, or holds objects other than"
                        " tensors and plain values; refusing to load it") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "simulation" not in state:
        raise UserError(f"checkpoint {path} is not a pflbench checkpoint (format {FORMAT})")
    return state


def restore(sim: Simulation, state: Mapping[str, Any], source: str | Path = "checkpoint") -> None:
    """Continue `sim` from a checkpoint of the same configuration, seed and partition."""
    for key, mine in (("seed", sim.cfg.seed), ("config_hash", config_hash(sim.cfg)),
                      ("partition_hash", sim.partition.digest())):
        if state.get(key) != mine:
            raise UserError(f"{source} was written by a run with another {key.replace('_', ' ')}"
                            f" ({state.get(key)!r}, this run {mine!r}); it cannot be resumed here")
    rounds = int(state["simulation"]["round"])
    if rounds > sim.cfg.train.rounds:
        raise UserError(f"{source} is at round {rounds}, past this run's train.rounds={sim.cfg.train.rounds}")
    try:
        sim.load_state_dict(state["simulation"])
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise UserError(f"{source} does not fit this simulation ({err})") from None


class Checkpointer(Callback):
    """Saves the simulation every `every` rounds and after the last one.

    `path` is asked for when the first checkpoint is due: the run's id (and so
    its file name) is only known once the tracking run has started.
    """

    def __init__(self, path: Callable[[], Path], every: int):
        self.path = path
        self.every = every
        self.sim: Simulation | None = None
        self.saved: Path | None = None  # the last checkpoint written

    def on_start(self, sim: Simulation) -> None:
        self.sim = sim

    def on_round(self, round_index: int, metrics: Mapping[str, float]) -> None:
        assert self.sim is not None
        if self.every > 0 and (round_index % self.every == 0 or round_index == self.sim.cfg.train.rounds):
            self.saved = save_checkpoint(self.path(), self.sim)
