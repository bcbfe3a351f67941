"""Tile sources for self-supervised training.

A *tile source* is an indexable collection of RGB uint8 tiles with a physical scale (``mpp``, µm/px):

* :class:`FolderTiles` — image files under a folder (recursive), all at one ``mpp`` given by the user;
* :class:`RunTiles` — tile coordinates of a RUN folder (``tiles/<slide_id>.h5``), read straight from the
  slides with :meth:`Slide.read_region_at_mpp` at the tiles' target MPP.

Labelled folders and their source split (``--subset train|test``) come from :mod:`wsi_pipeline.tiles`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsi_pipeline.errors import ConfigError, TilesNotFoundError
from wsi_pipeline.tiles.folders import IMAGE_SUFFIXES, list_images, load_labelled_folder, read_rgb
from wsi_pipeline.tiles.split import seeded_rng, source_split

log = logging.getLogger(__name__)

SUBSETS = ("all", "train", "test")


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

    def __init__(self, run_root: str | Path, max_tiles_per_slide: int | None = None, seed: int = 0,
                 slide_dirs: Sequence[str] = ()) -> None:
        from wsi_pipeline.formats import api as F
        from wsi_pipeline.runfolder.layout import RunLayout
        from wsi_pipeline.slide.open import require_recorded_slide

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
            path = require_recorded_slide(ts.attrs.get(F.A_SLIDE_PATH), slide_dirs)
            xy = ts.l0_xy
            if max_tiles_per_slide and len(xy) > max_tiles_per_slide:
                xy = xy[seeded_rng(seed, "run", sid).choice(len(xy), max_tiles_per_slide, replace=False)]
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
        from wsi_pipeline.slide.open import open_slide

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
    slide_dirs: Sequence[str] = (),
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
        return RunTiles(data, max_tiles_per_slide=max_tiles_per_slide, seed=split_seed, slide_dirs=slide_dirs)
    if subset == "all":
        return FolderTiles(list_images(data), mpp, description=f"{data}")
    tiles = load_labelled_folder(data)
    is_test, _ = source_split(tiles, test_fraction, split_seed)
    keep = is_test if subset == "test" else ~is_test
    paths = [p for p, k in zip(tiles.paths, keep, strict=True) if k]
    return FolderTiles(paths, mpp, description=f"{data} ({subset} split, seed {split_seed}, {len(paths)} tiles)")
