"""Tile datasets for the DataLoader: one item = one batch of tiles of one slide, read in a cache-friendly
order by a reader that each worker process opens for itself.

Items carry the tiles' positions in the slide's tile list so the engine can put the features back in
the tiles-file order. A slide that cannot be read yields error items instead of raising, so one bad
slide never stops the loader.
"""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from wsi_pipeline.features.reader import ReadSpec, TileReader, open_tile_reader

log = logging.getLogger(__name__)

BLOCK_COLS, BLOCK_ROWS = 8, 4  # output tiles per reading block (x, y)


@dataclass(frozen=True)
class SlideSource:
    """What a worker needs to read one slide's tiles."""

    slide_path: str
    l0_xy: np.ndarray  # (N, 2) int64, tiles-file order
    spec: ReadSpec
    step_l0: int  # nominal tile pitch in level-0 px (for the reading order)


@dataclass(frozen=True)
class ReaderOptions:
    fast: bool = True
    reduced_decode: bool = True
    cache_tiles: int = 256
    threads: int = 1  # decoding threads per reader (for reading in the main process)


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


class SlideBatchDataset(Dataset):
    """Map-style dataset: ``ds[i]`` → ``(source, positions, tiles, error)``
    with ``tiles`` uint8 (n, T, T, 3) or None and ``error`` '' or 'ErrorType: message'."""

    def __init__(self, sources: Sequence[SlideSource], items: Sequence[tuple[int, np.ndarray]],
                 options: ReaderOptions = ReaderOptions()) -> None:
        self.sources = list(sources)
        self.items = list(items)
        self.options = options
        self._reader: TileReader | None = None
        self._reader_source = -1
        self._pid = -1
        self._failed: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _get_reader(self, si: int) -> TileReader:
        pid = os.getpid()
        if self._pid != pid:  # a fresh worker process: never reuse a parent's handles
            self._reader, self._reader_source, self._pid, self._failed = None, -1, pid, {}
        if self._reader_source != si:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            src = self.sources[si]
            o = self.options
            self._reader = open_tile_reader(src.slide_path, src.spec, fast=o.fast, cache_tiles=o.cache_tiles,
                                            reduced_decode=o.reduced_decode, threads=o.threads)
            self._reader_source = si
        assert self._reader is not None
        return self._reader

    def __getitem__(self, i: int) -> tuple[int, Any, Any, str]:
        si, positions = self.items[i]
        if si in self._failed and self._pid == os.getpid():
            return si, torch.from_numpy(positions), None, self._failed[si]
        try:
            reader = self._get_reader(si)
            tiles = reader.read_many(self.sources[si].l0_xy[positions])
        except Exception as e:  # noqa: BLE001 - isolate the slide: report, do not kill the loader
            err = f"{type(e).__name__}: {e}"
            log.debug("reading %s failed:\n%s", self.sources[si].slide_path, traceback.format_exc())
            self._failed[si] = err
            if self._reader is not None:
                self._reader.close()
            self._reader, self._reader_source = None, -1
            return si, torch.from_numpy(positions), None, err
        return si, torch.from_numpy(positions), torch.from_numpy(tiles), ""

    def reader_kind(self, si: int) -> str:
        """Which reader a source would use (opens and closes it; for reporting)."""
        src = self.sources[si]
        with open_tile_reader(src.slide_path, src.spec, fast=self.options.fast) as r:
            return r.kind

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def worker_init(_worker_id: int) -> None:
    """Reader processes: one intra-op thread, and a lower CPU priority than the model's threads."""
    torch.set_num_threads(1)
    with contextlib.suppress(OSError):  # raising priority back is not allowed; lowering always is
        os.nice(int(os.environ.get("WSI_READER_NICE", "5")))
