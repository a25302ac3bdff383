"""train.client_failure_rate: seeded client failures drop those updates; a round where all fail changes nothing."""

from __future__ import annotations

import math

import torch

from pflbench.benchmark.engine import Simulation

from conftest import tiny_config


def _spy_aggregate(sim, monkeypatch):
    """The clients of each finished aggregation, from the method's streaming hooks."""
    seen, arriving = [], []
    add, finish = sim.method.add_update, sim.method.finish_aggregation

    def spy_add(update):
        arriving.append(update.client)
        add(update)

    def spy_finish():
        seen.append(sorted(arriving))
        arriving.clear()
        finish()

    monkeypatch.setattr(sim.method, "add_update", spy_add)
    monkeypatch.setattr(sim.method, "finish_aggregation", spy_finish)
    return seen


def test_failed_clients_updates_are_dropped_and_counted(monkeypatch):
    cfg = tiny_config("fedavg", "train.client_failure_rate=0.5", "train.rounds=6", "data.num_clients=6")
    sim = Simulation(cfg)
    seen = _spy_aggregate(sim, monkeypatch)
    failed_per_round = []
    for r in range(1, 7):
        sampler_state = sim._sampler.bit_generator.state
        selected = sim.sample_clients()
        sim._sampler.bit_generator.state = sampler_state  # run_round draws the same clients again
        failed = sim.failing_clients(r, selected)
        failed_per_round.append(failed)
        metrics = sim.run_round()
        assert metrics["failed_clients"] == len(failed)
        if len(failed) < len(selected):
            assert seen[-1] == sorted(set(selected) - failed)  # only the survivors are aggregated
    assert any(failed_per_round) and not all(len(f) == 6 for f in failed_per_round)
    # Seeded: the same seed fails the same clients, another seed others.
    again = Simulation(cfg)
    assert [again.failing_clients(r, list(range(6))) for r in range(1, 7)] == \
           [sim.failing_clients(r, list(range(6))) for r in range(1, 7)]
    other = Simulation(tiny_config("fedavg", "train.client_failure_rate=0.5", "data.num_clients=6", seed=1))
    assert [other.failing_clients(r, list(range(6))) for r in range(1, 7)] != \
           [sim.failing_clients(r, list(range(6))) for r in range(1, 7)]


def test_a_round_where_every_client_fails_keeps_the_server_state(monkeypatch):
    sim = Simulation(tiny_config("fedper", "train.client_failure_rate=1.0", "train.rounds=2"))
    seen = _spy_aggregate(sim, monkeypatch)
    before = {n: t.clone() for n, t in sim.method.global_state.items()}
    result = sim.run()
    assert seen == []  # nothing to aggregate, so aggregate is never asked
    for name, value in sim.method.global_state.items():
        assert torch.equal(value, before[name])
    assert len(sim._personal) == 0  # no client trained, so no personal state moved
    for metrics in result.history:
        assert metrics["failed_clients"] == metrics["clients"] == 4
        assert math.isnan(metrics["train_loss"]) and metrics["bytes_up"] == 0 and metrics["bytes_down"] > 0


def test_a_failure_rate_of_zero_changes_nothing():
    plain = Simulation(tiny_config("fedavg")).run().history
    zero = Simulation(tiny_config("fedavg", "train.client_failure_rate=0.0")).run().history
    strip = [{k: v for k, v in h.items() if k != "round_seconds"} for h in plain]
    assert strip == [{k: v for k, v in h.items() if k != "round_seconds"} for h in zero]
    assert "failed_clients" not in zero[-1]
