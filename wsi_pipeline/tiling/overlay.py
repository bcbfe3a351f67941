"""Draw the kept tile grid on a thumbnail, vectorised over thumbnail pixels (no loop over tiles)."""

from __future__ import annotations

import numpy as np

GRID_COLOR = np.array([0, 160, 60], np.float32)


def draw_tile_grid(thumb: np.ndarray, l0_xy: np.ndarray, tile_size_l0: int, l0_per_px: float,
                   alpha: float = 0.25) -> np.ndarray:
    """Tint kept tiles and outline them. ``l0_per_px``: level-0 pixels per thumbnail pixel."""
    h, w = thumb.shape[:2]
    cover = np.zeros((h, w), np.int32)  # number of tiles covering each thumbnail pixel
    edge = np.zeros((h, w), bool)
    if len(l0_xy):
        x0 = np.clip(np.floor(l0_xy[:, 0] / l0_per_px).astype(np.int64), 0, w - 1)
        y0 = np.clip(np.floor(l0_xy[:, 1] / l0_per_px).astype(np.int64), 0, h - 1)
        x1 = np.clip(np.ceil((l0_xy[:, 0] + tile_size_l0) / l0_per_px).astype(np.int64), 1, w)
        y1 = np.clip(np.ceil((l0_xy[:, 1] + tile_size_l0) / l0_per_px).astype(np.int64), 1, h)
        diff = np.zeros((h + 1, w + 1), np.int32)
        np.add.at(diff, (y0, x0), 1)
        np.add.at(diff, (y0, x1), -1)
        np.add.at(diff, (y1, x0), -1)
        np.add.at(diff, (y1, x1), 1)
        cover = np.cumsum(np.cumsum(diff, axis=0), axis=1)[:h, :w]
        # outlines: top/left edge pixels of every tile rectangle
        for xs in (x0, np.clip(x1 - 1, 0, w - 1)):
            _vertical_edges(edge, xs, y0, y1)
        for ys in (y0, np.clip(y1 - 1, 0, h - 1)):
            _horizontal_edges(edge, ys, x0, x1)
    out = thumb.astype(np.float32)
    tinted = cover > 0
    out[tinted] = out[tinted] * (1 - alpha) + GRID_COLOR * alpha
    out[edge] = GRID_COLOR
    return out.astype(np.uint8)


def _vertical_edges(edge: np.ndarray, xs: np.ndarray, y0: np.ndarray, y1: np.ndarray) -> None:
    h = edge.shape[0]
    diff = np.zeros((h + 1, edge.shape[1]), np.int32)
    np.add.at(diff, (y0, xs), 1)
    np.add.at(diff, (y1, xs), -1)
    edge |= np.cumsum(diff, axis=0)[:h] > 0


def _horizontal_edges(edge: np.ndarray, ys: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> None:
    w = edge.shape[1]
    diff = np.zeros((edge.shape[0], w + 1), np.int32)
    np.add.at(diff, (ys, x0), 1)
    np.add.at(diff, (ys, x1), -1)
    edge |= np.cumsum(diff, axis=1)[:, :w] > 0
