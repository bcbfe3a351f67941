"""Class maps: the ground-truth tissue layout of a synthetic slide on a coarse grid of cells.

One cell is one tile-sized square of tissue (by default 112 µm, i.e. 224 px at 0.5 µm/px; for
kather16 mosaics one 150-px tile at 0.495 µm/px). A class map is a 2-D ``int8`` array of
:class:`TissueClass` codes; rendering (``tissue.py``) and mosaics (``kather.py``) both start from one.

The immune phenotype is defined by *geometry*, never by the amount of lymphocytes:

- **inflamed**: lymphocyte cells sit inside tumour nests (in holes of the tumour mask; most of them),
  the rest in the peri-tumoural stroma band;
- **excluded**: lymphocyte cells sit in the stroma band around the nests (``band_cells`` wide) and
  never inside a nest;
- **desert**: few lymphocyte cells (``desert_til`` of the tissue), scattered in stroma away from nests.

For inflamed and excluded slides the number of lymphocyte cells is drawn from the *same*
distribution (``til_target`` × tissue cells, capped by a capacity computed from the layout before
the phenotype is used), so the lymphocyte count does not tell the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

PHENOTYPES = ("inflamed", "excluded", "desert")


class TissueClass(IntEnum):
    """Cell classes of a class map; the order follows kather16 (01_TUMOR … 07_ADIPOSE, 08_EMPTY = 0)."""

    GLASS = 0
    TUMOUR = 1
    STROMA = 2
    COMPLEX = 3  # complex (cellular, mixed) stroma
    LYMPHO = 4
    NECROSIS = 5  # necrosis / debris
    MUCOSA = 6  # normal mucosa
    ADIPOSE = 7


CLASS_NAMES: tuple[str, ...] = tuple(c.name.lower() for c in TissueClass)
N_CLASSES = len(CLASS_NAMES)


@dataclass(frozen=True)
class LayoutParams:
    """How class maps are drawn. Ranges are (low, high) of a uniform draw per slide."""

    tissue_coverage: tuple[float, float] = (0.45, 0.65)  # tissue cells / all cells
    blob_sigma_cells: float | None = None  # smoothness of the tissue field; None: from the map size
    margin_cells: int = 1  # glass frame around the slide
    n_blobs: int = 1  # > 1: that many separate tissue fragments
    band_cells: int = 1  # width of the peri-tumoural stroma band (cells, chessboard distance)
    nest_radius_cells: tuple[float, float] = (2.5, 4.5)
    tumour_target: tuple[float, float] = (0.3, 0.5)  # tumour cells / tissue cells
    til_target: tuple[float, float] = (0.05, 0.2)  # lymphocyte cells / tissue cells (inflamed, excluded)
    desert_til: tuple[float, float] = (0.0, 0.02)
    min_capacity: float = 0.04  # redraw tissue and nests until this many lymphocyte cells fit (× tissue)
    inflamed_intratumoural: tuple[float, float] = (0.75, 1.0)  # share of lymphocyte cells inside nests
    max_interior_lymph: float = 0.7  # at most this share of a nest's interior turns lymphocytic
    necrosis_prob: float = 0.3  # per nest with a big enough interior
    adipose_prob: float = 0.3  # per slide: one adipose patch at the tissue edge
    complex_fraction: float = 0.0  # share of the far stroma turned into complex-stroma patches
    mucosa_prob: float = 0.0  # per slide: one normal-mucosa patch at the tissue edge
    patch_cells: tuple[int, int] = (3, 9)  # size range of adipose / mucosa patches (cells)


def _ndi() -> Any:
    from scipy import ndimage

    return ndimage


_SQUARE = np.ones((3, 3), bool)
_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)


def _dilate(mask: np.ndarray, n: int) -> np.ndarray:
    if n <= 0:
        return mask.copy()
    return _ndi().binary_dilation(mask, structure=_SQUARE, iterations=n)


def _erode(mask: np.ndarray, n: int, structure: np.ndarray = _SQUARE) -> np.ndarray:
    if n <= 0:
        return mask.copy()
    return _ndi().binary_erosion(mask, structure=structure, iterations=n, border_value=0)


def _smooth_priority(shape: tuple[int, int], rng: np.random.Generator, sigma: float = 1.0) -> np.ndarray:
    """Spatially smooth random priorities: picking the top-k cells gives clustered, arc-like groups."""
    return _ndi().gaussian_filter(rng.standard_normal(shape), sigma) + 0.3 * rng.standard_normal(shape)


def _pick(candidates: np.ndarray, k: int, priority: np.ndarray) -> np.ndarray:
    """Boolean mask of the ``k`` candidate cells with the highest priority."""
    out = np.zeros_like(candidates)
    idx = np.flatnonzero(candidates)
    k = int(min(max(k, 0), idx.size))
    if k:
        order = np.argsort(-priority.ravel()[idx], kind="stable")[:k]
        out.ravel()[idx[order]] = True
    return out


def tissue_mask(shape: tuple[int, int], rng: np.random.Generator, params: LayoutParams) -> np.ndarray:
    """One or several smooth tissue blobs covering about ``tissue_coverage`` of the grid, no holes."""
    ndi = _ndi()
    rows, cols = shape
    sigma = params.blob_sigma_cells or max(1.5, min(rows, cols) / 7.0)
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="constant")
    field /= field.std() + 1e-9
    yy, xx = np.mgrid[0:rows, 0:cols]
    if params.n_blobs > 1:  # separate fragments: one bump per fragment on a jittered grid
        gy = max(1, round(np.sqrt(params.n_blobs * rows / cols)))
        gx = max(1, int(np.ceil(params.n_blobs / gy)))
        cells = rng.permutation(gy * gx)[: params.n_blobs]
        bumps = np.full(shape, -np.inf)
        for k in cells:
            cy = (k // gx + rng.uniform(0.35, 0.65)) * rows / gy
            cx = (k % gx + rng.uniform(0.35, 0.65)) * cols / gx
            ry, rx = rows / gy * rng.uniform(0.3, 0.45), cols / gx * rng.uniform(0.3, 0.45)
            bumps = np.maximum(bumps, 2.5 * (1 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2))
        field = bumps + 0.6 * field
    else:
        r2 = ((yy - (rows - 1) / 2) / (rows / 2)) ** 2 + ((xx - (cols - 1) / 2) / (cols / 2)) ** 2
        field -= 1.5 * r2  # keep tissue away from the slide edge
    m = params.margin_cells
    frame = np.zeros(shape, bool)
    frame[m : rows - m, m : cols - m] = True
    coverage = rng.uniform(*params.tissue_coverage)
    thr = np.quantile(field[frame], 1.0 - min(0.95, coverage * rows * cols / max(1, frame.sum())))
    mask = (field >= thr) & frame
    labels, n = ndi.label(mask)
    if n:
        sizes = ndi.sum(mask, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= max(4, 0.05 * sizes.max())) + 1
        mask = np.isin(labels, keep)
    mask = ndi.binary_fill_holes(mask)
    if not mask.any():  # degenerate tiny grid: one central cell
        mask[rows // 2, cols // 2] = True
    return mask


def _place_nests(
    tissue: np.ndarray, rng: np.random.Generator, params: LayoutParams, tumour_target: float
) -> np.ndarray:
    """Convex (elliptical) tumour nests inside the tissue, each at least ``band_cells`` + 1 cells from
    glass and ``2 * band_cells + 1`` from the next nest (chessboard), so every nest has its own stroma band."""
    ndi = _ndi()
    rows, cols = tissue.shape
    band = params.band_cells
    allowed = _erode(tissue, band)
    nests = np.zeros_like(tissue)
    goal = tumour_target * tissue.sum()
    yy, xx = np.mgrid[0:rows, 0:cols]
    free = allowed.copy()
    failures = 0
    while nests.sum() < goal and failures < 40:
        cand = np.flatnonzero(free)
        if cand.size == 0:
            break
        c = cand[rng.integers(cand.size)]
        cy, cx = divmod(int(c), cols)
        ry, rx = rng.uniform(*params.nest_radius_cells, size=2)
        th = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(th) + dy * np.sin(th)) / rx
        v = (-dx * np.sin(th) + dy * np.cos(th)) / ry
        blob = (u * u + v * v <= 1.0) & free
        lab, _ = ndi.label(blob, structure=_CROSS)
        blob = lab == lab[cy, cx]
        if blob.sum() < 5 or not _erode(blob, 1, _CROSS).any():
            failures += 1
            continue
        nests |= blob
        free = allowed & ~_dilate(nests, 2 * band)
    if not nests.any() and allowed.any():  # small tissue: one nest at the deepest point
        dist = ndi.distance_transform_cdt(tissue, metric="chessboard")
        cy, cx = np.unravel_index(np.argmax(dist), dist.shape)
        nests[max(0, cy - 1) : cy + 2, max(0, cx - 1) : cx + 2] = True
        nests &= allowed | (dist >= 2)
    return nests


def peritumoural_band(nests: np.ndarray, tissue: np.ndarray, band_cells: int) -> np.ndarray:
    """Tissue cells within ``band_cells`` (chessboard distance) of a nest, outside the nests."""
    return _dilate(nests, band_cells) & tissue & ~nests


def _edge_patch(
    candidates: np.ndarray, tissue: np.ndarray, rng: np.random.Generator, size: int
) -> np.ndarray:
    """A small compact patch of candidate cells grown from a cell at the tissue edge."""
    edge = candidates & _dilate(~tissue, 1)
    pool = np.flatnonzero(edge if edge.any() else candidates)
    patch = np.zeros_like(candidates)
    if pool.size == 0:
        return patch
    patch.ravel()[pool[rng.integers(pool.size)]] = True
    for _ in range(size - 1):
        ring = _ndi().binary_dilation(patch, structure=_CROSS) & candidates & ~patch
        ring_idx = np.flatnonzero(ring)
        if ring_idx.size == 0:
            break
        patch.ravel()[ring_idx[rng.integers(ring_idx.size)]] = True
    return patch


def _grow(nests: np.ndarray, n: int, tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``n`` tissue cells just outside the nests, most-enclosed first (keeps nests compact)."""
    ndi = _ndi()
    grown = np.zeros_like(nests)
    inner = _erode(tissue, 1)
    while n > 0:
        cur = nests | grown
        ring = ndi.binary_dilation(cur, structure=_CROSS) & tissue & ~cur
        if not ring.any():
            break
        pref = ring & inner
        ring = pref if pref.any() else ring
        enclosed = ndi.convolve(cur.astype(np.int8), _CROSS.astype(np.int8), mode="constant")
        take = _pick(ring, n, enclosed + 0.5 * rng.random(ring.shape))
        grown |= take
        n -= int(take.sum())
    return grown


def _capacity(interior: np.ndarray, band: np.ndarray, p: LayoutParams) -> int:
    """How many lymphocyte cells fit both an inflamed layout (at least ``inflamed_intratumoural[0]`` of
    them inside the nests) and an excluded one (all in the band); phenotype-independent."""
    inside = p.max_interior_lymph * interior.sum()
    return int(min(inside / max(p.inflamed_intratumoural[0], 1e-6), band.sum()))


def make_class_map(
    shape: tuple[int, int],
    phenotype: str,
    rng: np.random.Generator,
    params: LayoutParams | None = None,
    til_target: float | None = None,
    tumour_target: float | None = None,
) -> np.ndarray:
    """Draw a class map of ``shape`` (rows, cols) with the given immune phenotype.

    ``til_target`` (lymphocyte cells / tissue cells) and ``tumour_target`` (tumour cells / tissue cells)
    default to draws from ``params``; the realised values can be lower when the layout has no room
    (read them back with :func:`class_map_truth`).
    """
    if phenotype not in PHENOTYPES:
        raise ValueError(f"unknown immune phenotype {phenotype!r}; use one of {PHENOTYPES}")
    p = params or LayoutParams()
    t_target = rng.uniform(*p.tumour_target) if tumour_target is None else float(tumour_target)
    for _ in range(8):  # the redraw depends on the layout only, never on the phenotype
        tissue = tissue_mask(shape, rng, p)
        nests = _place_nests(tissue, rng, p, t_target)
        band = peritumoural_band(nests, tissue, p.band_cells)
        interior = _erode(nests, 1, _CROSS)
        if _capacity(interior, band, p) >= p.min_capacity * tissue.sum():
            break

    cm = np.full(shape, TissueClass.GLASS, np.int8)
    cm[tissue] = TissueClass.STROMA
    cm[nests] = TissueClass.TUMOUR

    # necrosis in the centre of big nests
    necrosis = np.zeros_like(nests)
    lab, n = _ndi().label(nests, structure=_CROSS)
    for i in range(1, n + 1):
        core = interior & (lab == i)
        if core.sum() >= 4 and rng.random() < p.necrosis_prob:
            depth = _ndi().distance_transform_cdt(lab == i, metric="taxicab")
            deepest = np.flatnonzero(core & (depth == depth[core].max()))
            k = min(deepest.size, int(rng.integers(1, 3)))
            necrosis.ravel()[rng.choice(deepest, size=k, replace=False)] = True
    cm[necrosis] = TissueClass.NECROSIS
    interior &= ~necrosis

    # lymphocytes: the count never depends on inflamed vs excluded
    n_tissue = int(tissue.sum())
    cap = _capacity(interior, band, p)
    far_stroma = tissue & ~nests & ~band
    prio = _smooth_priority(shape, rng)
    if phenotype == "desert":
        t = rng.uniform(*p.desert_til) if til_target is None else float(til_target)
        lymph = _pick(far_stroma, round(t * n_tissue), prio)
    else:
        t = rng.uniform(*p.til_target) if til_target is None else float(til_target)
        n_lymph = min(round(t * n_tissue), cap)
        if phenotype == "inflamed":
            n_in = min(round(rng.uniform(*p.inflamed_intratumoural) * n_lymph),
                       int(p.max_interior_lymph * interior.sum()))
            lymph = _pick(interior, n_in, prio)
            # the nests grow by as many cells as lymphocytes moved in, so tumour and stroma counts keep
            # the same distribution as in excluded slides (only the lymphocytes' position differs)
            grown = _grow(nests, int(lymph.sum()), tissue, rng)
            cm[grown] = TissueClass.TUMOUR
            nests |= grown
            band = peritumoural_band(nests, tissue, p.band_cells)
            far_stroma = tissue & ~nests & ~band
            lymph |= _pick(band, n_lymph - int(lymph.sum()), prio)
        else:
            lymph = _pick(band, n_lymph, prio)
    cm[lymph] = TissueClass.LYMPHO

    # optional tissue types away from nests and their bands
    far = far_stroma & ~lymph
    if rng.random() < p.adipose_prob and far.any():
        fat = _edge_patch(far, tissue, rng, int(rng.integers(*p.patch_cells)))
        cm[fat] = TissueClass.ADIPOSE
        far &= ~fat
    if rng.random() < p.mucosa_prob and far.any():
        muc = _edge_patch(far, tissue, rng, int(rng.integers(*p.patch_cells)))
        cm[muc] = TissueClass.MUCOSA
        far &= ~muc
    if p.complex_fraction > 0 and far.any():
        cplx = _pick(far, round(p.complex_fraction * far.sum()), _smooth_priority(shape, rng))
        cm[cplx] = TissueClass.COMPLEX
    return cm


def lymph_geometry(class_map: np.ndarray, band_cells: int = 1) -> dict[str, float]:
    """Where the lymphocyte cells sit relative to tumour nests (nests = tumour mask with holes filled).

    Returns counts and densities: ``n_lymph``, ``n_lymph_intratumoural`` (inside filled nests),
    ``n_lymph_peritumoural`` (in the band around them), ``n_lymph_distant``, ``nest_cells``,
    ``band_cells``, ``intratumoural_density`` and ``peritumoural_density`` (lymphocyte cells per
    cell of nest / band), ``intratumoural_share`` (of all lymphocyte cells).
    """
    ndi = _ndi()
    cm = np.asarray(class_map)
    tissue = cm != TissueClass.GLASS
    lymph = cm == TissueClass.LYMPHO
    nests = ndi.binary_fill_holes(cm == TissueClass.TUMOUR)
    band = peritumoural_band(nests, tissue, band_cells)
    n_l = int(lymph.sum())
    n_in = int((lymph & nests).sum())
    n_band = int((lymph & band).sum())
    return {
        "n_lymph": n_l,
        "n_lymph_intratumoural": n_in,
        "n_lymph_peritumoural": n_band,
        "n_lymph_distant": n_l - n_in - n_band,
        "nest_cells": int(nests.sum()),
        "band_cells": int(band.sum()),
        "intratumoural_density": n_in / max(1, int(nests.sum())),
        "peritumoural_density": n_band / max(1, int(band.sum())),
        "intratumoural_share": n_in / max(1, n_l),
    }


def class_map_truth(class_map: np.ndarray) -> dict[str, float]:
    """Per-slide truth from a class map (fractions are of *tissue* cells, i.e. all but glass).

    ``til_fraction`` = lymphocyte cells / tissue cells; ``tumour_fraction`` = tumour cells / tissue
    cells; ``stroma_fraction`` = (stroma + complex stroma) / tissue cells; ``frac_<class>`` for every
    tissue class; ``tissue_cells``; ``tissue_coverage`` (tissue cells / all cells).
    """
    cm = np.asarray(class_map)
    counts = np.bincount(cm.ravel().astype(np.int64), minlength=N_CLASSES)
    n_tissue = int(counts[1:].sum())
    denom = max(1, n_tissue)
    out: dict[str, float] = {
        "til_fraction": counts[TissueClass.LYMPHO] / denom,
        "tumour_fraction": counts[TissueClass.TUMOUR] / denom,
        "stroma_fraction": (counts[TissueClass.STROMA] + counts[TissueClass.COMPLEX]) / denom,
        "tissue_cells": n_tissue,
        "tissue_coverage": n_tissue / max(1, cm.size),
    }
    for c in TissueClass:
        if c != TissueClass.GLASS:
            out[f"frac_{CLASS_NAMES[c]}"] = counts[c] / denom
    return {k: (float(v) if isinstance(v, float | np.floating) else int(v)) for k, v in out.items()}
