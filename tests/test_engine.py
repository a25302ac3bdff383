"""Engine invariants: the round loop, state swapping, aggregation and determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pflbench.benchmark.engine import Callback, Simulation
from pflbench.benchmark.errors import TrainingDiverged
from pflbench.benchmark.models import build_model
from pflbench.methods.aggregation import state_bytes, weighted_mean

from conftest import recorded_updates, tiny_config


def test_weighted_mean_is_the_sample_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "steps": torch.tensor(5)}
    out = weighted_mean([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([(1 + 12) / 4, (2 + 24) / 4]))
    assert out["steps"].item() == 5  # integer entries come from the heaviest client
    single = weighted_mean([a], [7])
    assert torch.equal(single["w"], a["w"])  # one client: bit-identical
    with pytest.raises(ValueError):
        weighted_mean([a, b], [0, 0])


def test_state_bytes_counts_raw_tensor_bytes():
    assert state_bytes({"a": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.float64)}) == 48 + 16


def test_fedavg_with_one_client_equals_plain_sgd():
    cfg = tiny_config("fedavg", "data.num_clients=1", "data.partition=iid", "train.rounds=3",
                      "train.local_epochs=2", "train.momentum=0.9", "train.sample_fraction=1.0")
    sim = Simulation(cfg)
    sim.run()

    # The same model init and the same batches, trained in one plain loop.
    torch.manual_seed(sim.seeds["init"])
    model = build_model(cfg.model, image_size=sim.data.image_size, in_chans=sim.data.in_chans,
                        num_classes=sim.data.num_classes)
    for r in range(1, cfg.train.rounds + 1):
        opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)  # fresh per round
        model.train()
        for x, y in sim.data.train_batches(0, cfg.train.local_epochs, cfg.train.batch_size, sim.batch_generator(r, 0)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(sim.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


class _Spy(Callback):
    def __init__(self):
        self.rounds = []

    def on_round(self, round_index, metrics):
        self.rounds.append(dict(metrics))


def test_server_state_is_the_weighted_mean_of_client_updates(monkeypatch):
    sim = Simulation(tiny_config("fedavg", "train.rounds=1", "data.partition=dirichlet"))
    updates = []
    original = sim.method.add_update

    def capture(update):
        updates.append(update)
        original(update)

    monkeypatch.setattr(sim.method, "add_update", capture)
    sim.run_round()
    sizes = [sim.data.num_samples(u.client) for u in updates]
    assert len(set(sizes)) > 1  # unequal clients, so weighting matters
    for name in sim.shared_names:
        expected = sum(n * u.params[name].double() for n, u in zip(sizes, updates)) / sum(sizes)
        torch.testing.assert_close(sim.method.global_state[name].double(), expected, rtol=1e-5, atol=1e-6)
        # after the next broadcast every client holds exactly the server state
        for c in range(sim.data.num_clients):
            sim.load_client(c)
            assert torch.equal(sim.model.state_dict()[name], sim.method.global_state[name])


def test_shared_bytes_are_counted_both_ways():
    sim = Simulation(tiny_config("fedavg", "train.rounds=1", "train.sample_fraction=0.5"))
    metrics = sim.run_round()
    per_client = sum(p.numel() * p.element_size() for p in sim.model.state_dict().values())
    assert metrics["clients"] == 2
    assert metrics["bytes_up"] == metrics["bytes_down"] == 2 * per_client


def test_local_keeps_every_client_apart_and_sends_nothing():
    sim = Simulation(tiny_config("local", "train.rounds=1", "train.sample_fraction=0.5"))
    before = {c: {n: t.clone() for n, t in sim.personal_state(c).items()} for c in range(sim.data.num_clients)}
    metrics = sim.run_round()
    assert metrics["bytes_up"] == metrics["bytes_down"] == 0
    trained = set(sim._personal)
    assert len(trained) == 2
    for c in range(sim.data.num_clients):
        after = sim.personal_state(c)
        changed = any(not torch.equal(before[c][n], after[n]) for n in after)
        assert changed == (c in trained)  # only a trained client's own weights moved
    a, b = sorted(trained)
    assert any(not torch.equal(sim.personal_state(a)[n], sim.personal_state(b)[n]) for n in sim.personal_names)


def test_same_seed_same_metrics_different_seed_different():
    def metrics(seed):
        sim = Simulation(tiny_config("fedavg", "train.sample_fraction=0.5", seed=seed))
        return [{k: v for k, v in m.items() if k != "round_seconds"} for m in sim.run().history], sim.partition.digest()

    first, second, other = metrics(3), metrics(3), metrics(4)
    assert first == second
    assert first[0] != other[0] and first[1] != other[1]


def test_client_sampling_follows_sample_fraction():
    sim = Simulation(tiny_config("fedavg", "data.num_clients=8", "train.sample_fraction=0.25"))
    draws = [sim.sample_clients() for _ in range(20)]
    assert all(len(d) == 2 and len(set(d)) == 2 for d in draws)
    assert len({tuple(d) for d in draws}) > 1


def test_visits_per_client_count_each_clients_trainings(tracking_uri):
    from mlflow import MlflowClient

    from pflbench.benchmark.tracking import RunRecorder

    cfg = tiny_config("fedavg", "data.num_clients=6", "train.sample_fraction=0.5", "train.rounds=4",
                      "train.client_failure_rate=0.3")
    sim = Simulation(cfg)
    rounds = recorded_updates(sim)
    recorder = RunRecorder(tracking_uri, "t")
    with recorder:
        history = sim.run([recorder]).history
    counts = np.zeros(6)
    for updates, metrics in zip(rounds, history):
        for u in updates:  # a failed client sent nothing back, so it did not count
            counts[u.client] += 1
        assert metrics["visits_per_client_mean"] == counts.mean()
        assert metrics["visits_per_client_min"] == counts.min()
    assert 0 < counts.sum() < 4 * 3  # some sampled clients failed
    logged = MlflowClient(tracking_uri).get_run(recorder.run_id).data.metrics  # the last round's: the whole run's
    assert logged["visits_per_client_mean"] == counts.mean() and logged["visits_per_client_min"] == counts.min()


def test_evaluation_reports_each_clients_personalized_accuracy():
    sim = Simulation(tiny_config("local", "train.rounds=1"))
    result = sim.run()
    final = result.final
    assert final.test_count.tolist() == [len(ix) for ix in sim.partition.test]
    assert result.history[-1]["test_acc_mean"] == pytest.approx(float(np.mean(final.test_correct / final.test_count)))
    assert result.history[-1]["test_acc_weighted"] == pytest.approx(final.test_correct.sum() / final.test_count.sum())
    # a client's own model: evaluating client 0 alone gives the same count
    again = sim.evaluate([0])
    assert again.test_correct[0] == final.test_correct[0]


def test_eval_every_skips_rounds_but_always_evaluates_the_last():
    spy = _Spy()
    Simulation(tiny_config("fedavg", "train.rounds=3", "train.eval_every=2")).run([spy])
    assert ["test_acc_mean" in m for m in spy.rounds] == [False, True, True]


def test_non_finite_loss_stops_the_run():
    sim = Simulation(tiny_config("fedavg", "train.lr=1e30", "data.augment=false"))
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        sim.run()


def test_batches_cover_a_clients_training_data_once_per_epoch():
    sim = Simulation(tiny_config("fedavg"))
    seen = []
    for _, y in sim.data.train_batches(1, 2, 7, sim.batch_generator(1, 1)):
        seen.append(y)
    labels = torch.cat(seen)
    own = sim.data.labels[sim.data.indices(1, "train")]
    assert len(labels) == 2 * len(own)
    assert torch.equal(torch.sort(labels[: len(own)]).values, torch.sort(own).values)


def test_augmentation_is_a_crop_of_the_padded_image():
    sim = Simulation(tiny_config("fedavg", "data.augment=true"))
    index = sim.data.indices(0, "train")[:16]
    plain, _ = sim.data.prepare(index)
    augmented, _ = sim.data.prepare(index, torch.Generator().manual_seed(0))
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
    # every augmented row that is not padding must appear in the plain image (digits: no flip)
    x = (augmented * sim.data.std + sim.data.mean)
    assert x.min() >= -1e-5 and x.max() <= 1 + 1e-5
