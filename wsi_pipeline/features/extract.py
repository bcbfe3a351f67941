"""The extraction engine: tiles of many slides → encoder → ``RUN/features/<encoder>/<slide_id>.h5``.

One DataLoader streams batches of all slides of this process's shard (reader processes prefetch while the
model runs), features are put back in tiles-file order and each slide is written atomically as soon as
its last batch is done. Slides already extracted with the same parameters are skipped; a slide that
cannot be read is recorded as failed in ``RUN/slides.csv`` and the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline import formats as F
from wsi_pipeline.errors import ConfigError, TilesNotFoundError, WSIPipelineError
from wsi_pipeline.features.config import ExtractConfig
from wsi_pipeline.features.dataset import ReaderOptions, SlideSource
from wsi_pipeline.features.reader import ReadSpec
from wsi_pipeline.runfolder.executor import Progress, SlideItem, SlideOutcome, StageSummary, run_streaming
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.runfolder.status import STATUS_FAILED

log = logging.getLogger(__name__)

STAGE = "extract"
FEATURES_FORMAT = 1  # bump when the meaning of the features of a given encoder changes
MPP_WARN, MPP_ERROR = 0.05, 0.20  # relative mismatch of effective tile MPP vs the encoder's


@dataclass
class SlideJob:
    slide_id: str
    slide_path: str
    tiles: F.TileSet
    out_path: Path
    params_hash: str = ""
    seconds: float = 0.0  # wall time from its first batch to its last

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    @property
    def spec(self) -> ReadSpec:
        return ReadSpec(self.tiles.target_mpp, self.tiles.tile_size, self.tiles.slide_mpp)


# ---------------------------------------------------------------- planning
def slide_paths_from_status(layout: RunLayout) -> dict[str, str]:
    from wsi_pipeline.runfolder.status import STATUS_DONE, read_status

    return {r.slide_id: r.path for r in read_status(layout.slides_csv)
            if r.stage == "tile" and r.status == STATUS_DONE and r.path}


def _complete_tile_attrs(tiles: F.TileSet, slide_path: str, coords_file: Path,
                         slide_mpp: float | None) -> F.TileSet:
    """Fill target_mpp / slide_mpp / tile_size of foreign (CLAM, TRIDENT) coordinate files from the slide."""
    a = dict(tiles.attrs)
    if F.A_TILE_SIZE not in a:
        raise F.FormatError(coords_file, "no patch_size / tile_size attribute; cannot know the tile size")
    if F.A_SLIDE_MPP not in a:
        if a.get(F.A_LEVEL0_MAG):
            a[F.A_SLIDE_MPP] = 10.0 / float(a[F.A_LEVEL0_MAG])  # TRIDENT convention
        elif slide_mpp is not None:
            a[F.A_SLIDE_MPP] = float(slide_mpp)
        else:
            from wsi_pipeline.slide import open_slide

            with open_slide(slide_path) as s:
                a[F.A_SLIDE_MPP] = s.mpp_or_none or 1.0  # CLAM works in pixels: any consistent scale will do
                if s.mpp_or_none is None:
                    log.warning("%s: no MPP in the slide; reading CLAM coordinates in pixel units", slide_path)
    if F.A_TARGET_MPP not in a:
        # CLAM: patch_size px read at patch_level, whose downsample is stored
        ds = a.get("downsample")
        factor = float(np.asarray(ds).ravel()[0]) if ds is not None else 1.0
        a[F.A_TARGET_MPP] = float(a[F.A_SLIDE_MPP]) * factor
    if F.A_PATCH_SIZE_L0 not in a:
        a[F.A_PATCH_SIZE_L0] = round(int(a[F.A_TILE_SIZE]) * float(a[F.A_TARGET_MPP]) / float(a[F.A_SLIDE_MPP]))
    return F.TileSet(tiles.l0_xy, a)


def find_coords_files(coords_dir: Path) -> list[Path]:
    """CLAM writes ``<dir>/patches/<slide>.h5``; TRIDENT ``<dir>/<mag>x_<px>px_.../patches/<slide>_patches.h5``."""
    files = sorted(coords_dir.glob("*.h5"))
    if not files:
        files = sorted(coords_dir.glob("patches/*.h5")) or sorted(coords_dir.rglob("*.h5"))
    return files


def _slide_id_of_coords(path: Path) -> str:
    stem = path.stem
    return stem[: -len("_patches")] if stem.endswith("_patches") else stem


def plan_jobs(layout: RunLayout, encoder_name: str, cfg: ExtractConfig
              ) -> tuple[list[SlideJob], list[tuple[str, WSIPipelineError]]]:
    """Every slide to extract (all shards) and the slides that cannot even be planned (id, error)."""
    jobs: list[SlideJob] = []
    bad: list[tuple[str, WSIPipelineError]] = []
    if cfg.coords_dir is not None:
        from wsi_pipeline.slide import find_slides, slide_id_from_path

        coords_dir, slides_dir = Path(cfg.coords_dir), Path(str(cfg.slides_dir))
        files = find_coords_files(coords_dir)
        if not files:
            raise TilesNotFoundError(f"{coords_dir}: no coordinate .h5 files (CLAM patches/ or TRIDENT)")
        slides = {slide_id_from_path(p): p for p in find_slides([slides_dir], recursive=True)}
        for cf in files:
            sid = _slide_id_of_coords(cf)
            try:
                tiles = F.read_tiles_h5(cf)
                sid = str(tiles.attrs.get(F.A_SLIDE_ID) or sid)
                if sid not in slides:
                    raise TilesNotFoundError(f"{cf}: no slide named {sid}.* in {slides_dir}")
                sp = str(slides[sid])
                tiles = _complete_tile_attrs(tiles, sp, cf, cfg.slide_mpp)
                jobs.append(SlideJob(sid, sp, tiles, layout.features_h5(encoder_name, sid)))
            except WSIPipelineError as e:
                bad.append((sid, e))
        return jobs, bad
    ids = layout.slide_ids_with_tiles()
    if not ids:
        raise TilesNotFoundError(f"{layout.tiles_dir}: no tiles files — run `wsi tile SLIDES --out {layout.root}` "
                                 "first, or pass --coords-dir/--slides-dir for CLAM/TRIDENT coordinates")
    paths = slide_paths_from_status(layout)
    for sid in ids:
        try:
            tiles = F.read_tiles_h5(layout.tiles_h5(sid))
            missing = [k for k in F.TILE_ATTRS_REQUIRED if k not in tiles.attrs]
            if missing:
                raise F.FormatError(layout.tiles_h5(sid), f"missing tiling attributes {missing}; re-run `wsi tile`")
            sp = paths.get(sid) or str(tiles.attrs.get(F.A_SLIDE_PATH) or "")
            if not sp:
                raise F.FormatError(layout.tiles_h5(sid), "no slide path (slides.csv or slide_path attr); re-run `wsi tile`")
            jobs.append(SlideJob(sid, sp, tiles, layout.features_h5(encoder_name, sid)))
        except WSIPipelineError as e:
            bad.append((sid, e))
    return jobs, bad


def balanced_share(jobs: Sequence[SlideJob], index: int, count: int) -> list[SlideJob]:
    """This shard's slides: biggest first, each to the least-loaded shard (same answer on every rank)."""
    order = sorted(jobs, key=lambda j: (-j.n_tiles, j.slide_id))
    loads = [0] * count
    mine = []
    for j in order:
        r = min(range(count), key=lambda i: (loads[i], i))
        loads[r] += max(1, j.n_tiles)
        if r == index:
            mine.append(j)
    return mine


def job_params(job: SlideJob, encoder: Any, cfg: ExtractConfig) -> dict[str, Any]:
    """Everything that changes a slide's features: the resume key."""
    import hashlib

    return {
        "features_format": FEATURES_FORMAT,
        "encoder": encoder.meta.name,
        "weights_sha256": encoder.weights_sha256 or "random-init",
        "encoder_forward": encoder.forward_spec,
        "coords_sha1": hashlib.sha1(np.ascontiguousarray(job.tiles.l0_xy).tobytes()).hexdigest(),
        "target_mpp": round(job.tiles.target_mpp, 6),
        "slide_mpp": round(job.tiles.slide_mpp, 6),
        "tile_size": job.tiles.tile_size,
        "slide_path": os.path.basename(job.slide_path),
        "precision": cfg.precision,
        "dtype": cfg.dtype,
    }


def check_mpp(jobs: Sequence[SlideJob], encoder: Any, allow: bool) -> None:
    """The tiles' physical scale (after resizing to the encoder input) must match the encoder's."""
    meta = encoder.meta
    worst: tuple[float, SlideJob | None] = (0.0, None)
    for j in jobs:
        eff = j.tiles.target_mpp * j.tiles.tile_size / meta.input_size
        rel = abs(eff / meta.mpp - 1.0)
        if rel > worst[0]:
            worst = (rel, j)
    rel, j = worst
    if j is None or rel <= MPP_WARN:
        return
    eff = j.tiles.target_mpp * j.tiles.tile_size / meta.input_size
    msg = (f"encoder {meta.name} expects {meta.mpp:g} µm/px tiles but {j.slide_id} has {j.tiles.tile_size} px tiles "
           f"at {j.tiles.target_mpp:g} µm/px → {eff:.3g} µm/px at its {meta.input_size} px input")
    if rel > MPP_ERROR and not allow:
        raise ConfigError(msg + f" — re-tile with `wsi tile --target-mpp {meta.mpp:g}`, or pass --allow-mpp-mismatch")
    log.warning("%s", msg)


# ---------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group (gloo on CPU, NCCL on GPU) when WORLD_SIZE > 1; else a no-op."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return DistInfo()
    import datetime

    import torch.distributed as dist

    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=12))
        info.initialized_here = True
    return info


def finish_distributed(info: DistInfo, summary: StageSummary, device: Any) -> None:
    """Wait for every rank; rank 0 logs the totals."""
    if info.world <= 1 or not info.initialized_here:
        return
    import torch
    import torch.distributed as dist

    counts = torch.tensor([len(summary.done), len(summary.skipped), len(summary.failed), summary.figures["tiles"]],
                          dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(counts)
    if info.rank == 0:
        d, s, f, t = (int(v) for v in counts.tolist())
        log.warning("all %d ranks: extracted %d slides (%d tiles), skipped %d, failed %d", info.world, d, t, s, f)
    dist.destroy_process_group()


# ---------------------------------------------------------------- the stage
class ExtractStage:
    """Extraction as a streaming stage (:mod:`wsi_pipeline.runfolder.executor`): the slides still to do are
    streamed through one DataLoader and one model; each slide is written as soon as its last batch is done."""

    name = STAGE

    def __init__(self, layout: RunLayout, encoder: Any, cfg: ExtractConfig, device: Any,
                 jobs: Sequence[SlideJob], bad: Sequence[tuple[str, WSIPipelineError]]) -> None:
        self.layout, self.encoder, self.cfg, self.device = layout, encoder, cfg, device
        self.component = encoder.meta.name
        self.jobs = {j.slide_id: j for j in jobs}
        self.bad = dict(bad)
        self.stats: dict[str, float] = {}
        self.tiles = 0

    def items(self) -> list[SlideItem]:
        items = [SlideItem(sid, j.slide_path) for sid, j in self.jobs.items()]
        return sorted(items + [SlideItem(sid) for sid in self.bad], key=lambda it: it.slide_id)

    def key(self, item: SlideItem) -> str:
        if item.slide_id in self.bad:
            raise self.bad[item.slide_id]
        job = self.jobs[item.slide_id]
        remove_stale_temps(job.out_path)
        job.params_hash = F.params_hash(job_params(job, self.encoder, self.cfg))
        return job.params_hash

    def done(self, item: SlideItem, key: str) -> SlideOutcome | None:
        job = self.jobs[item.slide_id]
        if job.out_path.exists() and F.read_h5_attrs(job.out_path).get(F.A_PARAMS_HASH) == key:
            return SlideOutcome(item.slide_id, n_tiles=job.n_tiles, slide_mpp=job.tiles.slide_mpp)
        return None

    def units(self, todo: Sequence[tuple[SlideItem, str]]) -> int:
        return sum(self.jobs[it.slide_id].n_tiles for it, _ in todo)

    def stream(self, todo: Sequence[tuple[SlideItem, str]], emit_units: Callable[[int], None]
               ) -> Iterator[SlideOutcome]:
        jobs = [self.jobs[it.slide_id] for it, _ in todo]
        for job, feats, err in run_jobs(jobs, self.encoder, self.cfg, self.device, emit_units, self.stats):
            yield self._write(job, feats, err)

    def _write(self, job: SlideJob, feats: np.ndarray | None, err: str) -> SlideOutcome:
        out = SlideOutcome(job.slide_id, path=job.slide_path, n_tiles=job.n_tiles, slide_mpp=job.tiles.slide_mpp,
                           seconds=job.seconds)
        if err or feats is None:
            out.status, out.error, out.error_type = STATUS_FAILED, err, err.split(":", 1)[0]
            return out
        try:
            write_slide_features(job, feats, self.encoder, self.cfg)
        except (WSIPipelineError, OSError, ValueError) as e:  # this slide's output only; the run goes on
            out.status, out.error_type = STATUS_FAILED, type(e).__name__
            out.error = f"{type(e).__name__}: cannot write {job.out_path} ({e})"
        else:
            self.tiles += job.n_tiles
        return out


def run_extract(run_root: str | Path, cfg: ExtractConfig, progress: Progress | None = None) -> StageSummary:
    """Extract features for every tiled slide of ``run_root`` handled by this process's shard.

    The summary's ``figures``: ``encoder``, ``features_dir``, ``tiles`` (extracted), ``tiles_per_s``,
    ``wait_s`` (waiting for tiles: reading, or blocked on reader processes), ``compute_s`` (preprocess +
    forward; on CUDA only the launches)."""
    from wsi_pipeline.encoders import create_encoder, default_encoder_name, resolve_device
    from wsi_pipeline.runfolder.batch import parse_shard

    cfg.validate()
    layout = RunLayout(run_root)
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device.type)
    if device.type == "cuda" and dist_info.world > 1 and device.index is None:
        import torch

        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    encoder = create_encoder(cfg.encoder or default_encoder_name(), cfg.weights, device="cpu")
    jobs, bad = plan_jobs(layout, encoder.meta.name, cfg)
    shard = parse_shard(cfg.shard)
    mine = balanced_share(jobs, shard.index, shard.count)
    bad = [b for i, b in enumerate(sorted(bad, key=lambda b: b[0])) if i % shard.count == shard.index]
    check_mpp(jobs, encoder, cfg.allow_mpp_mismatch)  # every rank decides the same
    stage = ExtractStage(layout, encoder, cfg, device, mine, bad)
    summary = run_streaming(stage, stage.items(), layout, force=cfg.force, progress=progress)
    loop_s = stage.stats.get("loop_s", 0.0)
    summary.figures.update(encoder=encoder.meta.name, features_dir=str(layout.features_dir(encoder.meta.name)),
                           tiles=stage.tiles, tiles_per_s=stage.tiles / loop_s if loop_s > 0 else 0.0,
                           wait_s=stage.stats.get("wait_s", 0.0), compute_s=stage.stats.get("compute_s", 0.0),
                           loop_s=loop_s)
    finish_distributed(dist_info, summary, device)
    return summary


def remove_stale_temps(out_path: Path) -> None:
    """Delete temporary files a killed run left for this output (``atomic_path`` names: .<name>.*.tmp)."""
    if not out_path.parent.is_dir():
        return
    for tmp in out_path.parent.glob(f".{out_path.name}.*.tmp"):
        log.info("removing %s (left by an interrupted run)", tmp)
        tmp.unlink(missing_ok=True)


def write_slide_features(job: SlideJob, feats: np.ndarray, encoder: Any, cfg: ExtractConfig) -> None:
    """Atomic write of ``features`` + ``coords`` (tiles-file order) with the encoder and tiling attrs."""
    meta = encoder.meta
    t = job.tiles
    attrs = {
        F.A_ENCODER: meta.name,
        F.A_WEIGHTS_SHA256: encoder.weights_sha256 or "random-init",
        F.A_EMBED_DIM: int(meta.embed_dim),
        F.A_INPUT_SIZE: int(meta.input_size),
        F.A_PRECISION: cfg.precision,
        F.A_PARAMS_HASH: job.params_hash,
        F.A_SLIDE_ID: job.slide_id,
        F.A_NAME: job.slide_id,
        F.A_SLIDE_PATH: job.slide_path,
        F.A_TARGET_MPP: float(t.target_mpp),
        F.A_SLIDE_MPP: float(t.slide_mpp),
        F.A_TILE_SIZE: int(t.tile_size),
        F.A_PATCH_SIZE: int(t.tile_size),
        F.A_PATCH_SIZE_L0: int(t.attrs.get(F.A_PATCH_SIZE_L0, 0)),
        "encoder_mpp": float(meta.mpp),
        "encoder_arch": meta.arch,
        "encoder_licence": meta.licence,
        "features_format": FEATURES_FORMAT,
    }
    for k in (F.A_LEVEL0_W, F.A_LEVEL0_H):
        if k in t.attrs:
            attrs[k] = int(t.attrs[k])
    F.write_features_h5(job.out_path, feats.astype(cfg.dtype, copy=False), t.l0_xy, attrs)


# ---------------------------------------------------------------- the loop
def default_num_workers(device_type: str) -> int:
    """GPU: reader processes on all but one core, prefetching while the GPU computes. CPU: none — the
    model's threads use every core, so the next batch is read between forward passes, by the same number
    of threads (a reader process would preempt one compute thread and stall the other at each barrier)."""
    from wsi_pipeline.runfolder.batch import default_workers

    cores = default_workers()
    return max(1, min(16, cores - 1)) if device_type == "cuda" else 0


def run_jobs(
    jobs: Sequence[SlideJob],
    encoder: Any,
    cfg: ExtractConfig,
    device: Any,
    on_progress: Callable[[int], None] | None = None,
    stats: dict[str, float] | None = None,
) -> Iterator[tuple[SlideJob, np.ndarray | None, str]]:
    """Yield ``(job, features in tiles-file order, '')`` per slide, or ``(job, None, error)``.

    ``stats`` (if given) receives ``wait_s``: seconds spent waiting for tiles (reading in this process, or
    blocked on the reader processes), ``compute_s``: seconds in preprocess + forward (CPU; on CUDA only the
    launches), and ``loop_s``: seconds of the whole loop.

    Empty slides yield a (0, D) array. A reader-process crash fails the slide being read and the loader
    restarts with the remaining slides.
    """
    import torch

    from wsi_pipeline.encoders.base import autocast, prepare_for_inference
    from wsi_pipeline.features.dataset import SlideBatchDataset, plan_batches

    model = prepare_for_inference(encoder, device)
    channels_last = encoder.is_cnn
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed tile size: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
    fwd: Callable[[Any], Any] = model
    if cfg.compile:
        fwd = torch.compile(model, dynamic=False)
    sources = [SlideSource(j.slide_path, j.tiles.l0_xy, j.spec, j.tiles.tile_size_l0 or 1) for j in jobs]
    for j in jobs:
        if j.n_tiles == 0:
            yield j, np.zeros((0, encoder.embed_dim), dtype=np.float32), ""
    items = plan_batches(sources, cfg.batch_size)
    remaining = {si: sum(1 for s, _ in items if s == si) for si in range(len(jobs))}
    buffers: dict[int, np.ndarray] = {}
    started: dict[int, float] = {}
    failed: set[int] = set()
    num_workers = default_num_workers(device.type) if cfg.num_workers is None else cfg.num_workers
    threads = cfg.reader_threads or (torch.get_num_threads() if num_workers == 0 else 1)
    options = ReaderOptions(cfg.fast_reader, cfg.reduced_decode, cfg.cache_tiles, threads)
    pending: tuple[int, Any, Any] | None = None  # (source, positions, device output) awaiting copy-back

    def finish(si: int, positions: Any, y: Any) -> Iterator[tuple[SlideJob, np.ndarray | None, str]]:
        if si in failed:
            return
        out = y.float().cpu().numpy()
        buf = buffers.get(si)
        if buf is None:
            buf = buffers[si] = np.empty((jobs[si].n_tiles, out.shape[1]), dtype=np.float32)
        idx = positions.numpy()
        buf[idx] = out[: len(idx)]
        remaining[si] -= 1
        if on_progress:
            on_progress(len(idx))
        if remaining[si] == 0:
            jobs[si].seconds = time.perf_counter() - started.get(si, time.perf_counter())
            yield jobs[si], buffers.pop(si), ""

    def fail(si: int, err: str) -> Iterator[tuple[SlideJob, np.ndarray | None, str]]:
        if si in failed:
            return
        failed.add(si)
        buffers.pop(si, None)
        yield jobs[si], None, err

    todo = list(items)
    waited, computed, t_loop = 0.0, 0.0, time.perf_counter()
    careful = 0  # after a reader crash: this many items are read one at a time, to find the culprit
    while todo:
        if careful:
            chunk, rest = todo[:careful], todo[careful:]
            ds = SlideBatchDataset(sources, chunk, options)
            loader = _make_loader(ds, 1, 1, device.type == "cuda")
        else:
            chunk, rest = todo, []
            ds = SlideBatchDataset(sources, chunk, options)
            loader = _make_loader(ds, num_workers, cfg.prefetch_factor, device.type == "cuda")
        pos = 0
        try:
            with torch.inference_mode():
                with _no_async_worker_errors():
                    it = iter(loader)  # workers start here
                while True:
                    t_wait = time.perf_counter()
                    try:
                        si, positions, tiles, err = next(it)
                    except StopIteration:
                        break
                    waited += time.perf_counter() - t_wait
                    pos += 1
                    si = int(si)
                    if err:
                        yield from fail(si, err)
                        continue
                    if si in failed:
                        continue
                    started.setdefault(si, time.perf_counter())
                    t_compute = time.perf_counter()
                    x = tiles.to(device, non_blocking=True)
                    n = x.shape[0]
                    if cfg.compile and n < cfg.batch_size:  # keep one static shape for the compiled graph
                        x = torch.cat([x, x[-1:].expand(cfg.batch_size - n, *x.shape[1:])])
                    x = model.preprocess(x)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with autocast(device, cfg.precision):
                        y = fwd(x)
                    computed += time.perf_counter() - t_compute  # on CUDA: launch time only (asynchronous)
                    if pending is not None:  # copy back the previous batch while this one runs
                        yield from finish(*pending)
                    pending = (si, positions, y)
                if pending is not None:
                    yield from finish(*pending)
                    pending = None
            todo, careful = [it for it in rest if it[0] not in failed], 0
        except RuntimeError as e:
            if "DataLoader worker" not in str(e) or num_workers == 0:
                raise
            if pending is not None:
                yield from finish(*pending)
                pending = None
            left = [it for it in chunk[pos:] if it[0] not in failed] + [it for it in rest if it[0] not in failed]
            if careful:  # one item in flight: the one that was not delivered killed the reader
                culprit = chunk[min(pos, len(chunk) - 1)][0]
                log.warning("%s: the reader process died on this slide (%s)", jobs[culprit].slide_path, e)
                yield from fail(culprit, f"WorkerCrash: the reader process died reading this slide ({e})")
                careful = max(0, careful - pos - 1)
                todo = [it for it in left if it[0] != culprit]
            else:  # prefetching: the culprit is among the next few items; re-read them one at a time
                log.warning("a reader process died (%s); re-reading the next batches one at a time", e)
                careful = num_workers * cfg.prefetch_factor + 2
                todo = left
        finally:
            ds.close()
    if stats is not None:
        stats.update(wait_s=waited, compute_s=computed, loop_s=time.perf_counter() - t_loop)
    if items and waited > 0.1 * (time.perf_counter() - t_loop):
        log.info("waited for tiles %.0f%% of the time: reading is a bottleneck (try more --num-workers)",
                 100 * waited / (time.perf_counter() - t_loop))


def _make_loader(ds: Any, num_workers: int, prefetch_factor: int, pin: bool) -> Any:
    from torch.utils.data import DataLoader

    from wsi_pipeline.features.dataset import worker_init

    kwargs: dict[str, Any] = {"batch_size": None, "shuffle": False, "num_workers": num_workers, "pin_memory": pin}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, worker_init_fn=worker_init, persistent_workers=False,
                      multiprocessing_context="fork")
    return DataLoader(ds, **kwargs)


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


# ---------------------------------------------------------------- single slide, in memory
def extract_slide_features(
    slide_path: str | Path,
    l0_xy: np.ndarray,
    spec: ReadSpec,
    encoder: Any,
    cfg: ExtractConfig | None = None,
    device: str = "auto",
) -> np.ndarray:
    """Features (N, D) float32 of the tiles ``l0_xy`` of one slide, in the given order (nothing written)."""
    from wsi_pipeline.encoders import resolve_device

    cfg = (cfg or ExtractConfig()).validate()
    attrs = {F.A_TARGET_MPP: spec.target_mpp, F.A_SLIDE_MPP: spec.slide_mpp, F.A_TILE_SIZE: spec.tile_size,
             F.A_PATCH_SIZE_L0: round(spec.tile_size * spec.target_mpp / spec.slide_mpp)}
    job = SlideJob(Path(slide_path).stem, str(slide_path), F.TileSet(np.asarray(l0_xy, np.int64).reshape(-1, 2), attrs),
                   Path(os.devnull))
    for _, feats, err in run_jobs([job], encoder, cfg, resolve_device(device)):
        if err or feats is None:
            raise WSIPipelineError(f"{slide_path}: {err}")
        return feats
    raise WSIPipelineError(f"{slide_path}: no features produced")
