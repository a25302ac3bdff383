"""The benchmarks run end to end at tiny settings (their numbers are not checked here: speed is not a test)."""

from __future__ import annotations

import re

from pflbench.benchmark.cli import main
from pflbench.benchmark.perf.memory import measure


def test_gpu_benchmark_runs_tiny_on_the_cpu(capsys):
    assert main(["perf", "gpu", "--tiny", "--threads", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"tight loop [\d.]+ samples/s, engine [\d.]+ samples/s, ratio [\d.]+", out)
    assert re.search(r"sequential [\d.]+ samples/s, \d+ clients together [\d.]+ samples/s", out)
    assert re.search(r"paper-cifar100 round .* [\d.]+ s; 50 rounds", out)
    assert "paper run (50 rounds) extrapolated" in out and "FAILED" not in out


def test_gpu_benchmark_needs_data_unless_tiny(capsys):
    assert main(["perf", "gpu"]) == 2
    assert "--data-root" in capsys.readouterr().err


def test_memory_benchmark_measures_each_run_in_its_own_process():
    tiny = ["model.patch_size=4", "model.embed_dim=16", "model.depth=1", "model.num_heads=2"]
    results = measure(methods=["local", "fedper"], clients=[6], overrides=tiny)
    assert [(r.method, r.clients) for r in results] == [("local", 6), ("fedper", 6)]
    for r in results:
        assert r.trained == r.clients  # every client trained and kept its personal state
        assert r.peak_rss > r.base_rss > 0
    local, fedper = results
    assert local.personal_bytes == local.model_bytes  # local: everything is personal
    assert 0 < fedper.personal_bytes < fedper.model_bytes  # fedper: only the head


def test_memory_benchmark_cli_prints_the_ratio(capsys):
    tiny = ["--set", "model.patch_size=4", "--set", "model.embed_dim=16", "--set", "model.depth=1",
            "--set", "model.num_heads=2"]
    assert main(["perf", "memory", "--methods", "fedper", "--clients", "2,4", "--quiet", *tiny]) == 0
    out = capsys.readouterr().out
    assert re.search(r"fedper: peak RSS 4 / 2 clients = [\d.]+; growth -?[\d.]+ KiB per added client", out)
    assert main(["perf", "memory", "--methods", "nosuch"]) == 2


def test_together_benchmark_runs_tiny(capsys):
    tiny = ["--set", "model.patch_size=4", "--set", "model.embed_dim=16", "--set", "model.depth=1",
            "--set", "model.num_heads=2", "--set", "data.num_clients=4"]
    assert main(["perf", "together", "--preset", "smoke", "--repeats", "1", "--threads", "1", "--quiet", *tiny]) == 0
    line = capsys.readouterr().out
    assert re.search(r"fedavg: sequential [\d.]+ samples/s, 4 clients together [\d.]+ samples/s; ratio", line)


TINY_PFEDHN = ["model.patch_size=4", "model.embed_dim=16", "model.depth=2", "model.num_heads=2", "data.num_clients=8",
               "train.sample_fraction=0.5", "method.hidden_dim=8"]


def test_pfedhn_step_splits_the_move_into_the_bases_and_the_hypernetworks_part():
    from pflbench.benchmark.perf.pfedhn_step import measure as step
    from pflbench.benchmark.resolve import RunSpec

    independent, correlated = step(RunSpec(preset="smoke", overrides=tuple(TINY_PFEDHN)), "digits", 10)
    # 4 of 8 clients a round; the head (16 x 10 + 10) and five LayerNorms (2 x 16 each), one output layer each.
    assert independent.clients == 4 and independent.chunks == 0 and independent.generated == 170 + 5 * 32
    assert independent.cosine > 0 and correlated.cosine > independent.cosine + 0.2  # the shared half adds up
    assert independent.deviation_size_ratio > 0  # the hypernetwork's own part moves too
    assert independent.size_ratio < 0.2  # at the paper's lr (1e-2) a round moves a client a fraction of its change
    # At a vanishing learning rate nothing moves: the base is stepped by the same optimizer.
    frozen = step(RunSpec(preset="smoke", overrides=(*TINY_PFEDHN, "method.hn_lr=1e-12")), "digits", 10)[0]
    assert frozen.size_ratio < 1e-6


def test_pfedhn_step_command_prints_both_figures(capsys):
    argv = ["perf", "pfedhn-step", "--dataset", "digits", "--preset", "smoke", "--quiet"]
    assert main([*argv, *(a for s in TINY_PFEDHN for a in ("--set", s))]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"whole move vs the client's change: cosine -?[\d.]+, size [\d.]+x", out)) == 2
    assert len(re.findall(r"hypernetwork's part vs the client's residual: cosine -?[\d.]+, size [\d.]+x", out)) == 2
    assert main(["perf", "pfedhn-step", "--scale", "0"]) == 2


def test_flops_benchmark_counts_what_a_round_of_the_engine_counts():
    from conftest import TINY, tiny_config

    from pflbench.benchmark.engine import Simulation
    from pflbench.benchmark.perf.flops import measure as flops_of
    from pflbench.benchmark.resolve import RunSpec

    overrides = [*TINY, "train.rounds=1", "train.sample_fraction=0.25"]
    for method in ("fedavg", "fedrep", "fedperfix", "apfl", "ditto", "perfedavg"):
        sim = Simulation(tiny_config(method, *overrides))
        (client,) = sim.sample_clients()
        sim._sampler = __import__("numpy").random.default_rng(sim.seeds["sampling"])  # the round samples it again
        metrics = sim.run().history[-1]
        n = sim.data.num_samples(client)
        (cost,) = flops_of([method], RunSpec(preset="smoke", overrides=tuple(overrides)), "digits",
                           classes=sim.data.num_classes, channels=sim.data.in_chans, client_samples=n, clients=1,
                           native_size=sim.data.image_size)
        # The run's one round is its last: its evaluation adapts every client where the method does (Per-FedAvg).
        assert cost.round_flops + cost.final_finetune_flops == metrics["train_flops"], method
        assert cost.parameters == sim.num_parameters and cost.personal_parameters == sim.num_personal_parameters


def test_flops_benchmark_prints_a_line_per_method(capsys):
    argv = ["perf", "flops", "--dataset", "digits", "--preset", "smoke", "--classes", "10", "--channels", "1",
            "--client-samples", "50", "--methods", "fedavg,fedperfix", "--quiet",
            "--set", "model.image_size=8", "--set", "model.embed_dim=16", "--set", "model.num_heads=2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["fedavg", "fedperfix"]
    assert main(["perf", "flops", "--methods", "nope"]) == 2
