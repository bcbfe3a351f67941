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


@dataclass
class _Colour:
    """Per-pixel colour quantities computed once on channel planes (fast: no reductions over a last axis)."""

    r: np.ndarray
    g: np.ndarray
    b: np.ndarray
    mx: np.ndarray  # max channel, uint8
    mn: np.ndarray  # min channel, uint8
    s: np.ndarray  # HSV saturation in [0, 1], float32

    @classmethod
    def of(cls, rgb: np.ndarray) -> _Colour:
        r, g, b = (np.ascontiguousarray(rgb[..., i]) for i in range(3))
        mx = np.maximum(np.maximum(r, g), b)
        mn = np.minimum(np.minimum(r, g), b)
        d = (mx - mn).astype(np.float32)
        s = d / np.maximum(mx, 1).astype(np.float32)
        return cls(r, g, b, mx, mn, s)

    def hue(self, where: np.ndarray) -> np.ndarray:
        """Hue in degrees [0, 360) of the pixels selected by ``where`` (1-D)."""
        r, g, b = (c[where].astype(np.float32) for c in (self.r, self.g, self.b))
        mx, mn = self.mx[where].astype(np.float32), self.mn[where].astype(np.float32)
        d = np.maximum(mx - mn, 1e-6)
        h = np.where(mx == r, ((g - b) / d) % 6.0, np.where(mx == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
        return h * 60.0


def _pen(c: _Colour) -> np.ndarray:
    pen = c.mx < DARK_V * 255  # near-black
    # hue is computed only where ink is possible: green/blue-dominant or strongly red-dominant pixels
    gb = (c.s > 0.2) & (c.mx < 0.95 * 255) & ((c.g == c.mx) | (c.b == c.mx))
    rd = (c.s > 0.6) & (c.r == c.mx) & (c.g.astype(np.int16) * 2 < c.r)
    for cand, lo_hi in ((gb, None), (rd, "red")):
        idx = np.flatnonzero(cand)
        if not idx.size:
            continue
        h = c.hue(cand)
        ink = ((h >= 335) | (h <= 20)) if lo_hi == "red" else ((h > 75) & (h < 255))
        pen.reshape(-1)[idx[ink]] = True
    return pen


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Marker ink: blue/green/cyan hues (absent from H&E), saturated red, and near-black."""
    return _pen(_Colour.of(rgb))


def otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """Otsu threshold of values in [0, 1] via a histogram (bincount on quantised values: fast)."""
    q = np.minimum((np.asarray(values, dtype=np.float32) * bins).astype(np.intp), bins - 1)
    hist = np.bincount(q.ravel(), minlength=bins).astype(np.float64)
    centers = (np.arange(bins) + 0.5) / bins
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between[:-1]))])


def detect_tissue(rgb: np.ndarray, params: TissueParams) -> np.ndarray:
    """Boolean tissue mask of ``rgb`` (H×W×3 uint8 at ``params.mask_mpp`` µm/px)."""

    c = _Colour.of(rgb)
    white = c.mn > WHITE_MIN_RGB
    pen = np.zeros(rgb.shape[:2], bool)
    if params.reject_pen:
        pen = _pen(c)
        if pen.any():  # ink bleeds: reject its blurred halo too
            pen = dilate3(pen, times=2)
    candidates = ~white & ~pen
    sample = c.s[candidates] if candidates.any() else c.s.ravel()
    thr = float(np.clip(otsu_threshold(sample), SAT_FLOOR, SAT_CEIL)) if sample.size else SAT_FLOOR
    mask = (c.s > thr) & candidates
    mask = _closing3(mask)
    px_area = params.mask_mpp**2
    mask = fill_small_holes(mask, max(1, int(params.min_hole_um2 / px_area))) & ~pen
    return remove_small_objects(mask, max(1, int(params.min_area_um2 / px_area)))


def _shift_or(m: np.ndarray, axis: int) -> np.ndarray:
    """OR of ``m`` with its ±1 shifts along ``axis`` (zero padding)."""
    out = m.copy()
    if axis == 0:
        out[1:] |= m[:-1]
        out[:-1] |= m[1:]
    else:
        out[:, 1:] |= m[:, :-1]
        out[:, :-1] |= m[:, 1:]
    return out


def dilate3(mask: np.ndarray, times: int = 1) -> np.ndarray:
    """3×3 binary dilation (separable shifts on bool arrays: far faster than scipy's binary ops)."""
    for _ in range(times):
        mask = _shift_or(_shift_or(mask, 0), 1)
    return mask


def erode3(mask: np.ndarray) -> np.ndarray:
    """3×3 binary erosion; outside the image counts as foreground (so closing does not eat borders)."""
    return ~dilate3(~mask)


def _closing3(mask: np.ndarray) -> np.ndarray:
    return erode3(dilate3(mask))


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
