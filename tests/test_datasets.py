"""Each loader on tiny files in its real on-disk format: contents, caching, errors."""

from __future__ import annotations

import hashlib
import pickle
import urllib.error

import numpy as np
import torch
import pytest
from fileformats import (
    CIFAR_NAMES, cifar100_batches, color_of, write_cifar100_folder, write_cifar100_tar, write_image,
    write_imagefolder, write_medmnist_npz, write_officehome,
)

from pflbench.benchmark.cli import main
from pflbench.benchmark.config import DatasetConfig
from pflbench.benchmark.resolve import resolve_config
from pflbench.benchmark.errors import UserError
from pflbench.datasets import DATASETS, cifar100, folders, officehome, organamnist
from pflbench.datasets.imagefolder import ImageFolderOptions, load_imagefolder
from pflbench.datasets.officehome import OfficeHomeOptions, load_officehome
from pflbench.datasets.organamnist import OrganAMNISTOptions, load_organamnist


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to download fails at once, as it does offline."""

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar100.urllib.request, "urlopen", offline)


def expected_cifar_images(batches):
    """CIFAR rows are R, G, B planes of 32x32, row-major."""
    return np.concatenate([batches[s]["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) for s in ("train", "test")])


# -- CIFAR-100 -------------------------------------------------------------------

def test_cifar100_archive_is_verified_parsed_and_cached(tmp_path, monkeypatch):
    batches = cifar100_batches()
    archive = write_cifar100_tar(tmp_path, batches)
    monkeypatch.setattr(cifar100, "MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    images = cifar100.load_cifar100(DatasetConfig(name="cifar100", root=str(tmp_path)))
    np.testing.assert_array_equal(images.images, expected_cifar_images(batches))
    np.testing.assert_array_equal(images.labels, batches["train"]["fine_labels"] + batches["test"]["fine_labels"])
    assert images.class_names == CIFAR_NAMES
    assert images.official_test.tolist() == [False] * 12 + [True] * 8
    # The second start reads the .npy cache: the archive is no longer needed.
    archive.unlink()
    again = cifar100.load_cifar100(DatasetConfig(name="cifar100", root=str(tmp_path)))
    np.testing.assert_array_equal(again.images, images.images)
    np.testing.assert_array_equal(again.official_test, images.official_test)
    assert again.class_names == CIFAR_NAMES
    assert (tmp_path / ".pflbench-cache" / "cifar100" / "images.npy").is_file()


def test_cifar100_reads_the_extracted_folder(tmp_path):
    batches = cifar100_batches(n_train=5, n_test=3, seed=1)
    write_cifar100_folder(tmp_path, batches)
    images = cifar100.load_cifar100(DatasetConfig(name="cifar100", root=str(tmp_path)))
    np.testing.assert_array_equal(images.images, expected_cifar_images(batches))
    assert images.official_test.sum() == 3


def test_cifar100_offline_without_files_is_one_line_naming_file_and_folder(tmp_path, capsys):
    root = tmp_path / "data"
    code = main(["partition", "--dataset", "cifar100", "--data-root", str(root)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "cifar-100-python.tar.gz" in err and str(root.resolve()) in err
    assert cifar100.URL in err and "Temporary failure" in err
    assert not list(root.glob("*.part"))  # a failed download leaves nothing behind


def test_cifar100_download_is_checksummed(tmp_path, monkeypatch):
    """A download whose MD5 differs from the official one is refused."""
    batches = cifar100_batches()
    source = write_cifar100_tar(tmp_path / "src", batches)

    def fake_download(url, dest):
        assert url == cifar100.URL
        dest.write_bytes(source.read_bytes())

    monkeypatch.setattr(cifar100, "download", fake_download)
    with pytest.raises(UserError, match="expected eb9058c3a382ffc7106e4002c42a8d85"):
        cifar100.load_cifar100(DatasetConfig(name="cifar100", root=str(tmp_path / "data")))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    batches = cifar100_batches()
    batches["train"]["data"] = Payload()
    folder = write_cifar100_folder(tmp_path, batches)
    with pytest.raises(UserError, match="refusing to load io.open"):
        cifar100.load_cifar100(DatasetConfig(name="cifar100", root=str(tmp_path)))
    assert not marker.exists()
    # The same bytes do run code under plain pickle: the refusal is what protects.
    pickle.loads((folder / "train").read_bytes())["data"].close()
    assert marker.exists()


def test_cifar100_corrupt_files_give_one_line_errors(tmp_path, monkeypatch):
    batches = cifar100_batches()
    archive = write_cifar100_tar(tmp_path / "a", batches)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # truncated
    with pytest.raises(UserError, match="corrupt or truncated") as err:
        cifar100.load_cifar100(DatasetConfig(name="cifar100", root=str(tmp_path / "a")))
    assert "\n" not in str(err.value)
    folder = write_cifar100_folder(tmp_path / "b", batches)
    (folder / "test").write_bytes((folder / "test").read_bytes()[:200])
    with pytest.raises(UserError, match=r"test is corrupt or truncated") as err:
        cifar100.load_cifar100(DatasetConfig(name="cifar100", root=str(tmp_path / "b")))
    assert "\n" not in str(err.value)


# -- OrganAMNIST -------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_organamnist_reads_npz_arrays(tmp_path, channels):
    from medmnist import INFO

    arrays = write_medmnist_npz(tmp_path / "organamnist.npz")
    images = load_organamnist(OrganAMNISTOptions(name="organamnist", root=str(tmp_path), channels=channels))
    gray = np.concatenate([arrays[f"{s}_images"] for s in ("train", "val", "test")])
    assert images.images.shape == (13, 28, 28, channels)
    for ch in range(channels):
        np.testing.assert_array_equal(images.images[..., ch], gray)
    np.testing.assert_array_equal(
        images.labels, np.concatenate([arrays[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
    )
    assert images.official_test.tolist() == [False] * 9 + [True] * 4
    assert images.class_names == [INFO["organamnist"]["label"][str(i)] for i in range(11)]
    assert images.hflip is False


def test_organamnist_size_picks_the_published_file(tmp_path):
    write_medmnist_npz(tmp_path / "organamnist_64.npz", size=64)
    images = load_organamnist(OrganAMNISTOptions(name="organamnist", root=str(tmp_path), size=64, channels=1))
    assert images.images.shape[1:] == (64, 64, 1)


def test_organamnist_missing_file_downloads_through_medmnist(tmp_path, monkeypatch):
    import medmnist.dataset

    calls = []

    def failing_download(self):
        calls.append((self.root, self.size_flag))
        raise RuntimeError("\n    Automatic download failed! Please download organamnist_128.npz manually.")

    monkeypatch.setattr(medmnist.dataset.MedMNIST, "download", failing_download)
    with pytest.raises(UserError) as err:
        load_organamnist(OrganAMNISTOptions(name="organamnist", root=str(tmp_path / "d"), size=128))
    message = str(err.value)
    assert calls == [(str(tmp_path / "d"), "_128")]
    assert "\n" not in message and "organamnist_128.npz" in message and "zenodo.org" in message
    assert str((tmp_path / "d" / "organamnist_128.npz").resolve()) in message


def test_organamnist_corrupt_npz_and_bad_options(tmp_path):
    (tmp_path / "organamnist.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(UserError, match="not a readable MedMNIST npz"):
        load_organamnist(OrganAMNISTOptions(name="organamnist", root=str(tmp_path)))
    with pytest.raises(UserError, match="dataset.channels"):
        resolve_config("fedavg", "organamnist", overrides=["dataset.channels=2"])
    with pytest.raises(UserError, match="dataset.size.*28, 64, 128, 224"):
        resolve_config("fedavg", "organamnist", overrides=["dataset.size=32"])


# -- Office-Home and image folders -----------------------------------------------------

@pytest.mark.parametrize("folder, real_world", [("OfficeHome", "Real World"), ("", "Real_World")])
def test_officehome_tree_is_decoded_with_domains(tmp_path, folder, real_world):
    n = write_officehome(tmp_path / folder, real_world=real_world)
    seen = []
    images = load_officehome(OfficeHomeOptions(name="officehome", root=str(tmp_path), image_size=16),
                             progress=lambda done, total: seen.append((done, total)))
    assert images.images.shape == (n, 16, 16, 3)
    assert images.domain_names == list(officehome.DOMAINS)
    assert images.class_names == ["Alarm_Clock", "Bike"]
    assert seen[-1] == (n, n)
    for i in range(n):  # each pixel's colour says which domain and class it came from
        expected = color_of(int(images.domains[i]), int(images.labels[i]))
        assert np.abs(images.images[i].reshape(-1, 3).mean(0) - expected).max() < 8


def test_officehome_missing_says_where_to_get_and_put_it(tmp_path):
    with pytest.raises(UserError) as err:
        load_officehome(OfficeHomeOptions(name="officehome", root=str(tmp_path)))
    assert officehome.HOMEPAGE in str(err.value)
    assert str((tmp_path / "OfficeHome").resolve()) in str(err.value)


def test_image_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    n = write_officehome(tmp_path / "OfficeHome", per_class=2)
    decoded = []
    original = folders.decode_image
    monkeypatch.setattr(folders, "decode_image", lambda path, size: decoded.append(path) or original(path, size))
    opts = OfficeHomeOptions(name="officehome", root=str(tmp_path), image_size=12)
    first = load_officehome(opts)
    assert len(decoded) == n
    second = load_officehome(opts)
    assert len(decoded) == n  # nothing decoded again
    np.testing.assert_array_equal(second.images, first.images)
    # A changed size rebuilds the cache.
    resized = load_officehome(OfficeHomeOptions(name="officehome", root=str(tmp_path), image_size=10))
    assert len(decoded) == 2 * n and resized.images.shape[1] == 10
    # So does a changed file set.
    write_image(tmp_path / "OfficeHome" / "Art" / "Bike" / "extra.jpg", (0, 0, 0))
    grown = load_officehome(OfficeHomeOptions(name="officehome", root=str(tmp_path), image_size=10))
    assert len(decoded) == 3 * n + 1 and len(grown.labels) == n + 1


def test_imagefolder_train_test_layout_marks_official_test(tmp_path):
    write_imagefolder(tmp_path / "pets", splits=("train", "test"), per_class=4)
    write_image(tmp_path / "pets" / "train" / "emu" / "0.png", (1, 2, 3), size=(8, 8))  # a class only in train
    images = load_imagefolder(ImageFolderOptions(name="imagefolder", root=str(tmp_path), folder="pets"))
    assert images.class_names == ["cat", "dog", "emu", "fox"]
    assert images.images.shape == (25, 8, 8, 3)  # native size kept
    assert images.official_test.sum() == 12
    test_labels = images.labels[images.official_test]
    assert sorted(set(test_labels.tolist())) == [0, 1, 3]
    # PNG is lossless: the pixels are exactly the written colours.
    for i in np.flatnonzero(images.official_test):
        assert tuple(images.images[i, 0, 0]) == color_of(1, ["cat", "dog", "fox"].index(images.class_names[images.labels[i]]))


def test_imagefolder_flat_layout_at_the_root_ignores_its_cache(tmp_path):
    write_imagefolder(tmp_path, splits=(), per_class=3)
    opts = ImageFolderOptions(name="imagefolder", root=str(tmp_path), image_size=4, hflip=False)
    first = load_imagefolder(opts)
    second = load_imagefolder(opts)  # the cache now lives in the tree: it must not become a class
    assert first.official_test is None and first.hflip is False
    assert second.class_names == first.class_names == ["cat", "dog", "fox"]
    assert len(second.labels) == 9


def test_imagefolder_errors_are_one_line_and_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="image folder not found"):
        load_imagefolder(ImageFolderOptions(name="imagefolder", root=str(tmp_path), folder="nope"))
    write_image(tmp_path / "mixed" / "a" / "0.png", (0, 0, 0), size=(8, 8))
    write_image(tmp_path / "mixed" / "a" / "1.png", (0, 0, 0), size=(9, 8))
    with pytest.raises(UserError, match="set dataset.image_size"):
        load_imagefolder(ImageFolderOptions(name="imagefolder", root=str(tmp_path), folder="mixed"))
    write_image(tmp_path / "broken" / "a" / "0.jpg", (0, 0, 0), size=(64, 64))
    jpg = tmp_path / "broken" / "a" / "0.jpg"
    jpg.write_bytes(jpg.read_bytes()[:150])  # truncated JPEG
    with pytest.raises(UserError, match="cannot decode image .*0.jpg") as err:
        load_imagefolder(ImageFolderOptions(name="imagefolder", root=str(tmp_path), folder="broken", image_size=8))
    assert "\n" not in str(err.value)


def test_every_dataset_is_registered_with_its_options():
    for name, options in (("cifar100", DatasetConfig), ("organamnist", OrganAMNISTOptions),
                          ("officehome", OfficeHomeOptions), ("imagefolder", ImageFolderOptions)):
        assert DATASETS.get(name).Options is options
    assert organamnist.file_name(28) == "organamnist.npz"
    assert organamnist.file_name(224) == "organamnist_224.npz"


def _digits_data(normalize: str, images=None):
    from pflbench.benchmark.engine import Simulation
    from pflbench.datasets.base import FederatedData

    from conftest import tiny_config

    sim = Simulation(tiny_config("fedavg", f"data.normalize={normalize}"))
    images = images if images is not None else sim.images
    return sim, FederatedData(images, sim.partition, normalize=normalize)


def test_normalization_statistics_come_from_the_training_images_only():
    import dataclasses

    sim, data = _digits_data("train")
    train = np.unique(np.concatenate(sim.partition.train))
    pixels = sim.images.images[train].reshape(-1, sim.images.images.shape[-1]) / 255.0
    assert torch.allclose(data.mean.flatten().double(), torch.from_numpy(pixels.mean(0)), atol=1e-6)
    assert torch.allclose(data.std.flatten().double(), torch.from_numpy(pixels.std(0, ddof=1)), atol=1e-5)
    # Whitening every test image changes nothing: no test statistics leak into preprocessing.
    changed = sim.images.images.copy()
    for split in (sim.partition.test, sim.partition.val):
        for ix in split:
            changed[ix] = 255
    _, again = _digits_data("train", dataclasses.replace(sim.images, images=changed))
    assert torch.equal(again.mean, data.mean) and torch.equal(again.std, data.std)
    assert sim.data.mean.flatten().tolist() == pytest.approx(data.mean.flatten().tolist())


def test_fixed_normalization_is_the_references_half_half():
    _, data = _digits_data("fixed")
    assert data.mean.flatten().tolist() == [0.5] * data.in_chans
    assert data.std.flatten().tolist() == [0.5] * data.in_chans
    x, _ = data.prepare(data.indices(0, "test")[:4])
    assert float(x.min()) >= -1.0 - 1e-6 and float(x.max()) <= 1.0 + 1e-6


def test_normalization_names_the_key():
    from conftest import tiny_config

    with pytest.raises(UserError, match="data.normalize"):
        tiny_config("fedavg", "data.normalize=imagenet")
