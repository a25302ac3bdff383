"""Datasets and partitioning. Importing this package registers every dataset."""

from .base import DATASETS, DatasetEntry, FederatedData, ImageSet, register_dataset
from .partition import PARTITIONERS, Partition, make_partition
from . import digits  # noqa: F401  (registers)

__all__ = [
    "DATASETS", "DatasetEntry", "FederatedData", "ImageSet", "PARTITIONERS", "Partition",
    "make_partition", "register_dataset",
]
