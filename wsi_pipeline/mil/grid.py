"""Tile-grid geometry from level-0 coordinates (shared by context features and TransMIL's PPEG)."""

from __future__ import annotations

import numpy as np


def grid_rc(l0_xy: np.ndarray) -> np.ndarray:
    """(row, col) of every tile on the tile grid; the step is the smallest coordinate difference per axis."""
    xy = np.asarray(l0_xy, dtype=np.int64).reshape(-1, 2)
    out = np.zeros_like(xy)
    for d in (0, 1):
        u = np.unique(xy[:, d])
        step = int(np.diff(u).min()) if len(u) > 1 else 1
        out[:, 1 - d] = (xy[:, d] - (u[0] if len(u) else 0)) // max(step, 1)
    return out


def ring_offsets(k: int) -> list[tuple[int, int]]:
    """Grid offsets (drow, dcol) at Chebyshev distance exactly ``k``."""
    return [(dr, dc) for dr in range(-k, k + 1) for dc in range(-k, k + 1) if max(abs(dr), abs(dc)) == k]


def grid_positions(l0_xy: np.ndarray, max_cells_factor: float = 4.0) -> tuple[np.ndarray, int, int]:
    """(row, col) of every tile and the grid shape (rows, cols).

    Sparse layouts (several sections far apart) whose bounding grid would exceed ``max_cells_factor``·N
    cells drop empty rows and columns.
    """
    rc = grid_rc(l0_xy)
    n = len(rc)
    if n == 0:
        return rc, 1, 1
    r, c = rc[:, 0], rc[:, 1]
    h, w = int(r.max()) + 1, int(c.max()) + 1
    if h * w > max_cells_factor * n + 64:
        r = np.unique(r, return_inverse=True)[1]
        c = np.unique(c, return_inverse=True)[1]
        h, w = int(r.max()) + 1, int(c.max()) + 1
    return np.stack([r, c], axis=1).astype(np.int64), h, w
