"""Image files, labelled tile folders and the source id of a tile file.

A labelled folder is ``<root>/<class>/**/<image>``: one sub-folder of tiles per class. The *source* of a
tile (the image or slide it was cut from) is parsed from its file name — Kather 2016's
``<n>_<SOURCE>.tif_Row_<r>_Col_<c>.jpg`` and ``<SOURCE>_x<x>_y<y>`` names of tile exporters — so that
:func:`wsi_pipeline.tiles.split.source_split` keeps neighbouring tiles on one side of a split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_pipeline.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
# Kather 2016: "<hex id>_<SOURCE>.tif_Row_<r>_Col_<c>.jpg" (SOURCE e.g. CRC-Prim-HE-07_022)
KATHER_NAME = re.compile(r"^[0-9A-Fa-f]+_(?P<source>.+?)\.tiff?_Row_\d+_Col_\d+", re.IGNORECASE)
# generic "<SOURCE>_x<x>_y<y>" / "<SOURCE>_<x>_<y>" tile names written by tile exporters
COORD_NAME = re.compile(r"^(?P<source>.+?)[_-]x?\d+[_-]y?\d+$")


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive), sorted; hidden files and folders skipped."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a folder of tiles — pass a folder of images (searched recursively)")
    files = [
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(files)


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def parse_source_id(name: str) -> str | None:
    """Source image of a tile from its file name, or None when the name carries none.

    Kather 2016 names (``1A2B_CRC-Prim-HE-07_022.tif_Row_1_Col_301.jpg`` → ``CRC-Prim-HE-07_022``) and
    ``<source>_x<x>_y<y>`` / ``<source>_<x>_<y>`` tile names are understood.
    """
    stem = Path(name).name
    m = KATHER_NAME.match(stem)
    if m:
        return m.group("source")
    m = COORD_NAME.match(Path(stem).stem)
    if m:
        return m.group("source")
    return None


def class_key(class_name: str) -> str:
    """A class name without its ordering prefix, lower-case, other characters as '_': '01_TUMOR' → 'tumor',
    'Complex stroma' → 'complex_stroma' (a name with nothing left is returned as is)."""
    name = re.sub(r"^\d+[_\-\s]*", "", class_name.strip())
    name = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
    return name or class_name


@dataclass
class LabelledTiles:
    """Tiles of a labelled folder: one entry per file, classes from the sub-folder names."""

    root: Path
    paths: list[Path]
    labels: np.ndarray  # (N,) int64 index into class_names
    class_names: list[str]
    sources: list[str | None] = field(default_factory=list)  # source image per tile (None: unknown)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, mask: np.ndarray) -> LabelledTiles:
        idx = np.flatnonzero(mask)
        return LabelledTiles(
            self.root, [self.paths[i] for i in idx], self.labels[idx], list(self.class_names),
            [self.sources[i] for i in idx],
        )


def load_labelled_folder(root: str | Path) -> LabelledTiles:
    """``root/<class>/**/<image>`` → :class:`LabelledTiles` (classes sorted by folder name)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder — pass a folder with one sub-folder of tiles per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    for ci, c in enumerate(classes):
        files = list_images(root / c)
        paths += files
        labels += [ci] * len(files)
    used = sorted(set(labels))
    if len(used) < 2:
        raise ConfigError(
            f"{root}: found {len(used)} class sub-folder(s) with images; a labelled folder needs ≥ 2 "
            "(layout: <root>/<class>/<tile>.jpg)"
        )
    if len(used) < len(classes):
        keep = [classes[i] for i in used]
        remap = {old: new for new, old in enumerate(used)}
        labels = [remap[x] for x in labels]
        classes = keep
    return LabelledTiles(root, paths, np.asarray(labels, np.int64), classes, [parse_source_id(p.name) for p in paths])
