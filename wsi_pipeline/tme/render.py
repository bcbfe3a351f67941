"""Class-map PNG over the thumbnail (with a legend) and the QuPath GeoJSON of classified tiles."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

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
    from PIL import Image, ImageDraw

    from wsi_pipeline.formats import atomic_path

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
    row_h, pad, legend_w = 18, 8, 200
    legend_h = pad * 2 + row_h * (len(class_names) + (2 if title else 1))
    canvas = Image.new("RGB", (w + legend_w, max(h, legend_h)), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = pad
    if title:
        draw.text((w + pad, y), title[:30], fill=(0, 0, 0))
        y += row_h
    draw.text((w + pad, y), "class (share of tiles)", fill=(0, 0, 0))
    y += row_h
    for i, name in enumerate(class_names):
        draw.rectangle([w + pad, y + 2, w + pad + 12, y + 14], fill=colours[name], outline=(0, 0, 0))
        draw.text((w + pad + 18, y + 2), f"{name} {100 * counts[i] / total:.0f}%", fill=(0, 0, 0))
        y += row_h
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


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
