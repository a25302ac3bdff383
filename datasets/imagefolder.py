"""Bring your own images: a folder of `<class>/<image>`, optionally under `train/` and `test/`.

Layout, below `<dataset.root>/<dataset.folder>`:

    <class>/<image>                      every image in one pool, or
    train/<class>/<image>                the official split: test/ images are
    test/<class>/<image>                 marked official_test (data.protocol=keep-test)
    (val/<class>/<image>                 optional; pooled with train)

Images are decoded once (Pillow), squashed to `dataset.image_size` when it
is set, and cached under `<dataset.root>/.pflbench-cache/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..benchmark.config import DatasetConfig
from ..benchmark.errors import UserError
from .base import ImageSet, ProgressFn, register_dataset
from .cache import CACHE_DIR
from .folders import load_images, scan_tree, visible_dirs

SPLITS = ("train", "val", "test")  # recognised split folders; test = the official test set


@dataclass
class ImageFolderOptions(DatasetConfig):
    """Where the image tree is and how its images are prepared."""

    folder: str = ""  # the tree below dataset.root (or an absolute path); "" = dataset.root itself
    image_size: int = 0  # square side images are resized to; 0 = keep (all must share one size)
    hflip: bool = True  # a mirrored image keeps its label (set false for digits, text, left/right labels)

    def validate(self) -> None:
        if self.image_size < 0:
            raise UserError(f"bad value for dataset.image_size: {self.image_size} (0 = keep, or a size in pixels)")


def tree_path(cfg: ImageFolderOptions) -> Path:
    """The image tree named by the options."""
    return Path(cfg.root) / cfg.folder if cfg.folder else Path(cfg.root)


@register_dataset(
    "imagefolder",
    "your own images: <data-root>/<dataset.folder>/[train|test/]<class>/<image> (JPEG, PNG, ...)",
    options=ImageFolderOptions,
)
def load_imagefolder(cfg: ImageFolderOptions, progress: ProgressFn | None = None) -> ImageSet:
    """Every image of the tree; with train/ and test/ folders, test/ is the official test split."""
    tree = tree_path(cfg)
    layout = "put images at <dataset.root>/<dataset.folder>/<class>/<image> (or under train/ and test/)"
    if not tree.is_dir():
        raise UserError(f"image folder not found: {tree.resolve()}; {layout}, or set --data-root / dataset.folder")
    top = visible_dirs(tree)
    split_layout = "train" in top and set(top) <= set(SPLITS)
    groups = [(s, s) for s in SPLITS if s in top] if split_layout else [("all", "")]
    files = scan_tree(tree, groups)
    if not files.paths:
        raise UserError(f"no images found in {tree.resolve()}; {layout}")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.folder.strip("/")) or "root"
    images = load_images(files, cfg.image_size, Path(cfg.root) / CACHE_DIR / f"imagefolder-{name}", progress)
    official_test = None
    if split_layout and "test" in top:
        official_test = files.groups == files.group_names.index("test")
    return ImageSet(images=images, labels=files.labels, class_names=files.class_names,
                    official_test=None if official_test is None else np.asarray(official_test), hflip=cfg.hflip)
