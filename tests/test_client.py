"""Per-client training: declared phases, clients trained together, personal state storage."""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
from conftest import tiny_config

from pflbench.benchmark import client
from pflbench.benchmark.client import PersonalStore, resolve_parallel, stacked_sgd_step
from pflbench.benchmark.config import TrainConfig
from pflbench.benchmark.engine import EvalResult, Simulation
from pflbench.benchmark.errors import UserError
from pflbench.methods.aggregation import RunningWeightedMean, weighted_mean
from pflbench.methods.structure import head_entries

# Momentum, weight decay, clipping and two epochs: every piece of the stacked optimizer is exercised.
HARD = ["train.rounds=2", "data.partition=dirichlet", "train.momentum=0.9", "train.weight_decay=0.01",
        "train.max_grad_norm=1.0", "train.local_epochs=2"]


@pytest.mark.parametrize("compact", [0.5, 0.0], ids=["gathered", "padded"])
@pytest.mark.parametrize("method", ["fedavg", "fedper", "fedrep", "fedperfix"])
def test_clients_trained_together_equal_sequential_training(method, compact, monkeypatch):
    # padded: finished clients always take masked steps; gathered: once few are left, only those step.
    monkeypatch.setattr(client, "COMPACT_BELOW", compact)
    extra = ["method.head_epochs=1"] if method == "fedrep" else []
    sims = {}
    for k in (1, 3):  # 3 of 4 clients: one group of three, then a lone client
        sim = Simulation(tiny_config(method, *HARD, *extra, f"train.parallel_clients={k}"))
        assert sim.parallel_clients == k
        sim.run_round()
        sim.run_round()
        sims[k] = sim
    seq, together = sims[1], sims[3]
    sizes = [seq.data.num_samples(c) for c in range(seq.data.num_clients)]
    assert len(set(sizes)) == len(sizes)  # unequal clients: padded, masked steps happen
    for name, value in seq.method.global_state.items():
        torch.testing.assert_close(together.method.global_state[name], value, rtol=1e-4, atol=1e-6)
    assert set(seq._personal) == set(together._personal)
    for c in seq._personal:
        for name, value in seq.personal_state(c).items():
            torch.testing.assert_close(together.personal_state(c)[name], value, rtol=1e-4, atol=1e-6)


def test_a_masked_step_changes_nothing_and_an_active_one_is_torch_sgd():
    cfg = TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.05, max_grad_norm=0.5)
    gen = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(2, 3, 4, generator=gen), "b": torch.randn(2, 4, generator=gen)}
    g = {n: torch.randn(t.shape, generator=gen) for n, t in p.items()}
    buffers = {n: torch.randn(t.shape, generator=gen) for n, t in p.items()}  # mid-phase momentum
    before = {n: t.clone() for n, t in buffers.items()}
    new = stacked_sgd_step(p, g, buffers, torch.tensor([True, False]), cfg)
    for n in p:  # client 1 is padded: parameters and momentum bit-identical
        assert torch.equal(new[n][1], p[n][1]) and torch.equal(buffers[n][1], before[n][1])
    # Client 0 took exactly torch's clipped SGD step from the same momentum.
    params = [torch.nn.Parameter(p[n][0].clone()) for n in p]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for param, n in zip(params, p):
        param.grad = g[n][0].clone()
        opt.state[param]["momentum_buffer"] = before[n][0].clone()
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    opt.step()
    for param, n in zip(params, p):
        torch.testing.assert_close(new[n][0], param.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(buffers[n][0], opt.state[param]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_streaming_aggregation_equals_weighted_mean():
    gen = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(5, 3, generator=gen), "steps": torch.tensor(i)} for i in range(4)]
    weights = [3, 10, 7, 10]
    running = RunningWeightedMean()
    for state, weight in zip(states, weights):
        running.add(state, weight)
    out, expected = running.result(), weighted_mean(states, weights)
    assert list(out) == list(expected)
    torch.testing.assert_close(out["w"], expected["w"], rtol=1e-6, atol=1e-7)
    assert out["steps"].item() == expected["steps"].item() == 1  # the first of the heaviest
    single = RunningWeightedMean()
    single.add(states[2], 7)
    assert torch.equal(single.result()["w"], states[2]["w"])  # one client: bit-identical


def test_the_round_aggregates_without_holding_every_update(monkeypatch):
    sim = Simulation(tiny_config("fedavg", "train.rounds=1", "train.parallel_clients=1"))
    seen: list[weakref.ref] = []
    alive = []
    original = sim.method.add_update

    def count(update):
        original(update)
        alive.append(sum(1 for ref in seen if ref() is not None))
        seen.append(weakref.ref(update))

    monkeypatch.setattr(sim.method, "add_update", count)
    sim.run_round()
    assert len(alive) == sim.data.num_clients
    assert max(alive) == 0  # the previous client's upload was freed before the next arrived


def test_fedrep_declares_a_head_phase_then_a_body_phase():
    sim = Simulation(tiny_config("fedrep", "method.head_epochs=2", "train.local_epochs=3"))
    head = head_entries(sim.model)
    ctx = type("Ctx", (), {"train": sim.cfg.train, "client": 0, "round_index": 1})()
    head_phase, body_phase = sim.method.local_phases(sim.model, ctx)
    assert set(head_phase.params) == {n for n, _ in sim.model.named_parameters() if n in head}
    assert head_phase.epochs == 2 and head_phase.forward is not None and head_phase.features is not None
    assert set(body_phase.params) == {n for n, _ in sim.model.named_parameters()} - head
    assert body_phase.epochs == 3 and body_phase.forward is None
    base = Simulation(tiny_config("fedavg", "train.local_epochs=2"))
    ctx.train = base.cfg.train
    (only,) = base.method.local_phases(base.model, ctx)
    assert set(only.params) == {n for n, _ in base.model.named_parameters()} and only.epochs == 2


def _head_on_a_frozen_body(model, x):
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    return model.get_classifier()(features)


def test_a_head_only_phase_trains_only_the_head_when_clients_train_together():
    sim = Simulation(tiny_config("fedrep", "method.head_epochs=1", "train.parallel_clients=4"))
    # FedRep's head phase on images (its own runs on precomputed features, one client at a time).
    sim.method.local_phases = lambda model, ctx, inner=sim.method.local_phases: [
        dataclasses.replace(inner(model, ctx)[0], forward=_head_on_a_frozen_body, features=None)]
    before = {n: t.clone() for n, t in sim.method.global_state.items()}
    heads = {c: {n: t.clone() for n, t in sim.personal_state(c).items()} for c in range(4)}
    sim.run_round()
    for name, value in before.items():  # the body was frozen: its mean is unchanged
        torch.testing.assert_close(sim.method.global_state[name], value, rtol=0, atol=1e-6)
    assert all(any(not torch.equal(sim.personal_state(c)[n], heads[c][n]) for n in heads[c]) for c in range(4))


def test_personal_state_beyond_the_budget_goes_to_host_memory():
    initial = {"w": torch.zeros(4, 4)}  # 64 bytes a client
    store = PersonalStore(initial, torch.device("meta"), device_budget=130)
    for c in range(3):
        store.put(c, {"w": torch.full((4, 4), float(c))})
    assert [store.is_on_device(c) for c in range(3)] == [True, True, False]
    assert store.get(2)["w"].device.type == "cpu" and torch.equal(store.get(2)["w"], torch.full((4, 4), 2.0))
    assert store.get(7) is store.initial  # never trained: the initial state


def test_parallel_clients_setting():
    assert resolve_parallel("auto", torch.device("cpu"), 10) == 1
    assert resolve_parallel("auto", torch.device("cuda"), 10) == 10
    assert resolve_parallel(4, torch.device("cpu"), 3) == 3
    assert tiny_config("fedavg", "train.parallel_clients=4").train.parallel_clients == 4
    assert tiny_config("fedavg", "train.parallel_clients=auto").train.parallel_clients == "auto"
    with pytest.raises(UserError, match="train.parallel_clients"):
        tiny_config("fedavg", "train.parallel_clients=0")
    with pytest.raises(UserError, match="train.parallel_clients"):
        tiny_config("fedavg", "train.parallel_clients=many")


@pytest.mark.parametrize("method", ["fedavg", "fedper", "fedrep", "fedperfix"])
def test_batched_evaluation_equals_evaluating_each_client(method):
    sim = Simulation(tiny_config(method, "train.rounds=1", "data.val_fraction=0.2", "train.eval_batch_size=50"))
    sim.run_round()
    shared_body = method != "fedperfix"  # its personal plugins sit inside the body
    assert sim._shared_body_evaluation() == shared_body
    batched = sim.evaluate()
    each = EvalResult.empty(sim.data.num_clients)
    for c in range(sim.data.num_clients):  # the per-client path: load, then evaluate
        sim.load_client(c)
        sim._evaluate_loaded(c, each)
    each.settle()  # the counts stayed on the device until here
    for key in ("test_correct", "test_count", "val_correct", "val_count"):
        assert getattr(batched, key).tolist() == getattr(each, key).tolist(), key
    assert batched.forward_samples == each.forward_samples
    assert batched.val_count.sum() > 0 and batched.test_correct.sum() > 0
    if method in ("fedper", "fedrep"):  # each client's own head is used: heads differ after training
        heads = [sim.personal_state(c)["head.weight"] for c in range(sim.data.num_clients)]
        assert not torch.equal(heads[0], heads[1])


def test_after_local_evaluation_sees_each_clients_trained_model_when_trained_together():
    results = []
    for k in (1, 4):
        sim = Simulation(tiny_config("fedper", "train.rounds=1", "train.eval_timing=after-local",
                                     f"train.parallel_clients={k}"))
        results.append(sim.run_round())
    seq, together = results
    assert seq["test_acc_mean"] == pytest.approx(together["test_acc_mean"], abs=0.02)
    assert seq["forward_samples"] == together["forward_samples"]


def test_fedavg_global_accuracy_reuses_the_personalized_evaluation(monkeypatch):
    sim = Simulation(tiny_config("fedavg", "train.rounds=1", "data.val_fraction=0.2"))
    assert sim._evaluates_the_global_model()
    calls = []
    monkeypatch.setattr(sim, "evaluate_global", lambda clients: calls.append(clients))
    metrics = sim.run_round()
    assert not calls  # the server's model was already evaluated on every client's test split
    computed = Simulation(tiny_config("fedavg", "train.rounds=1", "data.val_fraction=0.2"))
    computed.run_round()
    direct = computed.evaluate_global(computed.training_clients).metrics("global_")
    assert metrics["global_test_acc_mean"] == pytest.approx(direct["global_test_acc_mean"])
    assert "global_val_acc_mean" not in metrics
    assert not Simulation(tiny_config("fedavg_ft", "train.rounds=1"))._evaluates_the_global_model()
