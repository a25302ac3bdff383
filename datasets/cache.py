"""Decoded arrays kept on disk as uint8 `.npy` next to a small JSON manifest.

The manifest records a key (source files, image size, format version) and
each array's shape and dtype; a cache whose key differs from the one asked
for, or whose arrays are not what the manifest says (or what the caller
expects), is stale and is rebuilt, with one line saying why. The manifest is
written last, so an interrupted save never looks complete.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

CACHE_DIR = ".pflbench-cache"  # under dataset.root; hidden so image-folder scans skip it
_FORMAT = 2  # bump when the cached layout changes (2: shapes and dtypes in the manifest)
log = logging.getLogger(__name__)

# Checks the caller adds: `{name: check(array) -> problem or None}`.
Checks = Mapping[str, Callable[[np.ndarray], "str | None"]]


class ArrayCache:
    """Named numpy arrays under `folder`, valid while the manifest's key matches `key`."""

    def __init__(self, folder: str | Path, key: Mapping[str, Any]):
        self.folder = Path(folder)
        self.key = {"format": _FORMAT, **key}
        self.manifest = self.folder / "manifest.json"

    def load(self, checks: Checks | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The cached arrays and the info saved with them, or None when missing or stale.

        A cache that exists but does not match is reported in one line (it is rebuilt next).
        """
        if not self.manifest.exists():
            return None  # never built, or a save was interrupted: built now, nothing to say
        problem = self._problem(checks or {})
        if isinstance(problem, str):
            log.warning("the cache in %s does not match (%s); rebuilding it", self.folder, problem)
            return None
        return problem

    def _problem(self, checks: Checks) -> str | tuple[dict[str, np.ndarray], dict[str, Any]]:
        try:
            manifest = json.loads(self.manifest.read_text())
            if manifest.get("key") != self.key:
                return "its source files or settings changed"
            arrays = {}
            for name, (shape, dtype) in manifest["arrays"].items():
                array = np.load(self.folder / f"{name}.npy", allow_pickle=False, mmap_mode="r")
                if list(array.shape) != list(shape) or str(array.dtype) != dtype:
                    return f"{name}.npy is {array.dtype} {tuple(array.shape)}, its manifest says {dtype} {tuple(shape)}"
                check = checks.get(name)
                found = check(array) if check is not None else None
                if found:
                    return f"{name}.npy: {found}"
                arrays[name] = np.asarray(array)  # read into memory (the mapping would pin the file)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"unreadable: {type(err).__name__}"
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
            layout = {name: [list(a.shape), str(a.dtype)] for name, a in arrays.items()}
            text = json.dumps({"key": self.key, "arrays": layout, "info": dict(info or {})})
            tmp = self.folder / "manifest.tmp.json"
            tmp.write_text(text)
            os.replace(tmp, self.manifest)
        except OSError:
            return False  # a read-only data folder still works, just without a cache
        return True
