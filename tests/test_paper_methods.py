"""The FedPerfix paper's other baselines, each checked by its defining invariant:
APFL, Per-FedAvg, FedBABU, Ditto and Vanilla Attention."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import recorded_updates, tiny_config

from pflbench.benchmark.client import _ClientContext
from pflbench.benchmark.engine import Simulation
from pflbench.methods.aggregation import weighted_mean
from pflbench.methods.apfl import ALPHA, apfl_step, mixed_forward
from pflbench.methods.perfedavg import meta_gradient
from pflbench.methods.structure import head_entries
from pflbench.methods.twin import TWIN, twin_of

# Momentum and weight decay on: equalities below must hold through the whole optimizer.
OPTIMIZER = ["train.momentum=0.9", "train.weight_decay=0.001"]


def _state(sim: Simulation) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in sim.model.state_dict().items()}


class _Loop:
    """A `StepLoop` that leaves the gradients in place (no optimizer step)."""

    def __init__(self, model, names):
        named = dict(model.named_parameters())
        self.params = {n: named[n] for n in names}
        self.batch_size = 32
        self.autocast = contextlib.nullcontext

    def apply(self):
        pass


# -- APFL ----------------------------------------------------------------------------------------


def test_apfl_with_alpha_fixed_at_zero_is_fedavg():
    common = ["train.rounds=2", "train.sample_fraction=0.5", *OPTIMIZER]
    apfl = Simulation(tiny_config("apfl", "method.alpha=0", "method.learn_alpha=false", *common))
    fedavg = Simulation(tiny_config("fedavg", *common))
    # v and alpha are a second, personal copy: twice the parameters (plus alpha), none of them sent.
    assert apfl.num_parameters == 2 * fedavg.num_parameters + 1
    assert set(apfl.shared_names) == set(fedavg.shared_names)
    result, expected = apfl.run(), fedavg.run()
    for name, value in fedavg.method.global_state.items():
        torch.testing.assert_close(apfl.method.global_state[name], value, rtol=0, atol=1e-7)
    # The personalized model 0 * v + 1 * w is FedAvg's model: the same accuracy on every client.
    assert (result.final.test_correct == expected.final.test_correct).all()
    assert all(float(apfl.personal_state(c)[f"{TWIN}.{ALPHA}"]) == 0 for c in apfl._personal)


def test_apfl_alpha_gradient_matches_finite_differences():
    sim = Simulation(tiny_config("apfl", "train.rounds=1"))
    sim.run_round()  # v and w now differ
    sim.load_client(0)
    model = sim.model.double()
    alpha = getattr(twin_of(model), ALPHA)
    with torch.no_grad():
        alpha.fill_(0.4)
    x, y = next(sim.data.train_batches(0, 1, 32, torch.Generator().manual_seed(0)))
    x = x.double()
    names = [n for n, _ in model.named_parameters()]
    model.zero_grad(set_to_none=True)
    apfl_step(model, x, y, _Loop(model, names))

    def mixed_loss(a: float) -> float:
        with torch.no_grad():
            alpha.fill_(a)
            return float(F.cross_entropy(mixed_forward(model, x), y))

    eps = 1e-6
    numeric = (mixed_loss(0.4 + eps) - mixed_loss(0.4 - eps)) / (2 * eps)
    assert alpha.grad is not None and abs(numeric) > 1e-4  # a real slope, not a zero test
    assert float(alpha.grad) == pytest.approx(numeric, rel=1e-5)
    # w's gradient is that of its own loss alone: w is a constant inside the mixture.
    plain = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if not n.startswith(TWIN)}
    loss = F.cross_entropy(torch.func.functional_call(model, plain, (x,)), y)
    for (name, p), g in zip(plain.items(), torch.autograd.grad(loss, list(plain.values()))):
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, rtol=1e-6, atol=1e-9)


# -- Per-FedAvg ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_perfedavg_meta_gradient_on_a_quadratic_matches_the_closed_form(variant):
    # f(theta; D) = 1/2 (theta - c_D)^T A_D (theta - c_D): gradient A_D (theta - c_D), Hessian A_D.
    gen = torch.Generator().manual_seed(0)
    dim = 5

    def spd() -> torch.Tensor:
        m = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        return m @ m.T + torch.eye(dim, dtype=torch.float64)

    batches = [(spd(), torch.randn(dim, generator=gen, dtype=torch.float64)) for _ in range(3)]
    theta = torch.randn(dim, generator=gen, dtype=torch.float64)

    def grad(params, batch):
        a, c = batch
        flat = torch.cat([params["first"], params["rest"]])
        g = a @ (flat - c)
        return {"first": g[:2], "rest": g[2:]}, 0.5 * (flat - c) @ g

    lr, delta = 0.05, 1e-4
    meta, _ = meta_gradient(grad, {"first": theta[:2], "rest": theta[2:]}, batches, lr, variant, delta)
    (a1, c1), (a2, c2), (a3, _) = batches
    adapted = theta - lr * a1 @ (theta - c1)
    expected = a2 @ (adapted - c2)  # FO: the outer gradient at the adapted point
    if variant == "hf":
        expected = (torch.eye(dim, dtype=torch.float64) - lr * a3) @ expected
    torch.testing.assert_close(torch.cat([meta["first"], meta["rest"]]), expected, rtol=1e-8, atol=1e-10)


def test_perfedavg_evaluates_every_client_after_one_inner_step_on_one_batch():
    sim = Simulation(tiny_config("perfedavg", "train.rounds=1"))
    metrics = sim.run_round()
    bs = sim.cfg.train.batch_size
    clients = range(sim.data.num_clients)
    local = sum(sim.data.num_samples(c) for c in clients)  # FO: each sample once per epoch (D or D')
    adaptation = sum(min(bs, sim.data.num_samples(c)) for c in clients)
    assert metrics["train_samples"] == local + adaptation
    # The adapted weights were evaluated and dropped: the server's model is still every client's model.
    sim.load_client(0)
    assert all(torch.equal(sim._entries[n], v) for n, v in sim.method.global_state.items())
    assert "global_test_acc_mean" in metrics


# -- FedBABU -------------------------------------------------------------------------------------


def test_fedbabu_head_stays_bit_identical_to_its_init_and_the_body_is_averaged():
    sim = Simulation(tiny_config("fedbabu", "train.rounds=3", "train.sample_fraction=0.5", *OPTIMIZER))
    head = head_entries(sim.model)
    assert set(sim.personal_names) == head
    init = _state(sim)
    rounds = recorded_updates(sim)
    result = sim.run()
    for c in range(sim.data.num_clients):  # trained or not, every client still holds the initial head
        assert all(torch.equal(sim.personal_state(c)[n], init[n]) for n in head)
    last = rounds[-1]
    assert all(set(u.params) == set(sim.shared_names) for u in last)  # the head is never sent
    expected = weighted_mean([u.params for u in last], [u.num_samples for u in last])
    for name, value in expected.items():
        torch.testing.assert_close(sim.method.global_state[name], value, rtol=1e-6, atol=1e-7)
        assert not torch.equal(value, init[name]) or name.endswith("cls_token")  # the body trained
    # Only the final evaluation fine-tuned the head: one epoch of every client's training split.
    tuned = [h["train_samples"] - sum(sim.data.num_samples(u.client) for u in r) for h, r in zip(result.history, rounds)]
    assert tuned[:-1] == [0, 0] and tuned[-1] == sum(sim.data.num_samples(c) for c in range(sim.data.num_clients))


def test_fedbabu_fine_tunes_only_the_head():
    sim = Simulation(tiny_config("fedbabu"))
    ctx = sim._finetune_context(0, final=True)
    (phase,) = sim.method.finetune_phases(sim.model, ctx)
    assert set(phase.params) == {n for n, _ in sim.model.named_parameters()} & head_entries(sim.model)
    assert not sim.method.finetune_phases(sim.model, sim._finetune_context(0, final=False))
    (local,) = sim.method.local_phases(sim.model, ctx)
    assert not set(local.params) & head_entries(sim.model)


# -- Ditto ---------------------------------------------------------------------------------------


def test_ditto_with_lambda_zero_trains_locals_personal_model():
    common = ["train.rounds=3", "train.sample_fraction=0.5", *OPTIMIZER]
    ditto = Simulation(tiny_config("ditto", "method.lam=0", *common))
    local = Simulation(tiny_config("local", *common))
    ditto.run(), local.run()
    assert set(ditto._personal) == set(local._personal) and len(local._personal) > 0
    for c in local._personal:
        mine = ditto.personal_state(c)
        for name, value in local.personal_state(c).items():  # the same batches give the same v
            torch.testing.assert_close(mine[f"{TWIN}.{name}"], value, rtol=0, atol=1e-7)


def test_ditto_with_a_very_large_lambda_keeps_v_at_the_received_w():
    # lambda * lr = 1, the largest explicit proximal step (Ditto's solver) that does not overshoot w:
    # one step then lands v at w - lr * grad F(v), however far v was; momentum is off.
    lr = tiny_config("ditto").train.lr
    sim = Simulation(tiny_config("ditto", f"method.lam={1 / lr}"))
    sim.load_client(0)
    twin = twin_of(sim.model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))  # v far from w
    v0 = {n: p.detach().clone() for n, p in twin.named_parameters()}
    w = {n: p.detach().clone() for n, p in sim.model.named_parameters() if not n.startswith(TWIN)}
    ctx = _ClientContext(sim, 0, round_index=1)
    personal, _ = sim.method.local_phases(sim.model, ctx)
    one_batch = sim.cfg.train.batch_size / sim.data.num_samples(0)
    sim.clients.run_phases(ctx, [dataclasses.replace(personal, epochs=one_batch)])

    x, y = next(sim.data.train_batches(0, one_batch, sim.cfg.train.batch_size, sim.batch_generator(1, 0)))
    leaves = {n: t.clone().requires_grad_(True) for n, t in v0.items()}
    grads = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(twin, leaves, (x,)), y), list(leaves.values()))
    moved = 0.0
    for (name, g), start in zip(zip(leaves, grads), v0.values()):
        after = twin.get_parameter(name).detach()
        torch.testing.assert_close(after, w[name] - lr * g, rtol=1e-5, atol=1e-6)
        moved += float((start - w[name]).pow(2).sum())
    distance = sum(float((twin.get_parameter(n).detach() - w[n]).pow(2).sum()) for n in v0)
    assert distance < 1e-3 * moved  # from far away to one data step from w


# -- Vanilla Attention ---------------------------------------------------------------------------


def test_attention_is_partial_over_every_attention_layer_and_the_head():
    attention = Simulation(tiny_config("attention", "train.rounds=2", "train.sample_fraction=0.5"))
    depth = attention.cfg.model.depth
    expected = {f"blocks.{i}.attn.{part}.{kind}" for i in range(depth) for part in ("qkv", "proj")
                for kind in ("weight", "bias")} | {"head.weight", "head.bias"}
    assert set(attention.personal_names) == expected
    partial = Simulation(tiny_config("partial", "method.personal=blocks.*.attn.*,head.*",
                                     "train.rounds=2", "train.sample_fraction=0.5"))
    # The same training code: the same run, bit for bit.
    a, p = attention.run(), partial.run()
    assert [{k: v for k, v in h.items() if k != "round_seconds"} for h in a.history] == \
        [{k: v for k, v in h.items() if k != "round_seconds"} for h in p.history]
    assert all(torch.equal(attention.method.global_state[n], v) for n, v in partial.method.global_state.items())


# -- clients trained together --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["apfl", "perfedavg", "ditto"])
def test_phases_with_their_own_step_or_penalty_train_one_client_at_a_time(method):
    sims = {k: Simulation(tiny_config(method, "train.rounds=1", f"train.parallel_clients={k}")) for k in (1, 4)}
    assert sims[4].parallel_clients == 4
    ctx = sims[1]._finetune_context(0, final=False)
    assert not all(p.batchable for p in sims[1].method.local_phases(sims[1].model, ctx))
    for sim in sims.values():
        sim.run_round()
    seq, together = sims[1], sims[4]
    assert all(torch.equal(together.method.global_state[n], v) for n, v in seq.method.global_state.items())
    for c in seq._personal:
        assert all(torch.equal(together.personal_state(c)[n], v) for n, v in seq.personal_state(c).items())
