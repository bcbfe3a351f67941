"""The batch ring: reader processes write tiles into shared slots, only slot numbers cross the queue, a slot
is reused only after the main process released it, and the number of slots bounds memory."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.features.dataset import ReaderOptions, SlideBatchDataset, SlideSource, pack_batches
from wsi_pipeline.features.engine import _make_loader
from wsi_pipeline.features.reader import ReadSpec, open_tile_reader
from wsi_pipeline.features.ring import BatchRing, RingError, RingRows, ring_bytes, ring_slots
from wsi_pipeline.slide.open import open_slide


def _fill_after_acquire(ring: BatchRing, item: int, value: int, started: mp.Event) -> None:
    started.set()
    buf = ring.acquire(item, ring.tile_size)
    buf[:] = value


def test_a_forked_reader_writes_into_the_slot_only_after_its_release() -> None:
    ring = BatchRing(2, 4, 8)
    ring.acquire(0, 8)[:] = 7  # item 0 in slot 0, held by the main process
    started = mp.get_context("fork").Event()
    child = mp.get_context("fork").Process(target=_fill_after_acquire, args=(ring, 2, 9, started))  # slot 0 again
    child.start()
    assert started.wait(10)
    time.sleep(0.3)
    assert (ring.view(RingRows(0, 0, 4, 8)) == 7).all()  # the child waits: item 0 is still in use
    ring.release(0)
    child.join(10)
    assert child.exitcode == 0
    assert (ring.view(RingRows(0, 0, 4, 8)) == 9).all()  # written in place, seen here without any copy


def test_reading_in_the_main_process_never_waits_for_itself() -> None:
    ring = BatchRing(2, 4, 8)
    ring.acquire(0, 8)
    ring.acquire(1, 8)
    with pytest.raises(RingError, match="item 0 was never released"):
        ring.acquire(2, 8)
    ring.release(0)
    assert ring.acquire(2, 8).shape == (4, 8, 8, 3)
    ring.release(1)
    with pytest.raises(ValueError, match="16-px tiles"):
        ring.acquire(3, 16)


def test_slots_and_memory_formula() -> None:
    slot = ring_bytes(1, 256, 224)
    assert slot == 256 * 224 * 224 * 3  # 36.75 MiB
    assert ring_slots(0, 2, slot) == 2  # reading in the main process: the batch in use and the next
    assert ring_slots(2, 2, slot) == 6  # 2 readers x 2 ahead + 2 held by the main process
    assert ring_slots(14, 2, slot) == 27  # 30 wanted, bounded by 1 GiB of buffers
    assert ring_slots(14, 2, ring_bytes(1, 32, 224)) == 30  # small batches: not bounded
    assert ring_slots(40, 2, slot) == 42  # never fewer than one slot per reader (+2)
    assert ring_slots(14, 2, slot, total=8) == 10  # --prefetch-batches 8: the readers wait beyond that
    assert BatchRing(3, 5, 7).nbytes == ring_bytes(3, 5, 7)


@pytest.mark.parametrize("slots", [2, 6])
def test_reader_processes_hand_over_slot_numbers_and_pixels_arrive_intact(small_svs: Path, cmu_svs: Path,
                                                                           slots: int) -> None:
    """Two reader processes, two batches ahead each, through the engine's loader: every item is a list of
    (slide, positions, RingRows, '') — numpy positions, no tensors —, the slot's rows hold exactly the tiles
    of a direct read, also with fewer slots than items in flight (the readers then wait for releases)."""
    sources = []
    for path in (small_svs, cmu_svs):
        with open_slide(path) as s:
            (w, h), mpp = s.dimensions, s.mpp
        step = round(224 * 0.5 / mpp)
        xy = np.array([(x, y) for y in range(0, h - step, step) for x in range(0, w - step, step)], np.int64)[:13]
        sources.append(SlideSource(str(path), xy, ReadSpec(0.5, 224, mpp), step))
    items = pack_batches(sources, 5)
    ring = BatchRing(slots, 5, 224)
    ds = SlideBatchDataset(sources, items, ReaderOptions(decode="cpu-scaled"), ring)
    seen = 0
    for k, segments in enumerate(_make_loader(ds, 2, 2)):
        expect_start = 0
        for (si, positions, payload, err), (si_ref, pos_ref) in zip(segments, items[k], strict=True):
            assert not err and si == si_ref and isinstance(positions, np.ndarray)
            np.testing.assert_array_equal(positions, pos_ref)
            assert isinstance(payload, RingRows) and payload.slot == k % slots and payload.start == expect_start
            expect_start += payload.n
            src = sources[si]
            with open_tile_reader(src.slide_path, src.spec, decode="cpu-scaled") as r:
                np.testing.assert_array_equal(ring.view(payload), r.read_many(src.l0_xy[positions]))
            seen += payload.n
        ring.release(k)
    assert seen == 26
