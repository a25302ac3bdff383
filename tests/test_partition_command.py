"""`bench partition`: the table, the heatmap, the saved partition; and the dataset presets."""

from __future__ import annotations

import pytest
from fileformats import write_officehome
from PIL import Image

from pflbench.benchmark.cli import main
from pflbench.benchmark.config import list_presets
from pflbench.benchmark.resolve import resolve_config
from pflbench.benchmark.reports import label_skew
from pflbench.datasets import DATASETS, Partition, partition_for


def test_partition_command_prints_skew_and_writes_heatmap_and_json(tmp_path, capsys):
    png, saved = tmp_path / "skew.png", tmp_path / "p.json"
    overrides = ["--set", "data.num_clients=5", "--set", "data.alpha=0.2"]
    code = main(["partition", "--dataset", "digits", *overrides, "--seed", "3", "--plot", str(png), "--save", str(saved)])
    out = capsys.readouterr().out
    assert code == 0
    cfg = resolve_config("fedavg", "digits", overrides=[o for o in overrides if o != "--set"], seed=3)
    images = DATASETS.get("digits").load(cfg.dataset)
    expected = partition_for(images, cfg.data, 3)
    assert Partition.from_json(saved.read_text()).digest() == expected.digest()
    assert f"partition hash {expected.digest()}" in out.replace("\n", " ")
    skew = label_skew(expected.class_counts(images.labels, 10))
    assert f"{skew['entropy'].mean():.2f} bits" in out
    for c in range(5):  # one row per client: its train count is printed
        assert f" {len(expected.train[c])} " in out
    with Image.open(png) as picture:
        assert picture.format == "PNG" and picture.size[0] > 300


def test_partition_command_shows_domains_of_a_natural_split(tmp_path, capsys):
    write_officehome(tmp_path / "OfficeHome", per_class=4)
    code = main(["partition", "--dataset", "officehome", "--preset", "cpu-officehome", "--data-root", str(tmp_path),
                 "--set", "dataset.image_size=8", "--set", "data.min_samples=2"])
    out = capsys.readouterr().out
    assert code == 0
    for domain in ("Art", "Clipart", "Product", "Real_World"):
        assert out.count(f" {domain} ") == 2  # 2 clients per domain, each client one domain


def test_partition_command_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert main(["partition", "--dataset", "cifar10"]) == 2
    assert "choose one of: cifar100, digits, imagefolder, officehome, organamnist" in capsys.readouterr().err
    assert main(["partition", "--dataset", "digits", "--set", "data.partition=natural"]) == 2
    assert "needs a dataset with domains" in capsys.readouterr().err


@pytest.mark.parametrize("dataset, preset", [("cifar100", "paper-cifar100"), ("organamnist", "paper-organamnist"),
                                             ("officehome", "paper-officehome")])
def test_paper_presets_hold_the_fedperfix_reference_settings(dataset, preset):
    assert DATASETS.get(dataset).default_preset == preset
    cfg = resolve_config("fedavg", dataset)
    assert (cfg.model.name, cfg.model.image_size) == ("vit_small_patch16_224", 224)
    t = cfg.train
    assert (t.lr, t.momentum, t.batch_size, t.local_epochs, t.rounds) == (0.01, 0.0, 64, 10, 50)
    if dataset == "officehome":
        d = cfg.data
        assert (d.partition, d.num_clients, d.clients_per_domain, d.alpha, d.test_fraction) == ("natural", 16, 4, 1.0, 0.15)
        assert cfg.dataset.image_size == 224
    else:
        d = cfg.data
        assert (d.partition, d.protocol, d.num_clients, d.alpha, d.test_fraction) == ("dirichlet", "pool", 64, 0.5, 0.25)
        assert t.sample_fraction == 0.125
    if dataset == "organamnist":
        assert (cfg.dataset.size, cfg.dataset.channels) == (28, 3)


def test_cpu_cifar10_preset_points_the_image_folder_at_the_cifar10_tree():
    assert "cpu-cifar10" in list_presets()
    cfg = resolve_config("fedavg", "imagefolder", preset="cpu-cifar10", data_root="/data")
    assert cfg.dataset.folder == "cifar10-jpeg" and cfg.dataset.root == "/data"
    assert (cfg.model.image_size, cfg.model.patch_size, cfg.model.embed_dim, cfg.model.depth) == (16, 4, 96, 4)
    assert (cfg.data.num_clients, cfg.data.alpha, cfg.train.sample_fraction) == (20, 0.1, 0.25)
