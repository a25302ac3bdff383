"""Shared fixtures: tiny configs on the bundled digits, temporary MLflow stores."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from pflbench.benchmark.testing import TINY, tiny_config  # noqa: F401  (the tests' tiny runs, shared with plug-ins)

# Tiny models gain nothing from threads, and one thread per test process keeps timings stable.
torch.set_num_threads(1)


def recorded_updates(sim) -> list[list]:
    """Each round's client updates, kept as the engine streams them to the method's aggregation."""
    rounds: list[list] = []
    start, add = sim.method.start_aggregation, sim.method.add_update

    def start_aggregation(*args, **kwargs):
        rounds.append([])
        return start(*args, **kwargs)

    def add_update(update):
        rounds[-1].append(update)
        return add(update)

    sim.method.start_aggregation = start_aggregation
    sim.method.add_update = add_update
    return rounds


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory):
    """An empty MLflow sqlite store, created and migrated once per session (that takes seconds)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments(max_results=1)
    return db


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch, migrated_store):
    """A fresh sqlite MLflow store (a copy of the migrated one); the CLI's default store is pointed at it too."""
    shutil.copyfile(migrated_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri
