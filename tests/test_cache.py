"""The decoded-image cache follows the files' content and rebuilds itself, saying so, when it does not fit."""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from pflbench.datasets.cache import CACHE_DIR
from pflbench.datasets.imagefolder import ImageFolderOptions, load_imagefolder

from fileformats import write_image, write_imagefolder


def _cache(tmp_path):
    return tmp_path / CACHE_DIR / "imagefolder-pets"


def test_an_image_edited_in_place_with_the_same_size_rebuilds_the_cache(tmp_path, caplog):
    write_imagefolder(tmp_path / "pets", splits=(), per_class=2)
    opts = ImageFolderOptions(name="imagefolder", root=str(tmp_path), folder="pets")
    first = load_imagefolder(opts)
    target = tmp_path / "pets" / "cat" / "0.ppm"
    # PPM: the same pixel count gives the same byte size, whatever the colour.
    write_image(target, (1, 2, 3), size=(8, 8))
    size = target.stat().st_size
    grown = load_imagefolder(opts)  # a new file: rebuilt
    assert len(grown.labels) == len(first.labels) + 1
    write_image(target, (250, 9, 9), size=(8, 8))
    assert target.stat().st_size == size
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # as an editor saving a second later
    with caplog.at_level(logging.WARNING):
        edited = load_imagefolder(opts)
    index = [i for i in range(len(edited.labels)) if tuple(edited.images[i, 0, 0]) == (250, 9, 9)]
    assert len(index) == 1  # the edit is seen, not the stale pixels
    assert any("rebuilding" in r.getMessage() for r in caplog.records)


def test_a_cache_with_the_wrong_shape_is_rebuilt_with_one_line(tmp_path, caplog):
    write_imagefolder(tmp_path / "pets", splits=(), per_class=2)
    opts = ImageFolderOptions(name="imagefolder", root=str(tmp_path), folder="pets")
    good = load_imagefolder(opts)
    folder = _cache(tmp_path)
    # A right-format .npy of the wrong shape, behind the manifest's back...
    np.save(folder / "images.npy", np.zeros((3, 4, 4, 3), np.uint8))
    with caplog.at_level(logging.WARNING):
        again = load_imagefolder(opts)
    np.testing.assert_array_equal(again.images, good.images)
    (message,) = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert "images.npy" in message and "\n" not in message
    caplog.clear()
    # ... and one whose manifest was made to agree: the loader's own shape check catches it.
    np.save(folder / "images.npy", np.zeros((3, 4, 4, 3), np.uint8))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["arrays"]["images"] = [[3, 4, 4, 3], "uint8"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        third = load_imagefolder(opts)
    np.testing.assert_array_equal(third.images, good.images)
    assert any("expected uint8" in r.getMessage() for r in caplog.records)
    caplog.clear()
    load_imagefolder(opts)  # now it fits again: silent
    assert not [r for r in caplog.records if "rebuilding" in r.getMessage()]
