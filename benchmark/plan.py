"""`bench plan SUITE.toml`: the runs a suite will do, and the GPU hours they need, from FLOP counts.

The estimate of one run: the FLOPs of one client's local update, counted as
the engine counts `train_flops` (`flops.client_update_flops`: every phase of
the method, its own modules, steps, feature passes and second models
included), per training sample of an epoch, times the samples the run trains:
rounds x sampled clients x local epochs x a client's training split.
The split comes from the partition itself when the dataset is loaded (datasets
that publish no size: digits, image folders), else from the published size
(`DatasetEntry.num_samples`) split evenly. GPU hours follow at a stated share
of a GPU's peak throughput. Evaluation, fine-tuning before the final one and the
server's work are left out (forward passes over the test splits, a few
percent). A tuning study adds `trials` runs of `tune_rounds` rounds per
method and setting (an upper bound: pruned trials stop early).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..datasets import DATASETS, partition_for
from ..methods import METHODS
from .config import RunConfig
from .errors import UserError
from .flops import client_update_flops, count_flops
from .models import build_model
from .sweep import Suite, SweepItem, load_suite, skip_finished
from .tracking import default_tracking_uri

H100_BF16_TFLOPS = 989.0  # an H100 SXM's dense bf16 peak, from NVIDIA's datasheet
UTILIZATION = 0.4  # the share of that peak a ViT training step is assumed to sustain


def train_flops_per_sample(model: nn.Module, batch_size: int, in_chans: int, image_size: int) -> float:
    """FLOPs of one forward + backward (cross-entropy) of `model` on a batch of `batch_size`, per sample.

    `model` may live on the meta device: the count needs shapes only.
    """
    device = next(model.parameters()).device
    x = torch.zeros(batch_size, in_chans, image_size, image_size, device=device)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    return count_flops(lambda: F.cross_entropy(model(x), y).backward())[1] / batch_size


@dataclass
class DataShape:
    """What the estimate needs of a run's data: images, classes and each client's training split."""

    image_size: int
    in_chans: int
    num_classes: int
    train_per_client: float  # mean training samples of a client
    source: str  # "partition" or "published size"


@dataclass
class PlannedRun:
    """One run of the suite, with its estimated training compute."""

    item: SweepItem
    data: DataShape
    rounds: int
    clients_per_round: int
    local_epochs: int
    flops_per_sample: float

    @property
    def samples(self) -> float:
        """Samples trained over the whole run (local training)."""
        return self.rounds * self.clients_per_round * self.local_epochs * self.data.train_per_client

    @property
    def flops(self) -> float:
        return self.samples * self.flops_per_sample


@dataclass
class Plan:
    """A suite's runs and their cost at `peak_tflops` x `utilization`."""

    suite: Suite
    runs: list[PlannedRun]
    peak_tflops: float
    utilization: float
    trials: int = 0  # tuning trials per method and setting (0: no tuning)
    tune_rounds: int = 0  # rounds of a tuning trial
    tuning_flops: float = 0.0
    unregistered: list[str] = field(default_factory=list)  # methods named by the suite, not registered here

    @property
    def to_run(self) -> list[PlannedRun]:
        return [r for r in self.runs if r.item.status != "skipped"]

    @property
    def flops(self) -> float:
        """FLOPs of the final runs still to do."""
        return sum(r.flops for r in self.to_run)

    def gpu_hours(self, flops: float) -> float:
        """Hours of one GPU for `flops` at the stated throughput."""
        return flops / (self.peak_tflops * 1e12 * self.utilization) / 3600


def _data_shape(cfg: RunConfig, cache: dict) -> DataShape:
    """The run's data shape: from the partition when the dataset publishes no size, else from its size."""
    entry = DATASETS.get(cfg.dataset.name)
    d = cfg.data
    train_share = 1 - d.val_fraction - d.test_fraction
    if entry.num_samples and entry.num_classes and cfg.model.image_size:
        per_client = entry.num_samples * train_share / d.num_clients
        return DataShape(cfg.model.image_size, getattr(cfg.dataset, "channels", 3), entry.num_classes,
                         per_client, f"published size {entry.num_samples:,}")
    key = repr(cfg.dataset)
    if key not in cache:
        cache[key] = entry.load(cfg.dataset)
    images = cache[key]
    partition = partition_for(images, d, cfg.seed)
    sizes = [len(t) for t in partition.train]
    _, height, _, channels = images.images.shape
    return DataShape(cfg.model.image_size or height, channels, images.num_classes, sum(sizes) / len(sizes),
                     "partition")


def _flops(cfg: RunConfig, method: str, data: DataShape, cache: dict) -> float:
    """FLOPs per training sample of one local epoch: the method's whole local update (its own steps,
    feature passes and second models included, as `train_flops` counts them) over its samples."""
    key = (method, repr(cfg.model), repr(cfg.method), repr(cfg.train), data.image_size, data.in_chans,
           data.num_classes, data.train_per_client)
    if key not in cache:
        torch.manual_seed(0)
        m = METHODS.get(method)(cfg.method)
        model = m.adapt_model(build_model(cfg.model, image_size=data.image_size, in_chans=data.in_chans,
                                          num_classes=data.num_classes))
        update, _ = client_update_flops(m, model, cfg.train, data.in_chans, data.image_size, data.train_per_client)
        cache[key] = update / max(cfg.train.local_epochs * data.train_per_client, 1e-9)
    return cache[key]


def plan_suite(suite_path: str | Path, *, tracking_uri: str | None = None, experiment: str = "pflbench",
               data_root: str | None = None, peak_tflops: float = H100_BF16_TFLOPS,
               utilization: float = UTILIZATION, trials: int = 0, tune_rounds: int = 0) -> Plan:
    """Every run of the suite (finished ones marked skipped) with its estimated FLOPs.

    A method the suite names but this install does not register is planned as the plain
    model and listed in `Plan.unregistered` (the sweep itself refuses the suite).
    """
    if not 0 < utilization <= 1:
        raise UserError(f"bad --utilization {utilization}: must be in (0, 1]")
    if trials < 0 or tune_rounds < 0:
        raise UserError("bad --trials or --tune-rounds: must be >= 0")
    uri = tracking_uri or default_tracking_uri()
    with tempfile.TemporaryDirectory() as tmp:
        suite = load_suite(suite_path, tracking_uri=uri, experiment=experiment, config_folder=Path(tmp),
                           data_root=data_root, allow_unregistered=True)
        skip_finished(suite, uri, suite.experiment or experiment)
    images: dict = {}
    counted: dict = {}
    runs = []
    for item in suite.items:
        method = item.method if item.registered else "fedavg"
        cfg = item.spec.resolve(method, item.dataset)
        data = _data_shape(cfg, images)
        t = cfg.train
        clients = max(1, int(round(t.sample_fraction * (cfg.data.num_clients - cfg.data.novel_clients))))
        runs.append(PlannedRun(item, data, t.rounds, clients, t.local_epochs, _flops(cfg, method, data, counted)))
    plan = Plan(suite, runs, peak_tflops, utilization, trials, tune_rounds,
                unregistered=sorted({r.item.method for r in runs if not r.item.registered}))
    if trials:
        first = {}
        for r in runs:  # one study per method and setting: its cost per round, times trials x tune_rounds
            first.setdefault((r.item.method, r.item.dataset, r.item.spec.overrides, r.item.spec.preset), r)
        plan.tuning_flops = sum(trials * tune_rounds * r.flops / max(r.rounds, 1) for r in first.values())
    return plan


def suite_studies(suite_path: str | Path, *, tracking_uri: str | None = None,
                  experiment: str = "pflbench") -> list[tuple[str, str, str]]:
    """(method, dataset, preset) of each tuning study the suite's runs need, in the suite's order."""
    uri = tracking_uri or default_tracking_uri()
    with tempfile.TemporaryDirectory() as tmp:
        suite = load_suite(suite_path, tracking_uri=uri, experiment=experiment, config_folder=Path(tmp))
    out: dict[tuple[str, str, str], None] = {}
    for item in suite.items:
        out[(item.method, item.dataset, item.spec.preset or DATASETS.get(item.dataset).default_preset or "")] = None
    return list(out)
