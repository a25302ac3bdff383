"""The registries: unique names, and every registered method/dataset passes the same contract."""

from __future__ import annotations

import math

import pytest

from pflbench.benchmark.engine import METRIC_NAMES, Simulation
from pflbench.benchmark.errors import UserError
from pflbench.benchmark.registry import Registry
from pflbench.datasets import DATASETS
from pflbench.methods import METHODS, Method, register

from conftest import tiny_config


def test_duplicate_registration_is_an_error():
    reg = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 2)
    with pytest.raises(ValueError, match="already registered"):
        register("fedavg")(type("Shadow", (Method,), {"__doc__": "shadow"}))
    assert METHODS.get("fedavg").__name__ == "FedAvg"


def test_unknown_name_lists_choices():
    reg = Registry("thing")
    reg.add("b", 1)
    reg.add("a", 2)
    with pytest.raises(UserError, match=r"unknown thing 'c'; choose one of: a, b"):
        reg.get("c")
    assert reg.names("a*") == ["a"]


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_runs_two_rounds(name):
    sim = Simulation(tiny_config(name))
    result = sim.run()
    assert len(result.history) == 2
    for key in METRIC_NAMES:
        if key == "global_test_acc_mean" and not sim.has_global_view:
            assert key not in result.history[-1]  # only where the server holds one complete model
            continue
        assert key in result.history[-1] and math.isfinite(result.history[-1][key]), key
    assert 0.0 <= result.history[-1]["test_acc_mean"] <= 1.0
    assert METHODS.get(name).description()  # `bench list` has something to show


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_is_described_with_options(name):
    entry = DATASETS.get(name)
    assert entry.description and entry.Options(name=name).name == name
