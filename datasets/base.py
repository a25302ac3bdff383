"""Datasets as device-resident tensors, split over clients by index.

A dataset loader returns an `ImageSet`: every image as one uint8 array plus
labels (and, where they exist, domains and the official test split).
`FederatedData` moves the images to the run's device once and hands each
client its train / val / test samples as index tensors; batches are drawn by
index with a seeded generator, and normalization, resizing and light
augmentation run batched on the device. No per-sample Python, no DataLoader
workers in the hot loop.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..benchmark.config import NORMALIZATIONS, DatasetConfig
from ..benchmark.device import to_device
from ..benchmark.registry import Registry
from .partition import Partition


@dataclass
class ImageSet:
    """A whole dataset in host memory, before it is split over clients."""

    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray  # int64, (N,)
    class_names: list[str]  # index -> class name
    domains: np.ndarray | None = None  # int64 (N,): the domain of each sample, if any
    domain_names: list[str] = field(default_factory=list)  # index -> domain name
    official_test: np.ndarray | None = None  # bool (N,): in the official test split
    hflip: bool = True  # a horizontal flip keeps the label (false for digits, text)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        if len(self.labels) != len(self.images):
            raise ValueError("images and labels differ in length")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# A loader reports slow preparation (decoding thousands of images) as (done, total).
ProgressFn = Callable[[int, int], None]
# A loader: `load(options, progress=None) -> ImageSet`; it reads (or downloads) the files.
Loader = Callable[..., ImageSet]


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: how to load it and how to describe it."""

    name: str  # registry key
    description: str  # one line for `bench list`
    load: Loader  # load(options, progress=None): reads (or downloads) the files
    Options: type[DatasetConfig] = DatasetConfig  # the `dataset.*` config section
    default_preset: str | None = None  # preset used when --preset is not given
    num_samples: int = 0  # images in the published dataset, all splits (for estimates without the files); 0 = unknown
    num_classes: int = 0  # classes of the published dataset; 0 = unknown


def _adopt_dataset(name: str, obj: object) -> None:
    """A plug-in's entry point naming a DatasetEntry it did not register: register it under its own name."""
    if isinstance(obj, DatasetEntry) and obj.name == name:
        DATASETS.add(name, obj)


# Installed packages add datasets through the entry-point group `pflbench.datasets`.
DATASETS: Registry[DatasetEntry] = Registry("dataset", group="pflbench.datasets", adopt=_adopt_dataset)


def register_dataset(
    name: str,
    description: str,
    *,
    options: type[DatasetConfig] = DatasetConfig,
    default_preset: str | None = None,
    num_samples: int = 0,
    num_classes: int = 0,
) -> Callable[[Loader], Loader]:
    """Register a loader `load(options, progress=None) -> ImageSet` under `name`.

    `num_samples` and `num_classes` describe the published dataset (0 = unknown), so that
    `bench plan` can estimate a run's cost before the files are there.
    """

    def wrap(load: Loader) -> Loader:
        DATASETS.add(name, DatasetEntry(name, description, load, options, default_preset, num_samples, num_classes))
        return load

    return wrap


def channel_statistics(
    images: torch.Tensor, index: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std in [0, 1] of `images[index]` (uint8 N,H,W,C), in float64 chunks.

    Only the given images enter the statistics, so test images never shape
    the preprocessing of the training ones.
    """
    channels = images.shape[-1]
    total = torch.zeros(channels, dtype=torch.float64)
    square = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for start in range(0, len(index), chunk):
        x = images[index[start : start + chunk]].reshape(-1, channels).double().div_(255)
        total += x.sum(0)
        square += x.square().sum(0)
        count += len(x)
    mean = total / max(count, 1)
    var = (square / max(count, 1) - mean.square()).clamp_min(0) * count / max(count - 1, 1)
    return mean, var.sqrt()


class FederatedData:
    """All images on one device, and every client's train / val / test indices."""

    def __init__(
        self,
        images: ImageSet,
        partition: Partition,
        *,
        device: torch.device | str = "cpu",
        image_size: int = 0,
        augment: bool = True,
        normalize: str = "train",
    ):
        self.device = torch.device(device)
        self.partition = partition
        self.class_names = images.class_names
        self.num_classes = images.num_classes
        self.native_size = images.images.shape[1]
        self.image_size = image_size or self.native_size  # what the model sees
        self.in_chans = images.images.shape[3]
        self.hflip = images.hflip
        self.augment = augment
        with warnings.catch_warnings():
            # A cached dataset is a read-only memory map; nothing here writes to the images.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            host = torch.from_numpy(np.ascontiguousarray(images.images))
        if normalize == "fixed":  # the reference's transform: (x - 0.5) / 0.5
            mean, std = torch.full((self.in_chans,), 0.5), torch.full((self.in_chans,), 0.5)
        elif normalize == "train":
            train = np.unique(np.concatenate([np.asarray(ix, dtype=np.int64) for ix in partition.train]))
            mean, std = channel_statistics(host, torch.from_numpy(train))
        else:
            raise ValueError(f"unknown normalization {normalize!r}; choose one of: {', '.join(NORMALIZATIONS)}")
        self.mean = mean.float().to(self.device).view(1, -1, 1, 1)
        self.std = std.float().clamp_min(1e-3).to(self.device).view(1, -1, 1, 1)
        self.images = host.permute(0, 3, 1, 2).contiguous().to(self.device)  # uint8 N,C,H,W
        self.labels = torch.from_numpy(images.labels.astype(np.int64)).to(self.device)
        self._splits = {
            split: [torch.from_numpy(ix.astype(np.int64)).to(self.device) for ix in getattr(partition, split)]
            for split in ("train", "val", "test")
        }

    @property
    def num_clients(self) -> int:
        return len(self.partition.train)

    def indices(self, client: int, split: str) -> torch.Tensor:
        """The sample indices of one client's split ("train", "val" or "test")."""
        return self._splits[split][client]

    def num_samples(self, client: int, split: str = "train") -> int:
        return len(self._splits[split][client])

    def prepare(self, index: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized float images and labels for an index batch.

        With a generator (and augmentation on), each image is randomly
        cropped (4-pixel padding at 32 px, scaled with size) and, where
        labels allow, flipped; all in a few batched tensor ops.
        """
        x = self.images[index].float().div_(255)
        if generator is not None and self.augment:
            offset_y, offset_x, flip = (t.to(x.device) for t in self._draw_augmentation(len(index), generator))
            x = self._crop_flip(x, offset_y, offset_x, flip if self.hflip else None)
        return self._finish(x), self.labels[index]

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.image_size != self.native_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x

    @property
    def _pad(self) -> int:
        return max(1, self.native_size // 8)

    def _draw_augmentation(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """One batch's crop offsets (y, x) and flips (zeros where labels forbid flips), drawn on the CPU.

        Drawn on the CPU so a seed gives the same batches on any device; this
        order of draws is what fixes a seed's batches.
        """
        span = 2 * self._pad + 1
        offset_y = torch.randint(0, span, (batch,), generator=generator)
        offset_x = torch.randint(0, span, (batch,), generator=generator)
        if self.hflip:
            flip = (torch.rand(batch, generator=generator) < 0.5).long()
        else:
            flip = torch.zeros(batch, dtype=torch.long)
        return offset_y, offset_x, flip

    def _crop_flip(self, x: torch.Tensor, offset_y: torch.Tensor, offset_x: torch.Tensor,
                   flip: torch.Tensor | None) -> torch.Tensor:
        batch, _, height, width = x.shape
        pad = self._pad
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = offset_y[:, None] + torch.arange(height, device=x.device)
        cols = offset_x[:, None] + torch.arange(width, device=x.device)
        if flip is not None:
            cols = torch.where(flip.bool()[:, None], cols.flip(1), cols)
        batch_ix = torch.arange(batch, device=x.device)[:, None, None]
        # Advanced indexing on dims 0, 2, 3 yields (B, H, W, C).
        return padded[batch_ix, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def train_batches(
        self, client: int, epochs: float, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`epochs` shuffled passes over a client's training samples (as `shuffled_positions` orders them).

        Each epoch's order, crop offsets and flips are drawn on the CPU (in
        the order `prepare` draws them batch by batch) into one tensor that
        goes to the device in one non-blocking copy: the batch loop never
        waits for the host.
        """
        index = self._splits["train"][client]
        whole = int(epochs)
        for epoch in range(math.ceil(epochs)):
            order = torch.randperm(len(index), generator=generator)
            if epoch == whole:  # the fractional pass
                order = order[: max(1, round((epochs - whole) * len(index)))]
            columns = [order]
            if self.augment:
                draws = [self._draw_augmentation(len(order[s : s + batch_size]), generator)
                         for s in range(0, len(order), batch_size)]
                columns += [torch.cat(column) for column in zip(*draws)]
            table = to_device(torch.stack(columns), self.device)  # (1 or 4, samples): order, y, x, flip
            shuffled = index[table[0]]
            for start in range(0, len(shuffled), batch_size):
                batch = shuffled[start : start + batch_size]
                x = self.images[batch].float().div_(255)
                if self.augment:
                    part = table[1:, start : start + batch_size]
                    x = self._crop_flip(x, part[0], part[1], part[2] if self.hflip else None)
                yield self._finish(x), self.labels[batch]

    def shuffled_positions(
        self, count: int, epochs: float, batch_size: int, generator: torch.Generator
    ) -> Iterator[torch.Tensor]:
        """Batches of positions in `range(count)`: `epochs` shuffled passes.

        A fractional part is the first share of one more shuffled pass (at
        least one sample), so a budget of 0.5 epochs sees half the samples.
        Each epoch's order reaches the device in one non-blocking copy.
        """
        whole = int(epochs)
        for epoch in range(math.ceil(epochs)):
            order = to_device(torch.randperm(count, generator=generator), self.device)
            if epoch == whole:  # the fractional pass
                order = order[: max(1, round((epochs - whole) * count))]
            for start in range(0, len(order), batch_size):
                yield order[start : start + batch_size]

    def eval_batches(self, client: int, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A client's val or test samples in order, without augmentation."""
        index = self._splits[split][client]
        for start in range(0, len(index), batch_size):
            yield self.prepare(index[start : start + batch_size])
