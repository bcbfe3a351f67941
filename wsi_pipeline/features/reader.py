"""Reading output tiles (``tile_size`` px at ``target_mpp`` µm/px, top-left at level-0 ``l0_xy``) fast.

Two readers with one interface (:class:`TileReader`):

* :class:`JpegTiffReader` — for TIFF pyramids whose level is stored as JPEG tiles (Aperio SVS, generic
  tiled TIFF): reads each stored tile's bytes once (tifffile offsets, ``os.pread``), decodes it with
  libjpeg-turbo (:mod:`wsi_pipeline.features.decode`; at 1/2, 1/4 or 1/8 scale in the DCT when the target
  MPP is that much coarser than the level and the decode mode is ``cpu-scaled``) into a small LRU, and cuts the output tiles from the decoded pixels.
  Colour handling follows the TIFF photometric tag like libtiff/OpenSlide (Aperio's RGB-coded JPEGs are
  decoded without YCbCr conversion). With ``decode='gpu'`` it also hands out the compressed tiles and their
  layout (:meth:`JpegTiffReader.jpeg_batch`) for decoding on the GPU.
* :class:`SlideTileReader` — anything else (JPEG 2000, DICOM, MRXS, NDPI, ...) through
  :meth:`Slide.read_region_at_mpp` (OpenSlide / tifffile backends).

Both return the pixels of ``Slide.read_region_at_mpp`` (best level for the MPP, area-averaged resize) up
to JPEG/resampling noise; out-of-slide pixels are white.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import CorruptSlideError

log = logging.getLogger(__name__)

FAST_VENDORS = ("aperio", "generic-tiff")
WHITE = 255
JPEG = 7
PHOTOMETRIC_RGB = 2


@dataclass(frozen=True)
class ReadSpec:
    """What to cut: ``tile_size`` px at ``target_mpp`` µm/px; ``slide_mpp`` is the level-0 µm/px that the
    coordinates were made with (from the tiles file; it overrides the slide's own metadata)."""

    target_mpp: float
    tile_size: int
    slide_mpp: float


class TileReader:
    """Reads output tiles of one slide. ``read`` is for one thread; ``read_many`` may use the reader's own
    thread pool (``threads`` > 1: decoding releases the GIL). One reader per process."""

    kind = "abstract"
    spec: ReadSpec
    _pool: ThreadPoolExecutor | None = None

    def read(self, l0_xy: Sequence[int]) -> np.ndarray:
        """One tile: uint8 (tile_size, tile_size, 3)."""
        raise NotImplementedError

    def read_many(self, l0_xy: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Tiles for an (n, 2) array of level-0 corners → uint8 (n, T, T, 3) (in the given order)."""
        n = len(l0_xy)
        t = self.spec.tile_size
        if out is None:
            out = np.empty((n, t, t, 3), np.uint8)
        if self._pool is None or n < 2:
            for i in range(n):
                out[i] = self.read(l0_xy[i])
            return out

        def one(i: int) -> None:
            out[i] = self.read(l0_xy[i])

        for _ in self._pool.map(one, range(n)):
            pass
        return out

    def _start_pool(self, threads: int) -> None:
        if threads > 1:
            self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tile-reader")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlideTileReader(TileReader):
    """Generic reader through the slide layer (OpenSlide / tifffile backends)."""

    kind = "slide"

    def __init__(self, path: str | Path, spec: ReadSpec, slide: Any = None, threads: int = 1) -> None:
        from wsi_pipeline.slide.open import open_slide

        self.spec = spec
        self.slide = slide if slide is not None else open_slide(path, mpp=spec.slide_mpp)
        # OpenSlide handles are thread-safe; the tifffile/Pillow backends are read one tile at a time
        self._start_pool(threads if getattr(self.slide, "backend", "") == "openslide" else 1)

    def read(self, l0_xy: Sequence[int]) -> np.ndarray:
        return self.slide.read_region_at_mpp((int(l0_xy[0]), int(l0_xy[1])), self.spec.target_mpp,
                                             self.spec.tile_size)

    def close(self) -> None:
        super().close()
        self.slide.close()


@dataclass
class _LevelGeometry:
    level: int
    downsample: float  # level-0 px per level px
    scale: float  # level px per output px (>= ~1)
    width: int
    height: int
    region: int  # side of the level region that makes one output tile (level px)


class JpegTiffReader(TileReader):
    """Fast reader for TIFF pyramids with JPEG tiles (see module doc).

    ``decode``: ``cpu-scaled`` decodes at 1/2, 1/4 or 1/8 scale in the DCT when one output pixel covers that
    many level pixels; ``cpu-full`` always decodes at full scale and resizes (the reference pixels);
    ``gpu`` hands out the compressed tiles in :meth:`jpeg_batch` for the GPU to decode, and reads like
    ``cpu-scaled`` in :meth:`read` (for slides whose tiles the GPU does not decode right).
    """

    kind = "tiff-jpeg"

    def __init__(self, path: str | Path, spec: ReadSpec, slide: Any, page: Any, geometry: _LevelGeometry,
                 cache_tiles: int = 256, decode: str = "cpu-scaled", threads: int = 1) -> None:
        from wsi_pipeline.features.decode import simplejpeg_module

        self.path = Path(path)
        self.spec = spec
        self.slide = slide  # kept open for the geometry; pixels come from the TIFF
        self.geo = geometry
        self.decode = decode
        self._tw, self._th = int(page.tilewidth), int(page.tilelength)
        self._ntx = -(-int(page.imagewidth) // self._tw)
        self._nty = -(-int(page.imagelength) // self._th)
        self._offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self._counts = np.asarray(page.databytecounts, dtype=np.int64)
        self._tables: bytes | None = page.jpegtables
        self.raw_rgb = _raw_rgb(page)
        self._sj = simplejpeg_module()
        self._fd = os.open(str(self.path), os.O_RDONLY)
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cache_tiles = max(4, int(cache_tiles))
        # decode at 1/r in the DCT when one output px covers >= r level px (power of two, r <= 8)
        r = 1
        if decode in ("cpu-scaled", "gpu"):
            while r < 8 and geometry.scale >= 2 * r * (1 - 1e-6) and self._tw % (2 * r) == 0 and self._th % (2 * r) == 0:
                r *= 2
        self._reduce = r
        self.decoded_tiles = 0
        self._frozen = False  # True while pool threads cut tiles from the cache (no LRU bookkeeping then)
        self._start_pool(threads)

    @property
    def reduce(self) -> int:
        """The DCT scale denominator used for aligned output tiles (1 = full decode)."""
        return self._reduce

    # ---- stored tiles
    def _stored(self, tx: int, ty: int, r: int) -> np.ndarray:
        key = (tx, ty, r)
        hit = self._cache.get(key)
        if hit is not None:
            if not self._frozen:
                self._cache.move_to_end(key)
            return hit
        arr = self._load(key)
        if not self._frozen:
            self._put(key, arr)
        return arr

    def _put(self, key: tuple[int, int, int], arr: np.ndarray) -> None:
        self._cache[key] = arr
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_tiles:
            self._cache.popitem(last=False)

    def _stream(self, tx: int, ty: int) -> bytes | None:
        """The stored tile's standalone JPEG (tables spliced in), or None for a sparse (empty) tile."""
        from wsi_pipeline.features.decode import standalone_jpeg

        idx = ty * self._ntx + tx
        nbytes = int(self._counts[idx])
        if nbytes == 0:  # sparse tile: OpenSlide shows it as transparent → white
            return None
        data = os.pread(self._fd, nbytes, int(self._offsets[idx]))
        if len(data) < nbytes:
            raise CorruptSlideError(
                self.path, f"tile ({tx}, {ty}) of level {self.geo.level} lies beyond the end of the file",
                "the file is truncated; copy it again",
            )
        try:
            return standalone_jpeg(data, self._tables, self.raw_rgb)
        except ValueError as e:
            raise self._corrupt(tx, ty, e) from e

    def _corrupt(self, tx: int, ty: int, e: Exception) -> CorruptSlideError:
        return CorruptSlideError(self.path, f"JPEG tile ({tx}, {ty}) of level {self.geo.level} does not decode ({e})",
                                 "the file is damaged; re-copy or re-export it")

    def _load(self, key: tuple[int, int, int]) -> np.ndarray:
        """Read and decode one stored tile (thread-safe: ``os.pread`` and a GIL-free decoder)."""
        from wsi_pipeline.features.decode import decode_cpu

        tx, ty, r = key
        self.decoded_tiles += 1
        th, tw = self._th // r, self._tw // r
        jpeg = self._stream(tx, ty)
        if jpeg is None:
            return np.full((th, tw, 3), WHITE, np.uint8)
        try:
            arr = decode_cpu(jpeg, r, (self._tw, self._th), self._sj)
        except ValueError as e:
            raise self._corrupt(tx, ty, e) from e
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.shape[0] != th or arr.shape[1] != tw:  # libjpeg rounds scaled sizes up; crop or pad
            fixed = np.full((th, tw, 3), WHITE, np.uint8)
            h, w = min(th, arr.shape[0]), min(tw, arr.shape[1])
            fixed[:h, :w] = arr[:h, :w, :3]
            arr = fixed
        return arr[..., :3]

    # ---- output tiles
    def _plan(self, l0_xy: Sequence[int], allow_reduce: bool = True) -> tuple[int, int, int, int, float, float]:
        """(lx, ly, size, r, ax, ay): the level region [lx, lx+size)² read at 1/r scale, and the fractional
        level position (OpenSlide places regions at l0 / downsample with bilinear filtering)."""
        g = self.geo
        fx, fy = int(l0_xy[0]) / g.downsample, int(l0_xy[1]) / g.downsample
        lx, ly = int(np.floor(fx + 1e-9)), int(np.floor(fy + 1e-9))
        ax, ay = fx - lx, fy - ly
        ax, ay = (0.0 if ax < 1e-6 else ax), (0.0 if ay < 1e-6 else ay)
        size = g.region
        if ax or ay:
            return lx, ly, size + 1, 1, ax, ay
        r = self._reduce if allow_reduce else 1
        if r > 1 and (lx % r or ly % r or size % r):
            r = 1  # sub-pixel misalignment at reduced scale: decode at full scale for this tile
        return lx, ly, size, r, 0.0, 0.0

    def read(self, l0_xy: Sequence[int]) -> np.ndarray:
        from wsi_pipeline.slide.base import resize_rgb

        lx, ly, size, r, ax, ay = self._plan(l0_xy)
        region = self._region(lx, ly, size, r)
        if ax or ay:
            region = _bilinear_shift(region, ax, ay, size - 1)
        t = self.spec.tile_size
        if region.shape[0] != t:
            region = resize_rgb(region, (t, t))
        return region

    def _stored_keys(self, lx: int, ly: int, size: int, r: int) -> list[tuple[int, int, int]]:
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + size, self.geo.width), min(ly + size, self.geo.height)
        if x1 <= x0 or y1 <= y0:
            return []
        return [(tx, ty, r) for ty in range(y0 // self._th, (y1 - 1) // self._th + 1)
                for tx in range(x0 // self._tw, (x1 - 1) // self._tw + 1)]

    def read_many(self, l0_xy: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Decode the batch's stored tiles in parallel, then cut the output tiles in parallel from them (one large
        output tile, e.g. a dense TME region, is decoded in parallel too)."""
        if self._pool is None or len(l0_xy) == 0:
            return super().read_many(l0_xy, out)
        keys = list(dict.fromkeys(k for xy in l0_xy for k in self._stored_keys(*self._plan(xy)[:4])))
        if len(keys) > self._cache_tiles:  # more than the cache holds: no batch-wide prefetch
            return super().read_many(l0_xy, out)
        for k in keys:  # keep the ones already decoded at the young end of the LRU
            if k in self._cache:
                self._cache.move_to_end(k)
        missing = [k for k in keys if k not in self._cache]
        for k, arr in zip(missing, self._pool.map(self._load, missing), strict=True):
            self._put(k, arr)
        self._frozen = True
        try:
            return super().read_many(l0_xy, out)
        finally:
            self._frozen = False

    def _region(self, lx: int, ly: int, size: int, r: int) -> np.ndarray:
        """Level pixels [lx, lx+size)² at 1/r scale; white outside the level."""
        out_side = size // r
        out = np.empty((out_side, out_side, 3), np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + size, self.geo.width), min(ly + size, self.geo.height)
        if x1 <= x0 or y1 <= y0:
            out.fill(WHITE)
            return out
        if x0 > lx or y0 > ly or x1 < lx + size or y1 < ly + size:
            out.fill(WHITE)  # only partly inside the level
        tw, th = self._tw, self._th
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._stored(tx, ty, r)
                # intersection in level px
                ix0, iy0 = max(x0, tx * tw), max(y0, ty * th)
                ix1, iy1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                out[(iy0 - ly) // r:(iy1 - ly) // r, (ix0 - lx) // r:(ix1 - lx) // r] = \
                    tile[(iy0 - ty * th) // r:(iy1 - ty * th) // r, (ix0 - tx * tw) // r:(ix1 - tx * tw) // r]
        return out

    # ---- compressed tiles, for decoding elsewhere (the GPU)
    def jpeg_batch(self, l0_xy: np.ndarray) -> JpegBatch:
        """The stored tiles that the output tiles ``l0_xy`` need, still compressed (standalone JPEGs), and
        where each output tile lies in them: see :class:`JpegBatch`. No decoding here."""
        n = len(l0_xy)
        plans = [self._plan(xy, allow_reduce=False) for xy in l0_xy]
        tw, th = self._tw, self._th
        index: dict[tuple[int, int], int] = {}
        streams: list[bytes] = []
        origin = np.zeros((n, 2), np.int64)
        side = np.zeros(n, np.int64)
        shift = np.zeros((n, 2), np.float32)
        first = np.zeros((n, 2), np.int64)
        spans = []
        for i, (lx, ly, size, _, ax, ay) in enumerate(plans):
            origin[i], side[i], shift[i] = (lx, ly), size, (ax, ay)
            tx0, ty0 = max(lx, 0) // tw, max(ly, 0) // th
            first[i] = (tx0, ty0)
            keys = self._stored_keys(lx, ly, size, 1)
            spans.append(keys)
        ny = max([1 + max((k[1] for k in ks), default=0) - int(first[i, 1]) for i, ks in enumerate(spans)] or [1])
        nx = max([1 + max((k[0] for k in ks), default=0) - int(first[i, 0]) for i, ks in enumerate(spans)] or [1])
        table = np.full((n, max(1, ny), max(1, nx)), -1, np.int32)
        for i, ks in enumerate(spans):
            for tx, ty, _ in ks:
                k = index.get((tx, ty))
                if k is None:
                    stream = self._stream(tx, ty)
                    k = -1
                    if stream is not None:
                        k = index[(tx, ty)] = len(streams)
                        streams.append(stream)
                    else:
                        index[(tx, ty)] = -1
                table[i, ty - first[i, 1], tx - first[i, 0]] = k
        self.decoded_tiles += len(streams)
        lengths = np.fromiter((len(s) for s in streams), np.int64, len(streams))
        offsets = np.zeros(len(streams) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = np.frombuffer(bytearray(b"".join(streams)), np.uint8)  # writable: it becomes a tensor
        return JpegBatch(data=data, offsets=offsets, tile_wh=np.array([tw, th], np.int64),
                         level_wh=np.array([self.geo.width, self.geo.height], np.int64), origin=origin, side=side,
                         shift=shift, first_tile=first, table=table, out_size=int(self.spec.tile_size),
                         raw_rgb=bool(self.raw_rgb))

    def close(self) -> None:
        super().close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._cache.clear()
        self.slide.close()


@dataclass
class JpegBatch:
    """Compressed stored tiles of one slide level and the layout of the output tiles over them.

    ``data[offsets[k]:offsets[k+1]]`` is stored tile k as a standalone JPEG. Output tile i is the level region
    ``[origin[i], origin[i] + side[i])²`` (x, y), sampled at ``+ shift[i]`` px (bilinear; region one px
    larger then) and resized to ``out_size``². ``table[i, a, b]`` is the stored tile at column
    ``first_tile[i, 0] + b``, row ``first_tile[i, 1] + a`` (-1: white). Level pixels outside ``level_wh`` are
    white."""

    data: np.ndarray  # uint8 (total bytes,)
    offsets: np.ndarray  # int64 (K + 1,)
    tile_wh: np.ndarray  # int64 (2,) stored tile width, height
    level_wh: np.ndarray  # int64 (2,)
    origin: np.ndarray  # int64 (n, 2) level x, y of each region
    side: np.ndarray  # int64 (n,) region side in level px
    shift: np.ndarray  # float32 (n, 2) fractional level position (ax, ay)
    first_tile: np.ndarray  # int64 (n, 2) column, row of table[i, 0, 0]
    table: np.ndarray  # int32 (n, ny, nx)
    out_size: int
    raw_rgb: bool

    def __len__(self) -> int:
        return len(self.side)

    @property
    def n_streams(self) -> int:
        return len(self.offsets) - 1


# ---------------------------------------------------------------- helpers
def _bilinear_shift(region: np.ndarray, ax: float, ay: float, size: int) -> np.ndarray:
    """``region`` ((size+1)² px) sampled at (x + ax, y + ay): the size² result, bilinear."""
    r = region.astype(np.float32)
    top = r[:size, :size] * (1 - ax) + r[:size, 1:size + 1] * ax
    bottom = r[1:size + 1, :size] * (1 - ax) + r[1:size + 1, 1:size + 1] * ax
    out = top * (1 - ay) + bottom * ay
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _raw_rgb(page: Any) -> bool:
    """True when the tiles are RGB-coded JPEGs that libtiff reads without colour conversion (Aperio:
    photometric RGB without JFIF marker)."""
    photometric = int(page.photometric)
    jfif = bool(getattr(page, "is_jfif", False))
    return photometric == PHOTOMETRIC_RGB and not jfif


def level_geometry(slide: Any, spec: ReadSpec) -> _LevelGeometry:
    """The level ``Slide.read_region_at_mpp`` reads for ``spec`` and the region size there."""
    level = slide.best_level_for_mpp(spec.target_mpp)
    scale = spec.target_mpp / slide.level_mpp(level)
    region = max(1, round(spec.tile_size * scale))
    w, h = slide.level_dimensions[level]
    return _LevelGeometry(level, float(slide.level_downsamples[level]), scale, int(w), int(h), int(region))


def _find_jpeg_page(tif: Any, width: int, height: int) -> Any:
    """The tiled, 8-bit RGB, JPEG-compressed page of the given size (top-level pages and SubIFDs)."""
    pages = list(tif.pages)
    for p in list(pages):
        pages.extend(getattr(p, "pages", None) or [])  # SubIFD levels (OME/generic pyramids)
    for p in pages:
        try:
            if int(p.imagewidth) != width or int(p.imagelength) != height:
                continue
            if (p.is_tiled and int(p.compression) == JPEG and int(p.samplesperpixel) == 3
                    and int(p.bitspersample) == 8 and int(p.planarconfig) == 1 and not p.extrasamples
                    and int(p.imagedepth) == 1):
                return p
        except (AttributeError, TypeError, ValueError):
            continue
    return None


def open_tile_reader(path: str | Path, spec: ReadSpec, fast: bool = True, cache_tiles: int = 256,
                     reduced_decode: bool = True, threads: int = 1, decode: str | None = None) -> TileReader:
    """The fastest reader that can read ``path`` exactly (see module doc). ``threads`` > 1 decodes the tiles
    of one :meth:`~TileReader.read_many` call in parallel. ``decode``: ``cpu-scaled``, ``cpu-full`` or
    ``gpu`` (:mod:`wsi_pipeline.features.decode`); None: ``cpu-scaled`` if ``reduced_decode`` else
    ``cpu-full``."""
    if decode is None:
        decode = "cpu-scaled" if reduced_decode else "cpu-full"
    from wsi_pipeline.slide.open import open_slide

    slide = open_slide(path, mpp=spec.slide_mpp)
    if not fast or getattr(slide, "backend", "") != "openslide" or slide.vendor not in FAST_VENDORS:
        return SlideTileReader(path, spec, slide=slide, threads=threads)
    import tifffile

    geo = level_geometry(slide, spec)
    try:
        with tifffile.TiffFile(str(path)) as tif:
            page = _find_jpeg_page(tif, geo.width, geo.height)
            if page is not None:
                # materialise what the reader needs before the file closes
                _ = (page.dataoffsets, page.databytecounts, page.jpegtables)
                reader = JpegTiffReader(path, spec, slide, page, geo, cache_tiles, decode, threads)
                log.debug("%s: fast JPEG reader on level %d (decode 1/%d)", path, geo.level, reader._reduce)
                return reader
    except (tifffile.TiffFileError, OSError, ValueError) as e:
        log.debug("%s: tifffile cannot parse it (%s); using the slide reader", path, e)
    return SlideTileReader(path, spec, slide=slide, threads=threads)
