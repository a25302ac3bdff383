"""The method contract, checked for every registered method: registering a method gets it tested.

Per method only the overrides it needs to run (or to run fast) are listed;
a method missing here runs with its defaults.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from pflbench.benchmark.client import _ClientContext
from pflbench.benchmark.engine import Simulation
from pflbench.methods import METHODS, Method
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
def test_a_held_out_client_never_sends_an_update_nor_enters_an_aggregate(method):
    sim = _sim(method, "data.novel_clients=1")
    (novel,) = sim.held_out
    rounds = recorded_updates(sim)
    before = {}
    fit = sim.method.fit_held_out

    def fit_and_snapshot(clients, train_client):
        before["aggregations"] = len(rounds)
        before["global"] = {n: t.clone() for n, t in sim.method.global_state.items()}
        before["personal"] = {c: {n: t.clone() for n, t in sim.personal_state(c).items()}
                              for c in sim.training_clients}
        fit(clients, train_client)

    sim.method.fit_held_out = fit_and_snapshot
    result = sim.run()
    # Every aggregation is a training round, and none of them holds the held-out client's update.
    assert len(rounds) == before["aggregations"] == sim.cfg.train.rounds
    assert all(u.client != novel for r in rounds for u in r) and all(r for r in rounds)
    # Its adaptation changed neither the server's state nor any training client's personal state.
    assert all(torch.equal(before["global"][n], t) for n, t in sim.method.global_state.items())
    for c, state in before["personal"].items():
        assert all(torch.equal(sim.personal_state(c)[n], t) for n, t in state.items()), c
    # It is reported apart: out of the round metrics, in the novel_ ones.
    assert result.final.test_count[novel] == 0 and result.held_out.test_count[novel] > 0
    assert math.isfinite(result.held_out_metrics["novel_test_acc_mean"])
    # Fine-tuning before evaluation (fedavg_ft's) runs for it too, as for a final evaluation.
    assert (result.held_out.train_samples > 0) == sim._fine_tunes(final=True)


DEFAULT_HELD_OUT = [m for m in ALL if METHODS.get(m).fit_held_out is Method.fit_held_out]


@pytest.mark.parametrize("method", DEFAULT_HELD_OUT)
def test_by_default_a_held_out_client_trains_only_its_personal_part(method):
    sim = _sim(method, "data.novel_clients=1")
    (novel,) = sim.held_out
    updates = []
    train = sim.clients.train_client

    def spy(client, round_index, personal_only=False):
        update, stats = train(client, round_index, personal_only)
        if client == novel:
            updates.append((update, stats, personal_only))
        return update, stats

    sim.clients.train_client = spy
    sim.run()
    ((update, stats, personal_only),) = updates  # one local update, personal part only
    assert personal_only
    assert all(torch.equal(update.params[n], update.sent[n]) for n in update.sent)  # the shared part is frozen
    adapted = [n for n in sim.personal_names if not torch.equal(sim.personal_state(novel)[n], sim._personal.initial[n])]
    # It trained what its local phases train of its personal part; with none (FedAvg, or FedBABU's head,
    # which only fine-tuning trains) nothing was trained here at all.
    phases = sim.method.local_phases(sim.model, _ClientContext(sim, novel, sim.cfg.train.rounds + 1))
    trains_personal = {n for phase in phases for n in phase.params} & set(sim.personal_names)
    assert bool(adapted) == bool(trains_personal) == (stats.samples > 0)
    assert set(adapted) <= trains_personal | {n for n in sim.personal_names if n not in dict(sim.model.named_parameters())}


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


class RandomTrial(FakeTrial):
    """Answers a seeded random point of each range (log ranges sampled in log space)."""

    def __init__(self, seed: int):
        super().__init__()
        self.rng = np.random.default_rng(seed)

    def suggest_float(self, name, low, high, *, log=False):
        self.asked.append(name)
        return float(np.exp(self.rng.uniform(np.log(low), np.log(high))) if log else self.rng.uniform(low, high))

    def suggest_int(self, name, low, high, *, log=False):
        self.asked.append(name)
        return int(self.rng.integers(low, high + 1))

    def suggest_categorical(self, name, choices):
        self.asked.append(name)
        return list(choices)[int(self.rng.integers(len(choices)))]


@pytest.mark.parametrize("method", ALL)
def test_tuning_cannot_buy_compute(method):
    """At sampled points of the whole space tuning searches, a round costs what the defaults cost (within 10%)."""
    from pflbench.benchmark.tuning import budget_keys, suggest

    budget = budget_keys(method)
    assert {"train.rounds", "train.local_epochs"} <= budget
    baseline = _sim(method, "train.rounds=1").run().history[-1]["train_flops"]
    assert baseline > 0
    for trial in (FakeTrial(), FakeTrial(high=True), RandomTrial(0), RandomTrial(1)):
        params = suggest(trial, method, budget)
        assert not set(params) & budget
        sim = _sim(method, "train.rounds=1", *(f"{k}={v}" for k, v in params.items()))
        flops = sim.run().history[-1]["train_flops"]
        assert abs(flops - baseline) <= 0.1 * baseline, (params, flops, baseline)


def test_methods_never_import_optuna():
    code = "import sys, pflbench.methods; print('optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
