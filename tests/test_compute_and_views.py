"""Equal compute on record, the global-model view, fine-tuning before evaluation, evaluation timing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pflbench.benchmark.engine import FINETUNE_STREAM, Simulation
from pflbench.benchmark.errors import UserError

from conftest import recorded_updates, tiny_config


def test_rounds_record_trained_and_forwarded_samples():
    sim = Simulation(tiny_config("fedavg", "train.rounds=2", "train.eval_every=2", "train.local_epochs=2",
                                 "train.sample_fraction=0.5"))
    rounds = recorded_updates(sim)
    history = sim.run().history
    for metrics, updates in zip(history, rounds):
        assert metrics["train_samples"] == sum(2 * sim.data.num_samples(u.client) for u in updates)
    # Only the evaluated round forwards: every training client's test and val samples.
    assert history[0]["forward_samples"] == 0
    evaluated = sum(sim.data.num_samples(c, s) for c in range(sim.data.num_clients) for s in ("test", "val"))
    assert history[1]["forward_samples"] == evaluated


def test_a_fractional_epoch_is_the_first_share_of_a_shuffled_pass():
    sim = Simulation(tiny_config("fedavg"))
    n = sim.data.num_samples(0)
    seen = torch.cat([y for _, y in sim.data.train_batches(0, 1.5, 7, sim.batch_generator(1, 0))])
    assert len(seen) == n + round(0.5 * n)


def test_the_global_view_is_logged_only_where_the_server_holds_one_model():
    fedavg = Simulation(tiny_config("fedavg", "train.rounds=1")).run().history[-1]
    # FedAvg's personalized model is the global one: both views agree exactly.
    assert fedavg["global_test_acc_mean"] == fedavg["test_acc_mean"]
    for method in ("fedper", "fedbn", "local", "pfedhn"):
        metrics = Simulation(tiny_config(method, "train.rounds=1")).run().history[-1]
        assert "global_test_acc_mean" not in metrics, method


@pytest.mark.parametrize("every_eval", [False, True])
def test_fedavg_ft_is_fedavg_plus_a_fine_tune_that_never_leaks(every_eval):
    overrides = ("train.rounds=3", "train.sample_fraction=0.5", "train.eval_every=1")
    plain = Simulation(tiny_config("fedavg", *overrides))
    tuned = Simulation(tiny_config("fedavg_ft", *overrides, "method.finetune_epochs=2",
                                   f"method.finetune_every_eval={str(every_eval).lower()}"))
    a, b = plain.run().history, tuned.run().history
    # The server and the clients' training never see the fine-tuned weights.
    for x, y in zip(a, b):
        for key in ("train_loss", "bytes_up", "global_test_acc_mean", "global_test_acc_weighted"):
            assert x[key] == y[key], key
    fine_tuned = sum(2 * tuned.data.num_samples(c) for c in tuned.training_clients)
    for r, (x, y) in enumerate(zip(a, b), 1):
        # By default only the final evaluation fine-tunes; an intermediate one is FedAvg's model itself.
        fine_tunes = every_eval or r == len(a)
        assert y["train_samples"] == x["train_samples"] + (fine_tuned if fine_tunes else 0)
        if not fine_tunes:
            assert y["test_acc_mean"] == x["test_acc_mean"]
    for name, value in plain.method.global_state.items():
        assert torch.equal(value, tuned.method.global_state[name]), name
    assert a[-1]["test_acc_mean"] != b[-1]["test_acc_mean"]


def test_fedavg_ft_evaluates_the_global_model_fine_tuned_on_the_clients_own_data():
    sim = Simulation(tiny_config("fedavg_ft", "train.rounds=1", "method.finetune_epochs=1"))
    result = sim.run()
    client = 2
    # The same fine-tune by hand: global model, the client's batches of the fine-tuning stream, plain SGD.
    sim.load_client(client)
    model = sim.model
    model.train()
    cfg = sim.cfg.train
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    for x, y in sim.data.train_batches(client, 1, cfg.batch_size, sim.batch_generator(1, client, FINETUNE_STREAM)):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in sim.data.eval_batches(client, "test", 512))
    assert correct == result.final.test_correct[client]


def test_fedavg_ft_rejects_a_budget_of_zero():
    with pytest.raises(UserError, match="method.finetune_epochs"):
        tiny_config("fedavg_ft", "method.finetune_epochs=0")


def test_after_local_evaluates_the_sampled_clients_as_local_training_left_them():
    sim = Simulation(tiny_config("fedavg", "train.rounds=2", "train.sample_fraction=0.5",
                                 "train.eval_timing=after-local"))
    rounds = recorded_updates(sim)
    result = sim.run()
    sampled = {u.client for u in rounds[-1]}
    assert {c for c in range(sim.data.num_clients) if result.final.test_count[c] > 0} == sampled
    model = sim.model
    for update in rounds[-1]:
        with torch.no_grad():
            for name, value in update.params.items():
                model.state_dict()[name].copy_(value)
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum())
                          for x, y in sim.data.eval_batches(update.client, "test", 512))
        assert correct == result.final.test_correct[update.client]
    accs = [result.final.test_correct[c] / result.final.test_count[c] for c in sampled]
    assert result.history[-1]["test_acc_mean"] == pytest.approx(sum(accs) / len(accs))
    # The global view is still the aggregated model, on every client.
    assert math.isfinite(result.history[-1]["global_test_acc_mean"])


def test_eval_timing_names_the_key():
    with pytest.raises(UserError, match="train.eval_timing"):
        tiny_config("fedavg", "train.eval_timing=sometimes")


def _test_correct(sim, client: int, state: dict) -> int:
    model = sim.model
    with torch.no_grad():
        for name, value in state.items():
            sim._entries[name].copy_(value)
    model.eval()
    with torch.no_grad():
        return sum(int((model(x).argmax(1) == y).sum()) for x, y in sim.data.eval_batches(client, "test", 512))


def test_reference_timing_scores_every_client_the_sampled_ones_after_local_training():
    sim = Simulation(tiny_config("fedper", "train.rounds=2", "train.sample_fraction=0.5",
                                 "train.eval_timing=reference"))
    rounds = recorded_updates(sim)
    sim.run_round()
    broadcast = {n: t.clone() for n, t in sim.method.global_state.items()}
    personal_before = {c: {n: t.clone() for n, t in sim.personal_state(c).items()} for c in range(sim.data.num_clients)}
    metrics = sim.run_round()
    result = sim.last_eval
    sampled = {u.client: u for u in rounds[-1]}
    assert 0 < len(sampled) < sim.data.num_clients
    assert all(result.test_count[c] > 0 for c in range(sim.data.num_clients))  # every client is scored
    for c in range(sim.data.num_clients):
        if c in sampled:  # as its local training left it: its upload and its new personal part
            state = {**sampled[c].params, **sim.personal_state(c)}
        else:  # the round's broadcast and its own (untouched) personal part
            assert all(torch.equal(sim.personal_state(c)[n], t) for n, t in personal_before[c].items())
            state = {**broadcast, **personal_before[c]}
        assert _test_correct(sim, c, state) == result.test_correct[c], c
    accs = result.test_correct / result.test_count
    assert metrics["test_acc_mean"] == pytest.approx(float(accs.mean()))


def test_precision_sets_the_autocast_dtype():
    from pflbench.benchmark.engine import autocast_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cuda) == torch.bfloat16 and autocast_dtype("auto", cpu) is None
    assert autocast_dtype("fp32", cuda) is None and autocast_dtype("bf16", cpu) == torch.bfloat16
    sim = Simulation(tiny_config("fedavg", "train.rounds=1", "train.precision=bf16"))
    x, _ = next(sim.data.eval_batches(0, "test", 8))
    with sim.autocast():
        assert sim.model(x).dtype == torch.bfloat16
    with pytest.raises(UserError, match="train.precision"):
        tiny_config("fedavg", "train.precision=fp16")


@pytest.mark.parametrize("preset,dataset", [("paper-cifar100", "cifar100"), ("paper-organamnist", "organamnist"),
                                            ("paper-officehome", "officehome")])
def test_the_paper_presets_evaluate_and_train_as_the_reference(preset, dataset):
    from pflbench.benchmark.resolve import resolve_config

    cfg = resolve_config("fedavg", dataset, preset=preset)
    assert cfg.train.eval_timing == "reference" and cfg.train.precision == "fp32"
    if dataset == "officehome":  # the reference's Office-Home generator: no N/K cap, >= 20 / 0.15 samples a client
        assert not cfg.data.dirichlet_cap and cfg.data.min_samples == math.ceil(20 / 0.15)
