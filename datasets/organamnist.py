"""OrganAMNIST (MedMNIST v2, Yang et al., 2023): 58,830 abdominal CT slices, 11 organs.

Read from medmnist's own npz files under `<dataset.root>`:
`organamnist.npz` (28 px) or `organamnist_{64,128,224}.npz` (`dataset.size`),
keys `{train,val,test}_images` (uint8 N,H,W) and `{train,val,test}_labels`
(N,1). Names, URLs and checksums come from medmnist's `INFO`; a missing file
is downloaded through medmnist. The arrays are read directly (medmnist's
Dataset asserts the official sample counts on `len()`).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..benchmark.config import DatasetConfig
from ..benchmark.errors import UserError
from .base import ImageSet, ProgressFn, register_dataset

FLAG = "organamnist"
SIZES = (28, 64, 128, 224)  # the sizes MedMNIST publishes


@dataclass
class OrganAMNISTOptions(DatasetConfig):
    """Which published size to read, and how many channels to give the model."""

    size: int = 28  # image side: 28 (organamnist.npz) or 64, 128, 224 (organamnist_<size>.npz)
    channels: int = 3  # 1 = gray as stored; 3 = gray repeated to RGB (the FedPerfix setting)

    def validate(self) -> None:
        if self.size not in SIZES:
            raise UserError(f"bad value for dataset.size: {self.size} (choose one of: {', '.join(map(str, SIZES))})")
        if self.channels not in (1, 3):
            raise UserError(f"bad value for dataset.channels: {self.channels} (1 or 3)")


def _suffix(size: int) -> str:
    return "" if size == 28 else f"_{size}"


def file_name(size: int) -> str:
    """The npz file medmnist publishes for `size`."""
    return f"{FLAG}{_suffix(size)}.npz"


def _info() -> dict:
    from medmnist import INFO  # imported late: medmnist pulls in scikit-learn and more

    return INFO[FLAG]


def download(root: Path, size: int) -> None:
    """Fetch the npz through medmnist (it checks the MD5)."""
    from medmnist import OrganAMNIST

    OrganAMNIST(split="test", root=str(root), size=size, download=True)


@register_dataset(
    "organamnist",
    "OrganAMNIST (MedMNIST): 58,830 gray CT slices, 11 organs, 28-224 px (downloaded via medmnist)",
    options=OrganAMNISTOptions,
    default_preset="paper-organamnist",
    num_samples=58_830,
    num_classes=11,
)
def load_organamnist(cfg: OrganAMNISTOptions, progress: ProgressFn | None = None) -> ImageSet:
    """Official train+val then test (the test split marked), gray as 1 or 3 channels."""
    info = _info()
    root = Path(cfg.root)
    path = root / file_name(cfg.size)
    if not path.is_file():
        url = info[f"url{_suffix(cfg.size)}"]
        try:
            root.mkdir(parents=True, exist_ok=True)
            download(root, cfg.size)
        except Exception as err:  # medmnist wraps every failure in a multi-line RuntimeError
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"{path.name} not found in {root.resolve()} and the download failed ({reason});"
                f" download {url} (MD5 {info[f'MD5{_suffix(cfg.size)}']}) and place it at {path.resolve()}"
            ) from None
    splits = ("train", "val", "test")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images = [npz[f"{s}_images"] for s in splits]
            labels = [npz[f"{s}_labels"].reshape(-1).astype(np.int64) for s in splits]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(
            f"{path} is not a readable MedMNIST npz ({type(err).__name__}: {err}); delete it and download it again"
        ) from None
    gray = np.concatenate(images)
    if gray.ndim == 4 and gray.shape[-1] == 1:
        gray = gray[..., 0]
    if gray.dtype != np.uint8 or gray.shape[1:] != (cfg.size, cfg.size):
        raise UserError(f"{path} holds {gray.dtype} images of shape {gray.shape[1:]}, expected uint8 {cfg.size}x{cfg.size}")
    pixels = np.repeat(gray[..., None], cfg.channels, axis=-1)
    names = [info["label"][str(i)] for i in range(len(info["label"]))]
    all_labels = np.concatenate(labels)
    if all_labels.min() < 0 or all_labels.max() >= len(names):
        raise UserError(f"{path}: labels outside 0..{len(names) - 1}")
    official_test = np.concatenate([np.full(len(lab), s == "test") for s, lab in zip(splits, labels)])
    return ImageSet(images=pixels, labels=all_labels, class_names=names, official_test=official_test,
                    hflip=False)  # left/right organs are distinct classes: a mirror changes the label
