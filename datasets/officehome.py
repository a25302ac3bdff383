"""Office-Home (Venkateswara et al., 2017): 15,588 images of 65 classes in four domains.

Layout, below `<dataset.root>/<dataset.folder>` (default `data/OfficeHome`):

    Art/<class>/<image>  Clipart/...  Product/...  Real_World/...

The official archive (OfficeHomeDataset_10072016.zip) unzips to a folder of
that name with `Real World` spelt with a space; both spellings and both
folder names are accepted, as is the data root itself. The licence asks for
a manual download, so nothing is fetched automatically. Images are decoded
once, squashed to `dataset.image_size`, and cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..benchmark.config import DatasetConfig
from ..benchmark.errors import UserError
from .base import ImageSet, ProgressFn, register_dataset
from .cache import CACHE_DIR
from .folders import load_images, scan_tree

HOMEPAGE = "https://www.hemanthdv.org/officeHomeDataset.html"
DOMAINS = ("Art", "Clipart", "Product", "Real_World")
ARCHIVE_FOLDER = "OfficeHomeDataset_10072016"  # what the official zip unzips to


@dataclass
class OfficeHomeOptions(DatasetConfig):
    """Where Office-Home is and the size its images are stored at."""

    folder: str = "OfficeHome"  # folder below dataset.root holding Art/ Clipart/ Product/ Real_World/
    image_size: int = 224  # square side the images are resized to once, then cached

    def validate(self) -> None:
        if self.image_size < 1:
            raise UserError(f"bad value for dataset.image_size: {self.image_size} (must be >= 1)")


def _domain_folder(tree: Path, domain: str) -> str | None:
    for name in (domain, domain.replace("_", " ")):
        if (tree / name).is_dir():
            return name
    return None


def find_tree(cfg: OfficeHomeOptions) -> tuple[Path, list[str]]:
    """The folder holding the four domains, and each domain's folder name in it."""
    root = Path(cfg.root)
    for tree in (root / cfg.folder, root / ARCHIVE_FOLDER, root):
        folders = [_domain_folder(tree, d) for d in DOMAINS]
        if all(folders):
            return tree, folders  # type: ignore[return-value]
    raise UserError(
        f"Office-Home not found: expected {(root / cfg.folder).resolve()}/{{{','.join(DOMAINS)}}}/<class>/<image>;"
        f" download OfficeHomeDataset_10072016.zip from {HOMEPAGE} (its licence asks for a manual download)"
        f" and unzip its four domain folders there"
    )


@register_dataset(
    "officehome",
    "Office-Home: 65 classes in 4 domains (Art, Clipart, Product, Real_World); manual download",
    options=OfficeHomeOptions,
    default_preset="paper-officehome",
    num_samples=15_588,
    num_classes=65,
)
def load_officehome(cfg: OfficeHomeOptions, progress: ProgressFn | None = None) -> ImageSet:
    """Every image, labelled by class, with its domain."""
    tree, folders = find_tree(cfg)
    files = scan_tree(tree, list(zip(DOMAINS, folders)))
    if not files.paths:
        raise UserError(f"no images found below {tree.resolve()}; expected <domain>/<class>/<image>")
    images = load_images(files, cfg.image_size, Path(cfg.root) / CACHE_DIR / "officehome", progress)
    return ImageSet(images=images, labels=files.labels, class_names=files.class_names,
                    domains=files.groups, domain_names=list(DOMAINS))
