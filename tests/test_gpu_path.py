"""The GPU code paths, checked on the CPU.

CPU bf16 autocast reproduces what CUDA autocast does under `torch.vmap`; the
device count, CUDA_VISIBLE_DEVICES, the allocator's figures and
out-of-memory errors are mocked.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import Future

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, tiny_config

from pflbench.benchmark import client, engine, sweep, tuning
from pflbench.benchmark.checkpoint import read_checkpoint, save_checkpoint
from pflbench.benchmark.cli import main
from pflbench.benchmark.client import fit_parallel
from pflbench.benchmark.config import TrainConfig, config_hash
from pflbench.benchmark.device import CUBLAS_WORKSPACE, worker_devices
from pflbench.benchmark.engine import EvalResult, Simulation, autocast_dtype, resolve_device
from pflbench.benchmark.tracking import find_runs

HARD = ["train.rounds=2", "train.momentum=0.9", "train.weight_decay=0.01", "train.max_grad_norm=1.0",
        "train.local_epochs=2"]
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has a total capacity of 79.11 GiB"


# -- 1. bf16 under vmap -------------------------------------------------------------------
BF16 = "train.precision=bf16"  # CPU bf16 autocast: what CUDA's does, vmap included


def _batched_step_dtypes(sim: Simulation) -> tuple[torch.dtype, set[torch.dtype]]:
    """Logits dtype and gradient dtypes of one batched step of two clients."""
    runner = sim.clients
    step = runner._batched_step(None)
    seen = []

    def recorded(params, x):
        seen.append(step(params, x))
        return seen[-1]

    trained = [n for n, p in sim.model.named_parameters() if p.requires_grad]
    state = {n: torch.stack([t.detach()] * 2) for n, t in sim._entries.items()}
    x, y = next(sim.data.train_batches(0, 1, 8, sim.batch_generator(1, 0)))
    with client._unfused_attention(sim.model, enabled=True):
        _, grads = runner._batched_grads(recorded, state, trained, torch.stack([x, x]), torch.stack([y, y]),
                                         torch.ones(2, len(y)))
    return seen[0].dtype, {g.dtype for g in grads.values()}


def test_the_batched_step_runs_in_bf16_under_autocast_with_fp32_gradients():
    sim = Simulation(tiny_config("fedperfix", BF16))
    logits, grads = _batched_step_dtypes(sim)
    print(f"\nbatched step under CPU bf16 autocast: logits {logits}, gradients {sorted(map(str, grads))}")
    assert logits == torch.bfloat16 and grads == {torch.float32}
    assert all(t.dtype == torch.float32 for t in sim._entries.values() if t.is_floating_point())
    # Without the cast, autocast does not reach inside vmap: fp32 activations (the bug this fixes).
    sim.clients.low_precision = set()
    assert _batched_step_dtypes(sim)[0] == torch.float32


@pytest.mark.parametrize("method", ["fedavg", "fedperfix"])
def test_bf16_clients_trained_together_match_one_at_a_time_within_bf16_tolerance(method):
    sims = {}
    for k in (1, 3):
        sim = Simulation(tiny_config(method, *HARD, BF16, f"train.parallel_clients={k}"))
        sim.run_round()
        sim.run_round()
        sims[k] = sim
    seq, together = sims[1], sims[3]
    worst = 0.0
    for name, value in seq.method.global_state.items():
        torch.testing.assert_close(together.method.global_state[name], value, rtol=2e-2, atol=2e-3)
        worst = max(worst, float((together.method.global_state[name] - value).abs().max()))
    for c in seq._personal:
        for name, value in seq.personal_state(c).items():
            torch.testing.assert_close(together.personal_state(c)[name], value, rtol=2e-2, atol=2e-3)
    print(f"\n{method}: max |together - sequential| over shared parameters after 2 bf16 rounds: {worst:.2e}")


# -- 2. one device per worker ------------------------------------------------------------
UUIDS = "GPU-5f1c3a2e-8d1b-4c7e-9a0f-2b6d4e8c1a3f,MIG-7b2e9d4a-1c3f-5e8b-a0d2-4f6c8e1b3a5d"


@pytest.mark.parametrize("visible, count, expected", [
    (None, 3, ["0", "1", "2", "0"]),
    ("2,3", 2, ["2", "3", "2", "3"]),
    (UUIDS, 2, [*UUIDS.split(","), *UUIDS.split(",")]),
    (None, 0, None),  # no GPU: the CPU threads are split instead
], ids=["unset", "2,3", "uuid-mig", "no-gpu"])
def test_each_worker_gets_the_next_entry_of_the_parents_visible_devices(visible, count, expected, monkeypatch):
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert worker_devices(4, env, count) == expected
    print(f"\nCUDA_VISIBLE_DEVICES={visible!r}, {count} GPU(s): workers get {expected}")
    # The tune workers' environments, with torch's device count and the variable mocked.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    envs = tuning.worker_environments(4)
    assert [e.get("CUDA_VISIBLE_DEVICES") for e in envs] == (expected or [visible] * 4)


class _InlinePool:
    """A ProcessPoolExecutor stand-in: runs each task here (mocks reach it), records what workers get."""

    made: list = []

    def __init__(self, workers, mp_context=None, initializer=None, initargs=()):
        devices = initargs[0]
        self.devices = [devices.get() for _ in range(workers)] if devices is not None else None
        _InlinePool.made.append(self)

    def submit(self, fn, *args):
        future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - a future carries any error
            future.set_exception(err)
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


SUITE = """
experiment = "board"
seeds = [0, 1]
methods = ["fedavg", "fedper"]
[[run]]
dataset = "digits"
preset = "smoke"
overrides = OVERRIDES
"""


def _suite(tmp_path) -> str:
    path = tmp_path / "suite.toml"
    path.write_text(SUITE.replace("OVERRIDES", "[" + ", ".join(f'"{o}"' for o in TINY) + "]"))
    return str(path)


def _fail_one_run(monkeypatch, method: str = "fedper", seed: int = 1) -> None:
    """Round 2 of one (method, seed) runs out of device memory, after its MLflow run has started."""
    run_round = Simulation.run_round

    def maybe_oom(self, *args, **kwargs):
        if self.cfg.method.name == method and self.cfg.seed == seed and self.round_index == 1:
            raise torch.OutOfMemoryError(OOM)
        return run_round(self, *args, **kwargs)

    monkeypatch.setattr(Simulation, "run_round", maybe_oom)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_out_of_memory_run_fails_alone_and_the_sweep_exits_1(workers, capsys, tracking_uri, tmp_path, monkeypatch):
    _fail_one_run(monkeypatch)
    monkeypatch.setattr(sweep, "ProcessPoolExecutor", _InlinePool)
    # Two GPUs, the parent limited to 2 and 3 (the runs themselves stay on the CPU).
    monkeypatch.setattr(sweep, "worker_devices", lambda k: worker_devices(k, {"CUDA_VISIBLE_DEVICES": "2,3"}, 2))
    _InlinePool.made.clear()
    code = main(["sweep", _suite(tmp_path), "--workers", str(workers), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "runs=4 finished=3 skipped=0 failed=1" in out
    assert "failed: fedper/digits seed 1: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB." in " ".join(err.split())  # the console wraps
    if workers == 2:  # the workers took GPUs 2 and 3 of the parent's list
        assert [p.devices for p in _InlinePool.made] == [["2", "3"]]
    runs = find_runs(tracking_uri, "board", stage="final", status=None)
    records = sorted((r.tags["pflbench.method"], r.tags["pflbench.seed"], r.status,
                      r.tags.get("pflbench.error", "")) for r in runs)
    print(f"\nsweep --workers {workers} with an injected OOM, exit status {code}:")
    for record in records:
        print("  ", record)
    assert records == [
        ("fedavg", "0", "FINISHED", ""), ("fedavg", "1", "FINISHED", ""), ("fedper", "0", "FINISHED", ""),
        ("fedper", "1", "FAILED", "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."),
    ]


def test_an_out_of_memory_trial_fails_alone_and_tune_exits_1(capsys, tracking_uri, monkeypatch):
    trials = []
    run_round = Simulation.run_round

    def oom_in_trial_1(self, *args, **kwargs):
        if self.round_index == 0:
            trials.append(self)
        if len(trials) == 2:  # the second trial's first round
            raise torch.OutOfMemoryError(OOM)
        return run_round(self, *args, **kwargs)

    monkeypatch.setattr(Simulation, "run_round", oom_in_trial_1)
    fast = [a for o in [*TINY, "train.local_epochs=1"] for a in ("--set", o)]
    code = main(["tune", "--method", "fedavg", "--dataset", "digits", "--preset", "smoke", *fast,
                 "--trials", "3", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1 and "trials=3 ran=3" in out
    assert "failed: trial 1: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB." in " ".join(err.split())
    runs = find_runs(tracking_uri, "pflbench", stage="tune", status=None)
    children = sorted((r.tags["pflbench.trial"], r.status, r.tags.get("pflbench.error", ""))
                      for r in runs if "mlflow.parentRunId" in r.tags)
    assert children == [("0", "FINISHED", ""),
                        ("1", "FAILED", "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."),
                        ("2", "FINISHED", "")]


# -- 3. auto sized by memory, halved on OOM ------------------------------------------------
def _auto_on_gpu(monkeypatch) -> None:
    """`parallel_clients=auto` as it resolves on a GPU (the whole round, at most 16)."""
    monkeypatch.setattr(engine, "resolve_parallel",
                        lambda setting, device, sampled: min(sampled, 16) if setting == "auto" else int(setting))


def test_auto_halves_the_clients_trained_together_on_out_of_memory(monkeypatch):
    _auto_on_gpu(monkeypatch)
    sim = Simulation(tiny_config("fedavg", *HARD, "train.parallel_clients=auto"))
    groups = []
    together = sim.clients.train_together

    def small_memory(clients, round_index):
        groups.append(list(clients))
        if len(clients) > 2:
            raise torch.OutOfMemoryError(OOM)
        return together(clients, round_index)

    monkeypatch.setattr(sim.clients, "train_together", small_memory)
    assert sim.parallel_clients == 4
    sim.run_round()
    sim.run_round()
    assert groups == [[0, 1, 2, 3], [0, 1], [2, 3], [0, 1], [2, 3]]  # halved once, then kept
    assert sim.parallel_clients == 2
    pairs = Simulation(tiny_config("fedavg", *HARD, "train.parallel_clients=2"))
    pairs.run_round()
    pairs.run_round()
    for name, value in pairs.method.global_state.items():  # the same groups: the same result
        assert torch.equal(sim.method.global_state[name], value)


def test_an_explicit_parallel_setting_does_not_hide_out_of_memory(monkeypatch):
    sim = Simulation(tiny_config("fedavg", "train.parallel_clients=4"))

    def oom(clients, round_index):
        raise torch.OutOfMemoryError(OOM)

    monkeypatch.setattr(sim.clients, "train_together", oom)
    with pytest.raises(torch.OutOfMemoryError):
        sim.run_round()


def test_fit_parallel_keeps_k_within_free_memory():
    assert fit_parallel(16, free_bytes=10_000, per_client_bytes=1_000) == 8  # 80% of free memory
    assert fit_parallel(4, free_bytes=10_000, per_client_bytes=1_000) == 4  # never above the round
    assert fit_parallel(16, free_bytes=500, per_client_bytes=1_000) == 1  # never below one client


def test_auto_probes_one_batched_step_for_the_memory_a_client_needs(monkeypatch):
    sim = Simulation(tiny_config("fedperfix"))
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1_000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: calls.append("peak") or 1_000 + 50_000)
    params = sum(p.numel() * p.element_size() for p in sim.model.parameters())
    per_client = 50_000 + 3 * params
    # Free: the driver's figure plus what the allocator caches unused (here one client's worth).
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 1_000 + per_client)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(5.5 * per_client / 0.8) - per_client, 10**12))
    before = {n: t.detach().clone() for n, t in sim._entries.items()}
    calls_before = len(calls)
    assert sim.clients.probe_parallel(16) == 5
    assert calls[calls_before:] == ["reset", "peak"]  # the step ran between the two readings
    assert all(torch.equal(t, before[n]) for n, t in sim._entries.items())  # nothing was updated
    assert all(p.grad is None for p in sim.model.parameters())


# -- 4. batches unchanged, copies once per epoch, evaluation counts stay on the device ------------
# sha256 of every batch's pixels and labels (clients 0-3, 1.5 epochs, batch 7, round 2), recorded with
# the previous code (each batch drew its crops and flips as it was prepared).
BATCHES_BEFORE = {
    ("true", False): "34309feab885480e23572f2c0c90b24bdf4a59902a974f42f7cab8a5284889a4",
    ("true", True): "4fd09b191e5a199cf773d638dbc6eab778d5eee6f51a2c039795e5add7b5a78b",
    ("false", False): "46a48158036303c56f53486448aeba35719877495382595f52ee2c577a9bd019",
}


def _reference_batches(data, client_index: int, epochs: float, batch_size: int, generator: torch.Generator):
    """The previous drawing order (permutation per epoch; per batch: y offsets, x offsets, flips), per sample."""
    index = data.indices(client_index, "train")
    pad = max(1, data.native_size // 8)
    whole = int(epochs)
    for epoch in range(math.ceil(epochs)):
        order = torch.randperm(len(index), generator=generator)
        if epoch == whole:
            order = order[: max(1, round((epochs - whole) * len(index)))]
        for start in range(0, len(order), batch_size):
            batch = index[order[start : start + batch_size]]
            images = data.images[batch].float() / 255
            if data.augment:
                n = len(batch)
                dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
                dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
                flip = torch.rand(n, generator=generator) < 0.5 if data.hflip else torch.zeros(n, dtype=torch.bool)
                padded = F.pad(images, (pad, pad, pad, pad))
                size = images.shape[-1]
                crops = [padded[i, :, dy[i] : dy[i] + size, dx[i] : dx[i] + size] for i in range(n)]
                images = torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flip)])
            yield (images - data.mean) / data.std, data.labels[batch]


@pytest.mark.parametrize("augment, hflip", list(BATCHES_BEFORE), ids=["crops", "crops+flips", "plain"])
def test_a_seed_gives_the_same_batches_as_before(augment, hflip):
    sim = Simulation(tiny_config("fedavg", f"data.augment={augment}"))
    sim.data.hflip = hflip
    digest = hashlib.sha256()
    for c in range(sim.data.num_clients):
        batches = list(sim.data.train_batches(c, 1.5, 7, sim.batch_generator(2, c)))
        reference = list(_reference_batches(sim.data, c, 1.5, 7, sim.batch_generator(2, c)))
        assert len(batches) == len(reference)
        for (x, y), (rx, ry) in zip(batches, reference):
            assert torch.equal(y, ry) and torch.equal(x, rx)
            digest.update(x.numpy().tobytes())
            digest.update(y.numpy().tobytes())
    assert digest.hexdigest() == BATCHES_BEFORE[(augment, hflip)]


def test_each_epoch_goes_to_the_device_in_one_copy(monkeypatch):
    from pflbench.datasets import base

    sim = Simulation(tiny_config("fedavg"))
    copies = []
    monkeypatch.setattr(base, "to_device", lambda t, device: copies.append(tuple(t.shape)) or t.to(device))
    n = sim.data.num_samples(0)
    batches = list(sim.data.train_batches(0, 2, 7, sim.batch_generator(1, 0)))
    assert len(batches) == 2 * -(-n // 7)
    assert copies == [(4, n), (4, n)]  # order, y offsets, x offsets, flips: one table per epoch


def test_evaluation_counts_stay_on_the_device_until_the_evaluation_ends():
    sim = Simulation(tiny_config("fedperfix", "train.rounds=1", "data.val_fraction=0.2"))
    sim.run_round()
    result = EvalResult.empty(sim.data.num_clients)
    for c in range(sim.data.num_clients):
        sim.load_client(c)
        sim._evaluate_loaded(c, result)
    assert len(result.pending) == 2 * sim.data.num_clients and not result.test_correct.any()
    assert all(isinstance(hits, torch.Tensor) for _, _, hits in result.pending)
    result.settle()
    assert not result.pending
    assert result.test_correct.tolist() == sim.evaluate().test_correct.tolist()


# -- 5. speed knobs ---------------------------------------------------------------------------
def test_an_all_active_stacked_step_is_torch_sgd_for_each_client():
    cfg = TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.05, max_grad_norm=0.5)
    gen = torch.Generator().manual_seed(1)
    p = {"w": torch.randn(3, 4, 5, generator=gen), "b": torch.randn(3, 5, generator=gen)}
    g = {n: torch.randn(t.shape, generator=gen) for n, t in p.items()}
    buffers = {n: torch.randn(t.shape, generator=gen) for n, t in p.items()}
    before = {n: t.clone() for n, t in buffers.items()}
    new = client.stacked_sgd_step(p, g, buffers, torch.tensor([True, True, True]), cfg)
    for k in range(3):
        params = [torch.nn.Parameter(p[n][k].clone()) for n in p]
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        for param, n in zip(params, p):
            param.grad = g[n][k].clone()
            opt.state[param]["momentum_buffer"] = before[n][k].clone()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        for param, n in zip(params, p):
            torch.testing.assert_close(new[n][k], param.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(buffers[n][k], opt.state[param]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_model_compile_compiles_the_batched_step_too(monkeypatch):
    compiled = []
    real = torch.compile

    def compile_eagerly(fn, **kwargs):  # dynamo traces the step; the eager backend needs no C++ toolchain
        compiled.append(fn)
        return real(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    plain = Simulation(tiny_config("fedavg", *HARD, "train.parallel_clients=3"))
    plain.run_round()
    torch._dynamo.reset()
    sim = Simulation(tiny_config("fedavg", *HARD, "train.parallel_clients=3", "model.compile=true"))
    sim.run_round()
    torch._dynamo.reset()
    assert compiled[0] is sim.model  # the one-client forward, as before
    assert len(compiled) == 2 and not isinstance(compiled[1], torch.nn.Module)  # and the batched step
    for name, value in plain.method.global_state.items():
        torch.testing.assert_close(sim.method.global_state[name], value, rtol=1e-4, atol=1e-6)


# -- 6. determinism, checkpoints, device index, precision -----------------------------------------
def test_run_deterministic_turns_on_deterministic_algorithms_and_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    plain = Simulation(tiny_config("fedavg", "train.rounds=1"))
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and not torch.are_deterministic_algorithms_enabled()
    try:
        sim = Simulation(tiny_config("fedavg", "train.rounds=1", "run.deterministic=true"))
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
        assert sim.run_round()["train_loss"] == plain.run_round()["train_loss"]  # the CPU was deterministic already
    finally:
        torch.use_deterministic_algorithms(False)
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    assert config_hash(sim.cfg) == config_hash(plain.cfg)


def test_a_checkpoint_keeps_the_cuda_generator_state(monkeypatch, tmp_path):
    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    sim = Simulation(tiny_config("fedavg", "train.rounds=2"))
    sim.run_round()
    sim.device = torch.device("cuda", 0)  # what is saved and restored depends only on the device's type
    path = save_checkpoint(tmp_path / "ckpt.pt", sim)
    state = read_checkpoint(path)
    assert torch.equal(state["simulation"]["cuda_rng"], cuda_state)
    fresh = Simulation(tiny_config("fedavg", "train.rounds=2"))
    fresh.device = torch.device("cuda", 0)
    fresh.load_state_dict(state["simulation"])
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_state) and restored[0][1] == sim.device
    cpu = Simulation(tiny_config("fedavg", "train.rounds=2"))
    assert cpu.state_dict()["cuda_rng"] is None  # a CPU run has no CUDA generator to keep


def test_cuda_resolves_to_an_indexed_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("precision, device, capability, expected", [
    ("auto", "cuda", (9, 0), torch.bfloat16),  # H100
    ("bf16", "cuda", (8, 0), torch.bfloat16),  # A100
    ("auto", "cuda", (7, 5), None),  # T4: bf16 only emulated -> fp32
    ("bf16", "cuda", (7, 0), None),  # V100, even when asked for
    ("fp32", "cuda", (9, 0), None),
    ("auto", "cpu", None, None),
])
def test_bf16_needs_compute_capability_8_and_falls_back_to_fp32(precision, device, capability, expected):
    assert autocast_dtype(precision, torch.device(device), capability) == expected


def test_the_simulation_autocasts_to_its_dtype():
    sim = Simulation(tiny_config("fedavg"))
    assert sim.amp_dtype is None  # the CPU trains in fp32
    with sim.autocast():
        assert not torch.is_autocast_enabled("cpu")
    sim.amp_dtype = torch.bfloat16
    with sim.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


# -- 7. benchmarks warm up ------------------------------------------------------------------------
def test_the_perf_benchmarks_run_one_untimed_round_first(monkeypatch):
    from pflbench.benchmark.perf import overhead, together
    from pflbench.benchmark.resolve import RunSpec

    rounds = []
    run_round = Simulation.run_round
    monkeypatch.setattr(Simulation, "run_round", lambda self, *a, **k: rounds.append(self) or run_round(self, *a, **k))
    tiny = ("model.patch_size=4", "model.embed_dim=16", "model.depth=1", "model.num_heads=2", "data.num_clients=4")
    together.measure(RunSpec(preset="smoke", overrides=tiny, device="cpu"), rounds=1, repeats=1)
    assert len(rounds) == 4  # each side: one warm-up round, then the timed one
    rounds.clear()
    overhead.measure(RunSpec(overrides=tiny, device="cpu"), clients=2, rounds=1, repeats=1)
    assert len(rounds) == 2  # the engine side: warm-up, then the timed round


def test_worker_counts_are_capped_at_what_the_machine_runs_and_the_cap_is_stated():
    from pflbench.benchmark.device import check_workers
    from pflbench.benchmark.errors import UserError

    check_workers(8, cpu_count=8, device_count=0)
    check_workers(8, cpu_count=2, device_count=8)  # one GPU each: more workers than cores
    with pytest.raises(UserError, match=r"bad --workers 9: this machine runs at most 8 worker processes"
                                        r" \(2 CPU cores, 8 GPUs\)"):
        check_workers(9, cpu_count=2, device_count=8)
    with pytest.raises(UserError, match=r"at most 2 worker processes \(2 CPU cores\)$"):
        check_workers(100000, cpu_count=2, device_count=0)
    with pytest.raises(UserError, match="must be >= 1"):
        check_workers(0, cpu_count=2, device_count=0)
