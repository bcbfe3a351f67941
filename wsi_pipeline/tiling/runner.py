"""Tile one slide: tissue mask → tile grid → RUN/tiles/<slide_id>.h5 plus mask, thumbnails and GeoJSON.
And the batch over many slides, with crash isolation, resume and sharding."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline import formats as F
from wsi_pipeline.config import TilingConfig
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.slide.base import Slide
from wsi_pipeline.tiling.grid import TileSpec, select_tiles
from wsi_pipeline.tiling.tissue import DETECTOR_VERSION, TissueParams, detect_tissue

log = logging.getLogger(__name__)

STAGE = "tile"
THUMBNAIL_MAX = 1024
MASK_MPP_CAP = 2.0  # the tissue level is never finer than this (µm/px): bounded memory on any slide


@dataclass
class TissueMap:
    mask: np.ndarray  # bool H×W
    rgb: np.ndarray  # the low-resolution image it was computed on
    l0_per_px: tuple[float, float]  # level-0 pixels per mask pixel (x, y)

    @property
    def mask_mpp(self) -> float:
        return self.l0_per_px[0]


@dataclass
class TileResult:
    slide_id: str
    path: str
    n_tiles: int
    slide_mpp: float
    seconds: float = 0.0
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)


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


def tile_slide(path: str | Path, layout: RunLayout, cfg: TilingConfig, slide_id: str | None = None,
               force: bool = False) -> TileResult:
    """Tile one slide into ``layout``; skip when its outputs exist with the same parameters."""
    from wsi_pipeline.slide import open_slide, slide_id_from_path

    t0 = time.perf_counter()
    slide_id = slide_id or slide_id_from_path(path)
    with open_slide(path, mpp=cfg.force_slide_mpp, mpp_fallback=cfg.slide_mpp,
                    mpp_from_objective=cfg.mpp_from_objective) as slide:
        mpp = slide.mpp
        key = resume_key(path, cfg, mpp)
        if not force and is_done(layout, slide_id, key):
            n = len(F.read_tiles_h5(layout.tiles_h5(slide_id)))
            return TileResult(slide_id, str(path), n, mpp, skipped=True)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        tmap = tissue_map(slide, cfg)
        timings["tissue"] = time.perf_counter() - t
        t = time.perf_counter()
        l0_xy = tile_coordinates(slide, tmap, cfg)
        timings["grid"] = time.perf_counter() - t
        attrs = tile_attrs(slide, cfg, key)
        attrs[F.A_SLIDE_ID] = attrs[F.A_NAME] = slide_id
        _write_side_outputs(slide, layout, slide_id, tmap, l0_xy, attrs[F.A_PATCH_SIZE_L0])
        # the tiles file last: its presence marks the slide done
        F.write_tiles_h5(layout.tiles_h5(slide_id), l0_xy, attrs)
    return TileResult(slide_id, str(path), len(l0_xy), mpp, time.perf_counter() - t0, timings=timings)


def _write_side_outputs(slide: Slide, layout: RunLayout, slide_id: str, tmap: TissueMap, l0_xy: np.ndarray,
                        tile_size_l0: int) -> None:
    from PIL import Image

    from wsi_pipeline import qupath
    from wsi_pipeline.tiling.contours import mask_polygons
    from wsi_pipeline.tiling.overlay import draw_tile_grid

    _save_png(layout.mask_png(slide_id), Image.fromarray((tmap.mask * 255).astype(np.uint8)))
    thumb, thumb_l0_per_px = slide.thumbnail(THUMBNAIL_MAX)
    _save_png(layout.thumbnail_png(slide_id), Image.fromarray(thumb))
    grid = draw_tile_grid(thumb, l0_xy, tile_size_l0, thumb_l0_per_px)
    _save_png(layout.grid_png(slide_id), Image.fromarray(grid))
    polygons = mask_polygons(tmap.mask, tmap.l0_per_px)
    feats = [qupath.polygon_feature(rings, object_type="annotation", classification="Tissue",
                                    measurements={"area_um2": _polygon_area_um2(rings, slide.mpp)})
             for rings in polygons]
    qupath.write_geojson(layout.tissue_geojson(slide_id), qupath.feature_collection(feats))


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
    from wsi_pipeline.slide import slide_id_from_path

    seen: dict[str, int] = {}
    ids = []
    for p in paths:
        base = slide_id_from_path(p)
        n = seen.get(base, 0) + 1
        seen[base] = n
        ids.append(base if n == 1 else f"{base}-{n}")
    return ids


@dataclass
class BatchSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (slide_id, error)

    @property
    def ok(self) -> bool:
        return not self.failed


def preload_tiling_modules() -> None:
    """Import what tiling one slide needs (scipy.ndimage, skimage.measure, Pillow, the slide backends) in
    the parent process, so forked per-slide workers inherit them instead of importing them again (~1–4 s each)."""
    import importlib

    for name in ("scipy.ndimage", "skimage.measure", "PIL.Image", "wsi_pipeline.slide", "wsi_pipeline.qupath",
                 "wsi_pipeline.tiling.contours", "wsi_pipeline.tiling.overlay"):
        importlib.import_module(name)


def tile_slides(
    paths: Sequence[Path],
    layout: RunLayout,
    cfg: TilingConfig,
    workers: int = 1,
    shard: Any = None,
    force: bool = False,
    on_result: Callable[[str, bool, str], None] | None = None,
) -> BatchSummary:
    """Tile many slides: crash-isolated workers, one status row per slide, never stopping on a failure."""
    from wsi_pipeline.runfolder.batch import Shard, map_isolated
    from wsi_pipeline.runfolder.status import STATUS_DONE, STATUS_FAILED, SlideStatus, update_status

    cfg.validate()
    paths = [Path(p) for p in paths]
    items = list(zip(unique_slide_ids(paths), paths, strict=True))
    items = (shard or Shard()).select(items)
    summary = BatchSummary()

    def work(item: tuple[str, Path]) -> TileResult:
        sid, p = item
        return tile_slide(p, layout, cfg, slide_id=sid, force=force)

    if workers > 0 and len(items) > 1:
        preload_tiling_modules()  # each slide runs in a fresh fork: import once here, not once per slide
    for out in map_isolated(work, items, workers=workers):
        sid, p = out.item
        if out.ok:
            res: TileResult = out.value
            (summary.skipped if res.skipped else summary.done).append(sid)
            if not res.skipped:
                update_status(layout.slides_csv, SlideStatus(
                    slide_id=sid, stage=STAGE, path=str(p.resolve()), status=STATUS_DONE,
                    n_tiles=res.n_tiles, slide_mpp=round(res.slide_mpp, 6), seconds=round(res.seconds, 3)))
        else:
            summary.failed.append((sid, out.error))
            log.info("%s failed: %s", sid, out.error)
            update_status(layout.slides_csv, SlideStatus(
                slide_id=sid, stage=STAGE, path=str(p.resolve()), status=STATUS_FAILED, error=out.error,
                error_type=out.error_type, seconds=round(out.seconds, 3)))
        if on_result:
            on_result(sid, out.ok, out.error)
    return summary
