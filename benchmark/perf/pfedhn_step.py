"""How one round of pFedHN server steps moves each client's generated weights, at a preset's full model size.

No data is read and nothing is trained: the model is built at the preset's
size, the server is initialized, and each of the round's sampled clients in
turn is sent its generated weights and returns a random change (N(0, scale^2))
of every generated tensor: "independent" (each client its own direction) or
"correlated" (half of it a direction shared by the round). The server steps
as it does in a run (one step per client update, at the configured `hn_lr`)
but plainly: no momentum, decay or clipping unless `--set` says otherwise.
Measured after the round, reported per mode as means over the round's clients:

- `cosine`, `size_ratio`: the client's whole move (base + deviation) against its change;
- `deviation_cosine`, `deviation_size_ratio`: the hypernetwork's own part of the move
  (the move minus the base's) against the client's residual (its change minus the
  round's mean change), i.e. how far the step personalizes.

    bench perf pfedhn-step --preset cpu-cifar10 --dataset imagefolder --classes 10
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ...methods import METHODS, ClientUpdate
from ..models import build_model
from ..resolve import RunSpec

MODES = ("independent", "correlated")
PLAIN_STEP = ["method.momentum=0", "method.weight_decay=0", "method.max_grad_norm=0"]


@dataclass
class StepAlignment:
    """One server step under one kind of client change, averaged over the round's clients."""

    mode: str
    clients: int  # sampled clients in the round
    chunks: int
    generated: int  # generated values (the base's size)
    hn_parameters: int
    cosine: float
    size_ratio: float
    deviation_cosine: float
    deviation_size_ratio: float


def _flat(tensors: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1).float() for n in names])


def measure(spec: RunSpec, dataset: str, num_classes: int, *, scale: float = 1e-3, seed: int = 0,
            modes: Sequence[str] = MODES, say: Callable[[str], None] = lambda line: None) -> list[StepAlignment]:
    """One round of plain pFedHN server steps per mode; see the module doc."""
    plain = dataclasses.replace(spec, overrides=(*PLAIN_STEP, *spec.overrides))  # the user's --set wins
    cfg = plain.resolve("pfedhn", dataset)
    torch.manual_seed(seed)
    model = build_model(cfg.model, image_size=cfg.model.image_size or 32, in_chans=3, num_classes=num_classes)
    probe = METHODS.get("pfedhn")(cfg.method)
    model = probe.adapt_model(model)
    personal = probe.personal_entries(model)
    shared = {n: t for n, t in model.state_dict().items() if n not in personal}
    num_clients = cfg.data.num_clients
    k = max(1, round(cfg.train.sample_fraction * num_clients))
    results = []
    for mode in modes:
        say(f"{mode}: server set-up for {num_clients} clients, {k} a round")
        torch.manual_seed(seed)  # the same hypernetwork for every mode
        method = METHODS.get("pfedhn")(cfg.method)
        method.server_init(model, shared, num_clients)
        names = method.targets
        gen = torch.Generator().manual_seed(seed + 1)
        common = {n: torch.randn(shared[n].shape, generator=gen) for n in names}
        updates = []
        base_before = method.hn.base_flat().clone()
        start = {c: _flat(method.broadcast(c), names) for c in range(k)}  # moves are measured from the round's start
        method.start_aggregation()
        for client in range(k):  # as the engine does: each client is sent what the server generates now
            sent = {n: t.clone() for n, t in method.broadcast(client).items()}
            after = dict(sent)
            for n in names:
                own = torch.randn(sent[n].shape, generator=gen)
                if mode == "correlated":
                    own = (own + common[n]) / math.sqrt(2)
                after[n] = sent[n] + scale * own.to(sent[n].dtype)
            updates.append(ClientUpdate(client, 100, sent, after))
            method.add_update(updates[-1])
        method.finish_aggregation()
        base_move = method.hn.base_flat() - base_before
        changes = [_flat(u.params, names) - _flat(u.sent, names) for u in updates]
        mean_change = torch.stack(changes).mean(0)
        cos, ratio, dev_cos, dev_ratio = [], [], [], []
        for update, change in zip(updates, changes):
            move = _flat(method.broadcast(update.client), names) - start[update.client]
            cos.append(float(torch.nn.functional.cosine_similarity(move, change, dim=0)))
            ratio.append(float(move.norm() / change.norm()))
            deviation, residual = move - base_move, change - mean_change
            dev_cos.append(float(torch.nn.functional.cosine_similarity(deviation, residual, dim=0)))
            dev_ratio.append(float(deviation.norm() / residual.norm()))
        info = method.run_info()
        results.append(StepAlignment(
            mode, k, int(info["hn_chunks"]), int(info["hn_generated_parameters"]), int(info["hn_parameters"]),
            sum(cos) / k, sum(ratio) / k, sum(dev_cos) / k, sum(dev_ratio) / k,
        ))
    return results
