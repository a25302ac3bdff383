"""The registries: unique names, and every registered method/dataset passes the same contract."""

from __future__ import annotations

import pytest

from pflbench.benchmark.errors import UserError
from pflbench.benchmark.registry import Registry
from pflbench.benchmark.testing import check_dataset, check_method
from pflbench.datasets import DATASETS
from pflbench.methods import METHODS, Method, register


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
    result = check_method(name)  # the contract plug-in authors run too (README: Add your own method)
    assert len(result.history) == 2 and 0.0 <= result.history[-1]["test_acc_mean"] <= 1.0


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_is_described_with_options(name):
    check_dataset(name, train=name == "digits")  # the others need their files
    entry = DATASETS.get(name)
    assert entry.description and entry.Options(name=name).name == name


def test_the_contract_check_refuses_a_method_without_a_description():
    register("undescribed")(type("Undescribed", (Method,), {}))
    try:
        with pytest.raises(AssertionError, match="method undescribed: no docstring"):
            check_method("undescribed")
    finally:
        METHODS._entries.pop("undescribed")
