"""``wsi heatmap``: per slide and channel, a PNG overlay on the thumbnail (tissue outline, colour bar), the
bare overlay layer, a multiscale level-0-aligned zarr, top/bottom-k tile galleries and the QuPath GeoJSON.
Everything lands under ``RUN/heatmaps/<slide_id>/``; ``index.json`` (written last) lists the outputs and
is the resume marker."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import SlideError
from wsi_pipeline.formats import api as F
from wsi_pipeline.review import raster as R
from wsi_pipeline.review.config import HeatmapConfig
from wsi_pipeline.review.scores import (
    SlideScores,
    input_stamps,
    load_slide_scores,
    resolve_model_name,
    scored_slide_ids,
    slide_paths_from_status,
)
from wsi_pipeline.runfolder.executor import Progress, SlideItem, SlideOutcome, StageSummary, run_per_slide
from wsi_pipeline.runfolder.layout import RunLayout

log = logging.getLogger(__name__)

STAGE = "heatmap"
# what drawing one slide imports (matplotlib and zarr take seconds): imported once before the per-slide workers fork
HEATMAP_PRELOAD = ("matplotlib.pyplot", "wsi_pipeline.review.render", "wsi_pipeline.review.qupath",
                   "wsi_pipeline.review.zarr_io", "wsi_pipeline.slide.open")


@dataclass
class HeatmapResult:
    slide_id: str
    n_tiles: int = 0
    skipped: bool = False
    seconds: float = 0.0
    index: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- slide access
def open_scored_slide(sc: SlideScores, slide_dirs: Sequence[str] = ()):
    """The slide of ``sc`` opened with the MPP its tiling used (looked for in ``slide_dirs`` when it moved)."""
    from wsi_pipeline.slide.open import open_recorded_slide

    if not sc.slide_path:
        raise SlideError(f"<{sc.slide_id}>", "the RUN folder does not record the slide's path",
                         "re-run `wsi tile` so slides.csv and the tiles file name it")
    return open_recorded_slide(sc.slide_path, sc.slide_mpp, slide_dirs)


def thumbnail_for(sc: SlideScores, layout: RunLayout, max_px: int, slide: Any | None
                  ) -> tuple[np.ndarray, tuple[float, float]]:
    """(RGB thumbnail, level-0 px per thumbnail px (x, y)) from the slide, else from RUN/thumbnails."""
    w0, h0 = sc.level0_size
    if slide is not None:
        rgb, _ = slide.thumbnail(max_px)
    else:
        from PIL import Image

        p = layout.thumbnail_png(sc.slide_id)
        if not p.exists():
            raise SlideError(sc.slide_path or sc.slide_id, "cannot open the slide and RUN has no thumbnail",
                             "make the slide file available at the path in RUN/slides.csv")
        rgb = np.asarray(Image.open(p).convert("RGB"))
    return rgb, (w0 / rgb.shape[1], h0 / rgb.shape[0])


def tissue_outlines(layout: RunLayout, sc: SlideScores, l0_per_px: tuple[float, float]) -> list[np.ndarray]:
    from wsi_pipeline.review.render import outlines_from_geojson, outlines_from_mask

    gj = layout.tissue_geojson(sc.slide_id)
    if gj.exists():
        try:
            return outlines_from_geojson(gj, l0_per_px)
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable tissue GeoJSON (%s); trying the mask", gj, e)
    mp = layout.mask_png(sc.slide_id)
    if mp.exists():
        from PIL import Image

        return outlines_from_mask(np.asarray(Image.open(mp).convert("L")), sc.level0_size, l0_per_px)
    return []


# ---------------------------------------------------------------- one slide
def resume_key(layout: RunLayout, sc_paths: tuple[Path, Path], model: str, cfg: HeatmapConfig) -> str:
    """The options, the model, and the tiles and scores files: by their own resume keys where they have one
    (a re-predicted slide with unchanged scores keeps its heatmaps), else by size and modification time."""
    return F.params_hash({**cfg.params(), "model": model, "inputs": input_stamps(sc_paths)})


def is_done(layout: RunLayout, slide_id: str, key: str) -> bool:
    p = layout.heatmap_index_json(slide_id)
    if not p.exists():
        return False
    try:
        return json.loads(p.read_text()).get("params_hash") == key
    except (OSError, ValueError):
        return False


def heatmap_slide(
    run_root: str | Path,
    slide_id: str,
    cfg: HeatmapConfig,
    model: str | None = None,
    slide_paths: dict[str, str] | None = None,
) -> HeatmapResult:
    """All review outputs of one slide; skipped when ``index.json`` says they are up to date."""
    cfg.validate()
    layout = RunLayout(run_root)
    model = model or resolve_model_name(layout, cfg.model)
    key = slide_key(layout, slide_id, model, cfg)
    if key and not cfg.force and is_done(layout, slide_id, key):
        index = json.loads(layout.heatmap_index_json(slide_id).read_text())
        return HeatmapResult(slide_id, int(index.get("n_tiles", 0)), skipped=True, index=index)
    return render_slide(layout, slide_id, model, cfg, key, slide_paths)


def slide_key(layout: RunLayout, slide_id: str, model: str, cfg: HeatmapConfig) -> str:
    """The resume key of one slide's heatmaps ('' when its tiles or scores are missing)."""
    tiles, scores = layout.tiles_h5(slide_id), layout.scores_h5(model, slide_id)
    return resume_key(layout, (tiles, scores), model, cfg) if scores.exists() and tiles.exists() else ""


def render_slide(layout: RunLayout, slide_id: str, model: str, cfg: HeatmapConfig, key: str,
                 slide_paths: dict[str, str] | None = None) -> HeatmapResult:
    """Write every review output of one slide, ``index.json`` (stamped with ``key``) last."""
    from wsi_pipeline.review import render
    from wsi_pipeline.review.qupath import export_slide_geojson, measurement_name
    from wsi_pipeline.review.zarr_io import write_heatmap_zarr

    t0 = time.perf_counter()
    sc = load_slide_scores(layout, slide_id, model, cfg.targets, attention=cfg.attention,
                           slide_paths=slide_paths if slide_paths is not None else slide_paths_from_status(layout))
    grid = R.grid_for_tiles(sc.l0_xy, sc.tile_size_l0, sc.level0_size, cfg.max_cells)
    lut = R.colormap_lut(cfg.cmap)
    out_dir = layout.heatmap_dir(slide_id)
    out_dir.mkdir(parents=True, exist_ok=True)

    slide = None
    try:
        try:
            slide = open_scored_slide(sc, cfg.slide_dirs)
        except SlideError as e:
            if cfg.galleries and cfg.top_k > 0:
                raise
            log.warning("%s: %s; using RUN/thumbnails", slide_id, e)
        thumb, l0_per_px = thumbnail_for(sc, layout, cfg.thumbnail_px, slide)
        outlines = tissue_outlines(layout, sc, l0_per_px)
        th, tw = thumb.shape[:2]
        pyramids: dict[str, list[np.ndarray]] = {}
        channels_index = []
        for ch in sc.channels:
            vals = sc.values[ch.key]
            raw = R.rasterize(sc.l0_xy, sc.tile_size_l0, vals, grid, smooth=cfg.smooth)
            norm = R.make_normalizer(vals, cfg.scale, cfg.vmin, cfg.vmax, ch.is_probability)
            thumb_vals = R.sample_raster(raw, grid, (tw, th), l0_per_px)
            overlay = R.colorize(norm(thumb_vals), lut)
            overlay_png = render.save_png(layout.heatmap_overlay_png(slide_id, ch.key), overlay)
            title = f"{slide_id} — {ch.label}"
            subtitle = (f"model {model} · {cfg.scale} scale{' · smoothed' if cfg.smooth else ''} · "
                        f"{len(sc)} tiles of {sc.tile_size} px at {sc.target_mpp:g} µm/px")
            fig_png = layout.heatmap_png(slide_id, ch.key)
            geom = render.render_heatmap_figure(fig_png, render.blend(thumb, overlay, cfg.alpha), outlines, norm,
                                                lut, title, subtitle)
            if cfg.zarr:
                pyramids[ch.key] = R.pyramid(raw, min_side=8)
            entry: dict[str, Any] = {
                "key": ch.key, "label": ch.label, "target": ch.target, "kind": ch.kind, "class": ch.class_name,
                "measurement": measurement_name(ch.label),
                "png": fig_png.name, "overlay_png": overlay_png.name,
                "figure_image_box_px": [round(v, 2) for v in geom.image_box_px],
                "vmin": norm.vmin, "vmax": norm.vmax,
            }
            if cfg.galleries and cfg.top_k > 0 and slide is not None:
                entry.update(_galleries(layout, sc, slide, ch.key, ch.label, vals, cfg.top_k))
            channels_index.append(entry)
        zarr_name = None
        if cfg.zarr and pyramids:
            zarr_path = write_heatmap_zarr(
                layout.heatmap_zarr(slide_id), grid, pyramids, {c.key: c.label for c in sc.channels},
                sc.slide_mpp, {"slide_id": slide_id, "model": model, "smooth": cfg.smooth,
                               "tile_size_l0": sc.tile_size_l0, "target_mpp": sc.target_mpp},
            )
            zarr_name = zarr_path.name
        geojson_name = None
        if cfg.geojson:
            geojson_name = export_slide_geojson(sc, layout.qupath_geojson(slide_id)).name
    finally:
        if slide is not None:
            slide.close()

    index = {
        "slide_id": slide_id, "model": model, "params_hash": key, "n_tiles": len(sc),
        "scale": cfg.scale, "smooth": cfg.smooth, "cmap": cfg.cmap,
        "tile_size_l0": sc.tile_size_l0, "target_mpp": sc.target_mpp, "slide_mpp": sc.slide_mpp,
        "level0_size": list(sc.level0_size), "cell_l0": grid.cell_l0, "grid_shape": list(grid.shape),
        "thumbnail_size": [tw, th], "thumbnail_l0_per_px": list(l0_per_px),
        "zarr": zarr_name, "geojson": geojson_name, "channels": channels_index,
    }
    F.write_text_atomic(layout.heatmap_index_json(slide_id), json.dumps(index, indent=1))
    return HeatmapResult(slide_id, len(sc), seconds=time.perf_counter() - t0, index=index)


def _galleries(layout: RunLayout, sc: SlideScores, slide: Any, key: str, label: str, vals: np.ndarray,
               k: int) -> dict[str, Any]:
    from wsi_pipeline.review.render import render_gallery

    top, bottom = R.top_bottom_indices(vals, k)
    out: dict[str, Any] = {}
    for which, idx in (("top", top), ("bottom", bottom)):
        images = [slide.read_region_at_mpp(tuple(sc.l0_xy[i]), sc.target_mpp, sc.tile_size) for i in idx]
        captions = [f"{vals[i]:.3f} @ ({sc.l0_xy[i, 0]}, {sc.l0_xy[i, 1]})" for i in idx]
        title = f"{sc.slide_id} — {label}: {which} {len(idx)} tiles ({sc.target_mpp:g} µm/px)"
        p = render_gallery(layout.gallery_png(sc.slide_id, key, which), images, captions, title)
        out[f"{which}_png"] = p.name
        out[f"{which}_tiles"] = [int(i) for i in idx]
    return out


# ---------------------------------------------------------------- a RUN folder
class HeatmapStage:
    """Heatmaps as a per-slide stage (:mod:`wsi_pipeline.runfolder.executor`), one component per model."""

    name = STAGE

    def __init__(self, layout: RunLayout, model: str, cfg: HeatmapConfig, slide_paths: dict[str, str]) -> None:
        self.layout, self.component, self.cfg, self.slide_paths = layout, model, cfg, slide_paths

    def key(self, item: SlideItem) -> str:
        return slide_key(self.layout, item.slide_id, self.component, self.cfg)

    def done(self, item: SlideItem, key: str) -> SlideOutcome | None:
        if not key or not is_done(self.layout, item.slide_id, key):
            return None
        index = json.loads(self.layout.heatmap_index_json(item.slide_id).read_text())
        return SlideOutcome(item.slide_id, n_tiles=int(index.get("n_tiles", 0)))

    def process(self, item: SlideItem, key: str) -> SlideOutcome:
        res = render_slide(self.layout, item.slide_id, self.component, self.cfg, key, self.slide_paths)
        return SlideOutcome(item.slide_id, n_tiles=res.n_tiles, seconds=res.seconds)


def run_heatmaps(
    run_root: str | Path,
    cfg: HeatmapConfig,
    slide_ids: list[str] | None = None,
    progress: Progress | None = None,
) -> StageSummary:
    """Heatmaps for every slide with scores of the model (or ``slide_ids``), ``cfg.workers`` slides at a time in
    forked processes (drawing is CPU-bound: PNG encoding, matplotlib, tile reads); failures are recorded in
    RUN/slides.csv (stage "heatmap", component = the model) and the batch goes on."""
    from wsi_pipeline.runfolder.batch import default_workers

    cfg.validate()
    layout = RunLayout(run_root)
    model = resolve_model_name(layout, cfg.model)
    paths = slide_paths_from_status(layout)
    items = [SlideItem(sid, paths.get(sid, "")) for sid in slide_ids or scored_slide_ids(layout, model)]
    workers = default_workers() if cfg.workers is None else cfg.workers
    return run_per_slide(HeatmapStage(layout, model, cfg, paths), items, layout, workers=workers, force=cfg.force,
                         progress=progress, preload=HEATMAP_PRELOAD)
