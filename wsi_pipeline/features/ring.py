"""Batch buffers shared with the reader processes: tiles are written once, where the model reads them.

Without it, each batch of tiles crossed from a reader process to the main process like this: the reader
allocated a fresh (n, T, T, 3) array, the DataLoader copied it into a new shared-memory segment and sent its
file descriptor, the main process mapped the segment (one page fault per 4 KiB), the pin-memory thread
copied it once more into page-locked memory, and both mappings were torn down again: 38.5 MB per batch of
256 tiles of 224 px, allocated and copied twice over and faulted in three times.

:class:`BatchRing` holds ``slots`` batch buffers in one anonymous shared mapping, made before the reader
processes fork (so they inherit it) and page-locked once for the GPU (``cudaHostRegister``) after they have
forked. Item *i* of the loader is written into slot ``i % slots``; only the slot number and row range travel
through the DataLoader's queue. A slot is reused once the main process has released the item that used it
before (:meth:`release`, after the host → device copy has finished, or after the forward pass on the CPU);
a reader that gets there first waits (:meth:`acquire`) — this is also what bounds the batches held in
memory: ``slots × batch_size × T² × 3`` bytes, whatever the number of reader processes.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

RING_BUDGET_BYTES = 1 << 30  # default bound of the batch buffers (ring_slots)
POLL_S = 0.0005  # a reader's wait for a free slot: polling period
PARENT_CHECK_S = 1.0  # ... and how often it checks that the main process is still there


class RingError(RuntimeError):
    """The ring's protocol broke (an item never released, the main process gone): not a slide's fault."""


@dataclass(frozen=True)
class RingRows:
    """Where a segment's tiles lie: tiles ``[start, start + n)`` of ``tile``² px in slot ``slot``."""

    slot: int
    start: int
    n: int
    tile: int


class BatchRing:
    """``slots`` uint8 buffers of ``batch_size`` tiles of up to ``tile_size``² px, shared with forked reader
    processes, with a release counter per slot (module doc)."""

    def __init__(self, slots: int, batch_size: int, tile_size: int) -> None:
        self.slots, self.batch_size, self.tile_size = max(1, int(slots)), int(batch_size), int(tile_size)
        self.slot_bytes = self.batch_size * self.tile_size * self.tile_size * 3
        nbytes = self.slots * self.slot_bytes
        header = -(-8 * self.slots // mmap.PAGESIZE) * mmap.PAGESIZE  # counters; pixels start on a page
        # anonymous MAP_SHARED: inherited by forked children, pages allocated only when first written
        self._map = mmap.mmap(-1, header + nbytes)
        # released[s] = g: the items of slot s up to generation g - 1 are done with; item i may be written
        # once released[i % slots] >= i // slots (aligned int64: one store, never seen half-written)
        self._released = np.frombuffer(self._map, np.int64, self.slots)
        self.pixels = np.frombuffer(self._map, np.uint8, nbytes, offset=header).reshape(self.slots, self.slot_bytes)
        self._parent = os.getpid()
        self._pinned_ptr: int | None = None

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def slot_of(self, item: int) -> int:
        return item % self.slots

    # ---- reader side
    def acquire(self, item: int, tile: int) -> np.ndarray:
        """The buffer (batch_size, tile, tile, 3) item ``item`` is written into, once the item that used that
        slot before is released (a reader process waits here while the main process holds every slot)."""
        s, gen = item % self.slots, item // self.slots
        if self._released[s] < gen and os.getpid() == self._parent:  # reading in the main process: nobody else
            raise RingError(f"batch ring: item {item - self.slots} was never released")  # would release it
        next_check = time.monotonic() + PARENT_CHECK_S
        while self._released[s] < gen:
            time.sleep(POLL_S)
            if time.monotonic() > next_check:
                if os.getppid() != self._parent:
                    raise RingError("the extraction's main process is gone; this reader stops")
                next_check = time.monotonic() + PARENT_CHECK_S
        return self._tiles(s, tile)

    def _tiles(self, s: int, tile: int) -> np.ndarray:
        if tile > self.tile_size:
            raise ValueError(f"batch ring: {tile}-px tiles in a ring made for {self.tile_size} px")
        n = self.batch_size * tile * tile * 3
        return self.pixels[s, :n].reshape(self.batch_size, tile, tile, 3)

    # ---- main-process side
    def view(self, rows: RingRows) -> np.ndarray:
        return self._tiles(rows.slot, rows.tile)[rows.start:rows.start + rows.n]

    def release(self, item: int) -> None:
        """The main process is done with item ``item``'s pixels: its slot may take item ``item + slots``."""
        s = item % self.slots
        self._released[s] = max(int(self._released[s]), item // self.slots + 1)

    def pin(self) -> bool:
        """Page-lock the buffers for asynchronous host → device copies (CUDA; call after the reader processes
        have forked, :meth:`unpin` before forking again). False when the driver refuses."""
        import torch

        if self._pinned_ptr is not None:
            return True
        ptr = self.pixels.ctypes.data
        try:
            err = int(torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 0))
        except (RuntimeError, AttributeError, TypeError) as e:  # no CUDA runtime API in this torch build
            log.warning("cannot page-lock the batch buffers (%s); host → device copies will be synchronous", e)
            return False
        if err != 0:
            log.warning("cudaHostRegister of %.0f MB of batch buffers failed (CUDA error %d); host → device "
                        "copies will be synchronous", self.nbytes / 2**20, err)
            return False
        self._pinned_ptr = ptr
        return True

    def unpin(self) -> None:
        if self._pinned_ptr is None:
            return
        import torch

        err = int(torch.cuda.cudart().cudaHostUnregister(self._pinned_ptr))
        if err != 0:
            log.warning("cudaHostUnregister of the batch buffers failed (CUDA error %d)", err)
        self._pinned_ptr = None

    @property
    def pinned(self) -> bool:
        return self._pinned_ptr is not None


def ring_slots(num_workers: int, prefetch_per_worker: int, slot_bytes: int, total: int | None = None,
               budget: int = RING_BUDGET_BYTES, held: int = 2) -> int:
    """How many batch buffers: ``total`` (``--prefetch-batches``) ahead plus the ``held`` ones the main
    process uses (the batch being copied or computed, and the one before); by default every reader process
    ``prefetch_per_worker`` batches ahead, within ``budget`` bytes but never fewer than one per reader.
    Readers that get further ahead wait for a slot. Reading in the main process (``num_workers`` 0): the
    batch in use and the next one.

    At 14 reader processes, batch 256, 224-px tiles (36.75 MiB a slot): min(14 × 2 + 2, 1 GiB / 36.75 MiB)
    = 27 slots, 0.97 GiB."""
    if num_workers <= 0:
        return 2
    if total is not None:
        return max(1, total) + held
    want = num_workers * max(1, prefetch_per_worker) + held
    return max(num_workers + held, min(want, budget // max(1, slot_bytes)))


def ring_bytes(slots: int, batch_size: int, tile_size: int) -> int:
    """Memory of the batch buffers: ``slots × batch_size × tile_size² × 3`` bytes."""
    return slots * batch_size * tile_size * tile_size * 3

