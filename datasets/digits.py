"""scikit-learn's bundled 8x8 handwritten digits: real data that needs no download."""

from __future__ import annotations

import numpy as np

from ..benchmark.config import DatasetConfig
from .base import ImageSet, ProgressFn, register_dataset


@register_dataset(
    "digits",
    "scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; offline)",
    default_preset="demo",
)
def load_digits(cfg: DatasetConfig, progress: ProgressFn | None = None) -> ImageSet:
    """All 1,797 images as uint8 (N, 8, 8, 1); pixel values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.clip(np.rint(bunch.images * (255 / 16)), 0, 255).astype(np.uint8)[..., None]
    return ImageSet(
        images=images,
        labels=bunch.target.astype(np.int64),
        class_names=[str(d) for d in range(10)],
        hflip=False,  # a mirrored digit is a different symbol
    )
