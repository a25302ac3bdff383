"""CIFAR-100 (Krizhevsky, 2009): 60,000 32x32 images of 100 classes, official 50k/10k split.

Looked for, in order, under `<dataset.root>`:
the cache `.pflbench-cache/cifar100/`, the extracted `cifar-100-python/`
folder (files `train`, `test`, `meta`), the archive
`cifar-100-python.tar.gz`; else the archive is downloaded from its
original host. The archive's MD5 is checked, and the pickles inside are read
with a restricted unpickler that builds only what the format holds (dicts,
lists, strings, numbers, numpy arrays): a file that asks for anything else
is refused instead of executed.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from ..benchmark.config import DatasetConfig
from ..benchmark.errors import UserError
from .base import ImageSet, ProgressFn, register_dataset
from .cache import CACHE_DIR, ArrayCache

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"  # what the archive extracts to
_PARTS = ("train", "test", "meta")

_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array-unpickling helper, wherever numpy keeps it
# The only callables a CIFAR python-format pickle needs (numpy 1.x and 2.x module paths).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a callable outside the CIFAR format."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals in `_ALLOWED`; anything else raises."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"refusing to load {module}.{name}") from None


def read_pickle(data: bytes, where: str) -> dict[str, Any]:
    """A CIFAR python-format pickle as a dict with str keys; a UserError names `where`."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except RefusedGlobal as err:
        raise UserError(f"{where} is not a CIFAR-100 python-format file ({err})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as err:
        raise UserError(f"{where} is corrupt or truncated ({type(err).__name__}: {err}); download it again") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where} is not a CIFAR-100 python-format file (holds {type(obj).__name__}, not dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path) -> None:
    """Fetch `url` into `dest` (through a `.part` file, so a broken download leaves nothing)."""
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _read_archive(path: Path) -> dict[str, bytes]:
    digest = md5_of(path)
    if digest != MD5:
        raise UserError(
            f"{path} has MD5 {digest}, expected {MD5}: the file is corrupt or truncated;"
            f" delete it and download {URL} again"
        )
    try:
        with tarfile.open(path, "r:gz") as tar:
            parts = {}
            for part in _PARTS:
                member = tar.extractfile(f"{FOLDER}/{part}")
                if member is None:
                    raise KeyError(part)
                parts[part] = member.read()
            return parts
    except (tarfile.TarError, KeyError, OSError, EOFError) as err:
        raise UserError(f"{path} is not a readable CIFAR-100 archive ({type(err).__name__}: {err})") from None


def _source_parts(root: Path) -> tuple[dict[str, bytes], Path]:
    """The raw `train`, `test` and `meta` pickles, from the folder, the archive or a download."""
    folder = root / FOLDER
    if all((folder / p).is_file() for p in _PARTS):
        return {p: (folder / p).read_bytes() for p in _PARTS}, folder
    archive = root / ARCHIVE
    if not archive.is_file():
        try:
            root.mkdir(parents=True, exist_ok=True)
            download(URL, archive)
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(
                f"CIFAR-100 not found and the download failed ({reason}); download {URL}"
                f" and place {ARCHIVE} in {root.resolve()}/ (or its extracted {FOLDER}/ folder)"
            ) from None
    return _read_archive(archive), archive


def parse(parts: dict[str, bytes], where: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Images (N, 32, 32, 3) uint8, fine labels, the official-test mask and the class names."""
    images, labels, is_test = [], [], []
    for split in ("train", "test"):
        batch = read_pickle(parts[split], f"{where}/{split}")
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            fine = np.asarray(batch["fine_labels"], dtype=np.int64)
        except (KeyError, ValueError) as err:
            raise UserError(f"{where}/{split} lacks CIFAR-100 fields ({type(err).__name__}: {err})") from None
        if len(fine) != len(data):
            raise UserError(f"{where}/{split} has {len(data)} images but {len(fine)} labels")
        images.append(data.transpose(0, 2, 3, 1))
        labels.append(fine)
        is_test.append(np.full(len(fine), split == "test"))
    meta = read_pickle(parts["meta"], f"{where}/meta")
    names = meta.get("fine_label_names")
    if not isinstance(names, list):
        raise UserError(f"{where}/meta lacks fine_label_names")
    labels_all = np.concatenate(labels)
    if labels_all.min() < 0 or labels_all.max() >= len(names):
        raise UserError(f"{where}: labels outside 0..{len(names) - 1}")
    return np.concatenate(images), labels_all, np.concatenate(is_test), [str(n) for n in names]


@register_dataset(
    "cifar100",
    "CIFAR-100: 60,000 32x32 images, 100 classes (downloaded from cs.toronto.edu, or a local copy)",
    options=DatasetConfig,
    default_preset="paper-cifar100",
    num_samples=60_000,
    num_classes=100,
)
def load_cifar100(cfg: DatasetConfig, progress: ProgressFn | None = None) -> ImageSet:
    """All 60,000 images (train then test), the official test split marked."""
    root = Path(cfg.root)
    cache = ArrayCache(root / CACHE_DIR / "cifar100", {"dataset": "cifar100", "md5": MD5})
    hit = cache.load()
    if hit is not None:
        arrays, info = hit
        return ImageSet(images=arrays["images"], labels=arrays["labels"], class_names=info["class_names"],
                        official_test=arrays["official_test"])
    parts, where = _source_parts(root)
    images, labels, official_test, names = parse(parts, where)
    cache.save({"images": images, "labels": labels, "official_test": official_test}, {"class_names": names})
    return ImageSet(images=images, labels=labels, class_names=names, official_test=official_test)
