"""Faults a long run meets: SIGKILL then --resume, SIGTERM, stale runs, concurrent first starts.

These start real `bench` processes, since signals and process death are what they are about.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from pflbench.benchmark.cli import main

from conftest import TINY

RUN = ["run", "--method", "fedavg", "--dataset", "digits", "--preset", "smoke", "--device", "cpu"]


def _sets(*settings: str) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def _bench(args, cwd: Path, uri: str, **kwargs) -> subprocess.Popen:
    # One thread, as in this test process: the same kernels, so the same floating-point results.
    env = os.environ | {"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    return subprocess.Popen([sys.executable, "-m", "pflbench.benchmark.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for_checkpoint(folder: Path, proc: subprocess.Popen, at_least: int) -> Path:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for path in folder.glob("*.pt"):
            try:
                if torch.load(path, weights_only=True)["simulation"]["round"] >= at_least:
                    return path
            except (OSError, RuntimeError, EOFError):
                pass  # renamed away under us
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def _histories(client, run_id):
    run = client.get_run(run_id)
    out = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run_id, key)
        out[key] = sorted((m.step, m.value) for m in history)
    return out


def _metrics(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part and not part.startswith("run_id"))


def test_a_run_killed_with_sigkill_resumes_to_exactly_the_uninterrupted_result(tracking_uri, tmp_path, capsys):
    torch.set_num_threads(1)  # as in the killed process (OMP_NUM_THREADS=1): the same kernels
    # A model that learns (digits at 8 px without augmentation), so equal accuracies mean something.
    settings = [*TINY, "train.rounds=16", "run.checkpoint_every=1", "run.keep_checkpoint=true",
                "train.sample_fraction=0.5", "model.embed_dim=32", "train.lr=0.1", "train.local_epochs=2",
                "data.augment=false"]
    checkpoints = tmp_path / "checkpoints"
    proc = _bench([*RUN, "--quiet", *_sets(*settings)], tmp_path, tracking_uri)
    path = _wait_for_checkpoint(checkpoints, proc, at_least=2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    run_id = path.stem
    client = MlflowClient(tracking_uri)
    killed_at = torch.load(path, weights_only=True)["simulation"]["round"]
    assert client.get_run(run_id).info.status == "RUNNING" and killed_at < 16

    assert main(["runs", "--stale"]) == 0
    assert run_id in capsys.readouterr().out  # its process is gone: stale

    assert main(["run", "--resume", run_id, "--quiet"]) == 0
    resumed_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert resumed_line.endswith(f"run_id={run_id}")  # the same MLflow run, continued
    resumed_state = torch.load(path, weights_only=True)["simulation"]

    assert main([*RUN, "--quiet", *_sets(*settings)]) == 0
    whole_line = capsys.readouterr().out.strip().splitlines()[-1]
    whole_id = whole_line.rsplit("run_id=", 1)[1]
    whole_state = torch.load(checkpoints / f"{whole_id}.pt", weights_only=True)["simulation"]

    print(f"interrupted at round {killed_at}, resumed: {resumed_line}\nuninterrupted: {whole_line}",
          file=sys.stderr)
    assert _metrics(resumed_line) == _metrics(whole_line)
    assert resumed_state["round"] == whole_state["round"] == 16
    for key in ("method", "personal", "initial_personal"):
        torch.testing.assert_close(resumed_state[key], whole_state[key], rtol=0, atol=0)
    assert client.get_run(run_id).info.status == "FINISHED"
    resumed, whole = _histories(client, run_id), _histories(client, whole_id)
    assert set(resumed) == set(whole)
    for key, points in resumed.items():
        assert [s for s, _ in points] == list(range(1, 17)), key  # every round once, none twice
        if key != "round_seconds":
            assert points == whole[key], key


def test_sigterm_ends_the_run_killed_with_exit_143_and_prints_plain_round_lines(tracking_uri, tmp_path):
    proc = _bench([*RUN, *_sets(*TINY, "train.rounds=200")], tmp_path, tracking_uri)
    lines = []
    for line in proc.stderr:  # stdout is a pipe, not a terminal: one plain line per round on stderr
        lines.append(line)
        if " round 2/200" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated (SIGTERM)" in err
    assert any("round 1/200" in line and "test_acc_mean" in line and " s" in line for line in lines)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pflbench").experiment_id])
    assert run.info.status == "KILLED"
    assert len(client.get_metric_history(run.info.run_id, "test_acc_mean")) >= 2  # what was logged stays


def test_stale_lists_only_runs_of_dead_processes_here_and_mark_killed_closes_them(tracking_uri, capsys):
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("e")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    runs = {}
    for name, tags in {"dead": {"pflbench.host": host, "pflbench.pid": str(dead.pid)},
                       "alive": {"pflbench.host": host, "pflbench.pid": str(os.getpid())},
                       "remote": {"pflbench.host": host + "-elsewhere", "pflbench.pid": str(dead.pid)}}.items():
        runs[name] = client.create_run(exp, run_name=name, tags=tags).info.run_id
    assert main(["runs", "--stale", "--mark-killed"]) == 0
    out = capsys.readouterr().out
    assert runs["dead"] in out and runs["alive"] not in out and runs["remote"] not in out
    assert client.get_run(runs["dead"]).info.status == "KILLED"
    assert client.get_run(runs["alive"]).info.status == "RUNNING"
    assert client.get_run(runs["remote"]).info.status == "RUNNING"  # another host: not judged from here
    assert main(["runs", "--stale"]) == 0
    assert runs["dead"] not in capsys.readouterr().out


def test_three_runs_started_together_on_a_fresh_store_all_finish(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # fresh: nobody has created or migrated it yet
    procs = [_bench([*RUN, "--quiet", "--seed", str(seed), *_sets(*TINY)], tmp_path, uri) for seed in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outputs]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pflbench").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3


def test_resume_refuses_a_finished_run_and_a_run_without_checkpoints(tracking_uri, capsys):
    assert main([*RUN, "--quiet", *_sets(*TINY)]) == 0
    run_id = capsys.readouterr().out.strip().rsplit("run_id=", 1)[1]
    assert main(["run", "--resume", run_id]) == 2
    assert "already finished" in capsys.readouterr().err
    client = MlflowClient(tracking_uri)
    client.set_terminated(run_id, "KILLED")
    assert main(["run", "--resume", run_id]) == 2
    assert "without checkpoints" in capsys.readouterr().err
    assert main(["run", "--resume", run_id, "--set", "train.lr=1"]) == 2
    assert main(["run", "--resume", "0" * 32]) == 2
    assert "no run" in capsys.readouterr().err
