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
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from ..benchmark.config import DataConfig
from ..benchmark.errors import UserError
from ..benchmark.registry import Registry

if TYPE_CHECKING:
    from .base import ImageSet

# data.protocol: which samples are split over clients, and where test samples come from.
PROTOCOLS = ("pool", "keep-test")
SPLITS = ("train", "val", "test")


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
    max_tries: int = 1000, cap: bool = False,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided over clients by Dirichlet(alpha) shares.

    Draws again (the whole split) until every client holds at least
    `min_samples` samples. With `cap`, as the FedPerfix reference (PFLlib)
    does, classes are dealt in order and a client that already holds N/K
    samples gets a zero share of every later class, which narrows the spread
    of client sizes.
    """
    if min_samples * num_clients > len(labels):
        raise UserError(
            f"cannot give {num_clients} clients {min_samples} samples each from {len(labels)} samples;"
            " lower data.min_samples or data.num_clients"
        )
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_tries):
        clients: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients)
        for members in classes:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            if cap:
                open_ = sizes < len(labels) / num_clients
                if open_.any() and (shares * open_).sum() > 0:
                    shares = shares * open_ / (shares * open_).sum()
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                clients[client].append(part)
                sizes[client] += len(part)
        merged = [np.sort(np.concatenate(parts)) for parts in clients]
        if min(len(m) for m in merged) >= min_samples:
            return merged
    raise UserError(
        f"no Dirichlet(alpha={alpha}) split in {max_tries} draws gives every one of {num_clients} clients"
        f" {min_samples} samples; lower data.min_samples or data.num_clients, or raise data.alpha"
    )


@register_partitioner("dirichlet", "label skew: each class split over clients by Dirichlet(data.alpha) shares")
def dirichlet(labels, num_clients, rng, cfg, domains=None):
    return dirichlet_split(labels, num_clients, cfg.alpha, rng, cfg.min_samples, cap=cfg.dirichlet_cap)


@register_partitioner("iid", "uniformly random, equal-sized clients")
def iid(labels, num_clients, rng, cfg, domains=None):
    if num_clients > len(labels):
        raise UserError(f"data.num_clients={num_clients} exceeds the {len(labels)} samples")
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]


@register_partitioner("shards", "pathological: each client holds exactly data.classes_per_client classes")
def shards(labels, num_clients, rng, cfg, domains=None):
    """Every client gets `cfg.classes_per_client` distinct classes; each class is cut into
    equal shards, one for each client holding it.

    Classes are dealt cyclically from a seeded permutation, so any run of k
    consecutive classes is distinct and every class has the same number of
    holders (+-1). With fewer client slots than classes, the samples of the
    classes no client draws stay unused.
    """
    classes = np.unique(labels)
    k = cfg.classes_per_client
    if k > len(classes):
        raise UserError(
            f"bad value for data.classes_per_client: {k} (the dataset has only {len(classes)} classes)"
        )
    order = rng.permutation(classes)
    held = [order[(c * k + np.arange(k)) % len(classes)] for c in range(num_clients)]
    clients: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in classes:
        holders = [c for c in range(num_clients) if cls in held[c]]
        if not holders:
            continue
        members = rng.permutation(np.flatnonzero(labels == cls))
        if len(members) < len(holders):
            raise UserError(
                f"class {cls} has {len(members)} samples for {len(holders)} clients holding it;"
                " lower data.num_clients or data.classes_per_client"
            )
        for client, part in zip(holders, np.array_split(members, len(holders))):
            clients[client].append(part)
    merged = [np.sort(np.concatenate(parts)) for parts in clients]
    smallest = min(len(m) for m in merged)
    if smallest < cfg.min_samples:
        raise UserError(
            f"a shards split leaves a client {smallest} samples, below data.min_samples={cfg.min_samples};"
            " lower data.min_samples or data.num_clients"
        )
    return merged


@register_partitioner(
    "natural", "clients are domains (Office-Home); each split into data.clients_per_domain by Dirichlet(data.alpha)"
)
def natural(labels, num_clients, rng, cfg, domains=None):
    """One client per domain, or `cfg.clients_per_domain` clients per domain drawn by
    Dirichlet(`cfg.alpha`) over that domain's labels; no client mixes domains."""
    if domains is None:
        raise UserError("data.partition=natural needs a dataset with domains (e.g. officehome); this one has none")
    present = np.unique(domains)
    per_domain = cfg.clients_per_domain
    if num_clients != len(present) * per_domain:
        raise UserError(
            f"data.partition=natural makes {len(present)} domains x data.clients_per_domain={per_domain}"
            f" = {len(present) * per_domain} clients; set data.num_clients={len(present) * per_domain}"
        )
    clients = []
    for domain in present:
        members = np.flatnonzero(domains == domain)
        if per_domain == 1:
            clients.append(members)
        else:
            parts = dirichlet_split(labels[members], per_domain, cfg.alpha, rng, cfg.min_samples, cap=cfg.dirichlet_cap)
            clients += [members[ix] for ix in parts]
    return clients


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
        return json.dumps({s: [ix.tolist() for ix in getattr(self, s)] for s in SPLITS})

    @classmethod
    def from_json(cls, text: str, source: str = "partition") -> Partition:
        """A partition from `to_json`'s text; a UserError naming what is wrong with its layout."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise UserError(f"{source} is not JSON ({err})") from None
        if not isinstance(data, dict) or set(SPLITS) - set(data):
            raise UserError(f"{source} is not a saved pflbench partition (expected an object with"
                            f" {', '.join(SPLITS)})")
        splits = {}
        for split in SPLITS:
            lists = data[split]
            if not isinstance(lists, list):
                raise UserError(f"{source}: {split} must be a list with one list of sample indices per client")
            arrays = []
            for client, ix in enumerate(lists):
                array = np.asarray(ix) if isinstance(ix, list) else None
                if array is None or array.ndim != 1 or array.size and array.dtype.kind not in "iu":
                    raise UserError(f"{source}: {split} of client {client} must be a list of integer sample indices")
                arrays.append(array.astype(np.int64))
            splits[split] = arrays
        if len({len(v) for v in splits.values()}) != 1:
            sizes = ", ".join(f"{s} {len(v)}" for s, v in splits.items())
            raise UserError(f"{source}: the splits list different numbers of clients ({sizes})")
        return cls(**splits)

    def check(self, num_samples: int, num_clients: int | None = None, source: str = "partition") -> None:
        """Every client present and trainable, every index in range, and no sample held twice.

        A sample in two places (a client's train and its test, or two clients)
        would leak test data into training, so it is refused outright.
        """
        if num_clients is not None and self.num_clients != num_clients:
            raise UserError(f"{source} has {self.num_clients} clients, but data.num_clients={num_clients}"
                            f" (set data.num_clients={self.num_clients})")
        for client, ix in enumerate(self.train):
            if len(ix) == 0:
                raise UserError(f"{source}: client {client} has no training samples")
        where = [(split, c) for split in SPLITS for c in range(self.num_clients)]
        arrays = [getattr(self, split)[c] for split, c in where]
        everything = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        if len(everything) and (everything.min() < 0 or everything.max() >= num_samples):
            bad = everything[(everything < 0) | (everything >= num_samples)][0]
            raise UserError(f"{source}: sample index {bad} is out of range for this dataset's {num_samples} samples")
        values, first, counts = np.unique(everything, return_index=True, return_counts=True)
        if (counts > 1).any():
            index = values[counts > 1][0]
            owners = np.repeat(np.arange(len(arrays)), [len(a) for a in arrays])[everything == index]
            places = " and ".join(f"client {where[o][1]} {where[o][0]}" for o in owners[:2])
            raise UserError(f"{source}: sample {index} appears more than once ({places});"
                            " every sample belongs to one split of one client")

    @classmethod
    def load(cls, path: str | Path, num_samples: int, num_clients: int | None = None) -> Partition:
        """A partition saved as a run artifact, checked against the dataset and the config."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"partition file not found: {path}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read partition file {path} ({err})") from None
        part = cls.from_json(text, f"partition file {path}")
        part.check(num_samples, num_clients, f"partition file {path}")
        return part

    def class_counts(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """(clients, classes) sample counts over all of each client's splits."""
        counts = np.zeros((self.num_clients, num_classes), dtype=np.int64)
        for c in range(self.num_clients):
            for split in (self.train, self.val, self.test):
                counts[c] += np.bincount(labels[split[c]], minlength=num_classes)
        return counts


def largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    """`total` split over groups in proportion to `counts`, in whole numbers that sum to `total`."""
    exact = counts * (total / max(counts.sum(), 1))
    out = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - out), kind="stable")
    out[order[: total - out.sum()]] += 1
    return out


def split_client(
    indices: np.ndarray, val_fraction: float, test_fraction: float, rng: np.random.Generator,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle one client's samples into (train, val, test) by the given fractions.

    A client with at least 3 samples always gets one in each split that has
    a non-zero fraction, so every client can be evaluated. With `labels`
    (the whole dataset's) the split is stratified: each class gives every
    split its share (largest remainders), the split sizes unchanged.
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
    if labels is None:
        test, val, train = np.split(order, [n_test, n_test + n_val])
        return np.sort(train), np.sort(val), np.sort(test)
    classes, counts = np.unique(labels[order], return_counts=True)
    per_test = largest_remainder(counts, n_test)
    per_val = largest_remainder(counts - per_test, n_val)
    parts: tuple[list[np.ndarray], ...] = ([], [], [])
    for cls, k_test, k_val in zip(classes, per_test, per_val):
        members = order[labels[order] == cls]  # already shuffled
        for part, piece in zip(parts[::-1], np.split(members, [k_test, k_test + k_val])):
            part.append(piece)
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return train, val, test


def distribute_like(
    test_index: np.ndarray, labels: np.ndarray, clients: list[np.ndarray], rng: np.random.Generator
) -> list[np.ndarray]:
    """Deal the samples in `test_index` to clients with each client's label proportions.

    Each class's test samples go to the clients in proportion to how many
    samples of that class they hold (evenly if none holds it), so a client's
    test set follows its own training distribution. Every test sample lands
    in exactly one client.
    """
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    held = np.stack([np.bincount(labels[ix], minlength=num_classes) for ix in clients]).astype(float)
    out: list[list[np.ndarray]] = [[] for _ in clients]
    test_labels = labels[test_index]
    for cls in np.unique(test_labels):
        members = rng.permutation(test_index[test_labels == cls])
        weights = held[:, cls] if held[:, cls].sum() > 0 else np.ones(len(clients))
        cuts = np.rint(np.cumsum(weights / weights.sum())[:-1] * len(members)).astype(int)
        for client, part in enumerate(np.split(members, cuts)):
            out[client].append(part)
    return [np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64) for parts in out]


def make_partition(
    labels: np.ndarray,
    cfg: DataConfig,
    seed: int,
    domains: np.ndarray | None = None,
    official_test: np.ndarray | None = None,
) -> Partition:
    """The seeded partition of `labels` described by `cfg`.

    `cfg.protocol == "pool"` (the FedPerfix protocol) splits every sample,
    official test included, over clients and then each client's share into
    train / val / test. `"keep-test"` splits only the official training
    samples (each client's share into train / val by `cfg.val_fraction`) and
    deals the official test set to the clients with their label proportions.
    """
    entry = PARTITIONERS.get(cfg.partition)
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    keep_test = cfg.protocol == "keep-test"
    if keep_test:
        if official_test is None or not np.any(official_test):
            raise UserError(
                "data.protocol=keep-test needs a dataset with an official test split; this one has none"
                " (use data.protocol=pool)"
            )
        pool = np.flatnonzero(~np.asarray(official_test, dtype=bool))
    else:
        pool = np.arange(len(labels))
    pool_domains = None if domains is None else np.asarray(domains)[pool]
    clients = [pool[ix] for ix in entry.split(labels[pool], cfg.num_clients, rng, cfg, pool_domains)]
    test_fraction = 0.0 if keep_test else cfg.test_fraction
    by_class = labels if cfg.stratify else None
    splits = [split_client(ix, cfg.val_fraction, test_fraction, rng, by_class) for ix in clients]
    train, val, test = (list(s) for s in zip(*splits))
    if keep_test:
        test = distribute_like(np.flatnonzero(official_test), labels, clients, rng)
    return Partition(train, val, test)


def partition_for(images: ImageSet, cfg: DataConfig, seed: int) -> Partition:
    """The partition a run uses: the saved one in `cfg.partition_file`, else a fresh
    seeded one (seed `cfg.partition_seed`, or the run's `seed` when that is -1)."""
    if cfg.partition_file:
        return Partition.load(cfg.partition_file, len(images.labels), cfg.num_clients)
    seed = cfg.partition_seed if cfg.partition_seed >= 0 else seed
    return make_partition(images.labels, cfg, seed, images.domains, images.official_test)
