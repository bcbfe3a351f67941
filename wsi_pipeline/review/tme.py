"""The TME read-out in the viewer: the tissue-class map of ``RUN/tme/<slide_id>.h5`` as a level-0-aligned RGBA
raster (the dense map's top class per cell, or the classified tiles' top class for the per-tile footprints),
its legend (class colours of :mod:`wsi_pipeline.tiles.palette`, each class's share of the tissue area from the
slide's ``tme.csv`` row) and the phenotype with its reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_pipeline.formats import api as F
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.tiles.palette import class_colours

ALPHA = 255


@dataclass
class TMEOverlay:
    """A class-colour raster whose pixel (i, j) covers level-0 ``origin + [j, j+1)·cell_l0`` (x), rows alike."""

    rgba: np.ndarray  # H×W×4 uint8, alpha 0 where nothing was classified
    origin_l0: tuple[float, float]
    cell_l0: float
    class_names: list[str]
    row: dict[str, Any]  # the slide's tme.csv row ({} when not recorded)

    def payload(self, url: str) -> dict[str, Any]:
        """What the viewer needs: the raster's URL and placement, the legend and the phenotype."""
        from wsi_pipeline.tme.rules import is_borderline
        from wsi_pipeline.tme.spatial import class_column

        colours = class_colours(self.class_names)
        legend = []
        for name in self.class_names:
            share = _finite(self.row.get(f"area_frac_{class_column(name)}"))
            legend.append({"name": name, "color": "#" + "".join(f"{int(c):02x}" for c in colours[name]),
                           "share": None if share is None else round(share, 4)})
        return {"overlay": url, "origin_l0": [float(v) for v in self.origin_l0], "cell_l0": float(self.cell_l0),
                "width": int(self.rgba.shape[1]), "height": int(self.rgba.shape[0]), "classes": legend,
                "phenotype": self.row.get("immune_phenotype"), "reason": self.row.get("phenotype_reason"),
                "margin": _finite(self.row.get("phenotype_margin")),
                "borderline": is_borderline(self.row.get("phenotype_margin")), "footprint": self.row.get("footprint")}


def _finite(value: Any) -> float | None:
    """A float for JSON; None when missing or not finite (e.g. a row written before ``phenotype_margin``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _colour(labels: np.ndarray, class_names: list[str]) -> np.ndarray:
    colours = class_colours(class_names)
    palette = np.array([[*colours[n], ALPHA] for n in class_names] + [[0, 0, 0, 0]], np.uint8)
    return palette[np.where(labels >= 0, labels, len(class_names))]


def load_tme_overlay(layout: RunLayout, slide_id: str) -> TMEOverlay | None:
    """The slide's TME class raster (None when ``wsi tme`` has not been run on it)."""
    from wsi_pipeline.review.raster import grid_for_tiles, rasterize

    path = layout.tme_h5(slide_id)
    if not path.exists():
        return None
    xy, probs, attrs = F.read_tme_h5(path)
    names = [str(n) for n in attrs.get(F.A_CLASS_NAMES, [])] or [str(i) for i in range(probs.shape[1])]
    row = F.read_stage_record(layout.tme_record_json(slide_id)).get("row") or {}
    dense = F.read_tme_dense(path)
    if dense is not None:
        labels = np.where(dense.area, dense.probs.argmax(axis=-1), -1) if dense.probs.size else \
            np.full(dense.area.shape, -1)
        return TMEOverlay(_colour(labels, names), dense.origin_l0, dense.cell_l0, names, row)
    size_l0 = int(attrs[F.A_PATCH_SIZE_L0])
    level0 = (int(xy[:, 0].max() + size_l0), int(xy[:, 1].max() + size_l0)) if len(xy) else (size_l0, size_l0)
    grid = grid_for_tiles(xy, size_l0, level0)
    top = rasterize(xy, size_l0, probs.argmax(axis=1).astype(np.float64) if len(probs) else np.zeros(0), grid)
    labels = np.where(np.isfinite(top), top, -1).astype(np.int64)
    return TMEOverlay(_colour(labels, names), (0.0, 0.0), float(grid.cell_l0), names, row)
