"""Checkpoints: a simulation saved mid-run and continued ends exactly where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch

from pflbench.benchmark.checkpoint import Checkpointer, read_checkpoint, restore, save_checkpoint
from pflbench.benchmark.engine import Simulation
from pflbench.benchmark.errors import UserError

from conftest import tiny_config


def _server_and_personal(sim):
    state = sim.state_dict()
    return state["method"], state["personal"]


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("method, extra", [
    ("fedavg", ()),
    ("fedperfix", ("method.mid_dim=8",)),
    ("fedrep", ("method.head_epochs=1",)),
    ("pfedhn", ("method.variant=pc", "method.hidden_dim=8")),
])
def test_resumed_simulation_ends_exactly_like_an_uninterrupted_one(tmp_path, method, extra):
    overrides = ("train.rounds=4", "train.sample_fraction=0.5", "train.eval_every=3", *extra)
    whole = Simulation(tiny_config(method, *overrides))
    expected = whole.run()

    first = Simulation(tiny_config(method, *overrides))
    first.run_round()
    first.history.append({"round": 1.0})
    first.run_round()
    first.history.append({"round": 2.0})
    path = save_checkpoint(tmp_path / "c.pt", first)

    resumed = Simulation(tiny_config(method, *overrides))
    restore(resumed, read_checkpoint(path))
    assert resumed.round_index == 2
    result = resumed.run()
    for a, b in zip(expected.history[2:], result.history[2:]):
        assert {k: v for k, v in a.items() if k != "round_seconds"} == \
               {k: v for k, v in b.items() if k != "round_seconds"}
    assert expected.final.metrics() == result.final.metrics()
    _assert_same(_server_and_personal(whole), _server_and_personal(resumed))


def test_pfedhn_state_dict_round_trips_hypernetwork_and_optimizers(tmp_path):
    sim = Simulation(tiny_config("pfedhn", "method.hidden_dim=8", "train.rounds=2"))
    sim.run()  # the optimizers now hold momentum buffers
    saved = sim.method.state_dict()
    assert saved["hn_optimizer"]["state"] and saved["embed_optimizer"]["state"]
    torch.save(saved, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    other = Simulation(tiny_config("pfedhn", "method.hidden_dim=8", "train.rounds=2"))
    before = {n: t.clone() for n, t in other.method.hn.state_dict().items()}
    other.method.load_state_dict(loaded)
    _assert_same(saved, other.method.state_dict())
    assert any(not torch.equal(before[n], t) for n, t in other.method.hn.state_dict().items())
    # Both continue identically: the same generated weights and the same next server step.
    for c in range(sim.data.num_clients):
        _assert_same(dict(sim.method.broadcast(c)), dict(other.method.broadcast(c)))


def test_checkpointer_saves_every_k_rounds_and_after_the_last(tmp_path):
    sim = Simulation(tiny_config("fedavg", "train.rounds=5"))
    saved_rounds = []

    class Spy(Checkpointer):
        def on_round(self, round_index, metrics):
            super().on_round(round_index, metrics)
            if self.saved is not None:
                saved_rounds.append(read_checkpoint(self.saved)["simulation"]["round"])
                self.saved = None

    sim.run([Spy(lambda: tmp_path / "run.pt", every=2)])
    assert saved_rounds == [2, 4, 5]
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary file left behind


def test_checkpoint_of_another_config_or_seed_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", Simulation(tiny_config("fedavg", seed=1)))
    with pytest.raises(UserError, match="another seed"):
        restore(Simulation(tiny_config("fedavg", seed=2)), read_checkpoint(path))
    with pytest.raises(UserError, match="another config hash"):
        restore(Simulation(tiny_config("fedavg", "train.lr=0.5", seed=1)), read_checkpoint(path))


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_malicious_checkpoint_is_refused_without_torchs_advice(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "simulation": _Payload()}, path)
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert "refusing" in message and "weights_only" not in message
    assert "pwned" not in capsys.readouterr().out
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="damaged, not a pflbench checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
