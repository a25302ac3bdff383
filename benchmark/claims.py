"""Claims: sweeps on many processes and machines sharing one MLflow store run each (config, seed) once.

A claim is the run itself: a RUNNING run of the key (stage, config hash,
seed) whose holder is alive. Its `pflbench.host`, `pflbench.pid` and
`pflbench.heartbeat` tags name the holder; the heartbeat is refreshed while
the run trains. A holder is gone when its pid no longer runs (judged on its
own host only) or when its heartbeat is older than the timeout (any host).

To claim a key, a process looks at the key's runs: a FINISHED one means
done; a live claim means held elsewhere; a claim whose holder is gone, or a
run ended KILLED, that has a checkpoint is taken over and resumed in the same
MLflow run; otherwise a new run is created.

Why two processes never both win, without a lock or synchronized clocks:
both steps are "write my claim, then read; yield if another claim is there".
- New run: create my run, then list the key's live claims. If process A's
  read saw only its own run, B's run was created after A's read, hence after
  A's run; so B's read (after its own creation) sees A's run, and B yields:
  it deletes its run (deleted runs are invisible to every search) and retries
  after a random pause. At most one wins; when both yield, both retry.
- Takeover: add the tag `pflbench.claim.<generation>.<token>` to the run,
  where the generation is the run's resume count + 1, then read its tags. The
  same argument applies to two tags of one generation: the later reader sees
  the earlier claim and yields (removes its tag). The winner's tag stays, and
  it marks the run RUNNING with its own host, pid and heartbeat at once, so
  the run is a live claim again before any data is loaded.
"""

from __future__ import annotations

import os
import random
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .records import Tag
from .tracking import (
    RunRecord, create_claim_run, delete_run, delete_run_tag, find_runs, hold_run, holder_alive, run_tags, set_run_tags,
)

HEARTBEAT_TIMEOUT = 300.0  # seconds without a heartbeat before a run on another host is taken over
ATTEMPTS = 50  # rounds of "both yielded, retry" before giving up on a key for now


def heartbeat_interval(timeout: float) -> float:
    """How often a held run refreshes its heartbeat: five beats per timeout, at most once a minute."""
    return max(0.5, min(60.0, timeout / 5))


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming one key."""

    kind: str  # "new" (created, ours), "resume" (taken over, ours), "finished", "elsewhere" (held), "failed"
    run_id: str | None = None
    error: str = ""  # "failed": the run's error tag


def _key_runs(tracking_uri: str, experiment: str, key: Mapping[str, str]) -> list[RunRecord]:
    stage = key[Tag.STAGE]
    return find_runs(tracking_uri, experiment, stage=stage, status=None,
                     tags={k: v for k, v in key.items() if k != Tag.STAGE})


def _live(run: RunRecord, timeout: float) -> bool:
    return run.status == "RUNNING" and holder_alive(run.tags, timeout)


def _resumable(run: RunRecord) -> bool:
    """Ended by a signal, or held by a process that is gone, with a checkpoint this machine can read."""
    path = run.tags.get(Tag.CHECKPOINT)
    return run.status in ("RUNNING", "KILLED") and bool(path) and Path(path).is_file()


def _take_over(tracking_uri: str, run: RunRecord) -> bool:
    """Claim a resumable run for this process (see the module docstring); False when another process won."""
    generation = f"{Tag.CLAIM_PREFIX}{int(run.tags.get(Tag.RESUMES, '0')) + 1}."
    mine = generation + uuid.uuid4().hex
    set_run_tags(tracking_uri, run.run_id, {mine: f"{socket.gethostname()}:{os.getpid()}"})
    status, tags = run_tags(tracking_uri, run.run_id)
    if any(k.startswith(generation) and k != mine for k in tags) or status == "FINISHED":
        delete_run_tag(tracking_uri, run.run_id, mine)
        return False
    hold_run(tracking_uri, run.run_id)  # RUNNING in our name: a live claim from now on
    return True


def claim(tracking_uri: str, experiment: str, key: Mapping[str, str], *, timeout: float = HEARTBEAT_TIMEOUT,
          tags: Mapping[str, str] | None = None) -> Claim:
    """Claim the run of `key` (tag -> value; stage, config hash and seed) for this process.

    A new run is created with `key` and `tags` as its tags.
    """
    rng = random.Random(uuid.uuid4().int)  # independent of the run's seeds
    for attempt in range(ATTEMPTS):
        runs = _key_runs(tracking_uri, experiment, key)
        finished = [r for r in runs if r.status == "FINISHED"]
        if finished:
            return Claim("finished", finished[-1].run_id)
        live = [r for r in runs if _live(r, timeout)]
        if live:
            return Claim("elsewhere", live[0].run_id)
        resumable = [r for r in runs if _resumable(r)]
        if resumable:
            run = resumable[-1]  # the latest
            if _take_over(tracking_uri, run):
                return Claim("resume", run.run_id)
        else:
            run_id = create_claim_run(tracking_uri, experiment, {**key, **(tags or {})})
            rivals = [r for r in _key_runs(tracking_uri, experiment, key)
                      if r.run_id != run_id and (r.status == "FINISHED" or _live(r, timeout))]
            if not rivals:
                return Claim("new", run_id)
            delete_run(tracking_uri, run_id)
        time.sleep(rng.uniform(0.05, 0.3) * min(attempt + 1, 10))  # both yielded: retry at a random moment
    return Claim("elsewhere")


def failed(tracking_uri: str, run_id: str) -> str | None:
    """The error of a run that ended FAILED (e.g. one held elsewhere diverged); None otherwise."""
    status, tags = run_tags(tracking_uri, run_id)
    return tags.get(Tag.ERROR, "failed") if status == "FAILED" else None
