"""The extraction loop: batches of tiles (spanning slides) → device → encoder → features per slide.

Stages, overlapped on CUDA: reader processes read (and, unless the GPU decodes, decode) the next batches
while the GPU runs, writing the tiles straight into a slot of the shared, page-locked batch ring
(:mod:`wsi_pipeline.features.ring`: only slot numbers cross the process boundary, no per-batch buffers, no
pin-memory copy); pixels are copied host → device from there on a copy stream, and the slot is released as
soon as that copy has finished; JPEG tiles are
decoded and cut on the device (decode mode ``gpu``); preprocess + forward run on the compute stream;
features are copied device → host into pinned buffers on a third stream, and collected only once their copy
has finished, so the loop never waits for the batch it has just launched. Finished slides are yielded to the
caller (who writes them, see :class:`~wsi_pipeline.features.writer.SlideWriter`).

Main-process memory for batches: the ring, ``slots × batch_size × tile² × 3`` bytes (``ring_slots``: 2 per
reader process + 2, within 1 GiB by default, or ``--prefetch-batches`` + 2), page-locked on CUDA. The rest
of the main process (Python, torch, the CUDA context, the model) does not grow with the batch or the number
of readers; on the CPU add the float input batch (``batch_size × 3 × S² × 4`` bytes) and the activations.

Every forward pass has the same shape (the last batch is padded), so a tile's features do not depend on
which other slides share its batch: an interrupted run resumes to identical features.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_pipeline.features.config import ExtractConfig
from wsi_pipeline.features.dataset import ReaderOptions, Segment, SlideSource
from wsi_pipeline.features.ring import BatchRing, RingRows, ring_bytes, ring_slots

if TYPE_CHECKING:
    from wsi_pipeline.features.job import SlideJob

log = logging.getLogger(__name__)

Outcome = tuple["SlideJob", np.ndarray | None, str]
GPU_PROBE_MAX_MAD = 3.0  # mean abs difference (0-255) from libjpeg-turbo above which a JPEG flavour stays on the CPU
STAT_KEYS = ("wait_s", "h2d_s", "decode_s", "compute_s", "d2h_s", "collect_s", "loop_s")


def default_num_workers(device_type: str) -> int:
    """GPU: reader processes on all but one core, prefetching while the GPU computes. CPU: none — the
    model's threads use every core, so the next batch is read between forward passes, by the same number
    of threads (a reader process would preempt one compute thread and stall the other at each barrier)."""
    from wsi_pipeline.runfolder.batch import default_workers

    cores = default_workers()
    return max(1, min(16, cores - 1)) if device_type == "cuda" else 0


def prefetch_per_worker(cfg: ExtractConfig, num_workers: int) -> int:
    """Batches each reader process may have queued ahead in the DataLoader: ``prefetch_batches`` (a total, in
    batches) shared among the workers, at least 1 each; ``prefetch_factor`` when no total is set. The batch
    buffers themselves are bounded by the ring (:func:`~wsi_pipeline.features.ring.ring_slots`)."""
    if cfg.prefetch_batches is None:
        return cfg.prefetch_factor
    return max(1, -(-cfg.prefetch_batches // max(1, num_workers)))


# ---------------------------------------------------------------- collecting features per slide
@dataclass
class _Collector:
    """Per-slide feature buffers, filled batch by batch in tiles-file order; yields finished slides."""

    jobs: Sequence[SlideJob]
    embed_dim: int
    dtype: Any
    on_progress: Callable[[int], None] | None
    remaining: dict[int, int] = field(default_factory=dict)
    buffers: dict[int, np.ndarray] = field(default_factory=dict)
    started: dict[int, float] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)

    def start(self, si: int) -> None:
        self.started.setdefault(si, time.perf_counter())

    def put(self, segments: Sequence[tuple[int, np.ndarray]], feats: np.ndarray) -> Iterator[Outcome]:
        row = 0
        for si, idx in segments:
            n = len(idx)
            part = feats[row:row + n]
            row += n
            if si in self.failed:
                continue
            buf = self.buffers.get(si)
            if buf is None:
                buf = self.buffers[si] = np.empty((self.jobs[si].n_tiles, self.embed_dim), dtype=self.dtype)
            buf[idx] = part
            self.remaining[si] -= n
            if self.on_progress:
                self.on_progress(n)
            if self.remaining[si] == 0:
                job = self.jobs[si]
                job.seconds = time.perf_counter() - self.started.get(si, time.perf_counter())
                yield job, self.buffers.pop(si), ""

    def fail(self, si: int, err: str) -> Iterator[Outcome]:
        if si in self.failed:
            return
        self.failed.add(si)
        self.buffers.pop(si, None)
        yield self.jobs[si], None, err


# ---------------------------------------------------------------- device stages
@dataclass
class _InFlight:
    segments: list[tuple[int, np.ndarray]]
    n: int
    out: Any  # host tensor (pinned on CUDA) receiving the features
    done: Any = None  # CUDA event: features copied to the host
    t0: Any = None  # CUDA events around preprocess + forward
    t1: Any = None


class _Stages:
    """Host → device, decoding on the device, the model, device → host; with CUDA streams and events."""

    def __init__(self, model: Any, fwd: Callable[[Any], Any], device: Any, cfg: ExtractConfig, embed_dim: int,
                 out_dtype: Any, channels_last: bool) -> None:
        import torch

        self.torch = torch
        self.model, self.fwd, self.device, self.cfg = model, fwd, device, cfg
        self.channels_last = channels_last
        self.cuda = device.type == "cuda"
        self.out_dtype = torch.float16 if np.dtype(out_dtype) == np.float16 else torch.float32
        self.embed_dim = embed_dim
        self.gpu_model_s = 0.0
        self._pin_tried = False
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.back_stream = torch.cuda.Stream(device)
            self._host_ring: deque[Any] = deque()

    def to_device(self, payloads: list[Any], ring: BatchRing | None = None) -> tuple[Any, float, float, Any]:
        """uint8 (n, T, T, 3) on the device for the segments' payloads (ring rows, pixels or JPEG batches), in
        order; the seconds spent on copies and on decoding; and the CUDA event after which the ring slot may
        be reused (None: it may be reused once the forward pass has run). The usual batch — ring rows only,
        one after the other in their slot — is one view of the slot (CPU) or one copy of it (CUDA)."""
        torch = self.torch
        t = time.perf_counter()
        copied = None
        span = _one_span(payloads) if ring is not None else None
        if span is not None:
            x = self._ring_to_device(ring, span)
            copied = self._copied_event()
            return x, time.perf_counter() - t, 0.0, copied
        parts: list[Any] = [None] * len(payloads)
        for i, p in enumerate(payloads):
            if isinstance(p, RingRows) and ring is not None:
                parts[i] = self._ring_to_device(ring, p)
                copied = self._copied_event()
            elif not isinstance(p, dict):
                parts[i] = self._h2d(p)
        t_copy = time.perf_counter() - t
        jpeg = [i for i, p in enumerate(payloads) if isinstance(p, dict)]
        t = time.perf_counter()
        if jpeg:
            for i, tiles in zip(jpeg, self._decode([payloads[i] for i in jpeg]), strict=True):
                parts[i] = tiles
        t_decode = time.perf_counter() - t
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        return x, t_copy, t_decode, copied

    def _ring_to_device(self, ring: BatchRing, rows: RingRows) -> Any:
        """Tiles from their ring slot: a view on the CPU (no copy); on CUDA a copy (asynchronous from the
        page-locked ring, synchronous when it could not be locked)."""
        host = self.torch.from_numpy(ring.view(rows))
        if not self.cuda:
            return host
        if not ring.pinned and not self._pin_tried:
            self._pin_tried = True
            ring.pin()
        return self._h2d(host, blocking=not ring.pinned)

    def _copied_event(self) -> Any:
        if not self.cuda:
            return None
        ev = self.torch.cuda.Event()
        ev.record(self.copy_stream)
        return ev

    def copied(self, event: Any) -> bool:
        return event is None or bool(event.query())

    def wait_copied(self, event: Any) -> None:
        if event is not None:
            event.synchronize()

    def release_ring(self, ring: BatchRing) -> None:
        """Before the ring goes: wait for copies from it, then unlock its pages."""
        if self.cuda and ring.pinned:
            self.copy_stream.synchronize()
            ring.unpin()
        self._pin_tried = False

    def _h2d(self, tiles: Any, blocking: bool = False) -> Any:
        if not self.cuda:
            return tiles
        torch = self.torch
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            x = tiles.to(self.device, non_blocking=not blocking)
        compute.wait_stream(self.copy_stream)
        x.record_stream(compute)
        return x

    def _decode(self, batches: list[dict[str, Any]]) -> list[Any]:
        """All segments' stored tiles in one batched decode call, then each segment's output tiles."""
        from wsi_pipeline.features.gpu_decode import assemble_tiles, decode_streams

        torch = self.torch
        datas, offsets, counts = [], [0], []
        for b in batches:
            off = b["offsets"].numpy() if hasattr(b["offsets"], "numpy") else np.asarray(b["offsets"])
            datas.append(b["data"])
            offsets.extend((off[1:] + offsets[-1]).tolist())
            counts.append(len(off) - 1)
        data = datas[0] if len(datas) == 1 else torch.cat(datas)
        decoded = decode_streams(data, offsets, self.device)
        out, k = [], 0
        for b, c in zip(batches, counts, strict=True):
            out.append(assemble_tiles(decoded[k:k + c], b, self.device))
            k += c
        return out

    def forward(self, x: Any) -> tuple[Any, Any, Any]:
        """Features (batch, D) on the device, and CUDA events around the work (None on CPU). The batch is
        padded to ``batch_size`` so every forward pass has one shape."""
        from wsi_pipeline.encoders.base import autocast

        torch = self.torch
        n = x.shape[0]
        if n < self.cfg.batch_size:
            x = torch.cat([x, x[-1:].expand(self.cfg.batch_size - n, *x.shape[1:])])
        t0 = t1 = None
        if self.cuda:
            t0 = torch.cuda.Event(enable_timing=True)
            t0.record()
        x = self.model.preprocess(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.cfg.precision):
            y = self.fwd(x)
        if self.cuda:
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record()
        return y[:n], t0, t1

    def to_host(self, y: Any, flight: _InFlight) -> None:
        """Start copying the features to the host (CUDA: on the copy-back stream, into a pinned buffer)."""
        torch = self.torch
        if not self.cuda:
            flight.out = y.float().numpy()
            return
        y = y.to(self.out_dtype)
        buf = self._pinned(y.shape[0])
        self.back_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.back_stream):
            buf.copy_(y, non_blocking=True)
            flight.done = torch.cuda.Event()
            flight.done.record()
        y.record_stream(self.back_stream)
        flight.out = buf

    def _pinned(self, n: int) -> Any:
        torch = self.torch
        ring = self._host_ring
        buf = None
        if len(ring) > 8:  # recycle the oldest buffer: its batch has been collected long ago
            buf = ring.popleft()
        if buf is None or buf.shape[0] < n:
            buf = torch.empty((max(n, self.cfg.batch_size), self.embed_dim), dtype=self.out_dtype, pin_memory=True)
        ring.append(buf)
        return buf[:n]

    def ready(self, flight: _InFlight) -> bool:
        return flight.done is None or bool(flight.done.query())

    def collect(self, flight: _InFlight) -> np.ndarray:
        """The features on the host (waits for the copy)."""
        if not self.cuda:
            return flight.out
        flight.done.synchronize()
        if flight.t0 is not None:
            self.gpu_model_s += flight.t0.elapsed_time(flight.t1) / 1000.0
        return flight.out.numpy()


# ---------------------------------------------------------------- the loop
def run_jobs(
    jobs: Sequence[SlideJob],
    encoder: Any,
    cfg: ExtractConfig,
    device: Any,
    on_progress: Callable[[int], None] | None = None,
    stats: dict[str, Any] | None = None,
    out_dtype: Any = np.float32,
    decode: DecodePlan | None = None,
) -> Iterator[Outcome]:
    """Yield ``(job, features in tiles-file order, '')`` per slide, or ``(job, None, error)``.

    ``out_dtype``: dtype of the yielded features (float32, or the stored float16 to halve memory and copies).
    ``decode``: the resolved decode mode (:func:`resolve_decode`; default: resolved from ``cfg.decode``).
    ``stats`` (if given) receives the loop breakdown in seconds — ``wait_s`` (waiting for the readers, or
    reading in this process), ``h2d_s`` (issuing host → device copies), ``decode_s`` (device decoding and
    cutting; nvJPEG blocks until it is done), ``compute_s`` (preprocess + forward: all of it on CPU, launches
    on CUDA), ``d2h_s`` (waiting for features to reach the host), ``collect_s`` (filling slide buffers and the
    caller's handling of finished slides), ``loop_s`` (all) — plus ``gpu_model_s`` (CUDA: device time of
    preprocess + forward), ``decode`` (the decode mode that ran), ``batches`` and ``tiles``.

    Empty slides yield a (0, D) array. A reader-process crash fails the slide being read and the loader
    restarts with the remaining slides.
    """
    import torch

    from wsi_pipeline.encoders.base import prepare_for_inference
    from wsi_pipeline.features.dataset import SlideBatchDataset, pack_batches, split_segments

    model = prepare_for_inference(encoder, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed tile size: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
    fwd: Callable[[Any], Any] = torch.compile(model, dynamic=False) if cfg.compile else model
    plan = decode or resolve_decode(cfg.decode, device)
    sources = [SlideSource(j.slide_path, j.tiles.l0_xy, j.spec, j.tiles.tile_size_l0 or 1) for j in jobs]
    for j in jobs:
        if j.n_tiles == 0:
            yield j, np.zeros((0, encoder.embed_dim), dtype=out_dtype), ""
    items = pack_batches(sources, cfg.batch_size)
    col = _Collector(jobs, encoder.embed_dim, out_dtype, on_progress)
    for item in items:
        for si, idx in item:
            col.remaining[si] = col.remaining.get(si, 0) + len(idx)
    num_workers = default_num_workers(device.type) if cfg.num_workers is None else cfg.num_workers
    threads = cfg.reader_threads or (torch.get_num_threads() if num_workers == 0 else 1)
    options = ReaderOptions(cfg.fast_reader, plan.mode, cfg.cache_tiles, threads, plan.gpu_rgb)
    stages = _Stages(model, fwd, device, cfg, encoder.embed_dim, out_dtype, encoder.is_cnn)
    times = dict.fromkeys(STAT_KEYS, 0.0)
    max_inflight = 3 if device.type == "cuda" else 0
    inflight: deque[_InFlight] = deque()
    n_batches = n_tiles = 0

    def drain(keep: int) -> Iterator[Outcome]:
        while len(inflight) > keep or (inflight and stages.ready(inflight[0])):
            flight = inflight.popleft()
            t = time.perf_counter()
            feats = stages.collect(flight)
            t1 = time.perf_counter()
            times["d2h_s"] += t1 - t
            yield from col.put(flight.segments, feats)
            times["collect_s"] += time.perf_counter() - t1

    todo = list(items)
    tile_max = max((src.spec.tile_size for src in sources), default=1)
    t_loop = time.perf_counter()
    careful = 0  # after a reader crash: this many items are read one at a time, to find the culprit
    while todo:
        if careful:
            chunk, rest = split_segments(todo[:careful]), todo[careful:]
            workers, per_worker = 1, 1
        else:
            chunk, rest = todo, []
            workers, per_worker = num_workers, prefetch_per_worker(cfg, num_workers)
        # one ring per loader: readers of an earlier loader can never write into this one
        slots = ring_slots(workers, per_worker, ring_bytes(1, cfg.batch_size, tile_max),
                           None if careful else cfg.prefetch_batches)
        ring = BatchRing(slots, cfg.batch_size, tile_max)
        ds = SlideBatchDataset(sources, chunk, options, ring)
        loader = _make_loader(ds, workers, per_worker)
        held: deque[tuple[int, Any]] = deque()  # items whose ring slot is still in use: (item, copy event)
        pos = 0
        try:
            with torch.inference_mode():
                with _no_async_worker_errors():
                    it = iter(loader)  # workers start here
                while True:
                    _free_slots(stages, ring, held, keep=1)
                    t = time.perf_counter()
                    try:
                        segments = next(it)
                    except StopIteration:
                        break
                    times["wait_s"] += time.perf_counter() - t
                    k = pos
                    pos += 1
                    live: list[tuple[int, np.ndarray]] = []
                    payloads = []
                    for si, positions, payload, err in segments:
                        si = int(si)
                        if err:
                            yield from col.fail(si, err)
                        elif si not in col.failed:
                            col.start(si)
                            live.append((si, np.asarray(positions)))
                            payloads.append(payload)
                    if not live:
                        ring.release(k)
                        continue
                    x, t_copy, t_dec, copied = stages.to_device(payloads, ring)
                    times["h2d_s"] += t_copy
                    times["decode_s"] += t_dec
                    t = time.perf_counter()
                    n = int(x.shape[0])
                    y, e0, e1 = stages.forward(x)
                    del x
                    held.append((k, copied))  # on the CPU (copied None) released before the next item
                    flight = _InFlight(live, n, None, None, e0, e1)
                    stages.to_host(y, flight)
                    times["compute_s"] += time.perf_counter() - t  # on CUDA: launch time only (asynchronous)
                    inflight.append(flight)
                    n_batches += 1
                    n_tiles += flight.n
                    yield from drain(max_inflight)
                yield from drain(0)
            todo, careful = [it for it in rest if _alive(it, col.failed)], 0
        except RuntimeError as e:
            if "DataLoader worker" not in str(e) or num_workers == 0:
                raise
            yield from drain(0)
            left = [_alive_part(it, col.failed) for it in chunk[pos:] + rest]
            left = [it for it in left if it]
            if careful:  # one segment in flight: the one that was not delivered killed the reader
                culprit = chunk[min(pos, len(chunk) - 1)][0][0]
                log.warning("%s: the reader process died on this slide (%s)", jobs[culprit].slide_path, e)
                yield from col.fail(culprit, f"WorkerCrash: the reader process died reading this slide ({e})")
                careful = max(0, careful - pos - 1)
                todo = [p for p in (_without(it, culprit) for it in left) if p]
            else:  # prefetching: the culprit is among the next few items; re-read them one at a time
                log.warning("a reader process died (%s); re-reading the next batches one at a time", e)
                careful = num_workers * prefetch_per_worker(cfg, num_workers) + 2
                todo = left
        finally:
            ds.close()
            stages.release_ring(ring)
    loop_s = time.perf_counter() - t_loop
    times["loop_s"] = loop_s
    if stats is not None:
        stats.update(times)
        stats.update(gpu_model_s=stages.gpu_model_s, decode=plan.key, batches=n_batches, tiles=n_tiles)
    if items and times["wait_s"] > 0.1 * loop_s:
        log.info("waited for tiles %.0f%% of the time: reading is a bottleneck (try more --num-workers)",
                 100 * times["wait_s"] / loop_s)


def _one_span(payloads: Sequence[Any]) -> RingRows | None:
    """The payloads as one run of ring rows, when they are ring rows that follow each other in one slot."""
    if not payloads or not all(isinstance(p, RingRows) for p in payloads):
        return None
    for a, b in itertools.pairwise(payloads):
        if b.slot != a.slot or b.tile != a.tile or b.start != a.start + a.n:
            return None
    first = payloads[0]
    return RingRows(first.slot, first.start, sum(p.n for p in payloads), first.tile)


def _free_slots(stages: _Stages, ring: BatchRing, held: deque[tuple[int, Any]], keep: int) -> None:
    """Release the ring slots of ``held`` items whose host → device copy is done, and the oldest ones beyond
    ``keep`` (waiting for their copy)."""
    while held and (len(held) > keep or stages.copied(held[0][1])):
        k, ev = held.popleft()
        stages.wait_copied(ev)
        ring.release(k)


def _alive(item: tuple[Segment, ...], failed: set[int]) -> bool:
    return any(si not in failed for si, _ in item)


def _alive_part(item: tuple[Segment, ...], failed: set[int]) -> tuple[Segment, ...]:
    return tuple(seg for seg in item if seg[0] not in failed)


def _without(item: tuple[Segment, ...], si: int) -> tuple[Segment, ...]:
    return tuple(seg for seg in item if seg[0] != si)


@dataclass(frozen=True)
class DecodePlan:
    """The decode mode that runs, and (``gpu``) whether RGB-coded JPEG tiles go to the GPU too (when not,
    the reader processes decode those slides as ``cpu-scaled``)."""

    mode: str
    gpu_rgb: bool = True

    @property
    def key(self) -> str:
        """What the features record (h5 ``decode`` attribute, resume key)."""
        return self.mode if self.mode != "gpu" or self.gpu_rgb else "gpu/rgb-on-cpu-scaled"


def resolve_decode(mode: str, device: Any) -> DecodePlan:
    """``auto`` → ``cpu-scaled`` (everywhere: see :mod:`wsi_pipeline.features.decode` for the measurements);
    ``gpu`` → ``gpu`` when the device is CUDA and nvJPEG decodes like libjpeg-turbo (checked on small JPEGs
    of each flavour), otherwise ``cpu-scaled`` with a warning; RGB-coded tiles that the device decodes
    wrongly are decoded by the readers (``cpu-scaled``)."""
    from wsi_pipeline.features.decode import resolve_decode_mode

    resolved = resolve_decode_mode(mode, device)
    if resolved != "gpu":
        return DecodePlan(resolved)
    from wsi_pipeline.features.gpu_decode import probe_gpu_decoding

    try:
        mad = probe_gpu_decoding(device)
    except (RuntimeError, ValueError, OSError) as e:
        log.warning("--decode gpu: decoding on %s failed (%s); decoding on the CPU instead (cpu-scaled)", device, e)
        return DecodePlan("cpu-scaled")
    if mad["ycbcr"] > GPU_PROBE_MAX_MAD:
        log.warning("--decode gpu: %s decodes JPEGs %.1f levels away from libjpeg-turbo; decoding on the CPU "
                    "instead (cpu-scaled)", device, mad["ycbcr"])
        return DecodePlan("cpu-scaled")
    if mad["rgb"] > GPU_PROBE_MAX_MAD:
        log.warning("--decode gpu: %s does not decode RGB-coded JPEG tiles (Aperio) as RGB (%.1f levels off); the "
                    "reader processes decode those slides (cpu-scaled)", device, mad["rgb"])
        return DecodePlan("gpu", gpu_rgb=False)
    return DecodePlan("gpu")


def _make_loader(ds: Any, num_workers: int, prefetch_factor: int) -> Any:
    """Items in order, from ``num_workers`` forked reader processes (or this process), as they are. No
    pin-memory thread: pixels arrive in the page-locked ring, JPEG payloads are read by nvJPEG from any host
    memory."""
    from torch.utils.data import DataLoader

    from wsi_pipeline.features.dataset import worker_init

    kwargs: dict[str, Any] = {"batch_size": None, "shuffle": False, "num_workers": num_workers, "pin_memory": False,
                              "collate_fn": _as_is}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, worker_init_fn=worker_init, persistent_workers=False,
                      multiprocessing_context="fork")
    return DataLoader(ds, **kwargs)


def _as_is(item: Any) -> Any:
    """The loader's conversion step: none (its default turns every numpy array into a tensor, and every
    tensor crosses between processes as a shared-memory segment of its own)."""
    return item


@contextlib.contextmanager
def _no_async_worker_errors() -> Iterator[None]:
    """While our loader's workers start, keep PyTorch from installing its SIGCHLD handler, which raises
    "DataLoader worker exited" at an arbitrary point of the main thread (even while a features file is being
    written). Without it the loader still reports a dead worker, synchronously, from ``next()`` (within
    ~5 s), where the engine can attribute it to a slide and go on. The flag (private to torch, hence the
    ``hasattr`` guard) is restored afterwards, so other DataLoaders of the process behave as usual."""
    from torch.utils.data._utils import signal_handling

    if not hasattr(signal_handling, "_SIGCHLD_handler_set"):
        yield
        return
    before = signal_handling._SIGCHLD_handler_set
    signal_handling._SIGCHLD_handler_set = True
    try:
        yield
    finally:
        signal_handling._SIGCHLD_handler_set = before
