"""Datasets and partitioning. Importing this package registers every dataset."""

from .base import DATASETS, DatasetEntry, FederatedData, ImageSet, ProgressFn, register_dataset
from .partition import PARTITIONERS, PROTOCOLS, Partition, make_partition, partition_for
from . import cifar100, digits, imagefolder, officehome, organamnist  # noqa: F401  (registers)

__all__ = [
    "DATASETS", "DatasetEntry", "FederatedData", "ImageSet", "PARTITIONERS", "PROTOCOLS", "Partition",
    "ProgressFn", "make_partition", "partition_for", "register_dataset",
]
