"""`bench plan`: the runs of a suite and their GPU hours from FLOP counts, before anything trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pflbench.benchmark.cli import main
from pflbench.benchmark.models import build_model
from pflbench.benchmark.plan import plan_suite, train_flops_per_sample
from pflbench.benchmark.resolve import resolve_config
from pflbench.datasets import DATASETS, partition_for

from conftest import TINY


def _tiny_vit(device: str):
    cfg = resolve_config("fedavg", "digits", preset="smoke", overrides=TINY)
    with torch.device(device):
        return build_model(cfg.model, image_size=8, in_chans=1, num_classes=10)


def test_a_samples_flops_are_one_forward_and_backward_counted_on_the_meta_device():
    per_sample = train_flops_per_sample(_tiny_vit("meta"), 32, 1, 8)
    model = _tiny_vit("cpu")
    for module in model.modules():  # explicit matmuls: the CPU's fused attention backward is not counted by torch
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    with FlopCounterMode(display=False) as forward:
        logits = model(x)
    with FlopCounterMode(display=False) as backward:
        F.cross_entropy(logits, y).backward()
    # The same count as real tensors give, forward and backward (about twice the forward) together.
    assert per_sample * 32 == forward.get_total_flops() + backward.get_total_flops()
    assert 2.5 < per_sample * 32 / forward.get_total_flops() < 3.5


def _suite(path, methods: str, overrides=TINY) -> str:
    listed = ", ".join(f'"{o}"' for o in overrides)
    path.write_text(f'seeds = [0, 1]\nmethods = [{methods}]\n[[run]]\ndataset = "digits"\npreset = "smoke"\n'
                    f"overrides = [{listed}]\n")
    return str(path)


def test_the_plan_counts_each_runs_samples_from_its_partition_and_its_models_flops(tracking_uri, tmp_path):
    suite = _suite(tmp_path / "suite.toml", '"fedavg", "fedperfix"', [*TINY, "train.sample_fraction=0.5",
                                                                         "data.novel_clients=1"])
    plan = plan_suite(suite, peak_tflops=100.0, utilization=0.5)
    assert [(r.item.method, r.item.seed) for r in plan.runs] == [("fedavg", 0), ("fedavg", 1), ("fedperfix", 0),
                                                                 ("fedperfix", 1)]
    for run in plan.runs:
        cfg = run.item.spec.resolve(run.item.method, "digits")
        partition = partition_for(DATASETS.get("digits").load(cfg.dataset), cfg.data, cfg.seed)
        mean_train = sum(len(t) for t in partition.train) / partition.num_clients
        assert run.data.source == "partition" and run.data.train_per_client == pytest.approx(mean_train)
        # 2 rounds x round(0.5 x 3 training clients) x 1 epoch x a client's training samples
        assert run.samples == pytest.approx(2 * 2 * 1 * mean_train)
        assert run.flops == pytest.approx(run.samples * run.flops_per_sample)
    fedavg, fedperfix = plan.runs[0], plan.runs[2]
    assert fedperfix.flops_per_sample > fedavg.flops_per_sample  # the plugins are counted
    assert plan.gpu_hours(plan.flops) == pytest.approx(plan.flops / (100e12 * 0.5) / 3600)


def test_published_sizes_stand_in_for_files_not_there(tracking_uri, tmp_path):
    suite = tmp_path / "paper.toml"
    suite.write_text('seeds = [0]\nmethods = ["fedavg"]\n[[run]]\ndataset = "cifar100"\npreset = "paper-cifar100"\n')
    plan = plan_suite(str(suite), data_root=str(tmp_path / "nothing-here"))
    (run,) = plan.runs
    assert run.data.source == "published size 60,000" and run.data.num_classes == 100
    assert run.data.train_per_client == pytest.approx(60_000 * 0.75 / 64)  # no val split; 25% test
    assert (run.rounds, run.clients_per_round, run.local_epochs) == (50, 8, 10)


def test_an_unregistered_method_is_planned_then_refused(capsys, tracking_uri, tmp_path):
    suite = _suite(tmp_path / "suite.toml", '"fedavg", "notamethod"')
    assert main(["plan", suite]) == 2
    out, err = capsys.readouterr()
    assert "planned as the plain model: notamethod" in " ".join(out.split()) and "runs=4 to_run=4" in out
    assert err.count("\n") == 1 and "notamethod" in err
    assert main(["sweep", suite, "--quiet"]) == 2  # the sweep refuses the suite outright
    assert "unknown method 'notamethod'" in capsys.readouterr().err
