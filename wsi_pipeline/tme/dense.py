"""Dense tissue maps: the classifier over overlapping windows of its own field of view, combined into a
class-probability map at a fixed physical resolution, independent of where the RUN's tile grid falls.

Geometry (all from the classifier and its encoder; nothing depends on the RUN tiling)
------------------------------------------------------------------------------------
* **map cell**: ``cell_px`` pixels at the classifier's µm/px. For a convolutional encoder it is the trunk's
  output stride (resnet10t: 32 px = 16 µm at 0.5 µm/px); otherwise half the field of view.
* **window**: ``window_cells`` × ``window_cells`` map cells, the cell count closest to the classifier's field
  of view (``tile_um``: 148 px → 5 cells = 160 px), one window per map cell (stride = one cell, ≤ half the
  field of view). Window ``(a, b)`` covers map cells ``a … a+k-1`` × ``b … b+k-1``.
* **map** (:class:`wsi_pipeline.formats.h5.TMEDenseMap`): over the bounding box of the RUN tiles, anchored at its top-left corner; cell
  ``(i, j)`` holds the mean of the class probabilities of every window that covers it (overlap-add), and
  ``area`` marks the cells whose centre lies inside a RUN tile (the tiler's tissue).

Two ways to get the window probabilities (:data:`METHODS`)
----------------------------------------------------------
* ``fcn`` (convolutional encoders with average pooling, e.g. the shipped resnet10t): the encoder's feature map
  is computed once over large regions (:func:`fcn_regions`: strips of ``chunk`` window rows cut to the runs
  of windows the map needs, plus ``margin`` cells of context on every side) read at the classifier's µm/px
  through the extraction reader (:func:`wsi_pipeline.features.reader.open_tile_reader`); every window's feature
  is the average of the pre-pool feature map over its k × k cells (what global average pooling does to a
  tile), and the tissue head is applied to all of them at once. The encoder's per-tile stain standardisation,
  when it has one, slides with the pixel
  (:meth:`wsi_pipeline.encoders.stain.ReinhardStandardize.forward_local`: each pixel mapped with the moments
  of the field of view centred on it).
* ``window``: each window read and embedded on its own, exactly as a training tile (any encoder, ViTs
  included; :func:`window_probs_direct`). Also the reference that :func:`fcn_window_agreement` checks the
  ``fcn`` result against.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.formats import api as F
from wsi_pipeline.slide.open import require_recorded_slide

if TYPE_CHECKING:
    from wsi_pipeline.encoders.base import Encoder
    from wsi_pipeline.features.reader import TileReader
    from wsi_pipeline.tme.classifier import TissueClassifier

log = logging.getLogger(__name__)

METHOD_FCN = "fcn"
METHOD_WINDOW = "window"
METHODS = ("auto", METHOD_FCN, METHOD_WINDOW)
STAIN_BLOCK_PX = 8  # resolution of the sliding stain moments (px at the classifier's µm/px)
THREADED_REGION_CACHE_TILES = 1024  # stored tiles a threaded region reader keeps decoded (see dense_slide_map)
T = TypeVar("T")


@dataclass(frozen=True)
class DenseGeometry:
    """Map cell, window and region sizes in pixels at ``mpp`` (the classifier's µm/px)."""

    mpp: float
    cell_px: int
    window_cells: int
    window_px: int  # the classifier's field of view (a training tile), ≤ window_cells × cell_px
    chunk: int = 24  # windows per strip of regions (fcn; the regions' largest height)
    margin: int = 2  # cells of context around a region's windows (fcn)
    max_region_cells: int = 88 * 88  # feature-map cells of the largest region (fcn; bounds its memory)
    # the encoder's per-tile stain standardisation over a region (fcn): "local" (each pixel with the moments of
    # the field of view centred on it: what a window's own standardisation does), "region" (one
    # standardisation per region) or "none" (left out); measured in scripts/eval_tme.py --stain-modes
    stain: str = "local"

    @property
    def cell_um(self) -> float:
        return self.cell_px * self.mpp

    @property
    def window_um(self) -> float:
        return self.window_cells * self.cell_px * self.mpp

    @property
    def halo_cells(self) -> int:
        """Cells a region adds to the windows it computes: the window's extent and the context margins."""
        return self.window_cells - 1 + 2 * self.margin

    @property
    def region_px(self) -> int:
        """The side of the largest region's height (and of the squares a region is read in)."""
        return (self.chunk + self.halo_cells) * self.cell_px

    @property
    def max_region_windows(self) -> int:
        """Windows across the widest region of a strip."""
        return max(1, self.max_region_cells // (self.chunk + self.halo_cells) - self.halo_cells)


def map_shape(dense: F.TMEDenseMap) -> tuple[int, int]:
    return int(dense.probs.shape[0]), int(dense.probs.shape[1])


# ---------------------------------------------------------------- geometry
def fcn_capable(encoder: Encoder) -> bool:
    """A convolutional trunk whose pooled output is the global average of ``forward_features``."""
    from wsi_pipeline.encoders.meta import POOL_MODEL

    trunk = encoder.trunk
    pool = getattr(trunk, "global_pool", None)
    pool_type = str(getattr(pool, "pool_type", ""))
    return (encoder.is_cnn and encoder.meta.pool == POOL_MODEL and hasattr(trunk, "forward_features")
            and pool_type in ("avg", "fast", "fastavg"))


def feature_stride(encoder: Encoder, probe_px: int = 256) -> int:
    """Input pixels per cell of the trunk's feature map (a probe forward pass)."""
    import torch

    with torch.inference_mode():
        x = torch.zeros((1, 3, probe_px, probe_px), device=encoder.device)
        out = encoder.trunk.forward_features(x)
    return max(1, round(probe_px / int(out.shape[-1])))


def classifier_method(clf: TissueClassifier, method: str) -> str:
    """``auto`` → the way the classifier's context windows were computed in training (its windows are then
    computed the same way on slides), else ``auto`` (by the encoder, :func:`resolve_method`)."""
    if method != "auto":
        return method
    return str((clf.training.get("context") or {}).get("method") or "auto")


def resolve_method(method: str, encoder: Encoder) -> str:
    if method not in METHODS:
        raise ConfigError(f"--dense-method must be one of {', '.join(METHODS)} (got {method!r})")
    if method == "auto":
        return METHOD_FCN if fcn_capable(encoder) else METHOD_WINDOW
    if method == METHOD_FCN and not fcn_capable(encoder):
        raise ConfigError(f"--dense-method fcn: encoder {encoder.meta.name} has no average-pooled convolutional "
                          "feature map; use --dense-method window (or auto)")
    return method


def dense_geometry(clf: TissueClassifier, encoder: Encoder, method: str) -> DenseGeometry:
    """Map cell and window for ``clf`` on ``encoder`` (see the module docstring)."""
    if clf.tile_um <= 0:
        raise ConfigError(f"the classifier {clf.path} does not record its field of view (tile_um); retrain it "
                          "with `wsi tissue-train` or use --footprint tile")
    window_px = max(2, round(clf.tile_um / clf.mpp))
    if method == METHOD_FCN:
        cell = feature_stride(encoder)
        k = max(1, round(window_px / cell))
    else:
        k = 2  # stride half the field of view
        cell = max(1, round(window_px / k))
    return DenseGeometry(mpp=float(clf.mpp), cell_px=int(cell), window_cells=int(k),
                         window_px=min(window_px, k * cell))


def map_grid(tiles: F.TileSet, cell_l0: float) -> tuple[tuple[float, float], np.ndarray]:
    """The map's origin (the RUN tiles' top-left corner) and its ``area`` mask: cells whose centre lies in a
    RUN tile."""
    xy = np.asarray(tiles.l0_xy, np.float64).reshape(-1, 2)
    if not len(xy):
        return (0.0, 0.0), np.zeros((0, 0), bool)
    size = float(tiles.tile_size_l0)
    origin = xy.min(axis=0)
    span = xy.max(axis=0) + size - origin
    w, h = (int(np.ceil(s / cell_l0 - 1e-9)) for s in span)
    area = np.zeros((h, w), bool)
    # cells whose centre (origin + (i + 0.5) · cell) lies in [x, x + size)
    lo = np.ceil((xy - origin) / cell_l0 - 0.5 - 1e-9).astype(np.int64)
    hi = np.ceil((xy - origin + size) / cell_l0 - 0.5 - 1e-9).astype(np.int64)  # exclusive
    for (c0, r0), (c1, r1) in zip(lo, hi, strict=True):
        area[max(r0, 0):min(r1, h), max(c0, 0):min(c1, w)] = True
    return (float(origin[0]), float(origin[1])), area


def box_sum_valid(x: np.ndarray, k: int) -> np.ndarray:
    """Sum over every k × k block of the first two axes (``out[i, j] = Σ x[i:i+k, j:j+k]``), shape
    (H-k+1, W-k+1, ...)."""
    c = np.cumsum(np.cumsum(np.asarray(x, np.float64), axis=0), axis=1)
    c = np.pad(c, [(1, 0), (1, 0)] + [(0, 0)] * (c.ndim - 2))
    return c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]


def needed_windows(area: np.ndarray, k: int) -> np.ndarray:
    """(H+k-1)×(W+k-1) mask over window indices: index ``t`` is the window whose first cell is ``t-(k-1)``
    (it covers cells t-k+1 … t); True where it covers a cell of ``area``."""
    padded = np.pad(np.asarray(area, np.float64), k - 1)
    return box_sum_valid(padded, k) > 0.5


def column_runs(cols: np.ndarray, gap: int, max_len: int) -> list[tuple[int, int]]:
    """Runs [c0, c1) of True in ``cols``, runs apart by at most ``gap`` False joined (a separate region would
    cost its halo again), each at most ``max_len`` long."""
    idx = np.flatnonzero(cols)
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(idx) > gap + 1)
    starts, ends = np.r_[idx[0], idx[breaks + 1]], np.r_[idx[breaks], idx[-1]] + 1
    return [(int(c), int(min(c + max_len, c1))) for c0, c1 in zip(starts, ends, strict=True)
            for c in range(int(c0), int(c1), max_len)]


def fcn_regions(need: np.ndarray, geo: DenseGeometry) -> list[tuple[int, int, int, int]]:
    """The regions that compute ``need``'s windows: strips of ``geo.chunk`` window rows, each cut into runs of
    needed window columns (:func:`column_runs`, at most ``geo.max_region_windows`` wide) and cropped to the
    rows that a run needs. Returns (a, b, h, w): the h × w windows from window index (a, b)."""
    out = []
    halo, width = geo.halo_cells, geo.max_region_windows
    for a0 in range(0, need.shape[0], geo.chunk):
        strip = need[a0:a0 + geo.chunk]
        for c0, c1 in column_runs(strip.any(axis=0), halo, width):
            rows = np.flatnonzero(strip[:, c0:c1].any(axis=1))
            out.append((a0 + int(rows[0]), c0, int(rows[-1] - rows[0]) + 1, c1 - c0))
    return out


def region_cost(need: np.ndarray, geo: DenseGeometry) -> int:
    """Feature-map cells that :func:`fcn_regions` computes for ``need``."""
    halo = geo.halo_cells
    return sum((h + halo) * (w + halo) for _, _, h, w in fcn_regions(need, geo))


def choose_chunk(need: np.ndarray, geo: DenseGeometry, sizes: range = range(8, 81, 4)) -> DenseGeometry:
    """The strip height (windows) whose regions compute the fewest feature-map cells for ``need``
    (:func:`region_cost`; the smaller on ties)."""
    costs = {c: region_cost(need, dataclasses.replace(geo, chunk=c)) for c in sizes}
    return dataclasses.replace(geo, chunk=min(costs, key=lambda c: (costs[c], c)))


def overlap_add(window_probs: np.ndarray, done: np.ndarray, k: int) -> np.ndarray:
    """Map cell (i, j) = mean of the probabilities of the computed windows that cover it (window indices
    i … i+k-1, see :func:`needed_windows`) → (H, W, C) float32, zeros where no window was computed."""
    wp = box_sum_valid(np.where(done[..., None], window_probs, 0.0), k)
    wt = box_sum_valid(done.astype(np.float64), k)
    out = np.zeros(wp.shape, np.float32)
    ok = wt > 1e-9
    out[ok] = (wp[ok] / wt[ok][:, None]).astype(np.float32)
    return out


# ---------------------------------------------------------------- window probabilities
def feature_map_net(encoder: Encoder) -> Any:
    """The encoder trunk's ``forward_features`` as a module for inference, with batch norms folded into the
    convolutions (``torch.fx`` fusion, ~20 % faster on CPU; the plain trunk when it cannot be traced)."""
    import torch
    from torch import nn

    class _FeatureMap(nn.Module):
        def __init__(self, trunk: nn.Module) -> None:
            super().__init__()
            self.trunk = trunk

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.trunk.forward_features(x)

    net = _FeatureMap(encoder.trunk).eval()
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(net)
    except (torch.fx.proxy.TraceError, TypeError, RuntimeError, AttributeError, NotImplementedError) as e:
        log.debug("%s: no fused feature map (%s); using the trunk as is", encoder.meta.name, e)
        return net
    if encoder.is_cnn:
        fused = fused.to(memory_format=torch.channels_last)
    return fused


def region_feature_map(encoder: Encoder, region: np.ndarray, geo: DenseGeometry, precision: str,
                       net: Any = None) -> Any:
    """uint8 (H, W, 3) region at the encoder's µm/px → its pre-pool feature map (D, H/cell, W/cell), with the
    encoder's stain standardisation sliding over the field of view (``net``: :func:`feature_map_net`)."""
    import torch

    from wsi_pipeline.encoders.base import autocast

    pixels = torch.from_numpy(np.require(region, requirements=["C", "W"]))[None]
    memory_format = torch.channels_last if encoder.is_cnn else torch.contiguous_format
    if encoder.stain is not None and geo.stain == "local":  # = forward_local of the preprocessed region
        x = encoder.stain.forward_local_pixels(pixels, geo.window_px, STAIN_BLOCK_PX, memory_format)
    else:
        x = encoder.preprocess(pixels, resize=False)
        if encoder.stain is not None and geo.stain == "region":
            x = encoder.stain(x)
    x = x.contiguous(memory_format=memory_format)
    with autocast(encoder.device, precision):
        fmap = (net or encoder.trunk.forward_features)(x)
    return fmap[0].float()


def pooled_window_features(fmap: Any, k: int, margin: int, n: tuple[int, int]) -> np.ndarray:
    """Average of the feature map over every k × k block of cells of the n[0] × n[1] windows after ``margin``
    cells → (n[0]·n[1], D) row-major."""
    import torch

    core = fmap[:, margin:margin + n[0] + k - 1, margin:margin + n[1] + k - 1]
    pooled = torch.nn.functional.avg_pool2d(core[None], k, stride=1)[0]
    return pooled.permute(1, 2, 0).reshape(-1, pooled.shape[0]).cpu().numpy()


def _chunk_l0(origin: tuple[float, float], cell_l0: float, a0: int, b0: int, offset_cells: float) -> np.ndarray:
    return np.array([round(origin[0] + (b0 - offset_cells) * cell_l0),
                     round(origin[1] + (a0 - offset_cells) * cell_l0)], np.int64)


def fcn_window_features(read_region: Callable[[int, int, int, int], np.ndarray], encoder: Encoder,
                        geo: DenseGeometry, need: np.ndarray, precision: str, net: Any = None,
                        prefetch: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
    """Fully convolutional window features, region by region (:func:`fcn_regions`): for the h × w windows from
    window index (a, b), ``read_region(a, b, height_px, width_px)`` gives the region that starts
    ``window_cells - 1 + margin`` cells before window (a, b)'s first cell, (h + halo) × (w + halo) cells
    (``geo.halo_cells``). Yields (a, b, features (h, w, D)). ``prefetch``: read the next region while this one
    is computed (:func:`read_ahead`)."""
    import torch

    net = net if net is not None else feature_map_net(encoder)
    cell, halo = geo.cell_px, geo.halo_cells

    def read(r: tuple[int, int, int, int]) -> np.ndarray:
        return read_region(r[0], r[1], (r[2] + halo) * cell, (r[3] + halo) * cell)

    with torch.inference_mode():
        for (a, b, h, w), region in read_ahead(fcn_regions(need, geo), read, prefetch):
            fmap = region_feature_map(encoder, region, geo, precision, net)
            yield a, b, pooled_window_features(fmap, geo.window_cells, geo.margin, (h, w)).reshape(h, w, -1)


def read_ahead(items: Iterable[T], read: Callable[[T], np.ndarray], prefetch: bool
               ) -> Iterator[tuple[T, np.ndarray]]:
    """``(item, read(item))`` in order; with ``prefetch``, the next item is read by a background thread while
    the caller computes on the current one (an accelerator computes a region in a fraction of the time its
    reading takes; on a CPU the model's threads already use every core, so nothing is read ahead there). One
    read at a time either way, so the reader is never used from two threads at once."""
    if not prefetch:
        for item in items:
            yield item, read(item)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tme-read-ahead") as ahead:
        pending: tuple[T, Future[np.ndarray]] | None = None
        for item in items:
            nxt = (item, ahead.submit(read, item))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = nxt
        if pending is not None:
            yield pending[0], pending[1].result()


def window_probs_fcn(reader: TileReader, encoder: Encoder, clf: TissueClassifier, geo: DenseGeometry,
                     origin: tuple[float, float], cell_l0: float, need: np.ndarray, precision: str,
                     net: Any = None, prefetch: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Window probabilities by fully convolutional evaluation over regions read from the slide (see module
    docstring; ``prefetch``: :func:`read_ahead`). Returns (probs (Hw, Ww, C), done (Hw, Ww) bool) on the
    window index grid of :func:`needed_windows`."""
    offset = geo.window_cells - 1 + geo.margin
    probs = np.zeros((*need.shape, clf.n_classes), np.float32)
    done = np.zeros(need.shape, bool)

    side = geo.region_px  # the reader's square; a wider region is read as squares side by side

    def read(a0: int, b0: int, height: int, width: int) -> np.ndarray:
        step = side // geo.cell_px
        xy = np.stack([_chunk_l0(origin, cell_l0, a0, b0 + j * step, offset) for j in range(-(-width // side))])
        return np.concatenate(list(reader.read_many(xy)), axis=1)[:height, :width]

    for a0, b0, feats in fcn_window_features(read, encoder, geo, need, precision, net, prefetch):
        h, w = feats.shape[:2]
        probs[a0:a0 + h, b0:b0 + w] = clf.predict_proba(feats.reshape(h * w, -1)).reshape(h, w, -1)
        done[a0:a0 + h, b0:b0 + w] = True
    return probs, done


def window_corners_l0(geo: DenseGeometry, origin: tuple[float, float], cell_l0: float,
                      index: np.ndarray) -> np.ndarray:
    """Level-0 top-left corners of the ``window_px`` reads centred in the k × k cells of windows at ``index``
    ((n, 2) row, col on the window index grid)."""
    k = geo.window_cells
    inset = (k * geo.cell_px - geo.window_px) / 2.0 / geo.cell_px  # in cells
    first = np.asarray(index, np.float64) - (k - 1) + inset
    return np.stack([np.round(origin[0] + first[:, 1] * cell_l0), np.round(origin[1] + first[:, 0] * cell_l0)],
                    axis=1).astype(np.int64)


def window_probs_direct(reader: TileReader, encoder: Encoder, clf: TissueClassifier, geo: DenseGeometry,
                        origin: tuple[float, float], cell_l0: float, need: np.ndarray, precision: str,
                        batch_size: int = 64, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Window probabilities with every window read and embedded as a training tile (``reader`` reads
    ``window_px`` tiles). Same return as :func:`window_probs_fcn`."""
    from wsi_pipeline.tiles.embed import embed_tiles
    from wsi_pipeline.tiles.transform import fit_tile

    index = np.argwhere(need)
    corners = window_corners_l0(geo, origin, cell_l0, index)
    probs = np.zeros((*need.shape, clf.n_classes), np.float32)
    for s in range(0, len(index), batch_size):
        imgs = [fit_tile(im, encoder.meta.input_size, clf.fit or "pad")
                for im in reader.read_many(corners[s:s + batch_size])]
        p = clf.predict_proba(embed_tiles(encoder, imgs, batch_size, precision, device))
        probs[index[s:s + batch_size, 0], index[s:s + batch_size, 1]] = p
    return probs, need.copy()


# ---------------------------------------------------------------- a slide
def reader_threads(device_type: str) -> int:
    """Decoding threads for the map's reads: on a GPU as many as `wsi extract` has reader processes there
    (:func:`wsi_pipeline.features.engine.default_num_workers`: all cores but one; decoding releases the GIL),
    with the next region read ahead; on a CPU one, in turn with the model (whose threads use every core:
    reading with more threads measured no faster there)."""
    from wsi_pipeline.features.engine import default_num_workers

    return max(1, default_num_workers(device_type))


def dense_slide_map(tiles: F.TileSet, encoder: Encoder, clf: TissueClassifier, method: str = "auto",
                    precision: str = "fp32", batch_size: int = 64, device: str = "cpu",
                    geo: DenseGeometry | None = None, net: Any = None, threads: int | None = None
                    ) -> F.TMEDenseMap:
    """The dense class-probability map of the area the RUN ``tiles`` cover, read from their slide (``net``:
    :func:`feature_map_net` of ``encoder``, built here when not given; ``threads``: the reader's decoding
    threads, :func:`reader_threads` of the device when None; with more than one the next region is read
    ahead too). The map does not depend on ``threads``."""

    from wsi_pipeline.encoders.base import prepare_for_inference, resolve_device
    from wsi_pipeline.features.reader import ReadSpec, open_tile_reader

    path = require_recorded_slide(tiles.attrs.get(F.A_SLIDE_PATH))
    method = resolve_method(classifier_method(clf, method), encoder)
    geo = geo or dense_geometry(clf, encoder, method)
    encoder = prepare_for_inference(encoder, resolve_device(device))
    threads = reader_threads(encoder.device.type) if threads is None else max(1, int(threads))
    cell_l0 = geo.cell_px * geo.mpp / tiles.slide_mpp
    origin, area = map_grid(tiles, cell_l0)
    k = geo.window_cells
    if not area.any():
        return F.TMEDenseMap(np.zeros((*area.shape, clf.n_classes), np.float32), area, origin, cell_l0, geo.cell_um,
                        geo.window_um, method)
    need = needed_windows(area, k)
    if method == METHOD_FCN:
        geo = choose_chunk(need, geo)
        spec = ReadSpec(target_mpp=geo.mpp, tile_size=geo.region_px, slide_mpp=tiles.slide_mpp)
        # threaded, a region's stored tiles are decoded at once: the cache must hold one region's (a 2816-px square
        # at 0.5 µm/px spans about 600 DCT-scaled 240-px Aperio tiles; decoded tiles are 40-200 KB)
        cache = {"cache_tiles": THREADED_REGION_CACHE_TILES} if threads > 1 else {}
        with open_tile_reader(path, spec, threads=threads, **cache) as reader:
            wprobs, done = window_probs_fcn(reader, encoder, clf, geo, origin, cell_l0, need, precision, net,
                                            prefetch=threads > 1)
    else:
        spec = ReadSpec(target_mpp=geo.mpp, tile_size=geo.window_px, slide_mpp=tiles.slide_mpp)
        with open_tile_reader(path, spec, threads=threads) as reader:
            wprobs, done = window_probs_direct(reader, encoder, clf, geo, origin, cell_l0, need, precision,
                                               batch_size, device)
    probs = overlap_add(wprobs, done & need, k)
    return F.TMEDenseMap(probs, area, origin, cell_l0, geo.cell_um, geo.window_um, method)


def tile_means(dense: F.TMEDenseMap, tiles: F.TileSet) -> np.ndarray:
    """Each RUN tile's class probabilities: the mean of the map cells whose centre lies in it → (N, C)."""
    xy = np.asarray(tiles.l0_xy, np.float64).reshape(-1, 2)
    out = np.zeros((len(xy), dense.probs.shape[-1]), np.float32)
    h, w = map_shape(dense)
    size = float(tiles.tile_size_l0)
    ox, oy = dense.origin_l0
    for i, (x, y) in enumerate(xy):
        c0 = max(0, int(np.ceil((x - ox) / dense.cell_l0 - 0.5 - 1e-9)))
        c1 = min(w, int(np.ceil((x - ox + size) / dense.cell_l0 - 0.5 - 1e-9)))
        r0 = max(0, int(np.ceil((y - oy) / dense.cell_l0 - 0.5 - 1e-9)))
        r1 = min(h, int(np.ceil((y - oy + size) / dense.cell_l0 - 0.5 - 1e-9)))
        if r1 > r0 and c1 > c0:
            out[i] = dense.probs[r0:r1, c0:c1].reshape(-1, out.shape[1]).mean(axis=0)
    return out


def fcn_window_agreement(reader_path: str, tiles: F.TileSet, encoder: Encoder, clf: TissueClassifier,
                         n_windows: int = 64, seed: int = 0, precision: str = "fp32", stain: str = "local"
                         ) -> dict[str, Any]:
    """Fully convolutional window probabilities against the same windows classified one by one (a random
    sample of ``n_windows`` windows over the RUN tiles' area): probability MAE (mean over windows and
    classes), mean L1/2 (total-variation) distance and the share of windows with the same top class."""
    from wsi_pipeline.encoders.base import prepare_for_inference
    from wsi_pipeline.features.reader import ReadSpec, open_tile_reader

    encoder = prepare_for_inference(encoder, encoder.device)
    geo = dataclasses.replace(dense_geometry(clf, encoder, METHOD_FCN), stain=stain)
    cell_l0 = geo.cell_px * geo.mpp / tiles.slide_mpp
    origin, area = map_grid(tiles, cell_l0)
    need = needed_windows(area, geo.window_cells)
    with open_tile_reader(reader_path, ReadSpec(geo.mpp, geo.region_px, tiles.slide_mpp)) as reader:
        fcn, done = window_probs_fcn(reader, encoder, clf, geo, origin, cell_l0, need, precision)
    index = np.argwhere(need & done)
    rng = np.random.default_rng(seed)
    pick = index[rng.choice(len(index), min(n_windows, len(index)), replace=False)]
    sample = np.zeros_like(need)
    sample[pick[:, 0], pick[:, 1]] = True
    with open_tile_reader(reader_path, ReadSpec(geo.mpp, geo.window_px, tiles.slide_mpp)) as reader:
        ref, _ = window_probs_direct(reader, encoder, clf, geo, origin, cell_l0, sample, precision)
    a, b = fcn[sample], ref[sample]
    return {"n_windows": len(a), "prob_mae": float(np.abs(a - b).mean()),
            "tv_distance": float(np.abs(a - b).sum(axis=1).mean() / 2),
            "argmax_agreement": float(np.mean(a.argmax(1) == b.argmax(1))),
            "window_um": geo.window_um, "read_um": geo.window_px * geo.mpp, "cell_um": geo.cell_um, "stain": stain}
