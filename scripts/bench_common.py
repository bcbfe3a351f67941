"""Measurements shared by ``bench_extract.py`` and its ``--suite gpu`` (imported from the scripts folder).

Each function measures one thing on the bench slide and returns plain figures (dicts of numbers), so the
callers can print tables and write JSON as they go.
"""

from __future__ import annotations

import resource
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

READER_MODES = ("cpu-full", "cpu-scaled", "gpu")


def tile_bench_slide(slide: Path, run: Path, max_tiles: int, repeat_slides: int, full_run: Path | None = None) -> list[str]:
    """RUN/tiles for the bench slide (tiling reused; from ``full_run`` when given), optionally cut to
    ``max_tiles`` and repeated under several slide ids (a cohort of slides of this size: batches run across
    their boundaries)."""
    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.tiling.stage import tile_slide

    full = RunLayout(full_run or run.parent / (run.name + "_full"))
    res = tile_slide(slide, full, TilingConfig(), slide_id="bench")
    tiles = F.read_tiles_h5(full.tiles_h5(res.slide_id))
    xy = tiles.l0_xy
    if max_tiles and len(xy) > max_tiles:
        keep = np.sort(np.random.default_rng(0).choice(len(xy), max_tiles, replace=False))
        xy = xy[keep]
    layout = RunLayout(run)
    ids = [f"bench{i}" for i in range(repeat_slides)]
    for sid in ids:
        if not layout.tiles_h5(sid).exists():
            F.write_tiles_h5(layout.tiles_h5(sid), xy, {**tiles.attrs, F.A_SLIDE_ID: sid})
    return ids


def bench_weights(name: str, work: Path) -> str | None:
    """A random-init weights file for a preset whose weights come from the Hub (no network on bench
    machines); None for ``timm:<arch>`` and project encoders (they need none)."""
    import torch
    from safetensors.torch import save_file

    from wsi_pipeline.encoders.registry import get_entry, list_encoders

    if name.lower() not in {n.lower() for n in list_encoders(include_project=False)}:
        return None
    entry = get_entry(name)
    path = work / f"random_{entry.meta.name}.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = entry.build()
        work.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def model_only(encoder: Any, tiles: np.ndarray, batch_size: int, precision: str, device: Any,
               compile_model: bool, seconds: float) -> tuple[float, float]:
    """(tiles/s, CPU seconds per tile) of preprocess + forward on uint8 tiles already in (pinned) memory,
    like the engine does (copy-back of the previous batch overlapping the current one)."""
    import torch

    from wsi_pipeline.encoders.base import autocast, prepare_for_inference

    model = prepare_for_inference(encoder, device)
    fwd = torch.compile(model, dynamic=False) if compile_model else model
    reps = max(1, -(-batch_size // len(tiles)))
    tiles = np.concatenate([tiles] * reps) if reps > 1 else tiles
    batches = [torch.from_numpy(tiles[i:i + batch_size]) for i in range(0, len(tiles) - batch_size + 1, batch_size)]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        batches = [b.pin_memory() for b in batches]

    def run_one(b: Any) -> Any:
        x = model.preprocess(b.to(device, non_blocking=True))
        if encoder.is_cnn:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            return fwd(x)

    with torch.inference_mode():
        for b in batches[:2]:  # warm-up (and compilation)
            run_one(b).float().cpu()
        n, t0, i, c0 = 0, time.perf_counter(), 0, time.process_time()
        prev = None
        while time.perf_counter() - t0 < seconds or n < 4 * batch_size:
            y = run_one(batches[i % len(batches)])
            if prev is not None:
                prev.float().cpu()
            prev = y
            n += batch_size
            i += 1
        prev.float().cpu()
        return n / (time.perf_counter() - t0), (time.process_time() - c0) / n


def cpu_with_children() -> float:
    self_, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + kids.ru_utime + kids.ru_stime


class GpuBusy:
    """Samples the GPU's utilisation (NVML) every ``period`` s while in use; ``mean`` in % (None: no NVML)."""

    def __init__(self, device_index: int = 0, period: float = 0.1) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._period = period
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception:  # noqa: BLE001 - no NVML: no figure
            self._handle = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.samples.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def __enter__(self) -> GpuBusy:
        if self._handle is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._handle is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None


class _Figures:
    """The extraction stage's figures under the names the bench reports."""

    def __init__(self, f: dict[str, Any]) -> None:
        self.tiles_per_s, self.tiles, self.seconds = f["tiles_per_s"], f["tiles"], f["loop_s"]
        self.stats = f["stats"]


def end_to_end(run: Path, cfg_kwargs: dict[str, Any], gpu: bool) -> dict[str, Any]:
    """``run_extract`` on the RUN folder: tiles/s, steady-state tiles/s (from the 3rd batch on), CPU seconds
    per tile of this process and its reader processes, the loop breakdown (fractions of the loop time) and
    the GPU's mean utilisation."""
    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.extract import run_extract

    cfg = ExtractConfig(force=True, allow_mpp_mismatch=True, **cfg_kwargs)
    marks: list[tuple[float, int]] = []
    c0 = cpu_with_children()
    busy = GpuBusy() if gpu else None
    with busy or _null():
        res = run_extract(run, cfg, progress=lambda ev: marks.append((time.perf_counter(), ev.units))
                          if ev.kind == "units" else None)
    cpu = cpu_with_children() - c0
    if not res.ok:
        raise RuntimeError(f"extraction failed: {res.failed[:3]}")
    s = _Figures(res.figures)
    steady = sum(n for _, n in marks[3:]) / (marks[-1][0] - marks[2][0]) if len(marks) > 4 else float("nan")
    loop = max(s.stats.get("loop_s", s.seconds), 1e-9)
    breakdown = {k[:-2]: round(v / loop, 4) for k, v in s.stats.items()
                 if k.endswith("_s") and k != "loop_s" and not k.startswith("writer") and isinstance(v, float)}
    return {"tiles_per_s": s.tiles_per_s, "tiles": s.tiles, "steady_tiles_per_s": steady,
            "cpu_ms_per_tile": 1e3 * cpu / max(1, s.tiles), "seconds": s.seconds, "loop_breakdown": breakdown,
            "decode": s.stats.get("decode"), "gpu_busy_pct": busy.mean if busy else None,
            "writer_busy_s": s.stats.get("writer_busy_s"), "writer_blocked_s": s.stats.get("writer_blocked_s")}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def reader_per_core(slide: Path, run: Path, n: int, modes: tuple[str, ...] = READER_MODES,
                    n_openslide: int = 0) -> dict[str, dict[str, float]]:
    """Output tiles per CPU-second of one reader thread, for each decode mode, on a run of ``n`` neighbouring
    tiles from the middle of the slide (engine order). ``gpu``: the reader's share only (read the stored
    tiles, splice the tables; decoding happens on the GPU). Optionally OpenSlide read_region + resize."""
    from wsi_pipeline.features.dataset import read_order
    from wsi_pipeline.features.reader import ReadSpec, open_tile_reader
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout

    full = RunLayout(run.parent / (run.name + "_full"))
    tiles = F.read_tiles_h5(full.tiles_h5("bench"))
    order = read_order(tiles.l0_xy, tiles.tile_size_l0)
    start = (len(order) - n) // 2 if len(order) > n else 0
    xy = tiles.l0_xy[order[start:start + n]]
    rs = ReadSpec(tiles.target_mpp, tiles.tile_size, tiles.slide_mpp)
    out: dict[str, dict[str, float]] = {}
    for mode in modes:
        with open_tile_reader(slide, rs, decode=mode) as r:
            read: Callable[[np.ndarray], Any] = r.jpeg_batch if mode == "gpu" else r.read_many  # type: ignore[attr-defined]
            read(tiles.l0_xy[order[:32]])  # warm the page cache and the codec (tiles outside the measured run)
            r.decoded_tiles = 0  # type: ignore[attr-defined]
            c0, w0 = time.process_time(), time.perf_counter()
            read(xy)
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            out[mode] = {"reader_tiles_per_core_s": round(len(xy) / cpu, 1), "wall_tiles_per_s": round(len(xy) / wall, 1),
                         "stored_tiles_per_output_tile": round(r.decoded_tiles / len(xy), 2),  # type: ignore[attr-defined]
                         "reader": r.kind, "dct_scale": f"1/{getattr(r, 'reduce', 1)}", "n": len(xy)}
    if n_openslide:
        from wsi_pipeline.slide.open import open_slide

        sub = xy[:n_openslide]
        with open_slide(slide, mpp=rs.slide_mpp) as s:
            s.read_region_at_mpp(tuple(int(v) for v in sub[0]), rs.target_mpp, rs.tile_size)
            c0 = time.process_time()
            for x, y in sub:
                s.read_region_at_mpp((int(x), int(y)), rs.target_mpp, rs.tile_size)
            out["openslide"] = {"reader_tiles_per_core_s": round(len(sub) / (time.process_time() - c0), 1),
                                "n": len(sub)}
    return out


def in_memory_tiles(slide: Path, run: Path, sid: str, n: int) -> np.ndarray:
    from wsi_pipeline.features.reader import ReadSpec, open_tile_reader
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout

    tiles = F.read_tiles_h5(RunLayout(run).tiles_h5(sid))
    spec = ReadSpec(tiles.target_mpp, tiles.tile_size, tiles.slide_mpp)
    with open_tile_reader(slide, spec) as r:
        return r.read_many(tiles.l0_xy[:n])
