"""The tiling stage: tissue mask → tile grid → RUN/tiles/<slide_id>.h5 plus mask, thumbnails and GeoJSON, per
slide, run over many slides by the stage executor (crash isolation, resume, status rows, sharding)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.config import TilingConfig
from wsi_pipeline.formats import api as F
from wsi_pipeline.runfolder.batch import Shard
from wsi_pipeline.runfolder.executor import Progress, SlideItem, SlideOutcome, StageSummary, run_per_slide
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.runfolder.status import STATUS_SKIPPED
from wsi_pipeline.slide.base import Slide
from wsi_pipeline.tiling.grid import TileSpec, select_tiles
from wsi_pipeline.tiling.tissue import DETECTOR_VERSION, TissueParams, detect_tissue

log = logging.getLogger(__name__)

STAGE = "tile"
THUMBNAIL_MAX = 1024
# what tiling one slide imports (scipy.ndimage, skimage.measure, Pillow, the slide backends): imported once before the
# per-slide workers fork (~1–4 s each otherwise)
TILING_PRELOAD = ("scipy.ndimage", "skimage.measure", "PIL.Image", "wsi_pipeline.slide", "wsi_pipeline.formats.geojson",
                  "wsi_pipeline.tiling.contours", "wsi_pipeline.tiling.overlay")
MASK_MPP_CAP = 2.0  # the tissue level is never finer than this (µm/px): bounded memory on any slide


@dataclass
class TissueMap:
    mask: np.ndarray  # bool H×W
    rgb: np.ndarray  # the low-resolution image it was computed on
    l0_per_px: tuple[float, float]  # level-0 pixels per mask pixel (x, y)

    @property
    def mask_mpp(self) -> float:
        return self.l0_per_px[0]


def tissue_level(slide: Slide, tissue_mpp: float) -> int:
    """The coarsest level no coarser than 2 × ``tissue_mpp`` (a pyramid's thumbnail level when there is one)."""
    best = 0
    for lvl in range(slide.level_count):
        if slide.level_mpp(lvl) <= 2.0 * tissue_mpp * 1.05:
            best = lvl
    return best


def tissue_map(slide: Slide, cfg: TilingConfig) -> TissueMap:
    """Detect tissue on a low-resolution level (about ``cfg.tissue_mpp`` µm/px, up to 2× coarser)."""
    slide_mpp = slide.mpp
    tissue_mpp = max(cfg.tissue_mpp, MASK_MPP_CAP)
    rgb, _ = slide.read_at_downsample(tissue_mpp / slide_mpp, level=tissue_level(slide, tissue_mpp))
    w0, h0 = slide.dimensions
    l0_per_px = (w0 / rgb.shape[1], h0 / rgb.shape[0])
    params = TissueParams(mask_mpp=l0_per_px[0] * slide_mpp, min_area_um2=cfg.min_tissue_area_um2,
                          reject_pen=cfg.reject_pen)
    return TissueMap(detect_tissue(rgb, params), rgb, l0_per_px)


def tile_coordinates(slide: Slide, tmap: TissueMap, cfg: TilingConfig) -> np.ndarray:
    spec = TileSpec(cfg.target_mpp, cfg.tile_size, cfg.overlap)
    l0_xy, _ = select_tiles(tmap.mask, tmap.l0_per_px, slide.dimensions, slide.mpp, spec, cfg.min_tissue)
    return l0_xy


def tile_attrs(slide: Slide, cfg: TilingConfig, resume_key: str) -> dict[str, Any]:
    spec = TileSpec(cfg.target_mpp, cfg.tile_size, cfg.overlap)
    w0, h0 = slide.dimensions
    level = slide.best_level_for_mpp(cfg.target_mpp)
    size_l0 = spec.tile_size_l0(slide.mpp)
    return {
        F.A_PATCH_SIZE: cfg.tile_size,
        F.A_PATCH_SIZE_L0: size_l0,
        F.A_PATCH_LEVEL: level,
        "downsample": [float(slide.level_downsamples[level])] * 2,  # CLAM
        "level_dim": list(slide.level_dimensions[level]),  # CLAM
        F.A_LEVEL0_W: w0,
        F.A_LEVEL0_H: h0,
        F.A_TARGET_MPP: cfg.target_mpp,
        F.A_SLIDE_MPP: slide.mpp,
        F.A_SLIDE_MPP_SOURCE: slide.mpp_info.source,
        F.A_TILE_SIZE: cfg.tile_size,
        F.A_OVERLAP: cfg.overlap,
        F.A_MIN_TISSUE: cfg.min_tissue,
        F.A_TARGET_MAG: 10.0 / cfg.target_mpp,
        F.A_LEVEL0_MAG: 10.0 / slide.mpp,
        F.A_NAME: slide.slide_id,
        F.A_SLIDE_ID: slide.slide_id,
        F.A_SLIDE_PATH: str(Path(slide.path).resolve()),
        F.A_PARAMS_HASH: resume_key,
    }


def resume_key(path: str | Path, cfg: TilingConfig, slide_mpp: float) -> str:
    """Same slide file (size + mtime), same effective µm/px, same tiling parameters and same tissue
    detector version → same key (a changed detector re-tiles, and stages keyed on the tiles follow)."""
    st = Path(path).stat()
    params = {k: v for k, v in cfg.params().items() if k not in ("slide_mpp", "force_slide_mpp")}
    return F.params_hash({**params, "resolved_slide_mpp": slide_mpp, "file_size": st.st_size,
                          "file_mtime_ns": st.st_mtime_ns, "tissue_detector": DETECTOR_VERSION})


def is_done(layout: RunLayout, slide_id: str, key: str) -> bool:
    out = layout.tiles_h5(slide_id)
    return out.exists() and F.read_h5_attrs(out).get(F.A_PARAMS_HASH) == key


@dataclass
class TileStage:
    """Tiling as a per-slide stage (:mod:`wsi_pipeline.runfolder.executor`): item = (slide_id, slide file)."""

    layout: RunLayout
    cfg: TilingConfig
    name: str = STAGE
    component: str = ""

    def _open(self, path: str | Path) -> Slide:
        from wsi_pipeline.slide.open import open_slide

        cfg = self.cfg
        return open_slide(path, mpp=cfg.force_slide_mpp, mpp_fallback=cfg.slide_mpp,
                          mpp_from_objective=cfg.mpp_from_objective)

    def key(self, item: SlideItem) -> str:
        with self._open(item.path) as slide:
            return resume_key(item.path, self.cfg, slide.mpp)

    def done(self, item: SlideItem, key: str) -> SlideOutcome | None:
        if not is_done(self.layout, item.slide_id, key):
            return None
        tiles = F.read_tiles_h5(self.layout.tiles_h5(item.slide_id))
        return SlideOutcome(item.slide_id, n_tiles=len(tiles), slide_mpp=tiles.slide_mpp)

    def process(self, item: SlideItem, key: str) -> SlideOutcome:
        t0 = time.perf_counter()
        layout, slide_id = self.layout, item.slide_id
        with self._open(item.path) as slide:
            warn_if_upsampled(slide_id, slide.mpp, self.cfg.target_mpp)
            tmap = tissue_map(slide, self.cfg)
            l0_xy = tile_coordinates(slide, tmap, self.cfg)
            attrs = tile_attrs(slide, self.cfg, key)
            attrs[F.A_SLIDE_ID] = attrs[F.A_NAME] = slide_id
            _write_side_outputs(slide, layout, slide_id, tmap, l0_xy, attrs[F.A_PATCH_SIZE_L0])
            # the tiles file last: its presence marks the slide done
            F.write_tiles_h5(layout.tiles_h5(slide_id), l0_xy, attrs)
            mpp = slide.mpp
        return SlideOutcome(slide_id, path=str(Path(item.path).resolve()), n_tiles=len(l0_xy), slide_mpp=mpp,
                            seconds=time.perf_counter() - t0)


UPSAMPLE_TOLERANCE = 1.1  # a target finer than level 0 by more than this factor is upsampling


def warn_if_upsampled(slide_id: str, slide_mpp: float, target_mpp: float) -> None:
    """Log a warning when tiles at ``target_mpp`` would be upsampled from a coarser scan: they would hold no
    more detail than the scan, and a model trained at ``target_mpp`` would see blurred tissue."""
    if target_mpp * UPSAMPLE_TOLERANCE < slide_mpp:
        log.warning("%s: --target-mpp %g is finer than the scan (%g µm/px at level 0): tiles are upsampled %.1f× and "
                    "hold no more detail; use a --target-mpp of at least %g, or a scan at %g µm/px or finer",
                    slide_id, target_mpp, slide_mpp, slide_mpp / target_mpp, slide_mpp, target_mpp)


def tile_slide(path: str | Path, layout: RunLayout, cfg: TilingConfig, slide_id: str | None = None,
               force: bool = False) -> SlideOutcome:
    """Tile one slide into ``layout`` in this process (skipped when its outputs exist with the same
    parameters); errors are raised, not recorded."""
    from wsi_pipeline.slide.base import slide_id_from_path

    stage = TileStage(layout, cfg.validate())
    item = SlideItem(slide_id or slide_id_from_path(path), str(Path(path).resolve()))
    key = stage.key(item)
    prev = None if force else stage.done(item, key)
    if prev is not None:
        prev.status, prev.path = STATUS_SKIPPED, item.path
        return prev
    return stage.process(item, key)


def _write_side_outputs(slide: Slide, layout: RunLayout, slide_id: str, tmap: TissueMap, l0_xy: np.ndarray,
                        tile_size_l0: int) -> None:
    from PIL import Image

    from wsi_pipeline.formats import geojson
    from wsi_pipeline.tiling.contours import mask_polygons
    from wsi_pipeline.tiling.overlay import draw_tile_grid

    _save_png(layout.mask_png(slide_id), Image.fromarray((tmap.mask * 255).astype(np.uint8)))
    thumb, thumb_l0_per_px = slide.thumbnail(THUMBNAIL_MAX)
    _save_png(layout.thumbnail_png(slide_id), Image.fromarray(thumb))
    grid = draw_tile_grid(thumb, l0_xy, tile_size_l0, thumb_l0_per_px)
    _save_png(layout.grid_png(slide_id), Image.fromarray(grid))
    polygons = mask_polygons(tmap.mask, tmap.l0_per_px)
    feats = [geojson.polygon_feature(rings, object_type="annotation", classification="Tissue",
                                    measurements={"area_um2": _polygon_area_um2(rings, slide.mpp)})
             for rings in polygons]
    geojson.write_geojson(layout.tissue_geojson(slide_id), geojson.feature_collection(feats))


def _polygon_area_um2(rings: Sequence[Sequence[tuple[float, float]]], mpp: float) -> float:
    def area(r: Sequence[tuple[float, float]]) -> float:
        a = np.asarray(r, dtype=np.float64)
        return abs(0.5 * float(np.dot(a[:, 0], np.roll(a[:, 1], -1)) - np.dot(a[:, 1], np.roll(a[:, 0], -1))))

    return (area(rings[0]) - sum(area(h) for h in rings[1:])) * mpp * mpp


def _save_png(path: Path, image: Any) -> None:
    with F.atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


# ---------------------------------------------------------------- batch
def unique_slide_ids(paths: Sequence[Path]) -> list[str]:
    """Slide id = file name without extension; collisions get a suffix (-2, -3, ...) in input order."""
    from wsi_pipeline.slide.base import slide_id_from_path

    seen: dict[str, int] = {}
    ids = []
    for p in paths:
        base = slide_id_from_path(p)
        n = seen.get(base, 0) + 1
        seen[base] = n
        ids.append(base if n == 1 else f"{base}-{n}")
    return ids


def slide_items(paths: Sequence[str | Path]) -> list[SlideItem]:
    """One item per slide file, with unique slide ids (see :func:`unique_slide_ids`) and resolved paths (each
    folder resolved once: a cohort's slides share a few folders)."""
    paths = [Path(p) for p in paths]
    folders: dict[str, str] = {}
    return [SlideItem(sid, _resolved(str(p), folders)) for sid, p in zip(unique_slide_ids(paths), paths, strict=True)]


def _resolved(path: str, folders: dict[str, str]) -> str:
    """``os.path.realpath(path)`` (what ``Path.resolve`` does), resolving each folder once (``folders``); a
    symlinked file is resolved itself."""
    folder, name = os.path.split(path)
    if name in ("", ".", "..") or os.path.islink(path):
        return os.path.realpath(path)
    real = folders.get(folder)
    if real is None:
        real = folders[folder] = os.path.realpath(folder or ".")
    return os.path.join(real, name)


def run_tile(
    paths: Sequence[str | Path],
    run_root: str | Path,
    cfg: TilingConfig,
    *,
    workers: int = 1,
    shard: Shard | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> StageSummary:
    """Tile many slides: crash-isolated workers, one status row per slide, never stopping on a failure."""
    cfg.validate()
    items = (shard or Shard()).select(slide_items(paths))
    return run_per_slide(TileStage(RunLayout(run_root), cfg), items, RunLayout(run_root), workers=workers,
                         force=force, progress=progress, preload=TILING_PRELOAD)
