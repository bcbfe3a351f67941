"""Context windows for training the tissue head: labelled tiles placed side by side in random mosaics, the
windows `wsi tme` classifies over them (:mod:`wsi_pipeline.tme.dense`: same geometry, same fully
convolutional features) and each window's class-area fractions as its soft label.

Why: a window of the classifier's field of view on real tissue usually straddles several tissue types, and
the read-out needs the *areas* of the classes. A head trained on pure tiles only calls a mixed window by its
most conspicuous class (a window half lymphocytes, half tumour is mostly "tumour"), so averaged window
probabilities under-count the less conspicuous classes. Trained on the area fractions of mixed windows
(soft cross-entropy), the head's probabilities estimate areas, and the dense map's cell means add up to
area fractions.

The mosaics are uniform-random layouts with some spatial coherence (:func:`random_layout`); every tile is
rescaled to the encoder's µm/px (times a per-mosaic magnification with ``scale_jitter``), randomly rotated
by a multiple of 90° and flipped. Only tiles of the side
of the split they are built from are used (``wsi tissue-train`` builds them from its training tiles for the
fit and from its held-out tiles for the evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from wsi_pipeline.encoders.base import Encoder
    from wsi_pipeline.tme.dense import DenseGeometry

WHITE = 255


@dataclass(frozen=True)
class ContextSpec:
    """How many mosaics, their size and how many windows are sampled from each."""

    n_mosaics: int = 0  # 0 = no context windows
    grid: tuple[int, int] = (10, 12)  # cells (tiles) per mosaic
    windows: int = 600  # windows sampled per mosaic (without replacement, fully inside the mosaic)
    coherence: float = 0.5  # chance that a cell copies the class of its upper or left neighbour
    seed: int = 0
    scale_jitter: float = 0.0  # each mosaic magnified by a factor drawn from [1 − j, 1 + j] (0 = none)


@dataclass
class ContextWindows:
    """Window features (N, D) and their class-area fractions (N, C) (each row sums to 1)."""

    features: np.ndarray
    fractions: np.ndarray


def random_layout(shape: tuple[int, int], n_classes: int, rng: np.random.Generator, coherence: float,
                  class_probs: np.ndarray | None = None) -> np.ndarray:
    """A (rows, cols) class-index layout: each cell copies its upper or left neighbour with probability
    ``coherence``, else draws a class from ``class_probs`` (uniform by default)."""
    rows, cols = shape
    p = np.full(n_classes, 1.0 / n_classes) if class_probs is None else np.asarray(class_probs, np.float64)
    out = np.zeros(shape, np.int64)
    for r in range(rows):
        for c in range(cols):
            neighbours = ([out[r - 1, c]] if r else []) + ([out[r, c - 1]] if c else [])
            if neighbours and rng.random() < coherence:
                out[r, c] = neighbours[int(rng.integers(len(neighbours)))]
            else:
                out[r, c] = int(rng.choice(n_classes, p=p / p.sum()))
    return out


def compose(layout: np.ndarray, pools: Sequence[Sequence[Path]], rng: np.random.Generator, src_mpp: float,
            dst_mpp: float, magnify: float = 1.0) -> tuple[np.ndarray, int]:
    """The mosaic of ``layout`` at ``dst_mpp``: each cell a tile of its class (drawn from ``pools[class]``,
    rescaled from ``src_mpp`` and magnified by ``magnify``, rotated and flipped at random). Returns (image,
    cell side in px); every tile of the pools must have one size."""
    from wsi_pipeline.tiles.folders import read_rgb
    from wsi_pipeline.tiles.transform import rescale_tile

    cell = 0
    img = np.empty((0, 0, 3), np.uint8)
    for (r, c), k in np.ndenumerate(layout):
        pool = pools[int(k)]
        tile = rescale_tile(read_rgb(pool[int(rng.integers(len(pool)))]), src_mpp * magnify, dst_mpp)
        tile = np.rot90(tile, int(rng.integers(4)))
        tile = tile[:, ::-1] if rng.random() < 0.5 else tile
        if not cell:
            cell = min(tile.shape[:2])
            img = np.full((layout.shape[0] * cell, layout.shape[1] * cell, 3), WHITE, np.uint8)
        img[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = tile[:cell, :cell]
    return img, cell


def _overlap(starts: np.ndarray, size: float, cell: float, n_cells: int) -> np.ndarray:
    """(len(starts), n_cells): length of [start, start+size) ∩ [j·cell, (j+1)·cell), over size."""
    lo = np.arange(n_cells) * cell
    a = np.maximum(starts[:, None], lo[None, :])
    b = np.minimum(starts[:, None] + size, lo[None, :] + cell)
    return np.clip(b - a, 0, None) / size


def window_fractions(layout: np.ndarray, n_classes: int, cell_px: int, y0: np.ndarray, x0: np.ndarray,
                     size_px: float) -> np.ndarray:
    """Class-area fractions of square windows [y0, y0+size) × [x0, x0+size) (px) over ``layout`` cells of
    ``cell_px`` → (len(y0), n_classes)."""
    oy = _overlap(np.asarray(y0, np.float64), size_px, cell_px, layout.shape[0])
    ox = _overlap(np.asarray(x0, np.float64), size_px, cell_px, layout.shape[1])
    out = np.empty((len(y0), n_classes))
    for c in range(n_classes):
        onehot = (layout == c).astype(np.float64)
        out[:, c] = np.einsum("ni,ij,nj->n", oy, onehot, ox)
    return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)


def _crop(img: np.ndarray, y: int, x: int, size: int, width: int | None = None) -> np.ndarray:
    """``size`` × ``width`` (default ``size``) px from (y, x) of ``img``, white outside."""
    width = size if width is None else width
    out = np.full((size, width, 3), WHITE, np.uint8)
    h, w = img.shape[:2]
    ys, xs = max(0, y), max(0, x)
    ye, xe = min(h, y + size), min(w, x + width)
    if ye > ys and xe > xs:
        out[ys - y:ye - y, xs - x:xe - x] = img[ys:ye, xs:xe]
    return out


def mosaic_windows(encoder: Encoder, geo: DenseGeometry, method: str, img: np.ndarray, layout: np.ndarray,
                   cell_px: int, n_classes: int, n_windows: int, rng: np.random.Generator, precision: str = "fp32",
                   fit: str = "native") -> ContextWindows:
    """Window features of one mosaic, computed as `wsi tme` computes them on a slide (``method`` ``fcn``: the
    feature map over regions of the mosaic; ``window``: each window embedded on its own), for a random
    sample of ``n_windows`` windows that lie fully inside it, with their class-area fractions."""
    from wsi_pipeline.tme.dense import METHOD_FCN, fcn_window_features, needed_windows, window_corners_l0

    k, cp = geo.window_cells, geo.cell_px
    area = np.ones((-(-img.shape[0] // cp), -(-img.shape[1] // cp)), bool)
    need = needed_windows(area, k)
    index = np.argwhere(need)
    first = index - (k - 1)  # first cell of each window
    inside = np.all(first >= 0, axis=1) & ((first[:, 0] + k) * cp <= img.shape[0]) & \
        ((first[:, 1] + k) * cp <= img.shape[1])
    index = index[inside]
    pick = index[rng.choice(len(index), min(n_windows, len(index)), replace=False)]
    if method == METHOD_FCN:
        sample = np.zeros_like(need)
        sample[pick[:, 0], pick[:, 1]] = True
        off = (k - 1 + geo.margin) * cp
        feats = np.zeros((*need.shape, encoder.embed_dim), np.float32)
        for a0, b0, f in fcn_window_features(lambda a, b, h, w: _crop(img, a * cp - off, b * cp - off, h, w),
                                             encoder, geo, sample, precision):
            feats[a0:a0 + f.shape[0], b0:b0 + f.shape[1]] = f
        x = feats[pick[:, 0], pick[:, 1]]
    else:
        from wsi_pipeline.tiles.embed import embed_tiles
        from wsi_pipeline.tiles.transform import fit_tile

        corners = window_corners_l0(geo, (0.0, 0.0), float(cp), pick)  # image px as level 0
        crops = [fit_tile(_crop(img, int(y), int(x), geo.window_px), encoder.meta.input_size, fit)
                 for x, y in corners]
        x = embed_tiles(encoder, crops, 64, precision, encoder.device)
    y0, x0 = (pick[:, 0] - (k - 1)) * cp, (pick[:, 1] - (k - 1)) * cp
    frac = window_fractions(layout, n_classes, cell_px, y0, x0, float(k * cp))
    return ContextWindows(np.asarray(x, np.float32), frac.astype(np.float32))


def context_windows(encoder: Encoder, geo: DenseGeometry, method: str, pools: Sequence[Sequence[Path]],
                    src_mpp: float, spec: ContextSpec, precision: str = "fp32", fit: str = "native",
                    progress: Any = None) -> ContextWindows:
    """Windows of ``spec.n_mosaics`` random mosaics of the tiles in ``pools`` (one list of files per class;
    an empty pool's class is left out of the layouts)."""
    from wsi_pipeline.encoders.base import prepare_for_inference

    encoder = prepare_for_inference(encoder, encoder.device)
    rng = np.random.default_rng(spec.seed)
    n_classes = len(pools)
    probs = np.array([1.0 if len(p) else 0.0 for p in pools])
    feats, fracs = [], []
    for i in range(spec.n_mosaics):
        layout = random_layout(spec.grid, n_classes, rng, spec.coherence, probs)
        magnify = float(rng.uniform(1 - spec.scale_jitter, 1 + spec.scale_jitter)) if spec.scale_jitter else 1.0
        img, cell = compose(layout, pools, rng, src_mpp, geo.mpp, magnify)
        w = mosaic_windows(encoder, geo, method, img, layout, cell, n_classes, spec.windows, rng, precision, fit)
        feats.append(w.features)
        fracs.append(w.fractions)
        if progress is not None:
            progress(i + 1, spec.n_mosaics)
    dim = encoder.embed_dim
    return ContextWindows(np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
                          np.concatenate(fracs) if fracs else np.zeros((0, n_classes), np.float32))
