"""The tile grid at a physical resolution, and tissue-fraction filtering. Pure, vectorised functions.

All coordinates are level-0 pixels. A tile of ``tile_size`` px at ``target_mpp`` covers
``tile_size * target_mpp / slide_mpp`` level-0 px; the stride is ``(tile_size - overlap)`` target px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TileSpec:
    target_mpp: float = 0.5
    tile_size: int = 224
    overlap: int = 0

    def scale(self, slide_mpp: float) -> float:
        """Level-0 pixels per target pixel."""
        return self.target_mpp / slide_mpp

    def tile_size_l0(self, slide_mpp: float) -> int:
        return max(1, round(self.tile_size * self.scale(slide_mpp)))

    def stride_l0(self, slide_mpp: float) -> float:
        return (self.tile_size - self.overlap) * self.scale(slide_mpp)


def grid_l0_xy(dimensions_l0: tuple[int, int], slide_mpp: float, spec: TileSpec) -> np.ndarray:
    """Top-left level-0 corners of every full tile of the regular grid (row-major, N×2 int64)."""
    w0, h0 = dimensions_l0
    size = spec.tile_size_l0(slide_mpp)
    stride = spec.stride_l0(slide_mpp)
    nx = int(np.floor((w0 - size) / stride)) + 1 if w0 >= size else 0
    ny = int(np.floor((h0 - size) / stride)) + 1 if h0 >= size else 0
    xs = np.round(np.arange(nx) * stride).astype(np.int64)
    ys = np.round(np.arange(ny) * stride).astype(np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tissue_fractions(
    mask: np.ndarray, mask_l0_per_px: tuple[float, float], l0_xy: np.ndarray, tile_size_l0: int
) -> np.ndarray:
    """Fraction of each tile covered by ``mask`` (summed-area table; one pass, no loop over tiles)."""
    if len(l0_xy) == 0:
        return np.zeros(0, np.float32)
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.int32)  # summed-area table (int32: masks up to 2^31 px)
    np.cumsum(mask, axis=0, dtype=np.int32, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
    sx, sy = mask_l0_per_px
    x0 = np.clip(np.round(l0_xy[:, 0] / sx).astype(np.int64), 0, w)
    y0 = np.clip(np.round(l0_xy[:, 1] / sy).astype(np.int64), 0, h)
    x1 = np.clip(np.round((l0_xy[:, 0] + tile_size_l0) / sx).astype(np.int64), 0, w)
    y1 = np.clip(np.round((l0_xy[:, 1] + tile_size_l0) / sy).astype(np.int64), 0, h)
    x1 = np.maximum(x1, np.minimum(x0 + 1, w))
    y1 = np.maximum(y1, np.minimum(y0 + 1, h))
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return (inside / area).astype(np.float32)


def select_tiles(
    mask: np.ndarray,
    mask_l0_per_px: tuple[float, float],
    dimensions_l0: tuple[int, int],
    slide_mpp: float,
    spec: TileSpec,
    min_tissue: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Grid tiles whose tissue fraction ≥ ``min_tissue``: (l0_xy N×2 int64, fractions N)."""
    l0_xy = grid_l0_xy(dimensions_l0, slide_mpp, spec)
    frac = tissue_fractions(mask, mask_l0_per_px, l0_xy, spec.tile_size_l0(slide_mpp))
    keep = frac >= max(min_tissue, 1e-9)
    return l0_xy[keep], frac[keep]
