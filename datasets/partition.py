"""Seeded partitioners: which samples each client holds, and its train/val/test split.

A partitioner is a pure function of the labels (and domains) and a seeded
numpy Generator; it returns one index array per client. `make_partition`
then splits each client's samples into train / val / test. The result is
hashed so every run records exactly which split it used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from ..benchmark.config import DataConfig
from ..benchmark.errors import UserError
from ..benchmark.registry import Registry


class Partitioner(Protocol):
    def __call__(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator, cfg: DataConfig,
        domains: np.ndarray | None,
    ) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class PartitionerEntry:
    name: str  # registry key, the value of data.partition
    description: str  # one line for `bench list`
    split: Partitioner  # the function


PARTITIONERS: Registry[PartitionerEntry] = Registry("partition")


def register_partitioner(name: str, description: str) -> Callable[[Partitioner], Partitioner]:
    """Register a partition function as `data.partition = name`."""

    def wrap(fn: Partitioner) -> Partitioner:
        PARTITIONERS.add(name, PartitionerEntry(name, description, fn))
        return fn

    return wrap


# ---------------------------------------------------------------------------
# Partition functions


def dirichlet_split(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, min_samples: int = 0,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided over clients by Dirichlet(alpha) shares.

    Draws again until every client holds at least `min_samples` samples.
    """
    if min_samples * num_clients > len(labels):
        raise UserError(
            f"cannot give {num_clients} clients {min_samples} samples each from {len(labels)} samples;"
            " lower data.min_samples or data.num_clients"
        )
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_tries):
        clients: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in classes:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                clients[client].append(part)
        merged = [np.sort(np.concatenate(parts)) for parts in clients]
        if min(len(m) for m in merged) >= min_samples:
            return merged
    raise UserError(
        f"no Dirichlet(alpha={alpha}) split in {max_tries} draws gives every one of {num_clients} clients"
        f" {min_samples} samples; lower data.min_samples or data.num_clients, or raise data.alpha"
    )


@register_partitioner("dirichlet", "label skew: each class split over clients by Dirichlet(data.alpha) shares")
def dirichlet(labels, num_clients, rng, cfg, domains=None):
    return dirichlet_split(labels, num_clients, cfg.alpha, rng, cfg.min_samples)


@register_partitioner("iid", "uniformly random, equal-sized clients")
def iid(labels, num_clients, rng, cfg, domains=None):
    if num_clients > len(labels):
        raise UserError(f"data.num_clients={num_clients} exceeds the {len(labels)} samples")
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]


# ---------------------------------------------------------------------------
# The per-client train / val / test split


@dataclass
class Partition:
    """Per-client sample indices into the dataset, for each split."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    test: list[np.ndarray]

    @property
    def num_clients(self) -> int:
        return len(self.train)

    def digest(self) -> str:
        """A short hash of every index array: equal hashes, identical partitions."""
        h = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            for ix in split:
                h.update(np.asarray(ix, dtype=np.int64).tobytes())
                h.update(b"|")
            h.update(b"#")
        return h.hexdigest()[:12]

    def to_json(self) -> str:
        return json.dumps({s: [ix.tolist() for ix in getattr(self, s)] for s in ("train", "val", "test")})

    @classmethod
    def from_json(cls, text: str) -> Partition:
        data = json.loads(text)
        return cls(**{s: [np.asarray(ix, dtype=np.int64) for ix in data[s]] for s in ("train", "val", "test")})

    @classmethod
    def load(cls, path: str | Path, num_samples: int) -> Partition:
        """A partition saved as a run artifact, checked against the dataset size."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"partition file not found: {path}")
        try:
            part = cls.from_json(path.read_text())
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"partition file {path} is not a saved pflbench partition ({err})") from None
        everything = np.concatenate([ix for s in (part.train, part.val, part.test) for ix in s])
        if len(everything) and (everything.min() < 0 or everything.max() >= num_samples):
            raise UserError(f"partition file {path} indexes past this dataset's {num_samples} samples")
        return part

    def class_counts(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """(clients, classes) sample counts over all of each client's splits."""
        counts = np.zeros((self.num_clients, num_classes), dtype=np.int64)
        for c in range(self.num_clients):
            for split in (self.train, self.val, self.test):
                counts[c] += np.bincount(labels[split[c]], minlength=num_classes)
        return counts


def split_client(
    indices: np.ndarray, val_fraction: float, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle one client's samples into (train, val, test) by the given fractions.

    A client with at least 3 samples always gets one in each split that has
    a non-zero fraction, so every client can be evaluated.
    """
    order = rng.permutation(indices)
    n = len(order)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n >= 3:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
    n_test = min(n_test, max(n - 1, 0))
    n_val = min(n_val, max(n - 1 - n_test, 0))
    test, val, train = np.split(order, [n_test, n_test + n_val])
    return np.sort(train), np.sort(val), np.sort(test)


def make_partition(
    labels: np.ndarray, cfg: DataConfig, seed: int, domains: np.ndarray | None = None
) -> Partition:
    """The seeded partition of `labels` described by `cfg`."""
    entry = PARTITIONERS.get(cfg.partition)
    rng = np.random.default_rng(seed)
    clients = entry.split(labels, cfg.num_clients, rng, cfg, domains)
    splits = [split_client(ix, cfg.val_fraction, cfg.test_fraction, rng) for ix in clients]
    return Partition(*(list(s) for s in zip(*splits)))
