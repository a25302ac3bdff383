"""Image trees on disk (`<group>/<class>/<image>`), decoded once into a cached uint8 array.

Shared by the Office-Home loader (groups are domains) and the generic image
folder (groups are the official train / test splits). Images are decoded
with Pillow and resized to a square side; the result is cached as `.npy`
under `<dataset.root>/.pflbench-cache/`, keyed by the size and the file list
(paths, byte sizes and modification times), so a changed size, file set or an
image edited in place rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..benchmark.errors import UserError
from .base import ProgressFn
from .cache import ArrayCache

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_PROGRESS_EVERY = 500  # images between two progress reports


def visible_dirs(folder: Path) -> list[str]:
    """Names of the sub-folders of `folder`, hidden ones (the cache) left out, sorted."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def list_images(folder: Path) -> list[str]:
    """Paths (relative to `folder`, '/'-separated) of every image below it, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder)
        found += [(rel / f).as_posix() for f in filenames
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


@dataclass
class ImageFiles:
    """The images of a tree: paths, class labels and the group (domain or split) of each."""

    root: Path  # every path is relative to it
    paths: list[str]  # '/'-separated, sorted within each group
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]  # sorted union of the class folders of every group
    groups: np.ndarray  # int64 (N,): index into group_names
    group_names: list[str]

    def digest(self) -> str:
        """A hash of the file set (paths, byte sizes, modification times in ns): the cache's key.

        The time catches an image edited in place to the same size, without reading every file.
        """
        h = hashlib.sha256()
        for path in self.paths:
            st = (self.root / path).stat()
            h.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def scan_tree(root: Path, groups: Sequence[tuple[str, str]]) -> ImageFiles:
    """The images below `root`; `groups` pairs a group name with its folder (relative to
    `root`, "" = `root` itself), each holding one sub-folder of images per class."""
    per_group = {}
    for name, rel in groups:
        folder = root / rel
        per_group[name] = {cls: list_images(folder / cls) for cls in visible_dirs(folder)}
    class_names = sorted({cls for classes in per_group.values() for cls in classes})
    class_index = {cls: i for i, cls in enumerate(class_names)}
    paths, labels, group_ix = [], [], []
    for g, (name, rel) in enumerate(groups):
        prefix = f"{rel}/" if rel else ""
        for cls, files in per_group[name].items():
            paths += [f"{prefix}{cls}/{f}" for f in files]
            labels += [class_index[cls]] * len(files)
            group_ix += [g] * len(files)
    return ImageFiles(root, paths, np.asarray(labels, dtype=np.int64), class_names,
                      np.asarray(group_ix, dtype=np.int64), [name for name, _ in groups])


def decode_image(path: Path, size: int) -> np.ndarray:
    """One image as uint8 (H, W, 3), squashed to (size, size) unless size is 0."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if size:
                img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when much larger
            rgb = img.convert("RGB")
        if size and rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot decode image {path} ({err}); remove or replace the file") from None


def decode_images(files: ImageFiles, size: int, progress: ProgressFn | None = None) -> np.ndarray:
    """Every image of `files` as one uint8 (N, S, S, 3) array.

    With `size` 0 the images keep their own size, which must then be the
    same for all of them.
    """
    total = len(files.paths)
    first = decode_image(files.root / files.paths[0], size)
    out = np.empty((total, *first.shape), dtype=np.uint8)
    out[0] = first
    for i in range(1, total):
        image = decode_image(files.root / files.paths[i], size)
        if image.shape != first.shape:
            raise UserError(
                f"image {files.root / files.paths[i]} is {image.shape[1]}x{image.shape[0]} but"
                f" {files.paths[0]} is {first.shape[1]}x{first.shape[0]}; set dataset.image_size to resize all"
            )
        out[i] = image
        if progress is not None and (i + 1) % _PROGRESS_EVERY == 0:
            progress(i + 1, total)
    if progress is not None:
        progress(total, total)
    return out


def load_images(files: ImageFiles, size: int, cache_folder: Path, progress: ProgressFn | None = None) -> np.ndarray:
    """The decoded images of `files`, from the cache in `cache_folder` when it is current."""
    cache = ArrayCache(cache_folder, {"image_size": size, "files": files.digest(), "count": len(files.paths)})

    def fits(images: np.ndarray) -> str | None:
        side_ok = not size or images.shape[1:3] == (size, size)
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(files.paths) or not side_ok:
            return f"{images.dtype} {images.shape}, expected uint8 ({len(files.paths)}, {size or 'H'}, {size or 'W'}, 3)"
        return None

    hit = cache.load({"images": fits})
    if hit is not None:
        return hit[0]["images"]
    images = decode_images(files, size, progress)
    cache.save({"images": images}, {"source": str(files.root)})
    return images
