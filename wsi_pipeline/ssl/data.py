"""Tile sources for self-supervised training and labelled tile folders for encoder evaluation.

A *tile source* is an indexable collection of RGB uint8 tiles with a physical scale (``mpp``, µm/px):

* :class:`FolderTiles` — image files under a folder (recursive), all at one ``mpp`` given by the user;
* :class:`RunTiles` — tile coordinates of a RUN folder (``tiles/<slide_id>.h5``), read straight from the
  slides with :meth:`Slide.read_region_at_mpp` at the tiles' target MPP.

Labelled folders (``<root>/<class>/*.jpg``) are read by :func:`load_labelled_folder`; :func:`source_split`
splits them into train/test by *source image* (parsed from file names, e.g. Kather's
``<n>_<SOURCE>.tif_Row_<r>_Col_<c>.jpg``) so that near-neighbour tiles never straddle the split.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_pipeline.errors import ConfigError, TilesNotFoundError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
# Kather 2016: "<hex id>_<SOURCE>.tif_Row_<r>_Col_<c>.jpg" (SOURCE e.g. CRC-Prim-HE-07_022)
KATHER_NAME = re.compile(r"^[0-9A-Fa-f]+_(?P<source>.+?)\.tiff?_Row_\d+_Col_\d+", re.IGNORECASE)
# generic "<SOURCE>_x<x>_y<y>" / "<SOURCE>_<x>_<y>" tile names written by tile exporters
COORD_NAME = re.compile(r"^(?P<source>.+?)[_-]x?\d+[_-]y?\d+$")

SUBSETS = ("all", "train", "test")


# ---------------------------------------------------------------- image files
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


# ---------------------------------------------------------------- labelled folders
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


def _seeded_rng(seed: int, *keys: str) -> np.random.Generator:
    h = hashlib.sha256("|".join([str(seed), *keys]).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


@dataclass
class SplitInfo:
    """How each class was split: 'source' (by source image) or 'tile' (too few sources / none known)."""

    mode: dict[str, str]
    n_sources: dict[str, int]
    test_sources: list[str]


def source_split(
    tiles: LabelledTiles, test_fraction: float = 0.3, seed: int = 0, min_sources: int = 8
) -> tuple[np.ndarray, SplitInfo]:
    """Deterministic train/test split; returns (is_test bool mask, :class:`SplitInfo`).

    Classes whose tiles all carry a source id and that have ≥ ``min_sources`` distinct sources are split
    *by source*: sources (in a seeded order) go to test until the class holds ≥ ``test_fraction`` of its
    tiles there. A source seen in an earlier class keeps its side, so no source straddles the split among
    source-split classes. Other classes (Kather's 07_ADIPOSE with 7 sources, 08_EMPTY with 2, or folders
    without source ids) are split *by tile* (seeded shuffle, ``test_fraction`` of the tiles to test).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test fraction must lie in (0, 1), got {test_fraction}")
    n = len(tiles)
    is_test = np.zeros(n, bool)
    side: dict[str, bool] = {}
    modes: dict[str, str] = {}
    n_src: dict[str, int] = {}
    for ci, cname in enumerate(tiles.class_names):
        idx = np.flatnonzero(tiles.labels == ci)
        srcs = [tiles.sources[i] for i in idx]
        distinct = sorted({s for s in srcs if s is not None})
        n_src[cname] = len(distinct)
        if None in srcs or len(distinct) < min_sources:
            modes[cname] = "tile"
            rng = _seeded_rng(seed, "tile", cname)
            order = rng.permutation(idx)
            n_test = round(test_fraction * len(idx))
            is_test[order[:n_test]] = True
            continue
        modes[cname] = "source"
        count = {s: 0 for s in distinct}
        for s in srcs:
            count[s] += 1  # type: ignore[index]
        target = test_fraction * len(idx)
        n_test = sum(count[s] for s in distinct if side.get(s) is True)
        rng = _seeded_rng(seed, "source", cname)
        for s in [distinct[i] for i in rng.permutation(len(distinct))]:
            if s in side:
                continue
            to_test = n_test < target
            side[s] = to_test
            n_test += count[s] if to_test else 0
        for i, s in zip(idx, srcs, strict=True):
            is_test[i] = side[s]  # type: ignore[index]
    info = SplitInfo(modes, n_src, sorted(s for s, t in side.items() if t))
    return is_test, info


# ---------------------------------------------------------------- tile sources for training
class TileSource:
    """Indexable RGB uint8 tiles at ``mpp`` µm/px. Subclasses implement ``__len__`` and ``read``."""

    mpp: float
    description: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FolderTiles(TileSource):
    """Image files (any size) at one physical scale ``mpp``; optionally cached in memory after first read."""

    def __init__(self, paths: Sequence[Path], mpp: float, cache: bool = True, description: str = "") -> None:
        if not paths:
            raise ConfigError(f"{description or 'tile folder'}: no images found ({', '.join(IMAGE_SUFFIXES)})")
        if mpp <= 0:
            raise ConfigError(f"--mpp must be positive, got {mpp}")
        self.paths = list(paths)
        self.mpp = float(mpp)
        self.cache = cache
        self._cache: dict[int, np.ndarray] = {}
        self.description = description or f"{len(self.paths)} images"

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray:
        img = self._cache.get(i)
        if img is None:
            img = read_rgb(self.paths[i])
            if self.cache:
                self._cache[i] = img
        return img


class RunTiles(TileSource):
    """Tiles listed in ``RUN/tiles/*.h5`` read from their slides at the tiles' target MPP and size."""

    def __init__(self, run_root: str | Path, max_tiles_per_slide: int | None = None, seed: int = 0) -> None:
        from wsi_pipeline import formats as F
        from wsi_pipeline.runfolder.layout import RunLayout

        layout = RunLayout(run_root)
        ids = layout.slide_ids_with_tiles()
        if not ids:
            raise TilesNotFoundError(f"{layout.tiles_dir}: no tiles/*.h5 — run `wsi tile` on this RUN folder first")
        self.slides: list[tuple[str, float]] = []  # (slide path, slide mpp)
        entries: list[tuple[int, int, int]] = []  # (slide index, x, y)
        mpps, sizes = set(), set()
        for sid in ids:
            ts = F.read_tiles_h5(layout.tiles_h5(sid))
            if len(ts) == 0:
                continue
            path = ts.attrs.get(F.A_SLIDE_PATH)
            if not path or not Path(path).exists():
                raise TilesNotFoundError(
                    f"{layout.tiles_h5(sid)}: slide file {path!r} recorded in the tiles file is missing — "
                    "re-run `wsi tile` with the slides where they are now"
                )
            xy = ts.l0_xy
            if max_tiles_per_slide and len(xy) > max_tiles_per_slide:
                xy = xy[_seeded_rng(seed, "run", sid).choice(len(xy), max_tiles_per_slide, replace=False)]
            k = len(self.slides)
            self.slides.append((str(path), ts.slide_mpp))
            entries += [(k, int(x), int(y)) for x, y in xy]
            mpps.add(round(ts.target_mpp, 6))
            sizes.add(ts.tile_size)
        if len(mpps) != 1 or len(sizes) != 1:
            raise ConfigError(
                f"{run_root}: tiles were cut at several scales/sizes (mpp {sorted(mpps)}, px {sorted(sizes)}); "
                "re-tile the RUN with one --mpp and --tile-size"
            )
        self.entries = np.asarray(entries, np.int64).reshape(-1, 3)
        self.mpp = float(next(iter(mpps)))
        self.tile_size = int(next(iter(sizes)))
        self._open: dict[int, object] = {}
        self.description = f"{len(self.entries)} tiles of {len(self.slides)} slides in {run_root} at {self.mpp} µm/px"

    def __len__(self) -> int:
        return len(self.entries)

    def _slide(self, k: int):
        from wsi_pipeline.slide import open_slide

        s = self._open.get(k)
        if s is None:
            path, mpp = self.slides[k]
            s = open_slide(path, mpp=mpp)
            self._open[k] = s
        return s

    def read(self, i: int) -> np.ndarray:
        k, x, y = (int(v) for v in self.entries[i])
        return self._slide(k).read_region_at_mpp((x, y), self.mpp, self.tile_size)

    def close(self) -> None:
        for s in self._open.values():
            s.close()  # type: ignore[attr-defined]
        self._open.clear()

    def __getstate__(self) -> dict:  # open slides are not picklable: reopen in each worker
        d = dict(self.__dict__)
        d["_open"] = {}
        return d


def is_run_folder(path: str | Path) -> bool:
    from wsi_pipeline.runfolder.layout import RunLayout

    return RunLayout(path).tiles_dir.is_dir()


def open_tile_source(
    data: str | Path,
    mpp: float = 0.5,
    subset: str = "all",
    split_seed: int = 0,
    test_fraction: float = 0.3,
    max_tiles_per_slide: int | None = None,
) -> TileSource:
    """A RUN folder (has ``tiles/``) or an image folder (recursive) as a :class:`TileSource`.

    ``subset`` 'train'/'test' keeps one side of :func:`source_split` of a *labelled* folder (class
    sub-folders), so an encoder can be pretrained on the training sources only and evaluated on the rest.
    """
    if subset not in SUBSETS:
        raise ConfigError(f"--subset {subset!r}: expected one of {SUBSETS}")
    if is_run_folder(data):
        if subset != "all":
            raise ConfigError(f"{data}: --subset applies to labelled image folders, not RUN folders")
        return RunTiles(data, max_tiles_per_slide=max_tiles_per_slide, seed=split_seed)
    if subset == "all":
        return FolderTiles(list_images(data), mpp, description=f"{data}")
    tiles = load_labelled_folder(data)
    is_test, _ = source_split(tiles, test_fraction, split_seed)
    keep = is_test if subset == "test" else ~is_test
    paths = [p for p, k in zip(tiles.paths, keep, strict=True) if k]
    return FolderTiles(paths, mpp, description=f"{data} ({subset} split, seed {split_seed}, {len(paths)} tiles)")
