"""Decoded arrays kept on disk as uint8 `.npy` next to a small JSON manifest.

The manifest records a key (source files, image size, format version); a
cache whose key differs from the one asked for is stale and is rebuilt. The
manifest is written last, so an interrupted save never looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

CACHE_DIR = ".pflbench-cache"  # under dataset.root; hidden so image-folder scans skip it
_FORMAT = 1  # bump when the cached layout changes


class ArrayCache:
    """Named numpy arrays under `folder`, valid while the manifest's key matches `key`."""

    def __init__(self, folder: str | Path, key: Mapping[str, Any]):
        self.folder = Path(folder)
        self.key = {"format": _FORMAT, **key}
        self.manifest = self.folder / "manifest.json"

    def load(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The cached arrays and the info saved with them, or None when missing or stale."""
        try:
            manifest = json.loads(self.manifest.read_text())
            if manifest.get("key") != self.key:
                return None
            arrays = {name: np.load(self.folder / f"{name}.npy", allow_pickle=False) for name in manifest["arrays"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing, partly written or unreadable: rebuild it
        return arrays, manifest.get("info", {})

    def save(self, arrays: Mapping[str, np.ndarray], info: Mapping[str, Any] | None = None) -> bool:
        """Write the arrays, then the manifest; False when the folder is not writable."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.manifest.unlink(missing_ok=True)  # invalid until every array is written
            for name, array in arrays.items():
                tmp = self.folder / f"{name}.tmp.npy"
                np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
                os.replace(tmp, self.folder / f"{name}.npy")
            text = json.dumps({"key": self.key, "arrays": list(arrays), "info": dict(info or {})})
            tmp = self.folder / "manifest.tmp.json"
            tmp.write_text(text)
            os.replace(tmp, self.manifest)
        except OSError:
            return False  # a read-only data folder still works, just without a cache
        return True
