"""Tissue detection on a low-resolution RGB image: Otsu on saturation, near-white and pen-mark rejection,
morphology with real holes kept and a minimum area. Pure functions of arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WHITE_MIN_RGB = 215  # all channels above this: glass / near-white
SAT_FLOOR = 0.07  # saturation threshold never below this (an all-glass image has no tissue)
SAT_CEIL = 0.25  # nor above this (an all-tissue image keeps pale tissue)
DARK_V = 0.12  # value below this: black pen, folds' cores, scanner debris


@dataclass(frozen=True)
class TissueParams:
    mask_mpp: float  # µm per mask pixel
    min_area_um2: float = 20000.0  # blobs smaller than this are dropped
    min_hole_um2: float = 2000.0  # holes smaller than this are filled; larger (lumina, fat) are kept
    reject_pen: bool = True


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1]."""
    f = rgb.astype(np.float32) * (1.0 / 255.0)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    mx = f.max(axis=-1)
    mn = f.min(axis=-1)
    d = mx - mn
    s = np.where(mx > 0, d / np.maximum(mx, 1e-6), 0.0)
    dd = np.maximum(d, 1e-6)
    h = np.where(mx == r, (g - b) / dd % 6.0, np.where(mx == g, (b - r) / dd + 2.0, (r - g) / dd + 4.0)) * 60.0
    h = np.where(d > 0, h, 0.0)
    return h, s, mx


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Marker ink: blue/green/cyan hues (absent from H&E), saturated red, and near-black."""
    h, s, v = _hsv(rgb)
    r, g = rgb[..., 0].astype(np.int16), rgb[..., 1].astype(np.int16)
    blue_green = (h > 75) & (h < 255) & (s > 0.2) & (v < 0.95)
    red = ((h >= 335) | (h <= 20)) & (s > 0.6) & (g * 2 < r)
    black = v < DARK_V
    return blue_green | red | black


def otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """Otsu threshold of values in [0, 1] via a histogram (fast)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between[:-1]))])


def detect_tissue(rgb: np.ndarray, params: TissueParams) -> np.ndarray:
    """Boolean tissue mask of ``rgb`` (H×W×3 uint8 at ``params.mask_mpp`` µm/px)."""
    from scipy import ndimage as ndi

    _, s, _ = _hsv(rgb)
    white = rgb.min(axis=-1) > WHITE_MIN_RGB
    pen = np.zeros(rgb.shape[:2], bool)
    if params.reject_pen:
        pen = pen_mask(rgb)
        if pen.any():  # ink bleeds: reject its blurred halo too
            pen = ndi.binary_dilation(pen, structure=np.ones((5, 5), bool))
    candidates = ~white & ~pen
    sample = s[candidates] if candidates.any() else s.ravel()
    thr = float(np.clip(otsu_threshold(sample), SAT_FLOOR, SAT_CEIL)) if sample.size else SAT_FLOOR
    mask = (s > thr) & candidates
    mask = ndi.binary_closing(mask, structure=np.ones((3, 3), bool), border_value=0)
    px_area = params.mask_mpp**2
    mask = fill_small_holes(mask, max(1, int(params.min_hole_um2 / px_area))) & ~pen
    return remove_small_objects(mask, max(1, int(params.min_area_um2 / px_area)))


def remove_small_objects(mask: np.ndarray, min_px: int) -> np.ndarray:
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_hole_px: int) -> np.ndarray:
    """Fill holes smaller than ``max_hole_px``; larger holes (lumina, fat) stay open."""
    from scipy import ndimage as ndi

    holes = ~mask
    labels, n = ndi.label(holes)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    # background touching the border is never a hole
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    small = sizes < max_hole_px
    small[border] = False
    small[0] = False
    return mask | small[labels]
