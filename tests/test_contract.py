"""The method contract, checked for every registered method: registering a method gets it tested.

Per method only the overrides it needs to run (or to run fast) are listed;
a method missing here runs with its defaults.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pflbench.benchmark.engine import Simulation
from pflbench.methods import METHODS
from pflbench.methods.aggregation import state_bytes

from conftest import recorded_updates, tiny_config

NEEDS = {
    "partial": ["method.personal=blocks.1.*,head.*"],  # more than its default head, to test a block
    "fedperfix": ["method.mid_dim=8"],
    "pfedhn": ["method.hidden_dim=8", "method.n_hidden=1", "method.embed_dim=3"],
}
ALL = sorted(METHODS.names())


def _sim(method: str, *overrides: str, seed: int = 0) -> Simulation:
    return Simulation(tiny_config(method, *NEEDS.get(method, []), "train.sample_fraction=0.5", *overrides, seed=seed))


class FakeTrial:
    """The Optuna trial surface a search space may use; answers the low end (or the last choice)."""

    def __init__(self, high: bool = False):
        self.high = high
        self.asked: list[str] = []

    def suggest_float(self, name, low, high, *, log=False):
        self.asked.append(name)
        return high if self.high else low

    def suggest_int(self, name, low, high, *, log=False):
        self.asked.append(name)
        return high if self.high else low

    def suggest_categorical(self, name, choices):
        self.asked.append(name)
        return list(choices)[-1 if self.high else 0]


def test_the_registry_holds_the_methods_under_test():
    assert {"fedavg", "fedavg_ft", "local", "fedper", "fedrep", "fedbn", "fedperfix", "pfedhn", "partial"} <= set(ALL)


@pytest.mark.parametrize("method", ALL)
def test_personal_entries_never_reach_the_server(method):
    sim = _sim(method)
    rounds = recorded_updates(sim)
    sim.run()
    personal = set(sim.personal_names)
    assert not personal & set(sim.method.global_state)
    for c in range(sim.data.num_clients):
        assert not personal & set(sim.method.broadcast(c))
    for update in (u for r in rounds for u in r):
        assert not personal & set(update.params) and not personal & set(update.sent)
        assert set(update.params) == set(update.sent) == set(sim.shared_names)


@pytest.mark.parametrize("method", ALL)
def test_a_loaded_client_holds_exactly_the_broadcast_and_its_own_personal_state(method):
    sim = _sim(method)
    sim.run()
    for c in range(sim.data.num_clients):
        sent = sim.method.broadcast(c)
        sim.load_client(c)
        for name in sim.shared_names:
            assert torch.equal(sim._entries[name], sent[name]), (c, name)
        for name, value in sim.personal_state(c).items():
            assert torch.equal(sim._entries[name], value), (c, name)


@pytest.mark.parametrize("method", ALL)
def test_bytes_are_the_tensors_exchanged(method):
    sim = _sim(method, "train.rounds=1")
    rounds = recorded_updates(sim)
    metrics = sim.run().history[0]
    (updates,) = rounds
    assert metrics["bytes_down"] == sum(state_bytes(u.sent) for u in updates)
    assert metrics["bytes_up"] == sum(state_bytes(u.params) for u in updates)
    per_client = sum(sim._entries[n].numel() * sim._entries[n].element_size() for n in sim.shared_names)
    assert metrics["bytes_up"] == len(updates) * per_client
    # Each client trains its budget (train.local_epochs = 1) at least: a half-epoch phase may round one sample down.
    assert metrics["train_samples"] >= sum(sim.data.num_samples(u.client) for u in updates) - 2 * len(updates)


@pytest.mark.parametrize("method", ALL)
def test_one_seed_fixes_the_run(method):
    def run(seed):
        sim = _sim(method, seed=seed)
        history = [{k: v for k, v in m.items() if k != "round_seconds"} for m in sim.run().history]
        return history, {n: t.detach().clone() for n, t in sim.model.state_dict().items()}

    (first, state), (second, again) = run(5), run(5)
    assert first == second
    assert all(torch.equal(state[n], again[n]) for n in state)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("high", [False, True], ids=["low", "high"])
def test_the_search_space_resolves_to_valid_config_keys(method, high):
    trial = FakeTrial(high)
    space = METHODS.get(method).search_space(trial)
    assert set(space) == set(trial.asked)  # every suggestion is used, under the name it was asked by
    assert all(key.startswith("method.") for key in space)
    cfg = tiny_config(method, *NEEDS.get(method, []), *(f"{k}={v}" for k, v in space.items()))
    for key, value in space.items():
        resolved = getattr(cfg.method, key.split(".", 1)[1])
        assert (",".join(resolved) if isinstance(resolved, list) else resolved) == value


def test_methods_never_import_optuna():
    code = "import sys, pflbench.methods; print('optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
