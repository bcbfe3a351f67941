"""The extraction stage: tiles of many slides → encoder → ``RUN/features/<encoder>/<slide_id>.h5``.

One DataLoader streams batches of all slides of this process's shard, batches running across slide
boundaries (the loop: :mod:`wsi_pipeline.features.engine`); features are put back in tiles-file order and
each slide is written atomically, on a writer thread, as soon as its last batch is done. Slides already extracted with the same parameters are skipped; a slide that
cannot be read is recorded as failed in ``RUN/slides.csv`` and the others go on.
"""

from __future__ import annotations

import heapq
import logging
import os
import queue
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import ConfigError, FormatError, TilesNotFoundError, WSIPipelineError
from wsi_pipeline.features.config import ExtractConfig
from wsi_pipeline.features.engine import DecodePlan, resolve_decode, run_jobs
from wsi_pipeline.features.job import SlideJob
from wsi_pipeline.features.reader import ReadSpec
from wsi_pipeline.features.writer import SlideWriter
from wsi_pipeline.formats import api as F
from wsi_pipeline.runfolder.batch import Shard
from wsi_pipeline.runfolder.executor import Progress, SlideItem, SlideOutcome, StageSummary, run_streaming
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.runfolder.status import STATUS_FAILED

log = logging.getLogger(__name__)

STAGE = "extract"
FEATURES_FORMAT = 1  # bump when the meaning of the features of a given encoder changes
MPP_WARN, MPP_ERROR = 0.05, 0.20  # relative mismatch of effective tile MPP vs the encoder's


# ---------------------------------------------------------------- planning
def slide_paths_from_status(layout: RunLayout) -> dict[str, str]:
    return {sid: path for sid, (path, _) in tiled_slides_from_status(layout).items() if path}


def tiled_slides_from_status(layout: RunLayout) -> dict[str, tuple[str, int | None]]:
    """slide_id → (slide path, tiles) of the slides whose tiling row is done or skipped (one read of the
    status; tiles None where the row has no count)."""
    from wsi_pipeline.runfolder.status import STATUS_DONE, STATUS_SKIPPED, read_status

    out: dict[str, tuple[str, int | None]] = {}
    for r in read_status(layout.slides_csv):
        if r.stage == "tile" and r.status in (STATUS_DONE, STATUS_SKIPPED):
            n = str(r.n_tiles)
            out[r.slide_id] = (r.path, int(n) if n.isdigit() else None)
    return out


def _complete_tile_attrs(tiles: F.TileSet, slide_path: str, coords_file: Path,
                         slide_mpp: float | None) -> F.TileSet:
    """Fill target_mpp / slide_mpp / tile_size of foreign (CLAM, TRIDENT) coordinate files from the slide."""
    a = dict(tiles.attrs)
    if F.A_TILE_SIZE not in a:
        raise FormatError(coords_file, "no patch_size / tile_size attribute; cannot know the tile size")
    if F.A_SLIDE_MPP not in a:
        if a.get(F.A_LEVEL0_MAG):
            a[F.A_SLIDE_MPP] = 10.0 / float(a[F.A_LEVEL0_MAG])  # TRIDENT convention
        elif slide_mpp is not None:
            a[F.A_SLIDE_MPP] = float(slide_mpp)
        else:
            from wsi_pipeline.slide.open import open_slide

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


def plan_jobs(layout: RunLayout, encoder_name: str, cfg: ExtractConfig, shard: Shard | None = None
              ) -> tuple[list[SlideJob], list[tuple[str, WSIPipelineError]]]:
    """The slides of ``shard`` (default: all) to extract and those that cannot be planned (id, error).

    In a RUN folder the shards are balanced on the tile counts of the status table's tiling rows (a tiles
    file without one: its dataset's shape), so a rank reads only its own slides' tiles files."""
    shard = shard or Shard()
    if cfg.coords_dir is None:
        return _plan_run(layout, encoder_name, shard, cfg.slide_dirs)
    jobs, bad = _plan_coords(layout, encoder_name, cfg)
    return balanced_share(jobs, shard.index, shard.count), _share_bad(bad, shard)


def _share_bad(bad: list[tuple[str, WSIPipelineError]], shard: Shard) -> list[tuple[str, WSIPipelineError]]:
    return [b for i, b in enumerate(sorted(bad, key=lambda b: b[0])) if i % shard.count == shard.index]


def _plan_coords(layout: RunLayout, encoder_name: str, cfg: ExtractConfig
                 ) -> tuple[list[SlideJob], list[tuple[str, WSIPipelineError]]]:
    """Every slide of a CLAM / TRIDENT coordinates folder (all shards), tiles read."""
    from wsi_pipeline.slide.base import slide_id_from_path
    from wsi_pipeline.slide.open import find_slides

    jobs: list[SlideJob] = []
    bad: list[tuple[str, WSIPipelineError]] = []
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


def _plan_run(layout: RunLayout, encoder_name: str, shard: Shard, slide_dirs: Sequence[str] = ()
              ) -> tuple[list[SlideJob], list[tuple[str, WSIPipelineError]]]:
    """This shard's slides of a RUN folder: one scan of RUN/tiles, one read of the status, sizes from its
    tiling rows; then only this shard's tiles files are read (their slides looked for in ``slide_dirs`` when
    they moved)."""
    ids = layout.slide_ids_with_tiles()
    if not ids:
        raise TilesNotFoundError(f"{layout.tiles_dir}: no tiles files — run `wsi tile SLIDES --out {layout.root}` "
                                 "first, or pass --coords-dir/--slides-dir for CLAM/TRIDENT coordinates")
    rows = tiled_slides_from_status(layout)
    sized: list[SlideJob] = []
    bad: list[tuple[str, WSIPipelineError]] = []
    for sid in ids:
        path, n = rows.get(sid, ("", None))
        try:
            n = F.read_tiles_count(layout.tiles_h5(sid)) if n is None else n
        except WSIPipelineError as e:
            bad.append((sid, e))
            continue
        sized.append(SlideJob(sid, path, None, layout.features_h5(encoder_name, sid), size=n))
    jobs: list[SlideJob] = []
    mine_bad = _share_bad(bad, shard)
    for job in balanced_share(sized, shard.index, shard.count):
        try:
            jobs.append(_with_tiles(layout, job, slide_dirs))
        except WSIPipelineError as e:
            mine_bad.append((job.slide_id, e))
    return jobs, mine_bad


def _with_tiles(layout: RunLayout, job: SlideJob, slide_dirs: Sequence[str] = ()) -> SlideJob:
    """``job`` with its tiles read and checked, and its slide path (the status's, else the tiles file's; looked
    for by name in ``slide_dirs`` when it moved)."""
    from wsi_pipeline.slide.open import require_recorded_slide

    tiles_file = layout.tiles_h5(job.slide_id)
    tiles = F.read_tiles_h5(tiles_file)
    missing = [k for k in F.TILE_ATTRS_REQUIRED if k not in tiles.attrs]
    if missing:
        raise FormatError(tiles_file, f"missing tiling attributes {missing}; re-run `wsi tile`")
    job.slide_path = job.slide_path or str(tiles.attrs.get(F.A_SLIDE_PATH) or "")
    if not job.slide_path:
        raise FormatError(tiles_file, "no slide path (slides.csv or slide_path attr); re-run `wsi tile`")
    if len(tiles):
        job.slide_path = require_recorded_slide(job.slide_path, slide_dirs)
    job.tiles = tiles
    return job


def balanced_share(jobs: Sequence[SlideJob], index: int, count: int) -> list[SlideJob]:
    """This shard's slides: biggest first, each to the least-loaded shard, ties to the lowest shard (same
    answer on every rank)."""
    order = sorted(jobs, key=lambda j: (-j.n_tiles, j.slide_id))
    loads = [(0, i) for i in range(count)]  # a heap of (load, shard)
    mine = []
    for j in order:
        load, r = loads[0]
        heapq.heapreplace(loads, (load + max(1, j.n_tiles), r))
        if r == index:
            mine.append(j)
    return mine


def job_params(job: SlideJob, encoder: Any, cfg: ExtractConfig, decode: str | None = None) -> dict[str, Any]:
    """Everything that changes a slide's features: the resume key. ``decode``: the decode mode that runs
    (:func:`~wsi_pipeline.features.engine.resolve_decode`; default ``cfg.decode``)."""
    import hashlib

    return {
        "features_format": FEATURES_FORMAT,
        "encoder": encoder.meta.name,
        "weights_sha256": encoder.weights_id,  # the checksum, or random-init:seed<N>
        "encoder_forward": encoder.forward_spec,
        "coords_sha1": hashlib.sha1(np.ascontiguousarray(job.tiles.l0_xy).tobytes()).hexdigest(),
        "target_mpp": round(job.tiles.target_mpp, 6),
        "slide_mpp": round(job.tiles.slide_mpp, 6),
        "tile_size": job.tiles.tile_size,
        "slide_path": os.path.basename(job.slide_path),
        "precision": cfg.precision,
        "dtype": cfg.dtype,
        "decode": decode or cfg.decode,
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
        raise ConfigError(msg + f" — tile at --target-mpp {meta.mpp:g} (with a {meta.input_size} px --tile-size), "
                                "or accept the mismatch with `wsi extract --allow-mpp-mismatch`")
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
    unit = "tiles"

    def __init__(self, layout: RunLayout, encoder: Any, cfg: ExtractConfig, device: Any, decode: DecodePlan,
                 jobs: Sequence[SlideJob], bad: Sequence[tuple[str, WSIPipelineError]]) -> None:
        self.layout, self.encoder, self.cfg, self.device, self.decode = layout, encoder, cfg, device, decode
        self.component = encoder.meta.name
        self.jobs = {j.slide_id: j for j in jobs}
        self.bad = dict(bad)
        self.stats: dict[str, Any] = {}
        self.tiles = 0

    def items(self) -> list[SlideItem]:
        items = [SlideItem(sid, j.slide_path) for sid, j in self.jobs.items()]
        return sorted(items + [SlideItem(sid) for sid in self.bad], key=lambda it: it.slide_id)

    def key(self, item: SlideItem) -> str:
        if item.slide_id in self.bad:
            raise self.bad[item.slide_id]
        job = self.jobs[item.slide_id]
        remove_stale_temps(job.out_path)
        job.params_hash = F.params_hash(job_params(job, self.encoder, self.cfg, self.decode.key))
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
        """Slides come out of the loop as their last batch is done and are written on a writer thread (the
        loop never waits for a write); their outcomes are handed back here, on the calling thread."""
        jobs = [self.jobs[it.slide_id] for it, _ in todo]
        written: queue.SimpleQueue[SlideOutcome] = queue.SimpleQueue()
        with SlideWriter(lambda job, feats, err: written.put(self._write(job, feats, err))) as writer:
            for job, feats, err in run_jobs(jobs, self.encoder, self.cfg, self.device, emit_units, self.stats,
                                            out_dtype=np.dtype(self.cfg.dtype), decode=self.decode):
                writer.put(job, feats, err)
                yield from _drain(written)
        yield from _drain(written)
        self.stats.update(writer_busy_s=writer.busy_s, writer_blocked_s=writer.blocked_s)

    def _write(self, job: SlideJob, feats: np.ndarray | None, err: str) -> SlideOutcome:
        out = SlideOutcome(job.slide_id, path=job.slide_path, n_tiles=job.n_tiles, slide_mpp=job.tiles.slide_mpp,
                           seconds=job.seconds)
        if err or feats is None:
            etype, sep, message = err.partition(": ")  # the engine reports "ErrorType: message"
            typed = bool(sep) and etype.isidentifier()
            out.status, out.error_type = STATUS_FAILED, etype if typed else "WSIPipelineError"
            out.error = message if typed else err or "no features produced"
            return out
        try:
            write_slide_features(job, feats, self.encoder, self.cfg, self.decode.key)
        except (WSIPipelineError, OSError, ValueError) as e:  # this slide's output only; the run goes on
            out.status, out.error_type = STATUS_FAILED, type(e).__name__
            out.error = f"cannot write {job.out_path} ({e})"
        else:
            self.tiles += job.n_tiles
        return out


def run_extract(run_root: str | Path, cfg: ExtractConfig, progress: Progress | None = None) -> StageSummary:
    """Extract features for every tiled slide of ``run_root`` handled by this process's shard.

    The summary's ``figures``: ``encoder``, ``features_dir``, ``tiles`` (extracted), ``tiles_per_s``,
    ``wait_s`` (waiting for tiles: reading, or blocked on reader processes), ``compute_s`` (preprocess +
    forward; on CUDA only the launches)."""
    from wsi_pipeline.encoders.base import resolve_device
    from wsi_pipeline.encoders.registry import create_encoder, default_encoder_name
    from wsi_pipeline.runfolder.batch import parse_shard

    cfg.validate()
    layout = RunLayout(run_root)
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device.type)
    if device.type == "cuda" and dist_info.world > 1 and device.index is None:
        import torch

        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    encoder = create_encoder(cfg.encoder or default_encoder_name(), cfg.weights, device="cpu", init_seed=cfg.init_seed)
    decode = resolve_decode(cfg.decode, device)
    mine, bad = plan_jobs(layout, encoder.meta.name, cfg, parse_shard(cfg.shard))
    check_mpp(mine, encoder, cfg.allow_mpp_mismatch)  # each rank checks the slides it extracts
    stage = ExtractStage(layout, encoder, cfg, device, decode, mine, bad)
    summary = run_streaming(stage, stage.items(), layout, force=cfg.force, progress=progress)
    loop_s = stage.stats.get("loop_s", 0.0)
    summary.figures.update(encoder=encoder.meta.name, features_dir=str(layout.features_dir(encoder.meta.name)),
                           tiles=stage.tiles, tiles_per_s=stage.tiles / loop_s if loop_s > 0 else 0.0,
                           wait_s=stage.stats.get("wait_s", 0.0), compute_s=stage.stats.get("compute_s", 0.0),
                           loop_s=loop_s, decode=decode.key, stats=dict(stage.stats))
    finish_distributed(dist_info, summary, device)
    return summary


def _drain(q: queue.SimpleQueue[SlideOutcome]) -> Iterator[SlideOutcome]:
    while not q.empty():
        yield q.get()


def remove_stale_temps(out_path: Path) -> None:
    """Delete temporary files a killed run left for this output (``atomic_path`` names: .<name>.*.tmp)."""
    if not out_path.parent.is_dir():
        return
    for tmp in out_path.parent.glob(f".{out_path.name}.*.tmp"):
        log.info("removing %s (left by an interrupted run)", tmp)
        tmp.unlink(missing_ok=True)


def write_slide_features(job: SlideJob, feats: np.ndarray, encoder: Any, cfg: ExtractConfig,
                         decode: str = "") -> None:
    """Atomic write of ``features`` + ``coords`` (tiles-file order) with the encoder and tiling attrs, and
    the decode mode the tiles were read with."""
    meta = encoder.meta
    t = job.tiles
    attrs = {
        F.A_ENCODER: meta.name,
        F.A_WEIGHTS_SHA256: encoder.weights_id,
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
        "decode": decode or cfg.decode,
    }
    for k in (F.A_LEVEL0_W, F.A_LEVEL0_H):
        if k in t.attrs:
            attrs[k] = int(t.attrs[k])
    F.write_features_h5(job.out_path, feats.astype(cfg.dtype, copy=False), t.l0_xy, attrs)


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
    from wsi_pipeline.encoders.base import resolve_device

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
