"""Training compute in FLOPs: counted once per kind of step, checked against a hand count."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from pflbench.benchmark.engine import Simulation
from pflbench.benchmark.flops import count_flops
from pflbench.methods import METHODS


def _dims(sim: Simulation) -> dict[str, int]:
    model = sim.model
    conv = model.patch_embed.proj
    return {
        "N": model.patch_embed.num_patches, "T": model.patch_embed.num_patches + model.num_prefix_tokens,
        "D": model.embed_dim, "H": model.blocks[0].mlp.fc1.out_features, "K": model.num_classes,
        "C": conv.in_channels, "P": conv.kernel_size[0] * conv.kernel_size[1], "L": len(model.blocks),
    }


def hand_count(d: dict[str, int]) -> dict[str, int]:
    """A ViT's FLOPs per sample, by hand: 2 per multiply-add, the class token alone feeds the head."""
    N, T, D, H, K, C, P, L = (d[k] for k in "NTDHKCPL")
    patch = 2 * N * (C * P) * D
    linear = 2 * T * (D * 3 * D + D * D + D * H + H * D)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * T * T * D  # scores and the weighted sum of values, over all heads
    head = 2 * D * K
    forward = patch + L * (linear + attention) + head
    # Backward: each layer's input gradient and weight gradient cost its forward again, except the
    # patch embedding, whose input (the image) needs no gradient.
    train = 3 * forward - patch
    body_forward = forward - head
    return {"forward": forward, "train": train, "body_forward": body_forward, "head": head}


def test_train_flops_of_a_round_match_a_hand_count():
    sim = Simulation(tiny_config("fedavg", "train.rounds=1"))
    metrics = sim.run().history[-1]
    per_sample = hand_count(_dims(sim))["train"]
    assert metrics["train_flops"] == metrics["train_samples"] * per_sample
    assert metrics["server_flops"] == 0  # averaging does no matrix work


def test_fedreps_head_epochs_cost_one_body_pass_and_a_head_per_epoch():
    sim = Simulation(tiny_config("fedrep", "method.head_epochs=3", "train.rounds=1", "train.sample_fraction=0.25"))
    (client,) = sim.sample_clients()
    sim._sampler = __import__("numpy").random.default_rng(sim.seeds["sampling"])
    metrics = sim.run().history[-1]
    n = sim.data.num_samples(client)
    c = hand_count(_dims(sim))
    head_phase = n * c["body_forward"] + 3 * n * 2 * c["head"]  # features once; the head's forward and weight grad
    body_phase = n * (c["train"] - c["head"])  # the frozen head passes the gradient back but takes none
    assert metrics["train_flops"] == head_phase + body_phase


def test_flops_are_the_same_one_client_at_a_time_or_together():
    one = Simulation(tiny_config("fedperfix", "method.mid_dim=8", "train.rounds=1", "train.parallel_clients=1"))
    together = Simulation(tiny_config("fedperfix", "method.mid_dim=8", "train.rounds=1", "train.parallel_clients=4"))
    a, b = one.run().history[-1], together.run().history[-1]
    assert a["train_flops"] > 0 and a["train_flops"] == b["train_flops"]


def test_the_counter_runs_once_per_kind_of_step_not_per_batch(monkeypatch):
    from pflbench.benchmark import flops

    calls = []
    original = flops.step_flops
    monkeypatch.setattr(flops, "step_flops", lambda *a, **k: calls.append(1) or original(*a, **k))
    sim = Simulation(tiny_config("fedavg", "train.rounds=2", "train.local_epochs=2"))
    sim.run()
    assert len(calls) == 1  # one kind of step, one input shape, over 2 rounds of every client's batches


def test_server_flops_count_the_servers_own_matrix_work():
    sim = Simulation(tiny_config("pfedhn", "train.rounds=1"))
    metrics = sim.run().history[-1]
    assert metrics["server_flops"] > 0 and metrics["train_flops"] > 0


def test_count_flops_counts_a_matmul():
    a, b = torch.ones(3, 4), torch.ones(4, 5)
    out, flops = count_flops(torch.mm, a, b)
    assert flops == 2 * 3 * 4 * 5 and out.shape == (3, 5)
