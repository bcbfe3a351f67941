"""Tissue mask → polygons (outer ring + holes) in level-0 coordinates, for QuPath GeoJSON."""

from __future__ import annotations

import numpy as np

Ring = list[tuple[float, float]]


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _trace(mask: np.ndarray, tolerance: float) -> list[np.ndarray]:
    """Closed boundary rings (x, y in mask pixel-edge coordinates) of a binary mask."""
    from skimage import measure

    padded = np.pad(mask.astype(np.float32), 1)
    rings = []
    for c in measure.find_contours(padded, 0.5):
        c = measure.approximate_polygon(c, tolerance) if tolerance > 0 else c
        if len(c) < 4:
            continue
        # (row, col) in padded coords at pixel centres → (x, y) edge coords of the unpadded mask
        xy = np.stack([c[:, 1] - 1 + 0.5, c[:, 0] - 1 + 0.5], axis=1)
        rings.append(xy)
    return rings


def mask_polygons(
    mask: np.ndarray, mask_l0_per_px: tuple[float, float], tolerance: float = 1.0
) -> list[list[Ring]]:
    """One polygon per connected tissue component: [exterior, hole, hole, ...] as level-0 (x, y) rings
    (orientation and closing are normalised by :mod:`wsi_pipeline.formats.geojson` when written)."""
    from scipy import ndimage as ndi

    labels, _ = ndi.label(mask)
    sx, sy = mask_l0_per_px
    polygons: list[list[Ring]] = []
    objects = ndi.find_objects(labels)
    for i, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        comp = labels[sl] == i
        oy, ox = sl[0].start, sl[1].start
        filled = ndi.binary_fill_holes(comp)
        outer = _trace(filled, tolerance)
        if not outer:
            continue
        ext = max(outer, key=lambda r: abs(_ring_area(r)))
        holes = _trace(filled & ~comp, tolerance)
        rings = [ext, *holes]
        polygons.append([_to_l0(r, ox, oy, sx, sy) for r in rings])
    return polygons


def _to_l0(ring: np.ndarray, ox: int, oy: int, sx: float, sy: float) -> Ring:
    pts = [(round((x + ox) * sx, 1), round((y + oy) * sy, 1)) for x, y in ring]
    if pts[0] != pts[-1]:
        pts.append(pts[0])
    return pts
