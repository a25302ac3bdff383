"""pFedHN: the generated personal part, the paper's per-client server step, FedAvg for the rest, novel clients."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
from conftest import recorded_updates, tiny_config
from torch import nn

from pflbench.benchmark.errors import UserError
from pflbench.benchmark.models import build_model
from pflbench.benchmark.resolve import resolve_config
from pflbench.benchmark.engine import Simulation
from pflbench.methods import METHODS, ClientUpdate
from pflbench.methods.pfedhn import Hypernetwork, PFedHN, PFedHNOptions, client_gradient, round_gradients
from pflbench.methods.structure import head_entries, norm_entries

# A small hypernetwork so every simulation here takes about a second.
SMALL_HN = ["method.hidden_dim=8", "method.n_hidden=1", "method.embed_dim=3"]
HEAD = {"head.weight", "head.bias"}
NORMS = {f"blocks.{i}.{norm}.{p}" for i in range(2) for norm in ("norm1", "norm2") for p in ("weight", "bias")} | {
    "norm.weight", "norm.bias"}
TARGETS = HEAD | NORMS  # the default personal part: the head (variant hn) and every norm's affine parameters


def small_sim(*overrides: str, seed: int = 0) -> Simulation:
    return Simulation(tiny_config("pfedhn", *SMALL_HN, *overrides, seed=seed))


def flat(tensors, names) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in names])


def tiny_hn(num_clients: int = 3, chunk_size: int = 0) -> Hypernetwork:
    """A float64 hypernetwork whose output weights are random, so every parameter has a gradient."""
    torch.manual_seed(0)
    shapes = {"a.weight": (3, 4), "b.weight": (5,), "c.weight": (2, 2)}
    hn = Hypernetwork(num_clients, shapes, embed_dim=2, hidden_dim=3, n_hidden=1, chunk_size=chunk_size).double()
    with torch.no_grad():
        for p in hn.generator_parameters():
            p.normal_()
    return hn


def synthetic_updates(sim: Simulation, clients=(0, 2, 3)) -> list[ClientUpdate]:
    """Updates as if `clients` had trained: their broadcast plus seeded noise, with unequal sample counts."""
    gen = torch.Generator().manual_seed(5)
    updates = []
    for i, client in enumerate(clients):
        sent = sim.method.broadcast(client)
        params = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in sent.items()}
        updates.append(ClientUpdate(client, 10 * (i + 1), sent, params))
    return updates


# -- what is generated ---------------------------------------------------------------


def test_the_generated_part_is_the_head_and_the_norms_and_every_client_starts_at_the_model():
    sim = small_sim()
    method = sim.method
    assert set(method.targets) == TARGETS == head_entries(sim.model) | norm_entries(sim.model)
    assert not TARGETS & set(method.global_state)  # generated only, never averaged
    assert set(method.global_state) == set(sim.shared_names) - TARGETS  # the rest is FedAvg's
    torch.manual_seed(sim.seeds["init"])  # the engine seeds the global RNG before building; rebuild the initial model
    model = build_model(sim.cfg.model, image_size=sim.data.image_size, in_chans=sim.data.in_chans,
                        num_classes=sim.data.num_classes)
    initial = model.state_dict()
    for client in range(sim.data.num_clients):  # no random initial deviation
        sent = method.broadcast(client)
        assert set(sent) == set(sim.shared_names)
        for name in TARGETS:
            assert torch.equal(sent[name], initial[name]), (client, name)


def test_each_generated_tensor_has_its_own_linear_output_whose_bias_is_the_base():
    sim = small_sim()
    hn, targets = sim.method.hn, sim.method.targets
    entries = sim.model.state_dict()
    assert hn.num_chunks == 0 and len(hn.outputs) == len(targets)
    for name, layer in zip(targets, hn.outputs):
        assert isinstance(layer, nn.Linear) and layer.in_features == 8 and layer.out_features == entries[name].numel()
        assert torch.count_nonzero(layer.weight) == 0  # starts at the base
    assert torch.equal(hn.base_flat(), flat(sim.method.broadcast(0), targets))
    # The counts reported at run start, from the architecture alone.
    info = sim.method.run_info()
    size = sum(entries[n].numel() for n in TARGETS)
    body = 3 * 8 + 8 + 1 * (8 * 8 + 8)
    assert info["hn_generated_parameters"] == info["hn_base_parameters"] == size
    assert info["hn_parameters"] == body + 8 * size  # the output weights, the base apart
    assert info["hn_chunks"] == 0
    assert info["hn_client_embedding_parameters"] == 3 * sim.data.num_clients


def test_at_vit_s_the_generated_part_is_under_100k_values():
    cfg = resolve_config("pfedhn", "cifar100", preset="paper-cifar100")
    torch.manual_seed(0)
    model = build_model(cfg.model, image_size=cfg.model.image_size, in_chans=3, num_classes=100)
    method = PFedHN(cfg.method)
    method.server_init(model, dict(model.state_dict()), 64)
    sizes = model.state_dict()
    generated = sum(sizes[n].numel() for n in method.targets)
    # The head (384 x 100 + 100) and two LayerNorms per block plus the final one (2 x 384 values each).
    assert generated == 384 * 100 + 100 + (2 * 12 + 1) * 2 * 384 <= 100_000
    assert set(method.targets) == head_entries(model) | norm_entries(model)
    assert method.hn.num_chunks == 0  # the paper's per-tensor outputs, no chunking


def test_pc_variant_keeps_the_head_personal_and_generates_the_norms():
    sim = small_sim("method.variant=pc")
    assert set(sim.personal_names) == head_entries(sim.model)
    assert set(sim.method.targets) == NORMS
    assert not set(sim.personal_names) & set(sim.method.broadcast(0))
    assert set(small_sim().personal_names) == set()
    with pytest.raises(UserError, match="method.target"):
        small_sim("method.variant=pc", "method.target=head.weight")
    with pytest.raises(UserError, match="method.norms"):
        small_sim("method.variant=pc", "method.norms=false")


def test_a_large_target_needs_chunks_and_then_grows_the_hypernetwork_only_by_chunk_embeddings():
    attention = "method.target=blocks.*.attn.qkv.weight,blocks.*.attn.proj.weight"
    with pytest.raises(UserError, match="method.chunk_size"):
        small_sim(attention, "method.hidden_dim=100000")  # per-tensor outputs would be too large
    small = small_sim(attention, "method.chunk_size=96")
    large = small_sim(attention + ",blocks.*.mlp.fc1.weight", "method.chunk_size=96")
    a, b = small.method.hn, large.method.hn
    entries = small.model.state_dict()
    extra = sum(entries[f"blocks.{i}.mlp.fc1.weight"].numel() for i in range(2))
    assert b.num_generated == a.num_generated + extra
    chunks = [math.ceil(n / 96) for n in (a.num_generated, b.num_generated)]
    assert (a.num_chunks, b.num_chunks) == tuple(chunks)
    assert b.num_generator_parameters() - a.num_generator_parameters() == (chunks[1] - chunks[0]) * 8
    assert torch.equal(flat(large.method.broadcast(1), large.method.targets), b.base_flat())  # starts at the base


# -- the server math -----------------------------------------------------------------


def _explicit_vjp(hn, client, delta):
    """J^T delta from the full Jacobian (torch.func.jacrev), by parameter name."""
    params = {n: p.detach() for n, p in hn.named_parameters()}

    def flat_generated(p):
        gen = torch.func.functional_call(hn, p, (client,))
        return torch.cat([g.flatten() for g in gen.values()])

    jac = torch.func.jacrev(flat_generated)(params)  # name -> (N, *param shape)
    d = torch.cat([delta[n].flatten() for n in hn.shapes])
    return {name: torch.tensordot(d, jac[name], dims=1) for name in params}


def _random_deltas(hn, count: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """One random float64 change per client for every generated tensor."""
    return [{n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in hn.shapes.items()} for _ in range(count)]


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_server_gradients_equal_the_explicit_vector_jacobian_product(chunk_size):
    hn = tiny_hn(chunk_size=chunk_size)
    clients, weights = [0, 2], [3.0, 1.0]
    deltas = _random_deltas(hn, len(clients), torch.Generator().manual_seed(1))
    explicit = [_explicit_vjp(hn, c, d) for c, d in zip(clients, deltas)]
    names = {n for n, _ in hn.named_parameters()}
    # One client's gradient (the per-client step): every parameter, the base included.
    got = client_gradient(hn, clients[0], deltas[0])
    assert set(got) == names
    for name in names:
        assert torch.allclose(got[name], explicit[0][name], atol=1e-12), name
    assert torch.count_nonzero(got["embeddings.weight"][1:]) == 0  # only the client's own row
    # The round's gradient (step=round): the weighted mean, the embedding rows each their own.
    got = round_gradients(hn, clients, deltas, weights)
    for name in names:
        if name == "embeddings.weight":
            expected = explicit[0][name] + explicit[1][name]
        else:
            expected = (weights[0] * explicit[0][name] + weights[1] * explicit[1][name]) / sum(weights)
        assert torch.allclose(got[name], expected, atol=1e-12), name
    assert torch.count_nonzero(got["embeddings.weight"][1]) == 0


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_server_gradient_matches_finite_differences(chunk_size):
    hn = tiny_hn(chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(2)
    (delta,) = _random_deltas(hn, 1, gen)
    grads = client_gradient(hn, 1, delta)

    def objective() -> float:  # <generated, delta>: its gradient is J^T delta
        with torch.no_grad():
            g = hn(1)
            return sum(float((g[n] * delta[n]).sum()) for n in g)

    eps = 1e-6
    for name, param in hn.named_parameters():
        direction = torch.randn(param.shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            param.add_(direction, alpha=eps)
            plus = objective()
            param.sub_(direction, alpha=2 * eps)
            minus = objective()
            param.add_(direction, alpha=eps)
        numeric = (plus - minus) / (2 * eps)
        analytic = float((grads[name] * direction).sum())
        assert math.isclose(numeric, analytic, rel_tol=1e-6, abs_tol=1e-8), name


def test_the_paper_optimizer_is_the_default():
    opts = PFedHNOptions(name="pfedhn")
    assert (opts.hn_lr, opts.momentum, opts.weight_decay, opts.max_grad_norm) == (1e-2, 0.9, 1e-3, 50.0)
    assert opts.step == "client" and opts.chunk_size == 0 and opts.norms
    method = small_sim().method
    for opt in (method.hn_optimizer, method.embed_optimizer):  # embedding lr = lr
        (group,) = opt.param_groups
        assert (group["lr"], group["momentum"], group["weight_decay"]) == (1e-2, 0.9, 1e-3)
    # One optimizer steps the whole hypernetwork, its base (the output biases) included.
    stepped = {id(p) for opt in (method.hn_optimizer, method.embed_optimizer) for p in opt.param_groups[0]["params"]}
    assert stepped == {id(p) for p in method.hn.parameters()}


def _sgd_step(params, grads, lr, weight_decay, clip=0.0):
    """The first step of SGD with momentum (its buffer is the gradient), after clipping, by hand."""
    if clip:
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
        grads = {n: g * min(1.0, clip / (norm + 1e-6)) for n, g in grads.items()}
    return {n: p - lr * (grads[n] + weight_decay * p) for n, p in params.items()}


def test_each_client_update_takes_one_server_step_as_it_arrives():
    sim = small_sim()
    method, hn = sim.method, sim.method.hn
    first, second = synthetic_updates(sim, clients=(0, 2))[:2]
    method.start_aggregation()
    before = {n: p.detach().clone() for n, p in hn.named_parameters()}
    expected = _sgd_step(before, client_gradient(hn, 0, method._delta(first)), 1e-2, 1e-3)
    method.add_update(first)  # stepped now, before the round ends
    for name, p in hn.named_parameters():
        assert torch.allclose(p.detach(), expected[name], atol=1e-7), name
    # The next client's gradient is taken at the stepped hypernetwork; the round's end adds no step.
    stepped = {n: p.detach().clone() for n, p in hn.named_parameters()}
    method.add_update(second)
    assert any(not torch.equal(p.detach(), stepped[n]) for n, p in hn.named_parameters())
    after_second = {n: p.detach().clone() for n, p in hn.named_parameters()}
    method.finish_aggregation()
    for name, p in hn.named_parameters():
        assert torch.equal(p.detach(), after_second[name]), name
    # The client moved towards what it returned.
    new = method.broadcast(0)
    moved = flat(new, method.targets) - flat(first.sent, method.targets)
    change = flat(first.params, method.targets) - flat(first.sent, method.targets)
    assert float(moved @ change) > 0


def test_a_large_server_gradient_is_clipped_to_50():
    sim = small_sim()
    method, hn = sim.method, sim.method.hn
    (update,) = synthetic_updates(sim, clients=(1,))
    update.params.update({n: update.sent[n] + 100.0 for n in method.targets})  # a huge change
    grads = client_gradient(hn, 1, method._delta(update))
    assert math.sqrt(sum(float(g.square().sum()) for g in grads.values())) > 50
    before = {n: p.detach().clone() for n, p in hn.named_parameters()}
    expected = _sgd_step(before, grads, 1e-2, 1e-3, clip=50.0)
    method.aggregate([update])
    for name, p in hn.named_parameters():
        assert torch.allclose(p.detach(), expected[name], atol=1e-6), name


def test_the_round_step_takes_one_step_on_the_rounds_mean_gradient():
    sim = small_sim("method.step=round")
    method, hn = sim.method, sim.method.hn
    updates = synthetic_updates(sim)
    before = {n: p.detach().clone() for n, p in hn.named_parameters()}
    grads = round_gradients(hn, [u.client for u in updates], [method._delta(u) for u in updates],
                            [u.num_samples for u in updates])
    method.start_aggregation()
    for update in updates:
        method.add_update(update)
        for name, p in hn.named_parameters():  # nothing steps until the round ends
            assert torch.equal(p.detach(), before[name]), name
    method.finish_aggregation()
    expected = _sgd_step(before, grads, 1e-2, 1e-3)
    for name, p in hn.named_parameters():
        assert torch.allclose(p.detach(), expected[name], atol=1e-7), name


def test_ungenerated_entries_are_aggregated_exactly_as_fedavg():
    sim = small_sim()
    updates = synthetic_updates(sim)
    sim.method.aggregate(updates)
    fedavg = METHODS.get("fedavg")()
    rest = [n for n in sim.shared_names if n not in TARGETS]
    fedavg.server_init(sim.model, {n: updates[0].params[n] for n in rest}, sim.data.num_clients)
    fedavg.aggregate([
        ClientUpdate(u.client, u.num_samples, {n: u.sent[n] for n in rest}, {n: u.params[n] for n in rest})
        for u in updates
    ])
    assert set(sim.method.global_state) == set(rest)
    for name in rest:
        assert torch.equal(sim.method.global_state[name], fedavg.global_state[name]), name
    total = sum(u.num_samples for u in updates)
    name = "blocks.0.attn.qkv.weight"  # and independently of FedAvg's code: the sample-weighted mean
    mean = sum(u.params[name] * (u.num_samples / total) for u in updates)
    assert torch.allclose(sim.method.global_state[name], mean, atol=1e-6)


# -- it personalizes ---------------------------------------------------------------------


class _Toy(nn.Module):
    """A stand-in with a norm and a timm-style head: 52 generated values."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def get_classifier(self):
        return self.head


# A client trains on the quadratic loss 1/2 ||w - w*_c||^2 with the paper's local schedule
# (50 SGD steps at lr 5e-3), so it returns w + RHO (w*_c - w).
RHO = 1 - (1 - 5e-3) ** 50


def _visits_to_personal_optima(step: str, budget: int, clients: int = 8, target: float = 0.9) -> tuple[int | None, float]:
    """Full-participation rounds of the default server (only `step` set) on synthetic clients whose optima
    are independent N(0, 1) draws. Returns the first visit count at which every client's generated
    weights have cosine >= `target` with its own optimum (None within `budget`), and the worst cosine then."""
    torch.manual_seed(0)
    model = _Toy()
    method = PFedHN(PFedHNOptions(name="pfedhn", step=step))
    method.server_init(model, dict(model.state_dict()), clients)
    names = method.targets
    gen = torch.Generator().manual_seed(1)
    optima = [{n: torch.randn(t.shape, generator=gen) for n, t in model.state_dict().items()} for _ in range(clients)]
    worst = -1.0
    for visit in range(1, budget + 1):
        method.start_aggregation()
        for c in range(clients):  # one at a time, as the engine trains them
            sent = dict(method.broadcast(c))
            after = {n: sent[n] + RHO * (optima[c][n] - sent[n]) for n in sent}
            method.add_update(ClientUpdate(c, 10, sent, after))
        method.finish_aggregation()
        worst = min(float(nn.functional.cosine_similarity(flat(method.broadcast(c), names), flat(optima[c], names),
                                                          dim=0)) for c in range(clients))
        if worst >= target:
            return visit, worst
    return None, worst


def test_the_generated_weights_reach_each_clients_own_optimum_in_fewer_visits_than_round_averaged_steps():
    budget = 80  # visits per client
    visits, worst = _visits_to_personal_optima("client", budget)
    # The optima are independent: one shared solution would have cosine about 1/sqrt(8) with each.
    assert visits is not None and worst >= 0.9, worst
    averaged, averaged_worst = _visits_to_personal_optima("round", visits)
    assert averaged is None and averaged_worst < 0.9, averaged_worst  # not there in as many visits


# -- novel clients, seeds, records, options ------------------------------------------------


def test_novel_clients_are_never_trained_and_never_update_the_hypernetwork():
    sim = small_sim("data.novel_clients=1", "train.sample_fraction=0.67", "method.novel_rounds=2")
    novel = sim.held_out
    assert len(novel) == 1
    rounds = recorded_updates(sim)
    snapshots = {}
    fit = sim.method.fit_held_out

    def fit_and_snapshot(clients, train_client):
        snapshots["before"] = {k: v.clone() for k, v in sim.method.hn.state_dict().items()}
        fit(clients, train_client)
        snapshots["after"] = {k: v.clone() for k, v in sim.method.hn.state_dict().items()}

    sim.method.fit_held_out = fit_and_snapshot
    result = sim.run()
    assert len(rounds) == 2 and all(u.client not in novel for r in rounds for u in r)
    before, after = snapshots["before"], snapshots["after"]
    for name in before:
        if name != "embeddings.weight":
            assert torch.equal(before[name], after[name]), name
    others = [c for c in range(sim.data.num_clients) if c not in novel]
    assert torch.equal(before["embeddings.weight"][others], after["embeddings.weight"][others])
    assert not torch.equal(before["embeddings.weight"][novel], after["embeddings.weight"][novel])
    # The round metrics leave the novel client out; its own accuracy is reported apart.
    assert all(result.final.test_count[c] == 0 for c in novel)
    assert all(result.held_out.test_count[c] > 0 for c in novel)
    assert 0 <= result.held_out_metrics["novel_test_acc_mean"] <= 1


def test_novel_clients_must_leave_some_to_train():
    with pytest.raises(UserError, match="data.novel_clients"):
        small_sim("data.novel_clients=4")


def test_a_seed_fixes_the_run():
    def run(seed):
        sim = small_sim("data.novel_clients=1", "method.novel_rounds=1", "train.rounds=1", seed=seed)
        result = sim.run()
        history = [{k: v for k, v in h.items() if k != "round_seconds"} for h in result.history]
        return history, result.held_out_metrics, sim.held_out, sim.method.hn.state_dict()

    first, second, other = run(3), run(3), run(4)
    assert first[:3] == second[:3]
    assert all(torch.equal(first[3][k], second[3][k]) for k in first[3])
    assert first[0] != other[0]


def test_run_info_and_novel_accuracy_are_recorded(tracking_uri):
    from pflbench.benchmark.tracking import RunRecorder

    sim = small_sim("data.novel_clients=1", "method.novel_rounds=1", "train.rounds=1")
    recorder = RunRecorder(tracking_uri, "t")
    with recorder:
        result = sim.run([recorder])
    run = mlflow.MlflowClient(tracking_uri).get_run(recorder.run_id)
    assert run.data.tags["pflbench.info.hn_parameters"] == str(sim.method.hn.num_generator_parameters())
    assert run.data.metrics["novel_test_acc_mean"] == pytest.approx(result.held_out_metrics["novel_test_acc_mean"])


@pytest.mark.parametrize(("key", "value"), [
    ("variant", "xx"), ("step", "xx"), ("chunk_size", "-1"), ("hn_lr", "0"), ("momentum", "1"), ("novel_rounds", "0"),
])
def test_bad_options_name_the_key(key, value):
    with pytest.raises(UserError, match=f"method.{key}"):
        tiny_config("pfedhn", f"method.{key}={value}")


def test_a_target_matching_nothing_names_the_key():
    with pytest.raises(UserError, match="method.target"):
        small_sim("method.target=blocks.*.nothing")


class FakeTrial:
    """Records what a search space asks for and answers with the low end / the last choice."""

    def __init__(self):
        self.asked: dict[str, tuple] = {}

    def suggest_float(self, name, low, high, *, log=False):
        self.asked[name] = ("float", low, high, log)
        return low

    def suggest_int(self, name, low, high, *, log=False):
        self.asked[name] = ("int", low, high, log)
        return low

    def suggest_categorical(self, name, choices):
        self.asked[name] = ("categorical", tuple(choices))
        return choices[-1]


def test_search_space_suggests_valid_options():
    trial = FakeTrial()
    space = PFedHN.search_space(trial)
    assert set(space) == set(trial.asked) == {"method.hn_lr", "method.embed_lr", "method.hidden_dim"}
    assert trial.asked["method.hn_lr"][3] and trial.asked["method.embed_lr"][3]  # learning rates on a log scale
    cfg = resolve_config("pfedhn", "digits", preset="smoke", overrides=[f"{k}={v}" for k, v in space.items()])
    assert cfg.method.hn_lr == space["method.hn_lr"] and cfg.method.hidden_dim == space["method.hidden_dim"]
