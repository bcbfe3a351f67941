"""Tissue detection on a low-resolution RGB image. Pure functions of arrays.

A pixel is tissue when it is

* **stained**: HSV saturation above a threshold (Otsu, clamped to [``SAT_FLOOR``, ``SAT_CEIL``]), not
  near-white, and not of an ink hue (blue/green/cyan never occur in H&E); or
* **pale but textured**: local texture of the min-RGB channel (mean absolute gradient in a
  ``TEXTURE_WINDOW_UM`` window, measured at about ``TEXTURE_MPP`` µm/px) above the glass's own noise.
  This keeps adipose (white lumina with thin membranes) and loose stroma, which a saturation
  threshold drops; gradients at the edge of stained tissue are not counted, and the textured area is
  eroded by the window radius, so it does not spill a halo onto the glass.

Pen marks are removed first: near-black pixels, saturated blue/green/cyan ink and saturated pure-red
ink (hue ≥ ``PEN_RED_HUE_MIN`` or ≤ 20°: eosin is pinker), in strokes of at least ``PEN_MIN_AREA_UM2``
(scattered ink-coloured pixels in deeply stained tissue are not a pen), plus a 2-pixel halo. Then a
3 × 3 closing, holes smaller than ``min_hole_um2`` filled (larger ones — lumina, tears — stay open), and
connected regions kept when they are at least ``min_area_um2`` and hold stained pixels
(``SEED_FRACTION`` of the minimum area): texture alone (a coverslip edge, an air bubble, dust) is not
tissue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DETECTOR_VERSION = 2  # bump when the masks change (part of the tiling resume key)
WHITE_MIN_RGB = 215  # all channels above this: glass / near-white
SAT_FLOOR = 0.07  # saturation threshold never below this (an all-glass image has no tissue)
SAT_CEIL = 0.15  # nor above this (an all-tissue image keeps pale tissue)
DARK_V = 0.12  # value below this: black pen, folds' cores, scanner debris
INK_MIN_SAT = 0.05  # a blue/green/cyan hue at this saturation or more is ink (or its halo), never stain
PEN_RED_HUE_MIN = 345.0  # red ink hue range [345°, 20°]; eosin-rich stroma lies around 310–345°
PEN_MIN_AREA_UM2 = 10000.0  # ink strokes smaller than this are scattered pixels, not a pen mark
TEXTURE_MPP = 8.0  # texture is measured at about this scale (finer masks are block-averaged)
TEXTURE_WINDOW_UM = 40.0  # window of the local texture (about an adipocyte)
TEXTURE_MIN = 6.0  # texture threshold bounds (grey levels per pixel of the min-RGB channel)
TEXTURE_MAX = 14.0
TEXTURE_NOISE_K = 2.5  # texture threshold = K × the glass's texture (25th percentile over near-white pixels)
SEED_FRACTION = 0.1  # a kept region holds at least this fraction of min_area_um2 in stained pixels
OTSU_MAX_SAMPLES = 1 << 16  # Otsu's histogram is built from at most about this many pixels


@dataclass(frozen=True)
class TissueParams:
    mask_mpp: float  # µm per mask pixel
    min_area_um2: float = 20000.0  # blobs smaller than this are dropped
    min_hole_um2: float = 10000.0  # holes smaller than this (about a 110-µm lumen, an adipocyte) are filled
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

    def ink_hue(self, where: np.ndarray) -> np.ndarray:
        """Flat indices of the ``where`` pixels whose hue is in (75°, 255°) — green, cyan, blue — from
        integer comparisons. With d = max − min: max = G (and not R) gives hue 60·((B − R)/d + 2) ∈
        [60, 180], above 75° iff 4·(B − R) > −3d; max = B gives 60·((R − G)/d + 4) ∈ [180, 300], below
        255° iff 4·(R − G) < d."""
        idx = np.flatnonzero(where & (self.r < self.mx))
        r, g, b, mx, mn = (x.reshape(-1)[idx].astype(np.int16) for x in (self.r, self.g, self.b, self.mx, self.mn))
        d = mx - mn
        ok = ((g == mx) & (4 * (b - r) > -3 * d)) | ((b == mx) & (4 * (r - g) < d))
        return idx[ok]

    def red_ink_hue(self, where: np.ndarray) -> np.ndarray:
        """Flat indices of the ``where`` pixels with red the largest channel and hue in
        [``PEN_RED_HUE_MIN``, 20°]: hue = 60·(G − B)/d (mod 360), so ≤ 20° iff 0 ≤ 3·(G − B) ≤ d and
        ≥ 345° iff 0 < 4·(B − G) ≤ d."""
        idx = np.flatnonzero(where & (self.r == self.mx))
        g, b, mx, mn = (x.reshape(-1)[idx].astype(np.int16) for x in (self.g, self.b, self.mx, self.mn))
        d, gb = mx - mn, g - b
        k = 60.0 / (360.0 - PEN_RED_HUE_MIN)  # 4 for 345°
        return idx[((gb >= 0) & (3 * gb <= d)) | ((gb < 0) & (-gb * k <= d))]


def _pen(c: _Colour, min_px: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pen, ink): pen marks (near-black; saturated blue/green/cyan; saturated pure red), in strokes of
    at least ``min_px`` pixels when ``min_px`` > 1; ink = every pixel of an ink hue with saturation ≥
    :data:`INK_MIN_SAT` (pen strokes and their pale halo), which is never counted as stain."""
    pen = c.mx < DARK_V * 255
    ink = np.zeros_like(pen)
    flat_ink, flat_pen = ink.reshape(-1), pen.reshape(-1)
    idx = c.ink_hue(c.s >= INK_MIN_SAT)
    flat_ink[idx] = True
    strong = (c.s.reshape(-1)[idx] > 0.2) & (c.mx.reshape(-1)[idx] < 0.95 * 255)
    flat_pen[idx[strong]] = True
    red = (c.s > 0.6) & (c.g < (c.r >> 1) + (c.r & 1))  # 2·G < R
    flat_pen[c.red_ink_hue(red)] = True
    if min_px > 1 and pen.any():
        pen = remove_small_objects(pen, min_px)
    return pen, ink


def pen_mask(rgb: np.ndarray, mask_mpp: float | None = None) -> np.ndarray:
    """Marker ink: blue/green/cyan hues (absent from H&E), saturated pure red, and near-black. With
    ``mask_mpp`` (µm per pixel of ``rgb``), only strokes of at least :data:`PEN_MIN_AREA_UM2` count —
    what :func:`detect_tissue` rejects."""
    min_px = max(1, int(PEN_MIN_AREA_UM2 / mask_mpp**2)) if mask_mpp else 0
    return _pen(_Colour.of(rgb), min_px)[0]


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


def _subsample_step(n: int) -> int:
    return max(1, int(np.sqrt(n / OTSU_MAX_SAMPLES)))


def saturation_threshold(c: _Colour, candidates: np.ndarray) -> float:
    """Otsu on the saturation of non-white, non-ink pixels (a regular subsample on large images),
    clamped to [``SAT_FLOOR``, ``SAT_CEIL``]."""
    k = _subsample_step(candidates.size)
    sample = c.s[::k, ::k][candidates[::k, ::k]]
    if sample.size < 16:
        return SAT_FLOOR
    return float(np.clip(otsu_threshold(sample), SAT_FLOOR, SAT_CEIL))


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over f × f blocks (edge-padded to a multiple of f), float32."""
    h, w = a.shape
    hp, wp = -(-h // f) * f, -(-w // f) * f
    if (hp, wp) != (h, w):
        a = np.pad(a, ((0, hp - h), (0, wp - w)), mode="edge")
    return a.reshape(hp // f, f, wp // f, f).mean(axis=(1, 3), dtype=np.float32)


def _box_sum(a: np.ndarray, k: int) -> np.ndarray:
    """Sum over a k × k window (k odd and small; edges replicated) of a non-negative uint16 array,
    by shifted slices; the caller keeps k² × max(a) below 2¹⁶."""
    r = k // 2
    h, w = a.shape
    p = np.pad(a, r, mode="edge")
    v = p[:h].copy()
    for i in range(1, k):
        v += p[i : i + h]
    out = v[:, :w].copy()
    for j in range(1, k):
        out += v[:, j : j + w]
    return out


def local_texture(mn: np.ndarray, exclude: np.ndarray, mask_mpp: float) -> tuple[np.ndarray, float, int, int]:
    """Local texture of the min-RGB channel ``mn``: the mean absolute difference between 4-neighbours
    (grey levels) in a ``TEXTURE_WINDOW_UM`` window, measured at about ``TEXTURE_MPP`` µm/px;
    differences touching ``exclude`` pixels (stained tissue, ink) are not counted.

    Returns (sums, scale, f, k): window sums (uint16) on the mask grid block-averaged by ``f``, the factor
    turning them into grey levels, and the window ``k`` in those pixels."""
    f = max(1, round(TEXTURE_MPP / mask_mpp))
    if f > 1:
        m = np.rint(_block_mean(mn, f)).astype(np.int16)
        keep = _block_mean(exclude.view(np.uint8), f) <= 0.5
    else:
        m = mn.astype(np.int16)
        keep = ~exclude
    grad = np.zeros(m.shape, np.uint16)  # sum of |differences| to the 4 neighbours: ≤ 4 × 255
    for axis in (0, 1):
        lo = (slice(None, -1), slice(None)) if axis == 0 else (slice(None), slice(None, -1))
        hi = (slice(1, None), slice(None)) if axis == 0 else (slice(None), slice(1, None))
        d = np.abs(m[hi] - m[lo]).view(np.uint16)
        d *= keep[lo] & keep[hi]
        grad[lo] += d
        grad[hi] += d
    k = min(7, max(3, round(TEXTURE_WINDOW_UM / (mask_mpp * f)) | 1))  # 49 × 1020 < 2¹⁶
    return _box_sum(grad, k), 0.5 / (k * k), f, k


def texture_threshold(texture: np.ndarray, glass: np.ndarray, scale: float = 1.0) -> float:
    """Texture threshold in the units of ``texture`` (``scale`` turns them into grey levels):
    ``TEXTURE_NOISE_K`` × the 25th percentile over ``glass`` (near-white) pixels, clamped to
    [``TEXTURE_MIN``, ``TEXTURE_MAX``] grey levels — noisy scans need more texture to count as tissue."""
    t = texture[glass]
    if t.size < 64:
        return TEXTURE_MIN / scale
    noise = float(np.percentile(t[:: max(1, t.size // 8192)], 25)) * scale
    return float(np.clip(TEXTURE_NOISE_K * noise, TEXTURE_MIN, TEXTURE_MAX)) / scale


def pale_tissue(c: _Colour, stained: np.ndarray, exclude: np.ndarray, white: np.ndarray, mask_mpp: float
                ) -> np.ndarray:
    """Pale but textured pixels (adipose, loose stroma) — see the module docstring. Gradients at the
    edge of solid stained areas (what survives a 3 × 3 opening) are not counted; those of thin stained
    structures (membranes, fibres) are."""
    solid = dilate3(erode3(stained))
    tex, scale, f, k = local_texture(c.mn, solid | exclude, mask_mpp)
    glass = white[::f, ::f][: tex.shape[0], : tex.shape[1]] if f > 1 else white
    pale = tex > texture_threshold(tex, glass, scale)
    for _ in range(k // 2 + 1):  # undo the window's (and the gradient's) spread onto the glass
        pale = erode3(pale)
    if f > 1:
        pale = np.repeat(np.repeat(pale, f, axis=0), f, axis=1)[: c.mn.shape[0], : c.mn.shape[1]]
    return pale


def detect_tissue(rgb: np.ndarray, params: TissueParams) -> np.ndarray:
    """Boolean tissue mask of ``rgb`` (H×W×3 uint8 at ``params.mask_mpp`` µm/px)."""
    c = _Colour.of(rgb)
    px_area = params.mask_mpp**2
    white = c.mn > WHITE_MIN_RGB
    pen = np.zeros(rgb.shape[:2], bool)
    ink = pen
    if params.reject_pen:
        pen, ink = _pen(c, max(1, int(PEN_MIN_AREA_UM2 / px_area)))
        if pen.any():  # ink bleeds: reject its blurred halo too
            pen = dilate3(pen, times=2)
    not_pen = ~pen
    candidates = ~white & ~ink & not_pen
    stained = (c.s > saturation_threshold(c, candidates)) & candidates
    mask = (stained | pale_tissue(c, stained, pen | ink, white, params.mask_mpp)) & not_pen
    mask = _closing3(mask)
    mask = fill_small_holes(mask, max(1, int(params.min_hole_um2 / px_area))) & not_pen
    min_px = max(1, int(params.min_area_um2 / px_area))
    return keep_regions(mask, min_px, stained, max(1, int(SEED_FRACTION * min_px)))


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
    """Connected regions of ``mask`` with at least ``min_px`` pixels. Fast on sparse masks: isolated
    pixels are dropped first, and nothing is labelled when too few pixels are left."""
    from scipy import ndimage as ndi

    if min_px > 1:
        mask = mask & dilate3_cross_any(mask)
    if int(np.count_nonzero(mask)) < min_px or not _may_hold_region(mask, min_px):
        return np.zeros_like(mask)
    labels, n = ndi.label(mask)
    on = labels[mask]
    keep = np.bincount(on, minlength=n + 1) >= min_px
    out = np.zeros_like(mask)
    out[mask] = keep[on]
    return out


def _may_hold_region(mask: np.ndarray, min_px: int) -> bool:
    """False when no connected region of a sparse ``mask`` can reach ``min_px`` pixels, decided on the
    mask with its empty rows and columns removed (that only merges regions, so sizes are upper bounds):
    a tiny array to label instead of the whole image. True when unsure."""
    from scipy import ndimage as ndi

    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size * cols.size > mask.size // 4:
        return True
    labels, n = ndi.label(mask[np.ix_(rows, cols)])
    return bool(n) and int(np.bincount(labels.ravel())[1:].max()) >= min_px


def dilate3_cross_any(mask: np.ndarray) -> np.ndarray:
    """True where a 4-neighbour is set (the pixel itself not counted)."""
    out = np.zeros_like(mask)
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def keep_regions(mask: np.ndarray, min_px: int, seeds: np.ndarray, min_seed_px: int) -> np.ndarray:
    """Connected regions of ``mask`` with at least ``min_px`` pixels, ``min_seed_px`` of them in ``seeds``."""
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_px
    keep &= np.bincount(labels[seeds], minlength=n + 1) >= min_seed_px  # label 0: seeds outside the mask
    keep[0] = False
    return np.take(keep, labels)


def fill_small_holes(mask: np.ndarray, max_hole_px: int) -> np.ndarray:
    """Fill holes smaller than ``max_hole_px``; larger holes (lumina, tears) stay open."""
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
    return mask | np.take(small, labels)
