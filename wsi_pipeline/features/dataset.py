"""Tile datasets for the DataLoader: one item = one batch of tiles, read in a cache-friendly order by
readers that each worker process opens for itself.

A batch may span slide boundaries (:func:`pack_batches`): it is a tuple of *segments*, each a run of tiles
of one slide, so a cohort of small slides fills every batch like one big slide. Segments carry the tiles'
positions in the slide's tile list so the engine can put the features back in the tiles-file order. A slide
that cannot be read yields an error segment instead of raising, so one bad slide never stops the loader.

Pixels are written straight into a slot of a :class:`~wsi_pipeline.features.ring.BatchRing` shared with the
main process, and only the slot's row range (a :class:`~wsi_pipeline.features.ring.RingRows`) travels through
the DataLoader's queue. With decode mode ``gpu`` a segment of a JPEG-tiled slide carries the compressed
stored tiles and their layout (a :class:`~wsi_pipeline.features.reader.JpegBatch` as a dict) instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from wsi_pipeline.features.reader import JpegTiffReader, ReadSpec, TileReader, open_tile_reader
from wsi_pipeline.features.ring import BatchRing, RingError, RingRows

log = logging.getLogger(__name__)

BLOCK_COLS, BLOCK_ROWS = 8, 4  # output tiles per reading block (x, y)


@dataclass(frozen=True)
class SlideSource:
    """What a worker needs to read one slide's tiles."""

    slide_path: str
    l0_xy: np.ndarray  # (N, 2) int64, tiles-file order
    spec: ReadSpec
    step_l0: int  # nominal tile pitch in level-0 px (for the reading order)


Segment = tuple[int, np.ndarray]  # (source index, tile positions in that slide's list)
OPEN_READERS = 4  # readers a worker keeps open (batches that span slides switch back and forth)


@dataclass(frozen=True)
class ReaderOptions:
    fast: bool = True
    decode: str = "cpu-scaled"  # cpu-full | cpu-scaled | gpu (resolved; see features.decode)
    cache_tiles: int = 256
    threads: int = 1  # decoding threads per reader (for reading in the main process)
    gpu_rgb: bool = True  # gpu: RGB-coded JPEG tiles may go to the GPU (else the reader decodes them)


def read_order(l0_xy: np.ndarray, step_l0: int) -> np.ndarray:
    """Permutation visiting tiles block by block (8 × 4 tiles, blocks in raster order, raster inside):
    neighbouring output tiles share stored JPEG tiles, so each stored tile is decoded about once."""
    if len(l0_xy) == 0:
        return np.zeros(0, dtype=np.int64)
    step = max(1, int(step_l0))
    x, y = l0_xy[:, 0], l0_xy[:, 1]
    bx, by = x // (BLOCK_COLS * step), y // (BLOCK_ROWS * step)
    return np.lexsort((x, y, bx, by)).astype(np.int64)


def plan_batches(sources: Sequence[SlideSource], batch_size: int) -> list[tuple[int, np.ndarray]]:
    """(source index, tile positions) per batch, slides in order, tiles in :func:`read_order`."""
    items: list[tuple[int, np.ndarray]] = []
    for si, src in enumerate(sources):
        order = read_order(src.l0_xy, src.step_l0)
        for start in range(0, len(order), batch_size):
            items.append((si, order[start : start + batch_size]))
    return items


def pack_batches(sources: Sequence[SlideSource], batch_size: int) -> list[tuple[Segment, ...]]:
    """Batches of ``batch_size`` tiles that run across slide boundaries: slides in order, tiles in
    :func:`read_order`, each batch a tuple of segments (one per slide it touches). A batch never mixes tile
    sizes (the model input is one array)."""
    items: list[tuple[Segment, ...]] = []
    cur: list[Segment] = []
    n_cur, size_cur = 0, None
    for si, src in enumerate(sources):
        order = read_order(src.l0_xy, src.step_l0)
        if size_cur is not None and src.spec.tile_size != size_cur and cur:
            items.append(tuple(cur))
            cur, n_cur = [], 0
        size_cur = src.spec.tile_size
        start = 0
        while start < len(order):
            take = min(batch_size - n_cur, len(order) - start)
            cur.append((si, order[start:start + take]))
            n_cur += take
            start += take
            if n_cur == batch_size:
                items.append(tuple(cur))
                cur, n_cur = [], 0
    if cur:
        items.append(tuple(cur))
    return items


def split_segments(items: Sequence[tuple[Segment, ...]]) -> list[tuple[Segment, ...]]:
    """One segment per item (to find which slide kills a reader process)."""
    return [(seg,) for item in items for seg in item]


class SlideBatchDataset(Dataset):
    """Map-style dataset over :func:`pack_batches` items: ``ds[i]`` → a list of
    ``(source, positions, payload, error)``, one per segment, with ``positions`` an int64 array,
    ``payload`` the rows of ring slot ``i % slots`` holding its tiles (:class:`RingRows`; uint8 (n, T, T, 3)
    tiles without a ring), a compressed :class:`~wsi_pipeline.features.reader.JpegBatch` as a dict (decode
    mode ``gpu``), or None, and ``error`` '' or 'ErrorType: message'. The main process must
    :meth:`~BatchRing.release` every item it has received (in order), or the readers stop for lack of slots.
    """

    def __init__(self, sources: Sequence[SlideSource], items: Sequence[tuple[Segment, ...]],
                 options: ReaderOptions = ReaderOptions(), ring: BatchRing | None = None) -> None:
        self.sources = list(sources)
        self.items = list(items)
        self.options = options
        self.ring = ring
        self._readers: dict[int, TileReader] = {}
        self._pid = -1
        self._failed: dict[int, str] = {}
        self._slot: Any = None  # the ring buffer of the item being read (acquired at its first pixels)
        self._rows = 0

    def __len__(self) -> int:
        return len(self.items)

    def _get_reader(self, si: int) -> TileReader:
        pid = os.getpid()
        if self._pid != pid:  # a fresh worker process: never reuse a parent's handles
            self._readers, self._pid, self._failed = {}, pid, {}
        reader = self._readers.pop(si, None)
        if reader is None:
            while len(self._readers) >= OPEN_READERS:
                self._readers.pop(next(iter(self._readers))).close()
            src = self.sources[si]
            o = self.options
            reader = open_tile_reader(src.slide_path, src.spec, fast=o.fast, cache_tiles=o.cache_tiles,
                                      threads=o.threads, decode=o.decode)
        self._readers[si] = reader  # most recently used last
        return reader

    def _read(self, i: int, si: int, positions: np.ndarray) -> Any:
        reader = self._get_reader(si)
        xy = self.sources[si].l0_xy[positions]
        if (self.options.decode == "gpu" and isinstance(reader, JpegTiffReader)
                and (self.options.gpu_rgb or not reader.raw_rgb)):
            # the compressed bytes as a tensor (shared memory, for the batched decode); the small layout
            # arrays stay numpy arrays, pickled with the item instead of a shared-memory segment each
            return {k: (torch.from_numpy(v) if k == "data" else v)
                    for k, v in dataclasses.asdict(reader.jpeg_batch(xy)).items()}
        if self.ring is None:
            return torch.from_numpy(reader.read_many(xy))
        tile = self.sources[si].spec.tile_size
        if self._slot is None:
            self._slot = self.ring.acquire(i, tile)
        start = self._rows
        reader.read_many(xy, out=self._slot[start:start + len(xy)])
        self._rows += len(xy)  # only once the rows are written: a failed segment's rows are reused
        return RingRows(self.ring.slot_of(i), start, len(xy), tile)

    def __getitem__(self, i: int) -> list[tuple[int, Any, Any, str]]:
        if self._pid != os.getpid():
            self._readers, self._pid, self._failed = {}, os.getpid(), {}
        self._slot, self._rows = None, 0
        try:
            return [self._segment(i, si, positions) for si, positions in self.items[i]]
        finally:
            self._slot = None

    def _segment(self, i: int, si: int, positions: np.ndarray) -> tuple[int, Any, Any, str]:
        if si in self._failed:
            return si, positions, None, self._failed[si]
        try:
            payload = self._read(i, si, positions)
        except RingError:
            raise
        except Exception as e:  # noqa: BLE001 - isolate the slide: report, do not kill the loader
            err = f"{type(e).__name__}: {e}"
            log.debug("reading %s failed:\n%s", self.sources[si].slide_path, traceback.format_exc())
            self._failed[si] = err
            reader = self._readers.pop(si, None)
            if reader is not None:
                reader.close()
            return si, positions, None, err
        return si, positions, payload, ""

    def reader_kind(self, si: int) -> str:
        """Which reader a source would use (opens and closes it; for reporting)."""
        src = self.sources[si]
        with open_tile_reader(src.slide_path, src.spec, fast=self.options.fast) as r:
            return r.kind

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers = {}


def worker_init(_worker_id: int) -> None:
    """Reader processes: one intra-op thread, and a lower CPU priority than the model's threads."""
    torch.set_num_threads(1)
    with contextlib.suppress(OSError):  # raising priority back is not allowed; lowering always is
        os.nice(int(os.environ.get("WSI_READER_NICE", "5")))
