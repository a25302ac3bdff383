"""Each personalized method checked by its defining invariant, on the tiny digits config."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pflbench.benchmark.client import _ClientContext
from pflbench.benchmark.engine import Callback, Simulation
from pflbench.benchmark.errors import UserError
from pflbench.benchmark.models import load_weights
from pflbench.methods import METHODS
from pflbench.methods.aggregation import state_bytes
from pflbench.methods.fedperfix import FedPerfix, FedPerfixOptions, PrefixQKV
from pflbench.methods.partial import SEARCHED_PERSONAL_SETS

# Method -> overrides that keep it fast; each has a non-empty personal part.
PERSONAL = {
    "fedper": [],
    "fedrep": ["method.head_epochs=1"],
    "fedbn": [],
    "fedperfix": ["method.mid_dim=8"],
    "partial": ["method.personal=blocks.1.*,head.*"],
}


def _run_round_capturing(sim: Simulation) -> dict[int, dict[str, torch.Tensor]]:
    """One round; returns each trained client's personal entries as they were right after its training."""
    selected: list[int] = []
    original = sim.sample_clients

    def sample():
        selected[:] = original()
        return list(selected)

    sim.sample_clients = sample
    trained: dict[int, dict[str, torch.Tensor]] = {}

    class Capture(Callback):
        def on_progress(self, round_index, done, total):
            trained[selected[done - 1]] = {n: sim._entries[n].detach().clone() for n in sim.personal_names}

    sim.run_round([Capture()])
    return trained


def _entries(sim: Simulation, names) -> dict[str, torch.Tensor]:
    return {n: sim._entries[n].detach().clone() for n in names}


@pytest.mark.parametrize("method", sorted(PERSONAL))
def test_personal_entries_stay_on_the_client_and_shared_ones_are_broadcast(method):
    sim = Simulation(tiny_config(method, *PERSONAL[method], "train.rounds=1"))
    assert sim.personal_names and sim.shared_names
    trained = _run_round_capturing(sim)
    assert sorted(trained) == list(range(sim.data.num_clients))

    # The server never holds a personal entry, so aggregation cannot overwrite one.
    assert set(sim.method.global_state) == set(sim.shared_names)
    for client, after_training in trained.items():
        kept = sim.personal_state(client)
        assert all(torch.equal(kept[n], after_training[n]) for n in sim.personal_names)

    loaded = {}
    for client in trained:
        sim.load_client(client)
        loaded[client] = (_entries(sim, sim.shared_names), _entries(sim, sim.personal_names))
        # What the client trains from next round: its own personal entries...
        assert all(torch.equal(loaded[client][1][n], trained[client][n]) for n in sim.personal_names)
        # ...and exactly the server's aggregate for everything else.
        assert all(torch.equal(loaded[client][0][n], sim.method.global_state[n]) for n in sim.shared_names)
    first, *others = trained
    for other in others:
        assert all(torch.equal(loaded[first][0][n], loaded[other][0][n]) for n in sim.shared_names)
        # Every personal entry was trained on different data, so it differs between clients.
        assert all(not torch.equal(loaded[first][1][n], loaded[other][1][n]) for n in sim.personal_names)


def _head_bytes(sim: Simulation) -> int:
    return sum(p.numel() * p.element_size() for p in sim.model.get_classifier().parameters())


def test_bytes_up_drop_by_exactly_the_personal_bytes():
    sims = {m: Simulation(tiny_config(m, "train.rounds=1", *PERSONAL.get(m, [])))
            for m in ("fedavg", "fedper", "fedperfix")}
    up = {m: sim.run().history[-1]["bytes_up"] for m, sim in sims.items()}
    clients = sims["fedavg"].data.num_clients
    for m, sim in sims.items():
        total = state_bytes(sim.model.state_dict())
        personal = state_bytes({n: sim._entries[n] for n in sim.personal_names})
        assert up[m] == clients * (total - personal)
    head = _head_bytes(sims["fedavg"])
    assert head > 0
    assert up["fedavg"] - up["fedper"] == clients * head
    # FedPerfix sends the plain ViT minus its head: its plugins never leave the client.
    assert up["fedavg"] - up["fedperfix"] == clients * head


def test_fedrep_trains_head_then_body_each_with_the_other_untouched(monkeypatch):
    sim = Simulation(tiny_config("fedrep", "method.head_epochs=2", "train.rounds=1"))
    model = sim.model
    head = {id(p) for p in model.get_classifier().parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    calls = []
    original = _ClientContext.train_epochs

    def spy(ctx, model, params, epochs, forward=None, features=None):
        params = list(params)
        grads_seen: set[str] = set()
        # A frozen parameter takes no hook: it cannot receive a gradient at all.
        hooks = [p.register_hook(lambda g, n=n: grads_seen.add(n))
                 for n, p in model.named_parameters() if p.requires_grad]
        before = copy.deepcopy(model.state_dict())
        try:
            stats = original(ctx, model, params, epochs, forward, features)
        finally:
            for h in hooks:
                h.remove()
        after = model.state_dict()
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        calls.append(({id(p) for p in params}, epochs, changed, grads_seen, stats.samples, features))
        return stats

    monkeypatch.setattr(_ClientContext, "train_epochs", spy)
    sim.run_round()
    assert len(calls) == 2 * sim.data.num_clients
    head_names = {names[i] for i in head}
    body_names = set(names.values()) - head_names
    for head_call, body_call in zip(calls[::2], calls[1::2]):
        h_ids, h_epochs, h_changed, h_grads, h_n, h_features = head_call
        b_ids, b_epochs, b_changed, b_grads, b_n, b_features = body_call
        # Head phase: only the head is optimized, on features; no gradient reaches the body, which is bit-identical.
        assert h_ids == head and h_epochs == 2 and h_features is not None
        assert h_grads == head_names and h_changed == head_names
        # Body phase: the client's budget of train.local_epochs; the head gets no gradient and is bit-identical.
        assert b_ids == {id(p) for p in model.parameters()} - head and b_epochs == sim.cfg.train.local_epochs
        assert b_features is None
        assert b_grads == body_names and b_changed == body_names
        assert h_n == 2 * b_n  # two head epochs, one body epoch, over the same data
    assert all(p.requires_grad for p in model.parameters())  # the freeze is undone


def test_fedrep_head_epochs_train_on_body_features_computed_once_without_augmentation(monkeypatch):
    sim = Simulation(tiny_config("fedrep", "method.head_epochs=3", "train.rounds=1", "train.sample_fraction=0.25"))
    (client,) = sim.sample_clients()
    sim._sampler = np.random.default_rng(sim.seeds["sampling"])  # the round samples that client again
    model = sim.model
    bodies = []
    original = type(model).forward_features

    def counting(self, x, **kwargs):
        bodies.append(len(x))
        return original(self, x, **kwargs)

    monkeypatch.setattr(type(model), "forward_features", counting)
    trained: list[torch.Tensor] = []
    head = model.get_classifier()
    head.register_forward_pre_hook(lambda m, args: trained.append(args[0].detach().clone()) if m.training else None)
    start = {n: t.clone() for n, t in sim.method.global_state.items()}
    sim.run_round()
    n, bs = sim.data.num_samples(client), sim.cfg.train.batch_size
    # (Passes of one sample are the FLOP counter's probes.) The head phase ran the body once over the
    # client's training images in one evaluation-sized batch; the body phase then once per batch.
    passes = [b for b in bodies if b > 1 or n % bs == 1]
    body_batches = math.ceil(n / bs) * sim.cfg.train.local_epochs
    assert passes[0] == n
    assert all(b <= bs for b in passes[1 : 1 + body_batches])
    assert sum(passes[1 : 1 + body_batches]) == n * sim.cfg.train.local_epochs
    # Those features are the round's broadcast body on the unaugmented images.
    with torch.no_grad():
        for name, value in start.items():
            sim._entries[name].copy_(value)
        images = torch.cat([x for x, _ in sim.data.eval_batches(client, "train", 512)])
        expected = model.forward_head(original(model, images), pre_logits=True)
    head_batches = torch.cat([t for t in trained if len(t) > 1][: 3 * math.ceil(n / bs)])
    assert head_batches.shape[0] == 3 * n
    # Each head epoch is a shuffle of the client's features: compare the rows as sorted sets.
    assert torch.allclose(head_batches.sort(0).values, expected.repeat(3, 1).sort(0).values, atol=1e-5)


def _fedrep_schedule(monkeypatch, *overrides: str) -> tuple[list[float], dict[str, float]]:
    """The epochs of each train_epochs call of one FedRep round, and the round's metrics."""
    sim = Simulation(tiny_config("fedrep", "train.rounds=1", "train.sample_fraction=0.25", *overrides))
    epochs = []
    original = _ClientContext.train_epochs

    def spy(ctx, model, params, n, forward=None, features=None):
        epochs.append(n)
        return original(ctx, model, params, n, forward, features)

    monkeypatch.setattr(_ClientContext, "train_epochs", spy)
    return epochs, sim.run_round()


def test_fedrep_is_collins_schedule_ten_head_epochs_then_the_body_budget(monkeypatch):
    epochs, metrics = _fedrep_schedule(monkeypatch, "train.local_epochs=3")
    assert epochs == [10, 3]  # the reference's 10 head epochs, then the body for train.local_epochs
    fedavg = Simulation(tiny_config("fedavg", "train.rounds=1", "train.sample_fraction=0.25", "train.local_epochs=3"))
    plain = fedavg.run_round()
    # train_samples counts the head's epochs too; train_flops shows they are cheap: the body is the cost.
    assert metrics["train_samples"] == plain["train_samples"] * 13 / 3
    assert plain["train_flops"] < metrics["train_flops"] < 1.5 * plain["train_flops"]
    assert _fedrep_schedule(monkeypatch, "method.head_epochs=0", "train.local_epochs=2")[0][-1:] == [2]


def test_fedbn_personalizes_exactly_the_layernorm_parameters():
    sim = Simulation(tiny_config("fedbn"))
    expected = {f"{mod_name}.{p_name}" for mod_name, mod in sim.model.named_modules()
                if isinstance(mod, nn.LayerNorm) for p_name, _ in mod.named_parameters()}
    # Two per block (norm1, norm2) plus the final norm, each with weight and bias.
    assert len(expected) == 2 * (2 * sim.cfg.model.depth + 1)
    assert set(sim.personal_names) == expected


def _plain_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=3, num_heads=2)


def test_fedperfix_adds_one_plugin_per_block_keeping_the_vit_entry_names(tmp_path):
    plain = _plain_vit()
    method = FedPerfix(FedPerfixOptions(name="fedperfix", mid_dim=8, personal_blocks=1))
    model = method.adapt_model(copy.deepcopy(plain))
    plugins = [m for m in model.modules() if isinstance(m, PrefixQKV)]
    assert len(plugins) == 3 and all(isinstance(b.attn.qkv, PrefixQKV) for b in model.blocks)
    plugin_entries = {f"blocks.{i}.attn.qkv.plugin.{k}" for i in range(3) for k in
                      ("0.weight", "0.bias", "2.weight", "2.bias")}
    assert set(model.state_dict()) == set(plain.state_dict()) | plugin_entries
    # A plain ViT checkpoint loads into the adapted model; only the plugins stay at their init.
    torch.save(plain.state_dict(), tmp_path / "vit.pt")
    assert set(load_weights(model, tmp_path / "vit.pt")) == plugin_entries
    last_block = {n for n in model.state_dict() if n.startswith("blocks.2.")}
    personal = method.personal_entries(model)
    assert personal == plugin_entries | {"head.weight", "head.bias"} | last_block


def test_fedperfix_with_zero_plugins_is_the_plain_vit_and_uses_fused_attention(monkeypatch):
    plain = _plain_vit().eval()
    model = FedPerfix(FedPerfixOptions(name="fedperfix", mid_dim=8)).adapt_model(copy.deepcopy(plain)).eval()
    x = torch.rand(5, 1, 8, 8)

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    assert all(b.attn.fused_attn for b in model.blocks)
    with torch.no_grad():
        expected = plain(x)
        plain_qkv = seen[:]
        seen.clear()
        live = model(x)
        live_qkv = seen[:]
        for qkv in model.modules():
            if isinstance(qkv, PrefixQKV):
                nn.init.zeros_(qkv.plugin[-1].weight)
                nn.init.zeros_(qkv.plugin[-1].bias)
        seen.clear()
        zeroed = model(x)
    assert len(plain_qkv) == len(live_qkv) == len(seen) == 3  # one fused attention call per block
    assert torch.equal(zeroed, expected)
    assert not torch.allclose(live, expected)
    # The plugin shifts keys and values only; the first block's queries are unchanged.
    (q0, k0, v0), (q1, k1, v1) = plain_qkv[0], live_qkv[0]
    assert torch.equal(q0, q1) and not torch.allclose(k0, k1) and not torch.allclose(v0, v1)


def test_fedperfix_rejects_more_personal_blocks_than_the_model_has():
    with pytest.raises(UserError, match="method.personal_blocks"):
        Simulation(tiny_config("fedperfix", "method.personal_blocks=3"))


def test_partial_with_the_head_is_exactly_fedper():
    runs = {}
    for method, extra in (("fedper", []), ("partial", ["method.personal=head.*"])):
        sim = Simulation(tiny_config(method, *extra, seed=3))
        result = sim.run()
        runs[method] = (sim, [{k: v for k, v in h.items() if k != "round_seconds"} for h in result.history])
    (per, per_hist), (part, part_hist) = runs["fedper"], runs["partial"]
    assert per.personal_names == part.personal_names == ["head.weight", "head.bias"]
    assert per_hist == part_hist
    assert all(torch.equal(per.method.global_state[n], part.method.global_state[n]) for n in per.shared_names)
    for client in range(per.data.num_clients):
        a, b = per.personal_state(client), part.personal_state(client)
        assert all(torch.equal(a[n], b[n]) for n in per.personal_names)


def test_partial_takes_a_comma_list_of_globs():
    sim = Simulation(tiny_config("partial", "method.personal=blocks.*.attn.*,head.*"))
    attn = {n for n in sim.model.state_dict() if ".attn." in n}
    assert len(attn) == 4 * sim.cfg.model.depth  # qkv and proj, weight and bias, per block
    assert set(sim.personal_names) == attn | {"head.weight", "head.bias"}


@pytest.mark.parametrize("patterns", SEARCHED_PERSONAL_SETS)
def test_every_personal_set_tuning_searches_keeps_the_head_and_one_part_of_every_block(patterns):
    sim = Simulation(tiny_config("partial", f"method.personal={patterns}"))
    part = patterns.split(",")[0].split(".")[2] if "," in patterns else None  # attn, norm*, mlp
    names = set(sim.model.state_dict())
    expected = {"head.weight", "head.bias"}
    if part is not None:
        expected |= {n for n in names if n.startswith("blocks.") and n.split(".")[2].startswith(part.rstrip("*"))}
        assert {int(n.split(".")[1]) for n in expected - {"head.weight", "head.bias"}} == set(range(sim.cfg.model.depth))
    assert set(sim.personal_names) == expected
    assert set(sim.method.global_state).isdisjoint(expected)


def test_partial_pattern_matching_nothing_is_a_user_error_naming_it():
    with pytest.raises(UserError, match=r"'blocks\.\*\.atn\.\*' matches no parameter"):
        Simulation(tiny_config("partial", "method.personal=head.*,blocks.*.atn.*"))


def test_partial_without_patterns_is_a_user_error():
    with pytest.raises(UserError, match="method.personal is empty"):
        tiny_config("partial", "method.personal=")


@pytest.mark.parametrize("key,value", [
    ("fedrep", "method.head_epochs=-1"),
    ("fedperfix", "method.mid_dim=-1"), ("fedperfix", "method.scale=-1"), ("fedperfix", "method.personal_blocks=-1"),
])
def test_bad_method_options_name_the_key(key, value):
    with pytest.raises(UserError, match=value.split("=")[0]):
        tiny_config(key, value)


class FakeTrial:
    """Records every suggestion and answers the lowest value (or the first choice)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def suggest_float(self, name, low, high, *, log=False):
        self.calls.append(("float", name, low, high, log))
        return low

    def suggest_int(self, name, low, high, *, log=False):
        self.calls.append(("int", name, low, high, log))
        return low

    def suggest_categorical(self, name, choices):
        self.calls.append(("categorical", name, list(choices)))
        return choices[0]


def test_fedrep_and_fedperfix_search_spaces_leave_their_budget_alone():
    trial = FakeTrial()
    assert METHODS.get("fedrep").search_space(trial) == {} and not trial.calls
    assert METHODS.get("fedrep").budget_keys == ("method.head_epochs",)
    trial = FakeTrial()
    assert METHODS.get("fedperfix").search_space(trial) == {"method.scale": 0.25, "method.personal_blocks": 0}
    assert [c[:2] for c in trial.calls] == [("float", "method.scale"), ("int", "method.personal_blocks")]
    assert trial.calls[0][2] <= 1.5 <= trial.calls[0][3]  # the reference value
    assert "method.mid_dim" in METHODS.get("fedperfix").budget()


@pytest.mark.parametrize("overrides,expected", [
    ((), 64),  # cpu-cifar10's width 96: 2/3 of it
    (("model.embed_dim=384", "model.num_heads=6"), 256),  # ViT-S's width: the reference's 256
    (("method.mid_dim=100",), 100),  # an explicit value wins
])
def test_fedperfix_plugin_width_scales_with_the_model(overrides, expected):
    cfg = tiny_config("fedperfix", "model.embed_dim=96", "model.num_heads=4", *overrides)
    assert cfg.method.mid_dim == expected
    sim = Simulation(cfg)
    plugins = [m for m in sim.model.modules() if isinstance(m, PrefixQKV)]
    assert plugins and all(p.plugin[0].out_features == expected for p in plugins)


def test_the_paper_presets_resolve_fedperfix_to_the_reference_width():
    from pflbench.benchmark.resolve import resolve_config

    assert resolve_config("fedperfix", "cifar100", preset="paper-cifar100").method.mid_dim == 256
