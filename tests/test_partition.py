"""Partition invariants: coverage, determinism, skew, shards, domains, protocols, reuse."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import tiny_config

from pflbench.benchmark.config import DataConfig
from pflbench.benchmark.resolve import resolve_config
from pflbench.benchmark.errors import UserError
from pflbench.benchmark.reports import label_skew
from pflbench.datasets import ImageSet, Partition, make_partition, partition_for
from pflbench.datasets.partition import distribute_like, split_client

rng = np.random.default_rng(0)
LABELS = rng.integers(0, 10, 3000)
DOMAINS = rng.integers(0, 4, 3000)
OFFICIAL_TEST = rng.random(3000) < 0.2


def config(**changes) -> DataConfig:
    return dataclasses.replace(DataConfig(num_clients=8, min_samples=10), **changes)


def all_indices(part: Partition) -> np.ndarray:
    return np.sort(np.concatenate([ix for s in (part.train, part.val, part.test) for ix in s]))


SCHEMES = [
    config(partition="dirichlet", alpha=0.3),
    config(partition="iid"),
    config(partition="shards", classes_per_client=3),
    config(partition="natural", num_clients=8, clients_per_domain=2),
]


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: c.partition)
@pytest.mark.parametrize("protocol", ["pool", "keep-test"])
def test_every_sample_is_in_exactly_one_client_split(cfg, protocol):
    cfg = dataclasses.replace(cfg, protocol=protocol)
    part = make_partition(LABELS, cfg, seed=3, domains=DOMAINS, official_test=OFFICIAL_TEST)
    np.testing.assert_array_equal(all_indices(part), np.arange(len(LABELS)))
    assert part.num_clients == cfg.num_clients
    if protocol == "keep-test":  # official test samples are test samples, and only they are
        tests = np.concatenate(part.test)
        assert OFFICIAL_TEST[tests].all() and len(tests) == OFFICIAL_TEST.sum()
        assert not OFFICIAL_TEST[np.concatenate(part.train + part.val)].any()


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: c.partition)
def test_partition_is_determined_by_its_seed(cfg):
    a = make_partition(LABELS, cfg, seed=5, domains=DOMAINS)
    b = make_partition(LABELS, cfg, seed=5, domains=DOMAINS)
    c = make_partition(LABELS, cfg, seed=6, domains=DOMAINS)
    assert a.digest() == b.digest() and a.to_json() == b.to_json()
    assert a.digest() != c.digest()


def test_smaller_alpha_gives_more_label_skew():
    entropy = {}
    for alpha in (0.05, 0.5, 5.0, 500.0):
        part = make_partition(LABELS, config(alpha=alpha, num_clients=10, min_samples=1), seed=1)
        entropy[alpha] = label_skew(part.class_counts(LABELS, 10))["entropy"].mean()
    assert entropy[0.05] < entropy[0.5] < entropy[5.0] < entropy[500.0]
    assert entropy[500.0] > 0.97 * np.log2(10)  # nearly balanced


def test_dirichlet_keeps_its_minimum_samples():
    part = make_partition(LABELS, config(alpha=0.1, num_clients=20, min_samples=40), seed=2)
    assert min(len(a) + len(b) + len(c) for a, b, c in zip(part.train, part.val, part.test)) >= 40


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_shards_give_exactly_k_classes_per_client(k):
    part = make_partition(LABELS, config(partition="shards", classes_per_client=k, num_clients=12), seed=0)
    counts = part.class_counts(LABELS, 10)
    assert ((counts > 0).sum(axis=1) == k).all()
    holders = (counts > 0).sum(axis=0)
    assert holders.max() - holders.min() <= 1  # classes spread evenly over clients


def test_shards_refuse_more_classes_than_exist():
    with pytest.raises(UserError, match="data.classes_per_client.*only 10 classes"):
        make_partition(LABELS, config(partition="shards", classes_per_client=11), seed=0)


@pytest.mark.parametrize("per_domain", [1, 3])
def test_natural_clients_never_mix_domains(per_domain):
    cfg = config(partition="natural", num_clients=4 * per_domain, clients_per_domain=per_domain, alpha=1.0)
    part = make_partition(LABELS, cfg, seed=0, domains=DOMAINS)
    seen = []
    for c in range(part.num_clients):
        held = np.concatenate([part.train[c], part.val[c], part.test[c]])
        assert len(np.unique(DOMAINS[held])) == 1
        seen.append(int(DOMAINS[held][0]))
    assert sorted(seen) == sorted(list(range(4)) * per_domain)
    if per_domain == 1:  # a client is its whole domain
        assert [len(np.concatenate([part.train[c], part.val[c], part.test[c]])) for c in range(4)] == \
            [int((DOMAINS == seen[c]).sum()) for c in range(4)]


def test_natural_needs_domains_and_a_matching_client_count():
    with pytest.raises(UserError, match="needs a dataset with domains"):
        make_partition(LABELS, config(partition="natural", num_clients=4), seed=0)
    with pytest.raises(UserError, match="set data.num_clients=12"):
        make_partition(LABELS, config(partition="natural", num_clients=8, clients_per_domain=3), seed=0,
                       domains=DOMAINS)


def test_keep_test_deals_official_test_with_each_clients_label_proportions():
    cfg = config(alpha=0.2, protocol="keep-test", val_fraction=0.1)
    part = make_partition(LABELS, cfg, seed=4, official_test=OFFICIAL_TEST)
    held = np.stack([np.bincount(LABELS[np.concatenate([t, v])], minlength=10) for t, v in zip(part.train, part.val)])
    test = np.stack([np.bincount(LABELS[t], minlength=10) for t in part.test])
    per_class = np.bincount(LABELS[OFFICIAL_TEST], minlength=10)
    expected = held / held.sum(axis=0, keepdims=True) * per_class
    assert np.abs(test - expected).max() <= 1.0  # proportional, up to rounding
    assert (test[held == 0] == 0).all()


def test_distribute_like_spreads_a_class_no_client_holds_evenly():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    clients = [np.array([0, 1]), np.array([2, 3])]
    test = distribute_like(np.arange(4, 10), labels, clients, np.random.default_rng(0))
    assert [len(t) for t in test] == [3, 3]


def test_keep_test_needs_an_official_test_split():
    with pytest.raises(UserError, match="keep-test needs a dataset with an official test split"):
        make_partition(LABELS, config(protocol="keep-test"), seed=0)


def test_new_data_keys_are_validated():
    with pytest.raises(UserError, match="data.protocol.*pool, keep-test"):
        resolve_config("fedavg", "digits", overrides=["data.protocol=mixed"])
    with pytest.raises(UserError, match="data.classes_per_client"):
        resolve_config("fedavg", "digits", overrides=["data.classes_per_client=0"])
    with pytest.raises(UserError, match="data.clients_per_domain"):
        resolve_config("fedavg", "digits", overrides=["data.clients_per_domain=0"])


def test_a_saved_partition_file_is_reused_exactly(tmp_path):
    images = ImageSet(np.zeros((len(LABELS), 2, 2, 1), np.uint8), LABELS, [str(i) for i in range(10)])
    original = partition_for(images, config(alpha=0.3), seed=1)
    path = tmp_path / "partition.json"
    path.write_text(original.to_json())
    reused = partition_for(images, config(partition="iid", partition_file=str(path)), seed=99)
    assert reused.digest() == original.digest()
    with pytest.raises(UserError, match="out of range for this dataset.s 100 samples"):
        Partition.load(path, num_samples=100)


def test_a_runs_partition_artifact_is_reused_by_a_later_run(tmp_path):
    """The JSON a run records (partition.json), given back as data.partition_file, reproduces it
    exactly, even under another seed that would otherwise draw another partition."""
    from pflbench.benchmark.engine import Simulation

    first = Simulation(tiny_config("fedavg", seed=1))
    saved = tmp_path / "partition.json"
    saved.write_text(first.partition.to_json())  # what RunRecorder logs as the artifact
    again = Simulation(tiny_config("fedavg", f"data.partition_file={saved}", seed=2))
    fresh = partition_for(first.images, tiny_config("fedavg", seed=2).data, seed=2)
    assert again.partition.digest() == first.partition.digest() != fresh.digest()
    for split in ("train", "val", "test"):
        for a, b in zip(getattr(again.partition, split), getattr(first.partition, split)):
            np.testing.assert_array_equal(a, b)


def test_simulation_uses_official_test_under_keep_test(tmp_path):
    """The engine hands the loader's official_test mask to the partition."""
    from fileformats import write_imagefolder

    from pflbench.benchmark.engine import Simulation

    write_imagefolder(tmp_path / "imgs", splits=("train", "test"), per_class=20)
    cfg = tiny_config("fedavg", "dataset.folder=imgs", "data.protocol=keep-test", "data.min_samples=5",
                      "data.num_clients=3", "train.rounds=1", dataset="imagefolder")
    cfg.dataset.root = str(tmp_path)
    sim = Simulation(cfg)
    tests = np.concatenate(sim.partition.test)
    assert sim.images.official_test[tests].all() and len(tests) == 60
    result = sim.run()
    assert result.final.test_count.sum() == 60


def test_the_capped_dirichlet_deals_no_class_to_a_client_that_holds_n_over_k():
    labels = np.random.default_rng(1).integers(0, 20, 6000)
    k = 16
    cfg = config(partition="dirichlet", alpha=0.1, num_clients=k, dirichlet_cap=True, min_samples=100)
    part = make_partition(labels, cfg, seed=3)
    clients = [np.concatenate([part.train[c], part.val[c], part.test[c]]) for c in range(k)]
    assert min(len(c) for c in clients) >= 100  # the reference's minimum, by redrawing
    # Replay the deal class by class: a client at N/K before a class gets none of it.
    held = np.zeros(k)
    for cls in range(20):
        got = np.array([np.sum(labels[c] == cls) for c in clients])
        assert not np.any(got[held >= len(labels) / k]), cls
        held += got
    # The cap narrows the spread of client sizes against the uncapped draw of the same seed.
    uncapped = make_partition(labels, dataclasses.replace(cfg, dirichlet_cap=False, min_samples=0), seed=3)
    spread = [np.std([len(a) + len(b) + len(c) for a, b, c in zip(p.train, p.val, p.test)])
              for p in (part, uncapped)]
    assert spread[0] < spread[1]


def test_a_stratified_split_gives_each_split_every_class_share():
    labels = np.repeat(np.arange(4), [40, 20, 12, 8])
    train, val, test = split_client(np.arange(80), 0.15, 0.25, np.random.default_rng(0), labels)
    assert (len(train), len(val), len(test)) == (48, 12, 20)  # the unstratified sizes
    assert np.bincount(labels[test], minlength=4).tolist() == [10, 5, 3, 2]
    assert np.bincount(labels[val], minlength=4).tolist() == [6, 3, 2, 1]
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(80))


def test_stratify_applies_to_every_client_of_a_natural_partition():
    cfg = config(partition="natural", num_clients=8, clients_per_domain=2, stratify=True, test_fraction=0.2)
    part = make_partition(LABELS, cfg, seed=0, domains=DOMAINS)
    for c in range(8):
        everything = np.concatenate([part.train[c], part.val[c], part.test[c]])
        counts = np.bincount(LABELS[everything], minlength=10)
        test_counts = np.bincount(LABELS[part.test[c]], minlength=10)
        assert np.all(np.abs(test_counts - 0.2 * counts) <= 1)  # each class's own share, to a sample
        assert len(np.unique(DOMAINS[everything])) == 1
