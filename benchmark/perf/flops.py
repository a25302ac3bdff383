"""Each method's training FLOPs per round at a preset's full model size, counted without data or training.

The model is built at the preset's size, the method adds its modules, and
each of its local phases is counted on a probe sample (forward and backward
of what the phase trains, as the engine counts `train_flops`). A round is
then `sampled clients x client training samples x` those per-sample counts
(a phase on features adds one forward pass of the features). The final
round's fine-tuning (fedavg_ft) is shown apart, as it happens once a run.

    bench perf flops --dataset cifar100 --preset paper-cifar100 --classes 100 --client-samples 703
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ...methods import METHODS
from ..flops import client_update_flops, step_flops
from ..models import build_model
from ..resolve import RunSpec


@dataclass
class MethodCost:
    """One method's capacity and compute at the preset's size."""

    method: str
    parameters: int
    personal_parameters: int
    forward_per_sample: int  # FLOPs of one sample through the personalized model, inference only
    train_per_client: float  # FLOPs of one client's local update
    round_flops: float  # sampled clients x train_per_client
    final_finetune_flops: float  # fine-tuning before the final evaluation, every client, once a run


def _cost(method: str, spec: RunSpec, dataset: str, classes: int, channels: int, client_samples: float,
          clients: int, native_size: int) -> MethodCost:
    cfg = spec.resolve(method, dataset)
    torch.manual_seed(0)
    size = cfg.model.image_size or native_size
    m = METHODS.get(method)(cfg.method)
    model = m.adapt_model(build_model(cfg.model, image_size=size, in_chans=channels, num_classes=classes))
    personal = m.personal_entries(model)
    entries = model.state_dict(keep_vars=True)
    train, finetune = client_update_flops(m, model, cfg.train, channels, size, client_samples)
    sampled = max(1, int(round(cfg.train.sample_fraction * cfg.data.num_clients))) if clients <= 0 else clients
    model.eval()
    x = torch.zeros(1, channels, size, size)
    return MethodCost(method, sum(p.numel() for p in model.parameters()),
                      sum(entries[n].numel() for n in personal), step_flops(model, None, x, backward=False),
                      train, sampled * train, finetune * cfg.data.num_clients)


def measure(methods: Sequence[str], spec: RunSpec, dataset: str, *, classes: int, channels: int,
            client_samples: float, clients: int = 0, native_size: int = 32) -> list[MethodCost]:
    """The cost of each method in `methods` at `spec`'s settings (clients 0 = the preset's sampled count;
    `native_size`: the images' side where the config leaves `model.image_size` at 0)."""
    return [_cost(m, spec, dataset, classes, channels, client_samples, clients, native_size) for m in methods]
