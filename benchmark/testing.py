"""The registry's contract, as checks a plug-in author can run against their own method or dataset.

    from pflbench.benchmark.testing import check_dataset, check_method
    check_method("mymethod")             # two tiny rounds on the bundled digits
    check_dataset("mydata", train=True)  # described, options, and two tiny FedAvg rounds on it

Each check raises AssertionError (or the UserError a bad setting raises) naming what broke;
pflbench's own tests run the same checks over every registered method and dataset.
"""

from __future__ import annotations

import math

from .engine import METRIC_NAMES, RunResult, Simulation
from .resolve import resolve_config

# A digits-sized ViT: a 2-round run takes about a second on a CPU.
TINY = (
    "model.patch_size=4", "model.embed_dim=16", "model.depth=2", "model.num_heads=2",
    "data.num_clients=4", "data.min_samples=20", "train.rounds=2", "train.batch_size=32",
)


def tiny_config(method: str = "fedavg", *overrides: str, dataset: str = "digits", seed: int = 0):
    """A resolved config of a seconds-long CPU run of `method` on `dataset`, with extra `key=value` overrides."""
    return resolve_config(method, dataset, preset="smoke", overrides=[*TINY, *overrides], seed=seed, device="cpu")


def _check_two_rounds(sim: Simulation, result: RunResult, what: str) -> None:
    assert len(result.history) == 2, f"{what}: {len(result.history)} rounds recorded, expected 2"
    last = result.history[-1]
    for key in METRIC_NAMES:
        assert key in last and math.isfinite(last[key]), f"{what}: metric {key} missing or not finite"
    if not sim.has_global_view:  # only where the server holds one complete model
        assert "global_test_acc_mean" not in last, f"{what}: global_test_acc_mean without a global model"
    assert 0.0 <= last["test_acc_mean"] <= 1.0, f"{what}: test_acc_mean {last['test_acc_mean']} outside [0, 1]"


def check_method(name: str, *overrides: str, dataset: str = "digits") -> RunResult:
    """Check registered method `name`: it is described for `bench list` and trains two tiny rounds
    on `dataset` (default the bundled digits) with every metric a run logs, finite."""
    from ..methods import METHODS, Method

    cls = METHODS.get(name)
    assert isinstance(cls, type) and issubclass(cls, Method), f"method {name}: {cls!r} is not a Method subclass"
    assert cls.description(), f"method {name}: no docstring to show in `bench list`"
    sim = Simulation(tiny_config(name, *overrides, dataset=dataset))
    result = sim.run()
    _check_two_rounds(sim, result, f"method {name}")
    return result


def check_dataset(name: str, *overrides: str, train: bool = False) -> RunResult | None:
    """Check registered dataset `name`: described, its options section built; with `train`, it also
    loads (`--set dataset.root=...` among `overrides` where it needs files) and FedAvg trains two
    tiny rounds on it."""
    from ..datasets import DATASETS

    entry = DATASETS.get(name)
    assert entry.description, f"dataset {name}: no description to show in `bench list`"
    assert entry.Options(name=name).name == name, f"dataset {name}: its options do not carry its name"
    if not train:
        return None
    sim = Simulation(tiny_config("fedavg", *overrides, dataset=name))
    assert sim.images.num_classes >= 2, f"dataset {name}: {sim.images.num_classes} classes"
    result = sim.run()
    _check_two_rounds(sim, result, f"dataset {name}")
    return result
