"""Class-map PNG over the thumbnail (with a legend) and the QuPath GeoJSON: of classified tiles (footprints
``tile``, ``classifier``, ``grid``) or of the dense map (class polygons from the contours of its top class)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.formats import api as F
from wsi_pipeline.tiles.palette import class_colours
from wsi_pipeline.tme.spatial import class_column


def class_map_png(
    path: str | Path,
    thumb: np.ndarray,
    l0_per_thumb_px: float,
    l0_xy: np.ndarray,
    tile_size_l0: float,
    labels: np.ndarray,
    class_names: Sequence[str],
    title: str = "",
    alpha: float = 0.6,
    outlines: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Tiles coloured by class over the thumbnail, a legend with each class's tile share on the right.

    ``outlines``: per-tile boolean masks whose boundaries are drawn (``tumour_region`` in black,
    ``margin_band`` in white), so the compartments behind the metrics are visible."""
    from PIL import Image

    colours = class_colours(class_names)
    h, w = thumb.shape[:2]
    overlay = np.zeros((h, w, 3), np.float32)
    cover = np.zeros((h, w), np.float32)
    side = max(1, round(tile_size_l0 / l0_per_thumb_px))
    for (x, y), c in zip(np.asarray(l0_xy), np.asarray(labels), strict=True):
        x0, y0 = int(x / l0_per_thumb_px), int(y / l0_per_thumb_px)
        x1, y1 = min(w, x0 + side), min(h, y0 + side)
        if x1 <= x0 or y1 <= y0:
            continue
        overlay[y0:y1, x0:x1] = colours[class_names[int(c)]]
        cover[y0:y1, x0:x1] = alpha
    base = thumb.astype(np.float32)
    blended = base * (1 - cover[..., None]) + overlay * cover[..., None]
    for name, colour in (("margin_band", (255, 255, 255)), ("tumour_region", (0, 0, 0))):
        mask = (outlines or {}).get(name)
        if mask is not None and np.any(mask):
            edge = _outline(_paint_tiles((h, w), l0_xy, np.asarray(mask, bool), side, l0_per_thumb_px))
            blended[edge] = colour
    img = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))
    counts = np.bincount(np.asarray(labels, np.int64), minlength=len(class_names))
    total = max(1, int(counts.sum()))
    shares = {n: counts[i] / total for i, n in enumerate(class_names)}
    return _with_legend(path, img, class_names, colours, shares, title, "class (share of tiles)")


def _paint_tiles(shape: tuple[int, int], l0_xy: np.ndarray, keep: np.ndarray, side: int,
                 l0_per_px: float) -> np.ndarray:
    out = np.zeros(shape, bool)
    for x, y in np.asarray(l0_xy)[keep]:
        x0, y0 = int(x / l0_per_px), int(y / l0_per_px)
        out[y0 : y0 + side, x0 : x0 + side] = True
    return out


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` of its edge."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def classified_tiles_geojson(
    path: str | Path,
    l0_xy: np.ndarray,
    tile_size_l0: float,
    probs: np.ndarray,
    class_names: Sequence[str],
    extra: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """QuPath detections, one square per tile, classified by its top class; measurements are the class
    probabilities (``p_<class>``) plus ``extra`` per-tile values (compartments, distances)."""
    from wsi_pipeline.formats.geojson import tile_polygons_feature_collection, write_geojson

    labels = np.asarray(probs).argmax(axis=1)
    meas = {f"p_{class_column(c)}": probs[:, i] for i, c in enumerate(class_names)}
    meas.update(dict(extra or {}))
    fc = tile_polygons_feature_collection(
        l0_xy, tile_size_l0, measurements=meas, classes=[class_names[i] for i in labels],
        class_colors=class_colours(class_names),
    )
    return write_geojson(path, fc)


# ---------------------------------------------------------------- the dense map
def map_pixels(shape: tuple[int, int], l0_per_px: float, origin_l0: tuple[float, float], cell_l0: float,
               map_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For an image of ``shape`` whose pixel is ``l0_per_px`` level-0 px: the map row and column under each
    pixel centre and whether it falls on the map → (rows, cols, inside), each ``shape``."""
    h, w = shape
    xs = ((np.arange(w) + 0.5) * l0_per_px - origin_l0[0]) / cell_l0
    ys = ((np.arange(h) + 0.5) * l0_per_px - origin_l0[1]) / cell_l0
    cols, rows = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    okx, oky = (cols >= 0) & (cols < map_shape[1]), (rows >= 0) & (rows < map_shape[0])
    rr, cc = np.meshgrid(np.clip(rows, 0, max(0, map_shape[0] - 1)), np.clip(cols, 0, max(0, map_shape[1] - 1)),
                         indexing="ij")
    return rr, cc, oky[:, None] & okx[None, :]


def class_map_png_dense(
    path: str | Path,
    thumb: np.ndarray,
    l0_per_thumb_px: float,
    dense: F.TMEDenseMap,
    labels: np.ndarray,
    class_names: Sequence[str],
    shares: Mapping[str, float],
    title: str = "",
    alpha: float = 0.6,
    outlines: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """The dense map's top class over the thumbnail (cells outside the RUN tiles' area left bare), the
    compartment outlines (``tumour_region`` black, ``margin_band`` white, H×W masks on the map) and a legend
    with each class's share of the tissue area (``shares``, e.g. the ``area_frac_*`` of the read-out)."""
    from PIL import Image

    colours = class_colours(class_names)
    palette = np.array([colours[n] for n in class_names], np.float32).reshape(-1, 3)
    h, w = thumb.shape[:2]
    rr, cc, inside = map_pixels((h, w), l0_per_thumb_px, dense.origin_l0, dense.cell_l0, labels.shape)
    lab = np.where(inside, labels[rr, cc] if labels.size else -1, -1)
    cover = (lab >= 0).astype(np.float32) * alpha
    overlay = palette[np.clip(lab, 0, len(class_names) - 1)]
    blended = thumb.astype(np.float32) * (1 - cover[..., None]) + overlay * cover[..., None]
    for name, colour in (("margin_band", (255, 255, 255)), ("tumour_region", (0, 0, 0))):
        mask = (outlines or {}).get(name)
        if mask is not None and np.any(mask):
            edge = _outline(np.where(inside, np.asarray(mask, bool)[rr, cc], False))
            blended[edge] = colour
    img = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))
    return _with_legend(path, img, class_names, colours, shares, title, "class (share of tissue area)")


def _with_legend(path: str | Path, img: Any, class_names: Sequence[str], colours: Mapping[str, Any],
                 shares: Mapping[str, float], title: str, heading: str) -> Path:
    from PIL import Image, ImageDraw

    from wsi_pipeline.formats.atomic import atomic_path

    w, h = img.size
    row_h, pad, legend_w = 18, 8, 200
    legend_h = pad * 2 + row_h * (len(class_names) + (2 if title else 1))
    canvas = Image.new("RGB", (w + legend_w, max(h, legend_h)), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = pad
    if title:
        draw.text((w + pad, y), title[:30], fill=(0, 0, 0))
        y += row_h
    draw.text((w + pad, y), heading, fill=(0, 0, 0))
    y += row_h
    for name in class_names:
        draw.rectangle([w + pad, y + 2, w + pad + 12, y + 14], fill=tuple(colours[name]), outline=(0, 0, 0))
        share = shares.get(name)
        text = f"{name} {100 * share:.0f}%" if share is not None and np.isfinite(share) else name
        draw.text((w + pad + 18, y + 2), text, fill=(0, 0, 0))
        y += row_h
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=1)  # 3× faster than zlib's default 6, file ~10 % larger
    return path


def dense_map_feature_collection(
    dense: F.TMEDenseMap,
    labels: np.ndarray,
    class_names: Sequence[str],
    regions: Mapping[str, np.ndarray] | None = None,
    tolerance: float = 0.5,
) -> dict[str, Any]:
    """QuPath annotations from the dense map: one (Multi)Polygon per class, the contours of the cells whose top
    class it is (classification = the class, measurements ``area_um2`` and ``mean_p`` = mean probability of
    the class over them), plus one unclassified annotation per mask in ``regions`` (named by its key, e.g.
    ``tumour_region``, ``margin_band``). Level-0 coordinates."""
    from wsi_pipeline.formats.geojson import feature_collection, multipolygon_feature
    from wsi_pipeline.tiling.contours import mask_polygons

    colours = class_colours(class_names)
    cell_um2 = dense.cell_um ** 2

    def shifted(mask: np.ndarray) -> list[list[list[tuple[float, float]]]]:
        ox, oy = dense.origin_l0
        polys = mask_polygons(mask, (dense.cell_l0, dense.cell_l0), tolerance)
        return [[[(round(x + ox, 1), round(y + oy, 1)) for x, y in ring] for ring in poly] for poly in polys]

    features = []
    for ci, name in enumerate(class_names):
        mask = labels == ci
        if not mask.any():
            continue
        polys = shifted(mask)
        if polys:
            meas = {"area_um2": float(mask.sum()) * cell_um2, "mean_p": float(dense.probs[mask, ci].mean())}
            features.append(multipolygon_feature(polys, "annotation", {"name": name, "color": list(colours[name])},
                                                 meas, name=name))
    for key, mask in (regions or {}).items():
        m = np.asarray(mask, bool)
        polys = shifted(m) if m.any() else []
        if polys:
            features.append(multipolygon_feature(polys, "annotation", None,
                                                 {"area_um2": float(m.sum()) * cell_um2}, name=key))
    return feature_collection(features)
