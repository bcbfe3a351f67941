"""Pure raster code: per-tile scores → a level-0-aligned score grid, its 2× pyramid, normalisation and
colouring. No I/O.

The grid has its origin at level-0 (0, 0); pixel (i, j) of scale ``s`` covers the level-0 rectangle
``[j·cell·2^s, (j+1)·cell·2^s) × [i·cell·2^s, (i+1)·cell·2^s)``. A tile covers the cells whose *centres*
lie inside it. Without smoothing each cell takes the score of the covering tile whose centre is nearest;
with smoothing it takes the mean score of all covering tiles (overlapping tiles → a smoother map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GridSpec:
    """A score raster aligned to level 0: ``cell_l0`` level-0 pixels per raster pixel."""

    cell_l0: int
    width: int  # raster columns
    height: int  # raster rows
    level0_size: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def cell_of(self, l0_x: float, l0_y: float, scale: int = 0) -> tuple[int, int]:
        """(row, col) of the scale-``scale`` pixel containing a level-0 point."""
        c = self.cell_l0 * (1 << scale)
        return int(l0_y // c), int(l0_x // c)


def tile_stride(coords: np.ndarray, tile_size_l0: int) -> int:
    """The grid step along x/y (smallest positive gap between distinct coordinates), else the tile size."""
    gaps = []
    for col in (coords[:, 0], coords[:, 1]):
        u = np.unique(col)
        if len(u) > 1:
            gaps.append(int(np.diff(u).min()))
    return min(gaps) if gaps else int(tile_size_l0)


def grid_for_tiles(
    l0_xy: np.ndarray, tile_size_l0: int, level0_size: tuple[int, int], max_cells: int = 4096
) -> GridSpec:
    """Choose the cell size: the largest size that divides every tile corner and the tile side (so tiles
    map exactly onto cells) when that is not much finer than the tile step; otherwise the tile step.
    Doubled until the raster's longer side is ≤ ``max_cells``."""
    xy = np.asarray(l0_xy, dtype=np.int64).reshape(-1, 2)
    s = int(tile_size_l0)
    stride = max(1, min(tile_stride(xy, s), s)) if len(xy) else s
    g = math.gcd(s, stride)
    if len(xy):
        g = math.gcd(g, int(np.gcd.reduce(np.abs(xy).ravel())))
    cell = g if g * 4 >= stride else stride
    cell = max(1, cell)
    w0, h0 = int(level0_size[0]), int(level0_size[1])
    while max(math.ceil(w0 / cell), math.ceil(h0 / cell)) > max_cells:
        cell *= 2
    return GridSpec(cell_l0=cell, width=max(1, math.ceil(w0 / cell)), height=max(1, math.ceil(h0 / cell)),
                    level0_size=(w0, h0))


def tile_cells(l0_xy: np.ndarray, tile_size_l0: float, grid: GridSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (tile, cell) pair where the cell centre lies inside the tile, vectorised.

    Returns (tile index, flat cell index row*width+col, squared distance tile centre → cell centre)."""
    xy = np.asarray(l0_xy, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    if n == 0:
        e = np.empty(0, np.int64)
        return e, e, np.empty(0)
    c, s = float(grid.cell_l0), float(tile_size_l0)
    j0 = np.ceil(xy[:, 0] / c - 0.5).astype(np.int64)
    j1 = np.ceil((xy[:, 0] + s) / c - 0.5).astype(np.int64)
    i0 = np.ceil(xy[:, 1] / c - 0.5).astype(np.int64)
    i1 = np.ceil((xy[:, 1] + s) / c - 0.5).astype(np.int64)
    k = int(max((j1 - j0).max(), (i1 - i0).max(), 1))
    off = np.arange(k)
    jj = j0[:, None, None] + off[None, None, :]
    ii = i0[:, None, None] + off[None, :, None]
    valid = (jj < j1[:, None, None]) & (ii < i1[:, None, None])
    valid &= (jj >= 0) & (jj < grid.width) & (ii >= 0) & (ii < grid.height)
    tidx = np.broadcast_to(np.arange(n)[:, None, None], valid.shape)[valid]
    jj_b = np.broadcast_to(jj, valid.shape)[valid]
    ii_b = np.broadcast_to(ii, valid.shape)[valid]
    cx, cy = xy[tidx, 0] + s / 2, xy[tidx, 1] + s / 2
    d2 = (cx - (jj_b + 0.5) * c) ** 2 + (cy - (ii_b + 0.5) * c) ** 2
    return tidx, ii_b * grid.width + jj_b, d2


def rasterize(
    l0_xy: np.ndarray, tile_size_l0: float, values: np.ndarray, grid: GridSpec, smooth: bool = False
) -> np.ndarray:
    """Tile values → float32 raster of ``grid.shape``; NaN where no tile (or only NaN tiles) covers a cell."""
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    out = np.full(grid.height * grid.width, np.nan, np.float32)
    tidx, flat, d2 = tile_cells(l0_xy, tile_size_l0, grid)
    keep = np.isfinite(vals[tidx]) if len(tidx) else np.zeros(0, bool)
    tidx, flat, d2 = tidx[keep], flat[keep], d2[keep]
    if len(tidx) == 0:
        return out.reshape(grid.shape)
    if smooth:
        size = grid.height * grid.width
        total = np.bincount(flat, weights=vals[tidx], minlength=size)
        count = np.bincount(flat, minlength=size)
        hit = count > 0
        out[hit] = (total[hit] / count[hit]).astype(np.float32)
    else:
        order = np.lexsort((tidx, d2, flat))  # per cell: nearest tile centre first (ties: lower index)
        flat_s = flat[order]
        first = np.ones(len(flat_s), bool)
        first[1:] = flat_s[1:] != flat_s[:-1]
        out[flat_s[first]] = vals[tidx[order][first]].astype(np.float32)
    return out.reshape(grid.shape)


def downsample2(arr: np.ndarray) -> np.ndarray:
    """2×2 mean of the finite values (NaN where all four are NaN); odd sizes round up."""
    h, w = arr.shape
    hp, wp = h + (h % 2), w + (w % 2)
    pad = np.full((hp, wp), np.nan, np.float64)
    pad[:h, :w] = arr
    blocks = pad.reshape(hp // 2, 2, wp // 2, 2).transpose(0, 2, 1, 3).reshape(hp // 2, wp // 2, 4)
    finite = np.isfinite(blocks)
    cnt = finite.sum(axis=2)
    tot = np.where(finite, blocks, 0.0).sum(axis=2)
    out = np.full(cnt.shape, np.nan, np.float32)
    out[cnt > 0] = (tot[cnt > 0] / cnt[cnt > 0]).astype(np.float32)
    return out


def pyramid(arr: np.ndarray, min_side: int = 32, max_levels: int = 12) -> list[np.ndarray]:
    """Scale 0 is ``arr``; each next scale halves it until the longer side is ≤ ``min_side``."""
    levels = [np.asarray(arr, dtype=np.float32)]
    while max(levels[-1].shape) > min_side and len(levels) < max_levels:
        levels.append(downsample2(levels[-1]))
    return levels


# ---------------------------------------------------------------- normalisation and colour
@dataclass(frozen=True)
class Normalizer:
    """Map raw scores to [0, 1]: ``percentile`` (rank within the slide's tile scores) or ``absolute``
    (linear between vmin and vmax, clipped)."""

    scale: str
    vmin: float
    vmax: float
    sorted_values: np.ndarray  # the slide's finite tile scores, sorted (percentile scale)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        out = np.full(v.shape, np.nan)
        ok = np.isfinite(v)
        if self.scale == "percentile":
            sv = self.sorted_values
            if len(sv) <= 1:
                out[ok] = 0.5
            else:
                lo = np.searchsorted(sv, v[ok], side="left")
                hi = np.searchsorted(sv, v[ok], side="right")
                # mid-rank of the value among the slide's scores, 0 = lowest tile, 1 = highest tile
                out[ok] = np.clip(((lo + hi - 1) / 2.0) / (len(sv) - 1), 0.0, 1.0)
        else:
            span = self.vmax - self.vmin
            out[ok] = np.clip((v[ok] - self.vmin) / span, 0.0, 1.0) if span > 0 else 0.5
        return out

    def ticks(self, n: int = 5) -> list[tuple[float, str]]:
        """Colour-bar ticks as (position in [0, 1], label)."""
        pos = np.linspace(0.0, 1.0, n)
        if self.scale == "percentile":
            sv = self.sorted_values
            q = np.quantile(sv, pos) if len(sv) else np.zeros(n)
            return [(float(p), f"{p * 100:.0f}% ({v:.3g})") for p, v in zip(pos, q, strict=True)]
        return [(float(p), f"{self.vmin + p * (self.vmax - self.vmin):.3g}") for p in pos]

    @property
    def label(self) -> str:
        return "percentile within slide (score)" if self.scale == "percentile" else "score"


def make_normalizer(values: np.ndarray, scale: str, vmin: float | None = None,
                    vmax: float | None = None, probability: bool | None = None) -> Normalizer:
    """Absolute scale defaults to [0, 1] for probabilities (``probability`` True, or unknown and every
    score in [0, 1]), else to the data range; ``vmin``/``vmax`` override."""
    v = np.asarray(values, dtype=np.float64)
    v = np.sort(v[np.isfinite(v)])
    dmin, dmax = (float(v[0]), float(v[-1])) if len(v) else (0.0, 1.0)
    if probability is None:
        probability = bool(len(v)) and dmin >= 0.0 and dmax <= 1.0
    if scale == "absolute":
        if vmin is None and vmax is None and probability:
            lo, hi = 0.0, 1.0
        else:
            lo = dmin if vmin is None else float(vmin)
            hi = dmax if vmax is None else float(vmax)
        if hi <= lo:
            hi = lo + 1.0
    else:
        lo, hi = dmin, dmax
    return Normalizer(scale=scale, vmin=lo, vmax=hi, sorted_values=v)


def colormap_lut(name: str, n: int = 256) -> np.ndarray:
    """n×3 uint8 colours of a matplotlib colormap."""
    from matplotlib import colormaps

    cmap = colormaps[name]
    return (np.asarray(cmap(np.linspace(0, 1, n)))[:, :3] * 255 + 0.5).astype(np.uint8)


def colorize(normed: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """[0, 1] values (NaN = none) → RGBA uint8, alpha 0 where NaN and 255 elsewhere."""
    v = np.asarray(normed, dtype=np.float64)
    ok = np.isfinite(v)
    idx = np.zeros(v.shape, np.int64)
    idx[ok] = np.clip(np.round(v[ok] * (len(lut) - 1)), 0, len(lut) - 1).astype(np.int64)
    rgba = np.zeros((*v.shape, 4), np.uint8)
    rgba[..., :3] = lut[idx]
    rgba[..., 3] = np.where(ok, 255, 0)
    return rgba


def sample_raster(raster: np.ndarray, grid: GridSpec, out_size: tuple[int, int],
                  l0_per_px: tuple[float, float]) -> np.ndarray:
    """Resample a scale-0 raster onto an image of ``out_size`` = (w, h) whose pixel (r, c) covers level-0
    ``[c·fx, (c+1)·fx) × [r·fy, (r+1)·fy)`` (nearest cell at the pixel centre); NaN outside the grid."""
    w, h = out_size
    fx, fy = l0_per_px
    cols = np.floor((np.arange(w) + 0.5) * fx / grid.cell_l0).astype(np.int64)
    rows = np.floor((np.arange(h) + 0.5) * fy / grid.cell_l0).astype(np.int64)
    cok = (cols >= 0) & (cols < grid.width)
    rok = (rows >= 0) & (rows < grid.height)
    out = np.full((h, w), np.nan, np.float32)
    sub = raster[np.clip(rows, 0, grid.height - 1)][:, np.clip(cols, 0, grid.width - 1)]
    mask = rok[:, None] & cok[None, :]
    out[mask] = sub[mask]
    return out


def top_bottom_indices(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k highest (descending) and k lowest (ascending) finite values."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(v))
    if k <= 0 or len(finite) == 0:
        e = np.empty(0, np.int64)
        return e, e
    order = finite[np.argsort(v[finite], kind="stable")]
    k = min(k, len(order))
    return order[::-1][:k].copy(), order[:k].copy()
