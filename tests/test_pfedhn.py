"""pFedHN: the chunked hypernetwork, its server update, FedAvg for the rest, novel clients."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
from conftest import recorded_updates, tiny_config

from pflbench.benchmark.resolve import resolve_config
from pflbench.benchmark.engine import Simulation
from pflbench.benchmark.errors import UserError
from pflbench.benchmark.models import build_model
from pflbench.methods import METHODS, ClientUpdate
from pflbench.methods.pfedhn import ChunkedHypernetwork, PFedHN, round_gradients
from pflbench.methods.structure import head_entries

# A small hypernetwork so every simulation here takes about a second.
SMALL_HN = ["method.hidden_dim=8", "method.n_hidden=1", "method.chunk_size=96", "method.embed_dim=3"]
QKV_PROJ = {f"blocks.{i}.attn.{part}.weight" for i in range(2) for part in ("qkv", "proj")}
HEAD = {"head.weight", "head.bias"}
TARGETS = QKV_PROJ | HEAD  # the default: attention weights and, in variant hn, the classifier


def small_sim(*overrides: str, seed: int = 0) -> Simulation:
    return Simulation(tiny_config("pfedhn", *SMALL_HN, *overrides, seed=seed))


def tiny_hn(num_clients: int = 3) -> ChunkedHypernetwork:
    torch.manual_seed(0)
    shapes = {"a.weight": (3, 4), "b.weight": (5,), "c.weight": (2, 2)}
    return ChunkedHypernetwork(num_clients, shapes, embed_dim=2, hidden_dim=3, n_hidden=1, chunk_size=4).double()


def synthetic_updates(sim: Simulation, clients=(0, 2, 3)) -> list[ClientUpdate]:
    """Updates as if `clients` had trained: their broadcast plus seeded noise, with unequal sample counts."""
    gen = torch.Generator().manual_seed(5)
    updates = []
    for i, client in enumerate(clients):
        sent = sim.method.broadcast(client)
        params = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in sent.items()}
        updates.append(ClientUpdate(client, 10 * (i + 1), sent, params))
    return updates


def test_generated_tensors_match_the_targets_by_name_and_shape():
    sim = small_sim()
    method = sim.method
    # Default target: every block's qkv and proj weight, and the classifier head (the paper generates it).
    assert set(method.targets) == TARGETS == QKV_PROJ | head_entries(sim.model)
    sent = method.broadcast(1)
    entries = sim.model.state_dict()
    assert set(sent) == set(sim.shared_names)
    for name in TARGETS:
        assert sent[name].shape == entries[name].shape
    assert not TARGETS & set(method.global_state)  # the targets come only from the hypernetwork
    # Different clients get different generated weights (different embeddings).
    assert not torch.equal(sent["blocks.0.attn.qkv.weight"], method.broadcast(0)["blocks.0.attn.qkv.weight"])


def test_generated_weights_start_at_the_model_plus_a_small_deviation():
    sim = small_sim()
    # The engine seeds the global RNG before building; rebuild to read the initial targets.
    torch.manual_seed(sim.seeds["init"])
    model = build_model(sim.cfg.model, image_size=sim.data.image_size, in_chans=sim.data.in_chans,
                        num_classes=sim.data.num_classes)
    targets = sim.method.targets
    initial = torch.cat([model.state_dict()[n].flatten() for n in targets])
    hn = sim.method.hn
    # The shared base starts at the model's own initial weights ...
    assert torch.equal(hn.base.detach(), initial)
    # ... and each client's deviation at init_deviation (0.1) of their RMS.
    generated = torch.stack([
        torch.cat([sim.method.broadcast(c)[n].flatten() for n in targets]) for c in range(sim.data.num_clients)
    ])
    deviation = generated - initial
    assert torch.allclose(deviation.square().mean().sqrt(), 0.1 * initial.square().mean().sqrt(), rtol=1e-4)
    # The generator's input is normalized: E ||h * c_j||^2 = 1 over clients and chunks.
    with torch.no_grad():
        h = hn.body(hn.embeddings.weight)
        features = (h[:, None, :] * hn.chunk_embeddings[None]).square().sum(-1)
    assert torch.allclose(features.mean(), torch.tensor(1.0), rtol=1e-4)


def _explicit_gradients(hn, clients, deltas, weights):
    """J^T delta from the full Jacobian (torch.func.jacrev), built per client and summed by hand."""
    names = [n for n, _ in hn.named_parameters()]
    params = {n: p.detach() for n, p in hn.named_parameters()}
    total = sum(weights)
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for client, delta, weight in zip(clients, deltas, weights):
        def flat_generated(p, client=client):
            gen = torch.func.functional_call(hn, p, (client,))
            return torch.cat([g.flatten() for g in gen.values()])

        jac = torch.func.jacrev(flat_generated)(params)  # name -> (N, *param shape)
        d = torch.cat([delta[n].flatten() for n in hn.shapes])
        for name in names:
            vjp = torch.tensordot(d, jac[name], dims=1)
            scale = 1.0 if name == "embeddings.weight" else weight / total
            out[name] += scale * vjp
    return out


def _random_deltas(hn, count: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """One random float64 change per client for every generated tensor."""
    return [{n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in hn.shapes.items()} for _ in range(count)]


def test_server_gradient_equals_the_explicit_vector_jacobian_product():
    hn = tiny_hn()
    clients, weights = [0, 2], [3.0, 1.0]
    deltas = _random_deltas(hn, len(clients), torch.Generator().manual_seed(1))
    got = round_gradients(hn, clients, deltas, weights)
    expected = _explicit_gradients(hn, clients, deltas, weights)
    assert set(got) == set(expected) == {n for n, _ in hn.named_parameters()}
    for name in got:
        assert torch.allclose(got[name], expected[name], atol=1e-12), name
    # Only the round's clients' embedding rows receive a gradient.
    assert torch.count_nonzero(got["embeddings.weight"][1]) == 0
    assert torch.count_nonzero(got["embeddings.weight"][0]) > 0


def test_server_gradient_matches_finite_differences():
    hn = tiny_hn()
    gen = torch.Generator().manual_seed(2)
    clients, weights = [1, 2], [2.0, 5.0]
    deltas = _random_deltas(hn, len(clients), gen)
    grads = round_gradients(hn, clients, deltas, weights)
    total = sum(weights)

    def objective(shared_scale: bool) -> float:
        # <generated, delta>, weighted like the server weights each part.
        with torch.no_grad():
            value = 0.0
            for c, d, w in zip(clients, deltas, weights):
                g = hn(c)
                value += (w / total if shared_scale else 1.0) * sum(float((g[n] * d[n]).sum()) for n in g)
            return value

    eps = 1e-6
    params = dict(hn.named_parameters())
    for name, param in params.items():
        direction = torch.randn(param.shape, generator=gen, dtype=torch.float64)
        shared_scale = name != "embeddings.weight"
        with torch.no_grad():
            param.add_(direction, alpha=eps)
            plus = objective(shared_scale)
            param.sub_(direction, alpha=2 * eps)
            minus = objective(shared_scale)
            param.add_(direction, alpha=eps)
        numeric = (plus - minus) / (2 * eps)
        analytic = float((grads[name] * direction).sum())
        assert math.isclose(numeric, analytic, rel_tol=1e-6, abs_tol=1e-8), name


def test_hypernetwork_grows_only_by_chunk_embeddings():
    small = small_sim()
    large = small_sim("method.target=blocks.*.attn.qkv.weight,blocks.*.attn.proj.weight,blocks.*.mlp.fc1.weight")
    a, b = small.method.hn, large.method.hn
    entries = small.model.state_dict()
    extra = sum(entries[f"blocks.{i}.mlp.fc1.weight"].numel() for i in range(2))
    assert b.num_generated == a.num_generated + extra
    assert a.num_generated == sum(entries[n].numel() for n in TARGETS)
    chunks = [math.ceil(n / 96) for n in (a.num_generated, b.num_generated)]
    assert (a.num_chunks, b.num_chunks) == tuple(chunks) and chunks[1] > chunks[0]
    hidden = 8
    assert b.num_hypernetwork_parameters() - a.num_hypernetwork_parameters() == (chunks[1] - chunks[0]) * hidden
    # The count reported at run start is that number, from the architecture alone.
    embed, n_hidden, chunk = 3, 1, 96
    body = embed * hidden + hidden + n_hidden * (hidden * hidden + hidden)
    info = large.method.run_info()
    assert info["hn_parameters"] == body + hidden * chunk + chunks[1] * hidden  # the generator has no bias
    assert info["hn_chunks"] == chunks[1]
    assert info["hn_client_embedding_parameters"] == embed * large.data.num_clients
    # The base is one value per generated value, counted apart from the hypernetwork.
    assert info["hn_base_parameters"] == b.num_generated == b.base.numel()


def test_untargeted_entries_are_aggregated_exactly_as_fedavg():
    sim = small_sim()
    updates = synthetic_updates(sim)
    sim.method.aggregate(updates)
    fedavg = METHODS.get("fedavg")()
    untargeted = [n for n in sim.shared_names if n not in TARGETS]
    fedavg.server_init(sim.model, {n: updates[0].params[n] for n in untargeted}, sim.data.num_clients)
    fedavg.aggregate([
        ClientUpdate(u.client, u.num_samples, {n: u.sent[n] for n in untargeted}, {n: u.params[n] for n in untargeted})
        for u in updates
    ])
    assert set(sim.method.global_state) == set(untargeted)
    for name in untargeted:
        assert torch.equal(sim.method.global_state[name], fedavg.global_state[name]), name
    # And independently of FedAvg's code: the sample-weighted mean.
    total = sum(u.num_samples for u in updates)
    name = "blocks.0.attn.qkv.bias"
    mean = sum(u.params[name] * (u.num_samples / total) for u in updates)
    assert torch.allclose(sim.method.global_state[name], mean, atol=1e-6)


def test_a_server_step_moves_the_generated_weights_towards_the_returned_ones():
    sim = small_sim("method.momentum=0", "method.weight_decay=0", "method.max_grad_norm=0", "method.hn_lr=0.001")
    updates = synthetic_updates(sim)
    sim.method.aggregate(updates)
    for update in updates:
        new = sim.method.broadcast(update.client)
        moved = sum(float(((new[n] - update.sent[n]) * (update.params[n] - update.sent[n])).sum()) for n in TARGETS)
        assert moved > 0, update.client


def test_the_base_takes_fedavgs_step():
    sim = small_sim("method.base_lr=1", "method.momentum=0")
    updates = synthetic_updates(sim)
    hn = sim.method.hn
    before = hn.base.detach().clone()
    sim.method.aggregate(updates)
    total = sum(u.num_samples for u in updates)
    step = sum(
        (u.num_samples / total) * torch.cat([(u.params[n] - u.sent[n]).flatten() for n in sim.method.targets])
        for u in updates
    )
    assert torch.allclose(hn.base.detach(), before + step, atol=1e-6)


def test_the_hypernetworks_own_step_never_overshoots_the_delta():
    # The base frozen (a negligible step): what remains is the hypernetwork's move, lr J J^T delta / lambda_max.
    sim = small_sim("method.base_lr=1e-12", "method.hn_lr=1", "method.momentum=0", "method.weight_decay=0",
                    "method.max_grad_norm=0")
    (update,) = synthetic_updates(sim, clients=(0,))
    sim.method.aggregate([update])
    new = sim.method.broadcast(0)
    moved = torch.cat([(new[n] - update.sent[n]).flatten() for n in sim.method.targets])
    delta = torch.cat([(update.params[n] - update.sent[n]).flatten() for n in sim.method.targets])
    assert float(moved @ delta) > 0
    assert 0.01 < float(moved.norm() / delta.norm()) <= 1.05  # power iteration may undershoot lambda a little
    assert sim.method.run_info()["hn_step_eigenvalue"] == sim.method.step_eigenvalue > 0


def _vit_s_targets(num_classes: int = 100) -> dict[str, tuple[int, ...]]:
    """The generated shapes of variant hn on paper-cifar100's ViT-S/16: qkv, proj and the head."""
    dim, depth = 384, 12
    shapes = {}
    for i in range(depth):
        shapes[f"blocks.{i}.attn.qkv.weight"] = (3 * dim, dim)
        shapes[f"blocks.{i}.attn.proj.weight"] = (dim, dim)
    return shapes | {"head.weight": (num_classes, dim), "head.bias": (num_classes,)}


def test_a_server_step_follows_the_clients_at_the_paper_cifar100_chunk_count():
    """ViT-S/16 targets (3,475 chunks of 2,048), 8 of 64 clients a round, one plain step at hn_lr = 1."""
    cfg = resolve_config("pfedhn", "cifar100", preset="paper-cifar100", overrides=[
        "method.hidden_dim=8", "method.n_hidden=1", "method.hn_lr=1", "method.momentum=0", "method.weight_decay=0",
        "method.max_grad_norm=0"])
    shapes = _vit_s_targets()
    torch.manual_seed(0)
    model = _TargetsOnly(shapes)
    method = PFedHN(cfg.method)
    method.server_init(model, dict(model.state_dict()), 64)
    assert method.hn.num_chunks == math.ceil(sum(math.prod(s) for s in shapes.values()) / 2048) == 3475
    gen = torch.Generator().manual_seed(3)
    common = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    updates = []
    for client in range(8):
        sent = {n: t.clone() for n, t in method.broadcast(client).items()}
        # Half a direction all clients share, half the client's own.
        params = {n: t + 1e-3 * (common[n] + torch.randn(t.shape, generator=gen)) for n, t in sent.items()}
        updates.append(ClientUpdate(client, 100 + 10 * client, sent, params))
    method.aggregate(updates)
    for update in updates:
        new = method.broadcast(update.client)
        moved = torch.cat([(new[n] - update.sent[n]).flatten() for n in shapes])
        delta = torch.cat([(update.params[n] - update.sent[n]).flatten() for n in shapes])
        cosine = float(torch.nn.functional.cosine_similarity(moved, delta, dim=0))
        ratio = float(moved.norm() / delta.norm())
        assert cosine > 0.5, (update.client, cosine)
        assert 0.3 < ratio < 2, (update.client, ratio)  # the delta's order of size, not 10x to 100x


class _TargetsOnly(torch.nn.Module):
    """A stand-in with a ViT's target names and shapes and a timm-style classifier hook (no forward)."""

    def __init__(self, shapes):
        super().__init__()
        self.blocks = torch.nn.Module()
        for name, shape in shapes.items():
            *path, leaf = name.split(".")
            node = self
            for part in path:
                if not hasattr(node, part):
                    node.add_module(part, torch.nn.Module())
                node = getattr(node, part)
            node.register_parameter(leaf, torch.nn.Parameter(0.02 * torch.randn(shape)))

    def get_classifier(self):
        return self.head


def test_pc_variant_keeps_the_head_personal():
    sim = small_sim("method.variant=pc")
    assert set(sim.personal_names) == head_entries(sim.model)
    assert set(sim.method.targets) == QKV_PROJ  # the head is on the client, not generated
    assert not set(sim.personal_names) & set(sim.method.broadcast(0))
    assert set(small_sim().personal_names) == set()
    with pytest.raises(UserError, match="method.target"):
        small_sim("method.variant=pc", "method.target=head.weight")


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
    assert run.data.tags["pflbench.info.hn_parameters"] == str(sim.method.hn.num_hypernetwork_parameters())
    assert run.data.metrics["novel_test_acc_mean"] == pytest.approx(result.held_out_metrics["novel_test_acc_mean"])


@pytest.mark.parametrize(("key", "value"), [
    ("variant", "xx"), ("chunk_size", "0"), ("hn_lr", "0"), ("momentum", "1"), ("novel_rounds", "0"),
    ("target", ","),
])
def test_bad_options_name_the_key(key, value):
    with pytest.raises(UserError, match=f"method.{key}"):
        tiny_config("pfedhn", f"method.{key}={value}")


def test_a_target_matching_nothing_names_the_key():
    with pytest.raises(UserError, match="method.target"):
        small_sim("method.target=blocks.*.nothing")


class FakeTrial:
    """Records what a search space asks for and answers with the first choice / the low end."""

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
    assert set(space) == set(trial.asked) == {"method.hn_lr", "method.embed_dim", "method.hidden_dim",
                                              "method.chunk_size"}
    assert trial.asked["method.hn_lr"][3] is True  # a learning rate is searched on a log scale
    cfg = resolve_config("pfedhn", "digits", preset="smoke", overrides=[f"{k}={v}" for k, v in space.items()])
    assert cfg.method.chunk_size == space["method.chunk_size"] and cfg.method.hn_lr == space["method.hn_lr"]
