#!/usr/bin/env python
"""The CPU cost of the extraction data path, apart from the model: the bare reader against the whole loop
(reader processes, hand-over to the main process, batch assembly, collecting features) driven by an
instant model, per output tile. CPU seconds, not wall time, so the figures hold on a shared machine.

    python scripts/bench_loader.py [--slide S] [--workers 1,2] [--batch-size 256] [--slides 4]

Prints, per setting: wall tiles/s; CPU ms per tile in the reader processes and in the main process; the
reader processes' output tiles per CPU-second against the bare reader's (their ratio is the data path's
efficiency per worker); the loop breakdown; the main process's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def instant_encoder() -> Any:
    """An encoder whose forward pass costs nothing: it reads one pixel per tile (the loop, not the model)."""
    import torch
    from torch import nn

    from wsi_pipeline.encoders.base import Encoder, EncoderMeta

    class Instant(Encoder):
        def preprocess(self, images: torch.Tensor, resize: bool = True) -> torch.Tensor:
            return images[:, :1, :1, :].permute(0, 3, 1, 2).float()

    return Instant(nn.Flatten(), EncoderMeta("instant", "instant", 3))


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bare_reader(run: Path, ids: list[str], batch_size: int, decode: str) -> dict[str, float]:
    """Every batch read in this process, one thread: CPU ms per output tile."""
    from wsi_pipeline.features.dataset import ReaderOptions, SlideBatchDataset, SlideSource, pack_batches
    from wsi_pipeline.features.extract import ExtractConfig, plan_jobs
    from wsi_pipeline.runfolder.layout import RunLayout

    jobs, _ = plan_jobs(RunLayout(run), "instant", ExtractConfig())
    sources = [SlideSource(j.slide_path, j.tiles.l0_xy, j.spec, j.tiles.tile_size_l0 or 1) for j in jobs]
    items = pack_batches(sources, batch_size)
    ds = SlideBatchDataset(sources, items, ReaderOptions(decode=decode, threads=1))
    ds[0]  # warm the page cache and the codec
    n, c0, w0 = 0, time.process_time(), time.perf_counter()
    for i in range(len(ds)):
        n += sum(len(p) for _, p, _, _ in ds[i])
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    ds.close()
    return {"tiles": n, "cpu_ms_per_tile": 1e3 * cpu / n, "tiles_per_cpu_s": n / cpu, "wall_tiles_per_s": n / wall}


def loop(run: Path, batch_size: int, workers: int, decode: str, extra: dict[str, Any]) -> dict[str, Any]:
    """run_extract's loop (reader processes → main → instant model → collector), CPU per tile."""
    import torch

    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.engine import run_jobs
    from wsi_pipeline.features.extract import plan_jobs
    from wsi_pipeline.runfolder.layout import RunLayout

    cfg = ExtractConfig(batch_size=batch_size, num_workers=workers, decode=decode, device="cpu",
                        precision="fp32", **extra).validate()
    jobs, _ = plan_jobs(RunLayout(run), "instant", cfg)
    enc = instant_encoder()
    stats: dict[str, Any] = {}
    c0, k0, w0 = time.process_time(), cpu_children(), time.perf_counter()
    n = 0
    for _, feats, err in run_jobs(jobs, enc, cfg, torch.device("cpu"), stats=stats):
        assert not err, err
        n += len(feats)
    wall = time.perf_counter() - w0
    main_cpu, kids = time.process_time() - c0, cpu_children() - k0
    loop_s = stats["loop_s"]
    return {"tiles": n, "wall_tiles_per_s": n / wall, "main_cpu_ms_per_tile": 1e3 * main_cpu / n,
            "reader_cpu_ms_per_tile": 1e3 * kids / n if workers else float("nan"),
            "reader_tiles_per_cpu_s": n / kids if workers and kids > 0 else float("nan"),
            "breakdown": {k[:-2]: round(v / loop_s, 3) for k, v in stats.items()
                          if k.endswith("_s") and k != "loop_s" and isinstance(v, float) and v > 0}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=None, help="default: a 16000x12000 bench slide (built once)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--slides", type=int, default=4, help="slide ids sharing the bench slide")
    ap.add_argument("--decode", default="cpu-scaled")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi_bench_loader")
    args = ap.parse_args()

    from bench_common import tile_bench_slide

    from wsi_pipeline.synth.bench import BenchSlideParams, make_bench_slide

    slide = args.slide or make_bench_slide(args.work / "bench_16000x12000.svs", BenchSlideParams(size=(16000, 12000)))
    run = args.work / f"RUN_x{args.slides}"
    ids = tile_bench_slide(slide, run, 0, args.slides)
    print(f"slide {slide}; {len(ids)} slide ids; batch {args.batch_size}; decode {args.decode}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    for k in range(args.rounds):
        b = bare_reader(run, ids, args.batch_size, args.decode)
        print(f"[{k + 1}] bare reader: {b['tiles']} tiles, {b['cpu_ms_per_tile']:.3f} CPU-ms/tile = "
              f"{b['tiles_per_cpu_s']:,.0f} tiles per CPU-s (load {os.getloadavg()[0]:.1f})", flush=True)
        for w in (int(v) for v in args.workers.split(",")):
            r = loop(run, args.batch_size, w, args.decode, {})
            eff = r["reader_tiles_per_cpu_s"] / b["tiles_per_cpu_s"] if w else float("nan")
            print(f"[{k + 1}] loop, {w} reader processes: {r['wall_tiles_per_s']:,.0f} tiles/s wall; CPU-ms/tile "
                  f"readers {r['reader_cpu_ms_per_tile']:.3f}, main {r['main_cpu_ms_per_tile']:.3f}; readers "
                  f"{r['reader_tiles_per_cpu_s']:,.0f} tiles per CPU-s = {eff:.2f} of the bare reader; "
                  f"loop {r['breakdown']} (load {os.getloadavg()[0]:.1f})", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS main {rss:,.0f} MB", flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
