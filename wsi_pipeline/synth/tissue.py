"""Procedural H&E-like tissue, rendered at true physical scale from a class map.

A :class:`TissuePainter` turns a class map (``layout.py``; one cell = ``cell_um`` µm of tissue) into
pixels for any level-0 region at any downsample. Everything is defined in micrometres:

- class boundaries: the class map, domain-warped by smooth noise (amplitude about a fifth of a cell)
  and sampled on a raster of ``raster_um`` µm, so tissue edges look organic while every cell keeps its
  class at its centre;
- backgrounds: glass; eosin-pink stroma with wavy fibre bundles (7 µm period) and clefts; pink-purple
  tumour cytoplasm with gland-like lumens; pale necrosis; adipose vacuoles (about 65 µm) with thin
  pink membranes; mucosa with goblet-like vacuoles;
- nuclei: point processes on jittered lattices (one lattice per population, site spacing in µm),
  each site's existence, position, size, elongation, orientation and darkness hashed from its lattice
  index and the slide seed. Populations: tumour (equivalent diameter 9–14 µm, pleomorphic, vesicular),
  lymphocytes (about 7 µm, round, dark blue), fibroblasts (elongated along the fibres), debris
  fragments (1.5–4.5 µm) and mucosal nuclei. A site is drawn if a hash falls below the presence
  probability of the class (and peri-tumoural band flag) at its centre; lymphocytes are also scattered
  in other classes with phenotype-dependent densities (rendering only: the truth counts cells of
  the class map).

Because every random quantity is a hash of a position, a region renders identically whatever tiles
it is cut into, and pyramid levels agree: regions coarser than ``max_render_um`` per pixel are
rendered at a finer pixel size and box-filtered; ``min_render_um`` can render at a coarser size and
upsample (used for the fast benchmark slide). Rendering is vectorised numpy throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsi_pipeline.synth.layout import N_CLASSES, TissueClass, peritumoural_band
from wsi_pipeline.synth.noise import uniform, value_noise_grid, value_noise_points

_G, _T, _S, _C, _L, _N, _M, _A = (int(c) for c in TissueClass)
_BAND = N_CLASSES  # raster code offset for "in the peri-tumoural band"
_N_CODES = 2 * N_CLASSES


def _rgb(*v: float) -> np.ndarray:
    return np.array(v, np.float32)


# background colour per class (RGB 0–255)
_BASE = np.stack(
    [
        _rgb(243, 242, 246),  # glass
        _rgb(212, 158, 204),  # tumour cytoplasm
        _rgb(238, 172, 203),  # stroma (light fibres)
        _rgb(226, 160, 198),  # complex stroma
        _rgb(222, 184, 220),  # lymphocyte aggregate background
        _rgb(233, 185, 210),  # necrosis
        _rgb(214, 176, 214),  # mucosa
        _rgb(246, 244, 248),  # adipose vacuole
    ]
)
_FIBRE_DARK = _rgb(210, 104, 158)
_CLEFT = _rgb(246, 236, 244)
_LUMEN = _rgb(240, 226, 238)
_MEMBRANE = _rgb(214, 140, 184)
_GOBLET = _rgb(232, 222, 236)


@dataclass(frozen=True)
class Population:
    """One kind of nucleus: a jittered lattice of candidate sites with shape and colour ranges."""

    name: str
    key: int
    spacing_um: float
    radius_um: tuple[float, float]  # equivalent radius (sqrt(a*b))
    aspect: tuple[float, float]  # major / minor axis
    irregularity: float  # amplitude of 2nd/3rd harmonic boundary wobble
    rim: tuple[float, float, float]
    core: tuple[float, float, float]
    opacity: float = 0.95
    chromatin: float = 0.2  # per-pixel intensity noise inside the nucleus
    align: bool = False  # orient along the local stroma fibre direction
    avoid_lumen: bool = False

    @property
    def max_extent_um(self) -> float:
        return self.radius_um[1] * math.sqrt(self.aspect[1]) * (1.0 + self.irregularity)


POPULATIONS: tuple[Population, ...] = (
    Population("fibroblast", 11, 20.0, (2.4, 3.2), (3.0, 5.5), 0.05, (92, 52, 128), (120, 78, 152), 0.9, 0.15,
               align=True),
    Population("mucosa", 12, 10.0, (2.8, 3.5), (1.4, 2.2), 0.05, (72, 46, 122), (98, 68, 148), 0.95, 0.15),
    Population("tumour", 13, 13.0, (4.6, 6.9), (1.0, 1.6), 0.18, (62, 30, 104), (146, 100, 178), 0.93, 0.6,
               avoid_lumen=True),
    Population("debris", 14, 7.0, (0.8, 2.2), (1.0, 1.8), 0.35, (78, 42, 112), (96, 58, 134), 0.85, 0.2),
    Population("lympho", 15, 7.8, (3.1, 3.7), (1.0, 1.15), 0.05, (38, 28, 92), (62, 46, 122), 0.97, 0.15),
)

# presence probability of each population's sites by class (index = TissueClass)
_PRESENCE: dict[str, tuple[float, ...]] = {
    #            glass tum  str  cplx lym  nec  muc  adip
    "fibroblast": (0, 0.0, 0.45, 0.6, 0.0, 0.0, 0.1, 0.0),
    "mucosa": (0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.55, 0.0),
    "tumour": (0, 0.92, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "debris": (0, 0.0, 0.0, 0.05, 0.0, 0.55, 0.0, 0.0),
    "lympho": (0, 0.0, 0.0, 0.12, 0.93, 0.04, 0.06, 0.0),
}

# scattered lymphocytes by phenotype: (in tumour, in band stroma, in other stroma)
LYMPH_SCATTER: dict[str, tuple[float, float, float]] = {
    "inflamed": (0.10, 0.06, 0.02),
    "excluded": (0.01, 0.14, 0.02),
    "desert": (0.005, 0.015, 0.01),
}


def presence_table(phenotype: str | None) -> dict[str, np.ndarray]:
    """Per population, presence probability per raster code (class, or class + band offset)."""
    tables: dict[str, np.ndarray] = {}
    for pop in POPULATIONS:
        t = np.zeros(_N_CODES, np.float32)
        t[:N_CLASSES] = _PRESENCE[pop.name]
        t[_BAND:] = _PRESENCE[pop.name]
        tables[pop.name] = t
    if phenotype is not None:
        in_tum, in_band, other = LYMPH_SCATTER[phenotype]
        lt = tables["lympho"]
        lt[_T] = lt[_T + _BAND] = in_tum
        lt[_S], lt[_S + _BAND] = other, in_band
    return tables


@dataclass
class RenderOptions:
    """Rendering knobs (physical units)."""

    raster_um: float = 1.0  # resolution of the warped class raster
    warp_um: float = 0.15  # boundary warp amplitude, as a fraction of the cell size
    soften: float = 0.45  # Gaussian σ (cells) that rounds class boundaries
    max_render_um: float = 2.0  # coarser output is rendered at <= this and box-filtered
    min_render_um: float = 0.0  # finer output is rendered at this and upsampled (0: never)
    chunk_px: int = 1 << 20  # rendered pixels per internal chunk (bounds memory)
    strip_px: int = 4096  # width of the row-strip cache for tile-by-tile writers (0: off)
    stain_sd: float = 0.04  # per-slide stain gain variation (SD of per-channel gains)


@dataclass
class TissuePainter:
    """Paint H&E-like pixels for any level-0 region at any downsample (a :data:`pyramid.Painter`).

    ``class_map``: (rows, cols) int8 :class:`TissueClass` codes, one cell = ``cell_um`` µm, origin at
    level-0 (0, 0); ``mpp``: µm per level-0 pixel; ``phenotype`` sets the scattered-lymphocyte
    densities (``LYMPH_SCATTER``); ``seed`` keys every random quantity.
    """

    class_map: np.ndarray
    cell_um: float
    mpp: float
    size_l0: tuple[int, int]
    seed: int
    phenotype: str | None = None
    options: RenderOptions = field(default_factory=RenderOptions)
    band_cells: int = 1
    _raster: np.ndarray | None = field(default=None, init=False, repr=False)
    _presence: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _gain: np.ndarray = field(default_factory=lambda: np.ones(3, np.float32), init=False, repr=False)
    _strip: tuple[Any, ...] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.class_map = np.asarray(self.class_map, np.int8)
        self._presence = presence_table(self.phenotype)
        rng = np.random.default_rng([self.seed, 7])
        self._gain = np.clip(1.0 + rng.normal(0.0, self.options.stain_sd, 3), 0.85, 1.12).astype(np.float32)

    # ------------------------------------------------------------------ class raster
    @property
    def raster(self) -> np.ndarray:
        """Warped class codes (class, + ``N_CLASSES`` in the peri-tumoural band) on a ``raster_um`` grid,
        padded by one glass cell on every side."""
        if self._raster is None:
            self._raster = self._build_raster()
        return self._raster

    def _build_raster(self) -> np.ndarray:
        """Each raster pixel takes the class with the highest score, where a class's score is its
        Gaussian-smoothed indicator on the cell grid (σ = ``soften`` cells), bilinearly interpolated at
        a domain-warped position, plus a little noise: boundaries come out rounded and organic, and
        every cell keeps its own class at its centre."""
        from scipy import ndimage

        cm = self.class_map
        nests = ndimage.binary_fill_holes(cm == _T)
        band = peritumoural_band(nests, cm != _G, self.band_cells)
        present = [int(c) for c in np.unique(cm)]
        pad = 2
        scores = np.stack(
            [ndimage.gaussian_filter(np.pad((cm == c).astype(np.float32), pad, constant_values=float(c == _G)),
                                     self.options.soften, mode="nearest") for c in present]
        ).astype(np.float32)
        band_p = np.pad(band, pad)
        r = self.options.raster_um
        w_um, h_um = self.size_l0[0] * self.mpp, self.size_l0[1] * self.mpp
        nx, ny = math.ceil(w_um / r), math.ceil(h_um / r)
        out = np.zeros((ny + 2, nx + 2), np.int8)
        xs = (np.arange(nx) + 0.5) * r
        amp = self.options.warp_um * self.cell_um
        lut = np.asarray(present, np.int8)
        rows = max(1, (1 << 20) // max(1, nx))
        for y0 in range(0, ny, rows):
            ys = (np.arange(y0, min(ny, y0 + rows)) + 0.5) * r
            gx = (xs[None, :] + self._warp(xs, ys, amp, 0)) / self.cell_um - 0.5 + pad
            gy = (ys[:, None] + self._warp(xs, ys, amp, 1)) / self.cell_um - 0.5 + pad
            gx = np.clip(gx, 0, scores.shape[2] - 1.001).astype(np.float32)
            gy = np.clip(gy, 0, scores.shape[1] - 1.001).astype(np.float32)
            ix, iy = gx.astype(np.int32), gy.astype(np.int32)
            fx, fy = gx - ix, gy - iy
            stride = scores.shape[2]
            lin = (iy * stride + ix).ravel()
            w00 = ((1 - fx) * (1 - fy)).ravel()
            w01 = (fx * (1 - fy)).ravel()
            w10 = ((1 - fx) * fy).ravel()
            w11 = (fx * fy).ravel()
            fine = 0.12 * (value_noise_grid(xs, ys, 6.0, self.seed, 24) - 0.5).ravel()
            best = np.full(lin.shape, -np.inf, np.float32)
            arg = np.zeros(lin.shape, np.int8)
            for k in range(len(present)):
                sc = scores[k].ravel()
                v = sc.take(lin) * w00
                v += sc.take(lin + 1) * w01
                v += sc.take(lin + stride) * w10
                v += sc.take(lin + stride + 1) * w11
                if present[k] != _G:
                    v += fine
                better = v > best
                np.maximum(best, v, out=best)
                arg[better] = k
            arg = arg.reshape(gx.shape)
            codes = lut[arg]
            in_band = band_p[np.rint(gy).astype(np.int64), np.rint(gx).astype(np.int64)]
            codes = np.where(in_band & (codes != _G), codes + _BAND, codes).astype(np.int8)
            out[1 + y0 : 1 + y0 + len(ys), 1 : 1 + nx] = codes
        return out

    def _warp(self, xs: np.ndarray, ys: np.ndarray, amp: float, axis: int) -> np.ndarray:
        big = value_noise_grid(xs, ys, 0.6 * self.cell_um, self.seed, 20 + axis) - 0.5
        small = value_noise_grid(xs, ys, 0.15 * self.cell_um, self.seed, 22 + axis) - 0.5
        return (2.0 * amp) * big + (0.5 * amp) * small

    def _raster_index(self, v_um: np.ndarray, n: int) -> np.ndarray:
        return np.clip(np.floor(np.asarray(v_um) / self.options.raster_um).astype(np.int64) + 1, 0, n - 1)

    def codes_grid(self, xs_um: np.ndarray, ys_um: np.ndarray) -> np.ndarray:
        ras = self.raster
        return ras[self._raster_index(ys_um, ras.shape[0])][:, self._raster_index(xs_um, ras.shape[1])]

    def codes_points(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        ras = self.raster
        return ras[self._raster_index(y_um, ras.shape[0]), self._raster_index(x_um, ras.shape[1])]

    # ------------------------------------------------------------------ painter interface
    def __call__(self, l0_xy: tuple[int, int], size: tuple[int, int], downsample: float) -> np.ndarray:
        """Render ``size`` = (w, h) output pixels covering ``w*downsample × h*downsample`` level-0 px."""
        w, h = int(size[0]), int(size[1])
        x0, y0 = int(l0_xy[0]), int(l0_xy[1])
        sw = self.options.strip_px
        if sw and w < sw and h <= 1024:
            key = (float(downsample), y0, h)
            if self._strip is None or self._strip[0] != key or not (
                self._strip[1] <= x0 and x0 + round(w * downsample) <= self._strip[2]
            ):
                sw = max(w, min(sw, math.ceil((self.size_l0[0] - x0) / downsample)))
                strip = self._render_l0(x0, y0, sw, h, float(downsample))
                self._strip = (key, x0, x0 + round(strip.shape[1] * downsample), strip)
            _, sx0, _, strip = self._strip
            off = round((x0 - sx0) / downsample)
            return strip[:, off : off + w].copy()
        return self._render_l0(x0, y0, w, h, float(downsample))

    def _render_l0(self, x0: int, y0: int, w: int, h: int, ds: float) -> np.ndarray:
        from wsi_pipeline.slide.base import resize_rgb

        p_out = ds * self.mpp
        o = self.options
        if p_out > o.max_render_um:
            k = math.ceil(p_out / o.max_render_um)
            ds_n = ds / k
        elif o.min_render_um and p_out < o.min_render_um:
            ds_n = o.min_render_um / self.mpp
        else:
            ds_n = ds
        out = np.empty((h, w, 3), np.uint8)
        wn_total = max(1, math.ceil(w * ds / ds_n))
        rows_per = max(1, int(o.chunk_px / wn_total / max(1.0, ds / ds_n)))
        for r0 in range(0, h, rows_per):
            r1 = min(h, r0 + rows_per)
            hn = max(1, math.ceil((r1 - r0) * ds / ds_n))
            img = self.render_um(x0 * self.mpp, (y0 + r0 * ds) * self.mpp, ds_n * self.mpp, wn_total, hn)
            out[r0:r1] = resize_rgb(img, (w, r1 - r0))
        return out

    # ------------------------------------------------------------------ rendering in µm
    def render_um(self, x0_um: float, y0_um: float, p_um: float, w: int, h: int) -> np.ndarray:
        """Render (h, w) pixels of ``p_um`` µm whose top-left corner is at (x0_um, y0_um)."""
        xs = x0_um + (np.arange(w) + 0.5) * p_um
        ys = y0_um + (np.arange(h) + 0.5) * p_um
        codes = self.codes_grid(xs, ys)
        if not codes.any():  # all glass: nothing to draw
            return np.broadcast_to(_BASE[_G].astype(np.uint8), (h, w, 3)).copy()
        cls = codes % _BAND
        img = _BASE[cls]  # (h, w, 3) float32
        present = np.bincount(cls.ravel(), minlength=N_CLASSES) > 0
        shade = 0.94 + 0.12 * value_noise_grid(xs, ys, 260.0, self.seed, 30)
        if present[_S] or present[_C]:
            self._stroma(img, cls, xs, ys, p_um)
        if present[_T]:
            self._tumour_background(img, cls, xs, ys)
        if present[_N] or present[_L]:
            m = (cls == _N) | (cls == _L)
            tex = value_noise_grid(xs, ys, 5.0, self.seed, 40)
            img[m] *= (0.9 + 0.2 * tex[m])[:, None]
        if present[_M]:
            self._mucosa_background(img, cls, xs, ys)
        if present[_A]:
            self._adipose(img, cls, xs, ys, p_um)
        for pop in POPULATIONS:
            self._stamp(img, pop, x0_um, y0_um, p_um, w, h)
        img *= np.where((cls != _G)[:, :, None], shade[:, :, None] * self._gain, np.float32(1.0))
        np.clip(img, 0, 255, out=img)
        return img.astype(np.uint8)

    # fibre directions: three fixed families blended by smooth weights (no phase blow-up far from 0)
    _FIBRE_DIRS = (0.35, 1.4, 2.45)

    def _fibre_weights(self, noise: Any, *args: Any) -> list[np.ndarray]:
        return [noise(*args, 110.0, self.seed, 50 + k) ** 8 for k in range(3)]

    def _stroma(self, img: np.ndarray, cls: np.ndarray, xs: np.ndarray, ys: np.ndarray, p: float) -> None:
        m = ((cls == _S) | (cls == _C)).ravel()
        idx = np.flatnonzero(m)
        w = len(xs)
        X = xs.astype(np.float32)[idx % w]
        Y = ys.astype(np.float32)[idx // w]
        ws = [wk.ravel()[idx] for wk in self._fibre_weights(value_noise_grid, xs, ys)]
        wob = 6.0 * value_noise_grid(xs, ys, 16.0, self.seed, 55).ravel()[idx]
        wob += 2.5 * value_noise_grid(xs, ys, 5.0, self.seed, 57).ravel()[idx]
        brk = value_noise_grid(xs, ys, 9.0, self.seed, 58).ravel()[idx]
        lam = 7.0
        wsum = ws[0] + ws[1] + ws[2] + 1e-6
        g = np.zeros(idx.size, np.float32)  # fibre darkness in [0, 1]: line families overlaid, not summed
        for k, th in enumerate(self._FIBRE_DIRS):
            ph = np.float32(2 * np.pi * np.cos(th) / lam) * X
            ph += np.float32(2 * np.pi * np.sin(th) / lam) * Y
            ph += wob
            line = 0.5 + 0.5 * np.sin(ph)
            g = np.maximum(g, line * line * line * np.minimum(1.0, 2.0 * ws[k] / wsum))
        lod = float(np.clip(1.5 - p / lam * 2.0, 0.0, 1.0))  # fade fibres out where pixels are too big
        t = (g * (0.25 + 0.6 * brk) * lod + 0.25 * (1 - lod))[:, None]
        flat = img.reshape(-1, 3)
        light = flat[idx]
        col = light * (1 - t) + _FIBRE_DARK * t
        cleft_field = value_noise_grid(xs, ys, 40.0, self.seed, 56).ravel()[idx]
        cleft = np.clip((0.02 - g) / 0.02, 0, 1) * np.clip((cleft_field - 0.55) / 0.15, 0, 1) * lod
        col += (_CLEFT - col) * cleft[:, None]
        flat[idx] = col

    def _tumour_background(self, img: np.ndarray, cls: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> None:
        m = cls == _T
        tex = value_noise_grid(xs, ys, 4.0, self.seed, 60)[m]
        col = img[m] * (0.9 + 0.2 * tex)[:, None]
        lum = value_noise_grid(xs, ys, 30.0, self.seed, 61)[m]
        a = np.clip((lum - 0.77) / 0.05, 0, 1)[:, None]
        img[m] = col * (1 - a) + _LUMEN * a

    def _mucosa_background(self, img: np.ndarray, cls: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> None:
        m = cls == _M
        g = value_noise_grid(xs, ys, 9.0, self.seed, 70)[m]
        a = np.clip((g - 0.55) / 0.08, 0, 1)[:, None]
        img[m] = img[m] * (1 - a) + _GOBLET * a

    def _adipose(self, img: np.ndarray, cls: np.ndarray, xs: np.ndarray, ys: np.ndarray, p: float) -> None:
        """Worley cells: membranes where the two nearest jittered sites are about equally far."""
        rr, cc = np.nonzero(cls == _A)
        x, y = xs[cc], ys[rr]
        s = 65.0
        ix, iy = np.floor(x / s).astype(np.int64), np.floor(y / s).astype(np.int64)
        f1 = np.full(x.shape, np.inf, np.float32)
        f2 = np.full(x.shape, np.inf, np.float32)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                jx, jy = ix + dx, iy + dy
                sx = (jx + 0.15 + 0.7 * uniform(self.seed, 80, jy, jx)) * s
                sy = (jy + 0.15 + 0.7 * uniform(self.seed, 81, jy, jx)) * s
                d = np.hypot(x - sx, y - sy).astype(np.float32)
                f2 = np.minimum(f2, np.maximum(f1, d))
                f1 = np.minimum(f1, d)
        half = 1.2 + 0.5 * p
        a = np.clip(1.0 - ((f2 - f1) * 0.5 - half) / max(p, 0.5), 0, 1)[:, None]
        img[rr, cc] = img[rr, cc] * (1 - a) + _MEMBRANE * a

    def _stamp(self, img: np.ndarray, pop: Population, x0: float, y0: float, p: float, w: int, h: int) -> None:
        """Draw one nucleus population into ``img`` (vectorised over nuclei × box pixels)."""
        presence = self._presence[pop.name]
        s, ext = pop.spacing_um, pop.max_extent_um
        i0, i1 = math.floor((x0 - ext) / s), math.floor((x0 + w * p + ext) / s)
        j0, j1 = math.floor((y0 - ext) / s), math.floor((y0 + h * p + ext) / s)
        jy, ix = np.mgrid[j0 : j1 + 1, i0 : i1 + 1]
        jy, ix = jy.ravel(), ix.ravel()
        u = [uniform(self.seed, pop.key, c, jy, ix) for c in range(2)]
        cx = (ix + 0.1 + 0.8 * u[0]) * s
        cy = (jy + 0.1 + 0.8 * u[1]) * s
        codes = self.codes_points(cx, cy)
        keep = uniform(self.seed, pop.key, 2, jy, ix) < presence[codes]
        if pop.avoid_lumen:
            keep &= value_noise_points(cx, cy, 30.0, self.seed, 61) < 0.79
        if not keep.any():
            return
        jy, ix, cx, cy = jy[keep], ix[keep], cx[keep], cy[keep]
        v = [uniform(self.seed, pop.key, c, jy, ix).astype(np.float32) for c in range(3, 8)]
        r = pop.radius_um[0] + (pop.radius_um[1] - pop.radius_um[0]) * v[0]
        asp = pop.aspect[0] + (pop.aspect[1] - pop.aspect[0]) * v[1]
        a_ax, b_ax = r * np.sqrt(asp), r / np.sqrt(asp)
        if pop.align:
            ws = self._fibre_weights(value_noise_points, cx, cy)
            dirs = np.asarray(self._FIBRE_DIRS, np.float32)[np.argmax(np.stack(ws), axis=0)]
            ang = dirs + np.float32(0.25) * (v[2] - 0.5)
        else:
            ang = np.float32(np.pi) * v[2]
        dark = 0.75 + 0.45 * v[3]
        phase = np.float32(2 * np.pi) * v[4]

        R = math.ceil(ext / p) + 1
        off = np.arange(-R, R + 1)
        pcx = np.rint((cx - x0) / p - 0.5).astype(np.int64)
        pcy = np.rint((cy - y0) / p - 0.5).astype(np.int64)
        px = pcx[:, None, None] + off[None, None, :]
        py = pcy[:, None, None] + off[None, :, None]
        valid = (px >= 0) & (px < w) & (py >= 0) & (py < h)
        uu = ((px + 0.5) * p + x0 - cx[:, None, None]).astype(np.float32)
        vv = ((py + 0.5) * p + y0 - cy[:, None, None]).astype(np.float32)
        ca, sa = np.cos(ang)[:, None, None], np.sin(ang)[:, None, None]
        ur, vr = uu * ca + vv * sa, -uu * sa + vv * ca
        d = np.sqrt((ur / a_ax[:, None, None]) ** 2 + (vr / b_ax[:, None, None]) ** 2)
        if pop.irregularity:
            rho2 = ur * ur + vr * vr + 1e-6
            c2, s2 = (ur * ur - vr * vr) / rho2, 2 * ur * vr / rho2
            cp, sp = np.cos(phase)[:, None, None], np.sin(phase)[:, None, None]
            d = d * (1.0 + pop.irregularity * (cp * c2 + sp * s2) * (0.6 + 0.8 * v[4][:, None, None]))
        soft = max(p, 0.35)
        cov = np.clip((1.0 - d) * b_ax[:, None, None] / soft + 0.5, 0.0, 1.0) * pop.opacity
        sel = valid & (cov > 0.02)
        if not sel.any():
            return
        k_idx = np.broadcast_to(np.arange(len(cx))[:, None, None], sel.shape)[sel]
        fy, fx = np.broadcast_to(py, sel.shape)[sel], np.broadcast_to(px, sel.shape)[sel]
        cv = cov[sel]
        t = np.clip(d[sel], 0.0, 1.0) ** 2
        rim, core = np.asarray(pop.rim, np.float32), np.asarray(pop.core, np.float32)
        col = core[None, :] * (1 - t)[:, None] + rim[None, :] * t[:, None]
        # chromatin clumps: white noise on a 0.8-µm physical lattice (same at every pixel size)
        gx = np.floor((x0 + (fx + 0.5) * p) / 0.8).astype(np.int64)
        gy = np.floor((y0 + (fy + 0.5) * p) / 0.8).astype(np.int64)
        grain = uniform(self.seed, pop.key, 9, gy, gx).astype(np.float32)
        col *= (dark[k_idx] * (1.0 + pop.chromatin * (grain - 0.5)))[:, None]
        flat = img.reshape(-1, 3)
        idx = fy * w + fx
        flat[idx] = flat[idx] * (1 - cv)[:, None] + col * cv[:, None]


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed from ints and strings (stable across runs, processes and platforms)."""
    import hashlib

    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
