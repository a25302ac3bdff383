"""Tiny dataset files written in each dataset's real on-disk format."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_NAMES = ["apple", "bicycle", "cloud", "dolphin"]


def cifar100_batches(n_train: int = 12, n_test: int = 8, seed: int = 0) -> dict[str, dict]:
    """The three CIFAR-100 python-format dicts (`train`, `test`, `meta`) with str keys."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        out[split] = {
            "filenames": [f"img_{split}_{i}.png" for i in range(n)],
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": [int(v) for v in rng.integers(0, len(CIFAR_NAMES), n)],
            "coarse_labels": [0] * n,
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
    out["meta"] = {"fine_label_names": list(CIFAR_NAMES), "coarse_label_names": ["things"]}
    return out


def write_cifar100_tar(root: Path, batches: dict[str, dict]) -> Path:
    """`root/cifar-100-python.tar.gz` holding `cifar-100-python/{train,test,meta}` (pickle protocol 2)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, content in batches.items():
            data = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_cifar100_folder(root: Path, batches: dict[str, dict]) -> Path:
    """The extracted layout: `root/cifar-100-python/{train,test,meta}`."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in batches.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    return folder


def write_medmnist_npz(path: Path, counts=(6, 3, 4), size: int = 28, seed: int = 0) -> dict[str, np.ndarray]:
    """A MedMNIST npz: `{train,val,test}_images` uint8 (N,S,S), `{...}_labels` (N,1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 11, (n, 1)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> None:
    """A solid-colour image; the format follows the suffix (.jpg, .png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def color_of(group: int, cls: int) -> tuple[int, int, int]:
    """A colour that identifies (group, class) after JPEG compression."""
    return (40 + 60 * group, 40 + 90 * cls, 200 - 50 * group)


def write_officehome(tree: Path, classes=("Alarm_Clock", "Bike"), per_class: int = 3,
                     real_world: str = "Real World") -> int:
    """`tree/{Art,Clipart,Product,<real_world>}/<class>/<n>.jpg`, odd sizes; returns the image count."""
    count = 0
    for d, domain in enumerate(("Art", "Clipart", "Product", real_world)):
        for c, cls in enumerate(classes):
            for i in range(per_class):
                write_image(tree / domain / cls / f"{i:05d}.jpg", color_of(d, c), size=(40 + 7 * i, 30 + 5 * d))
                count += 1
    return count


def write_imagefolder(tree: Path, splits=("train", "test"), classes=("cat", "dog", "fox"), per_class: int = 4,
                      size: tuple[int, int] = (8, 8)) -> int:
    """`tree/[split/]<class>/<n>.png` (lossless); `splits=()` writes the flat layout."""
    count = 0
    for s, split in enumerate(splits or ("",)):
        for c, cls in enumerate(classes):
            for i in range(per_class):
                write_image(tree / split / cls / f"{i}.png", color_of(s, c), size=size)
                count += 1
    return count
