"""Sweeps that survive SIGKILL and share one store: claims, takeover and resume, shards.

These start real `bench sweep` processes, since process death and concurrency are what they are about.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pflbench.benchmark.cli import main
from pflbench.benchmark.records import Tag
from pflbench.benchmark.tracking import find_runs

from conftest import TINY

# A model that learns (digits at 8 px without augmentation), checkpointed every round and kept to compare.
LEARNS = [*TINY, "run.checkpoint_every=1", "run.keep_checkpoint=true", "train.sample_fraction=0.5",
          "model.embed_dim=32", "train.lr=0.1", "train.local_epochs=2", "data.augment=false"]


def _suite(path: Path, seeds, methods=("fedavg",), overrides=LEARNS) -> str:
    listed = ", ".join(f'"{o}"' for o in overrides)
    path.write_text(f"seeds = {list(seeds)}\nmethods = {list(methods)!r}\n".replace("'", '"')
                    + f'[[run]]\ndataset = "digits"\npreset = "smoke"\noverrides = [{listed}]\n')
    return str(path)


def _sweep_process(args, cwd: Path, uri: str) -> subprocess.Popen:
    # One thread, as in this test process: the same kernels, so the same floating-point results.
    env = os.environ | {"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    return subprocess.Popen([sys.executable, "-m", "pflbench.benchmark.cli", "sweep", *args, "--quiet"], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_after_checkpoint(proc: subprocess.Popen, folder: Path, at_least: int) -> Path:
    """SIGKILL `proc` once a checkpoint of round >= `at_least` is on disk; that checkpoint."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for path in folder.glob("*.pt"):
            try:
                if torch.load(path, weights_only=True)["simulation"]["round"] >= at_least:
                    proc.send_signal(signal.SIGKILL)
                    proc.communicate()
                    return path
            except (OSError, RuntimeError, EOFError):
                pass  # renamed away under us
        assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def _line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def _counts(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def _by_seed(uri: str, experiment: str) -> dict[str, str]:
    return {r.tags[Tag.SEED]: r.run_id for r in find_runs(uri, experiment, stage="final", status=None)}


def _histories(client, run_id):
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics}


def test_a_sweep_killed_with_sigkill_continues_its_runs_to_exactly_the_uninterrupted_result(
        tracking_uri, tmp_path, capsys):
    rounds = ["train.rounds=6"]
    suite = _suite(tmp_path / "suite.toml", [0, 1], overrides=[*LEARNS, *rounds])
    checkpoints = tmp_path / "checkpoints"
    proc = _sweep_process([suite, "--experiment", "killed"], tmp_path, tracking_uri)
    path = _kill_after_checkpoint(proc, checkpoints, at_least=2)
    killed_id, killed_at = path.stem, torch.load(path, weights_only=True)["simulation"]["round"]
    client = MlflowClient(tracking_uri)
    assert client.get_run(killed_id).info.status == "RUNNING" and killed_at < 6

    assert main(["sweep", suite, "--experiment", "killed", "--quiet"]) == 0
    rerun = _line(capsys)
    assert main(["sweep", suite, "--experiment", "whole", "--quiet"]) == 0
    whole = _line(capsys)
    print(f"killed at round {killed_at}; rerun: {rerun}; uninterrupted: {whole}", file=sys.stderr)

    assert _counts(rerun)["finished"] == "2" and _counts(rerun)["resumed"] == "1"
    killed, uninterrupted = _by_seed(tracking_uri, "killed"), _by_seed(tracking_uri, "whole")
    assert sorted(killed) == sorted(uninterrupted) == ["0", "1"]  # two runs each: none restarted as a new run
    assert killed_id in killed.values()  # the killed run was continued in the same MLflow run
    assert client.get_run(killed_id).data.tags[Tag.RESUMES] == "1"
    for seed, run_id in killed.items():
        assert client.get_run(run_id).info.status == "FINISHED"
        mine = torch.load(checkpoints / f"{run_id}.pt", weights_only=True)["simulation"]
        theirs = torch.load(checkpoints / f"{uninterrupted[seed]}.pt", weights_only=True)["simulation"]
        assert mine["round"] == theirs["round"] == 6
        for key in ("method", "personal", "initial_personal"):  # bit for bit
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0)
        resumed, straight = _histories(client, run_id), _histories(client, uninterrupted[seed])
        assert set(resumed) == set(straight)
        for key, points in resumed.items():
            assert [s for s, _ in points] == list(range(1, 7)), key  # every round once, none twice
            if key != "round_seconds":
                assert points == straight[key], key


def test_a_claim_whose_heartbeat_stopped_on_another_host_is_taken_over_and_resumed(tracking_uri, tmp_path, capsys):
    suite = _suite(tmp_path / "suite.toml", [0], overrides=[*LEARNS, "train.rounds=5"])
    proc = _sweep_process([suite], tmp_path, tracking_uri)
    run_id = _kill_after_checkpoint(proc, tmp_path / "checkpoints", at_least=1).stem
    client = MlflowClient(tracking_uri)
    # As if its holder ran on another machine that stopped answering: no pid to judge, a heartbeat just now.
    client.set_tag(run_id, Tag.HOST, "another-host")
    client.set_tag(run_id, Tag.HEARTBEAT, f"{time.time():.0f}")
    started = time.monotonic()
    assert main(["sweep", suite, "--quiet", "--heartbeat-timeout", "2"]) == 0
    line = _line(capsys)
    assert time.monotonic() - started >= 1.5  # held while its heartbeat was fresh, then taken over
    assert "finished=1" in line and "resumed=1" in line, line
    (run,) = find_runs(tracking_uri, "pflbench", stage="final", status=None)
    assert run.run_id == run_id and run.status == "FINISHED" and run.tags[Tag.RESUMES] == "1"
    assert run.tags[Tag.HOST] != "another-host"


def test_two_sweeps_started_together_on_one_store_run_every_run_exactly_once(tracking_uri, tmp_path):
    suite = _suite(tmp_path / "suite.toml", [0, 1], methods=("fedavg", "local"), overrides=TINY)
    procs = [_sweep_process([suite, "--heartbeat-timeout", "10"], tmp_path, tracking_uri) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    lines = [out.strip().splitlines()[-1] for out, _ in outputs]
    print("\n".join(f"process {i}: {line}" for i, line in enumerate(lines)), file=sys.stderr)
    counts = [_counts(line) for line in lines]
    assert sum(int(c["finished"]) for c in counts) == 4  # every run by exactly one of them
    for c in counts:
        assert int(c["finished"]) + int(c["elsewhere"]) == 4 and c["failed"] == "0"
    runs = find_runs(tracking_uri, "pflbench", stage="final", status=None)  # deleted (yielded) claims excluded
    assert sorted((r.tags[Tag.METHOD], r.tags[Tag.SEED]) for r in runs) == [
        ("fedavg", "0"), ("fedavg", "1"), ("local", "0"), ("local", "1")]
    assert {r.status for r in runs} == {"FINISHED"}


def test_shards_split_a_suite_deterministically_and_cover_it(tracking_uri, tmp_path, capsys):
    suite = _suite(tmp_path / "suite.toml", [0, 1, 2], overrides=TINY)
    seeds = []
    for i in range(2):
        assert main(["sweep", suite, "--quiet", "--shard", f"{i}/2"]) == 0
        assert _counts(_line(capsys))["runs"] == ("2" if i == 0 else "1")
        seeds.append(sorted(_by_seed(tracking_uri, "pflbench")))
    assert seeds == [["0", "2"], ["0", "1", "2"]]  # shard 0 of 2: the 1st and 3rd runs; shard 1: the 2nd


@pytest.mark.parametrize("shard", ["2/2", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_a_bad_shard_is_one_line_naming_the_option(tracking_uri, tmp_path, capsys, shard):
    suite = _suite(tmp_path / "suite.toml", [0], overrides=TINY)
    assert main(["sweep", suite, f"--shard={shard}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--shard" in err and "0 <= I < N" in err
