#!/usr/bin/env python
"""Tiling benchmark on a 40000×30000, 0.25-MPP Aperio-style JPEG pyramid (built once, then reused).

Prints: tissue detection + tile coordinates time for 224 px @ 0.5 MPP (median of 5; the low-resolution
read, the detection and the grid shown apart), tiles kept, and the peak RSS of a whole `wsi tile` process.
Targets: ≤ 25 ms per slide; peak RSS ≤ 1 GB.

    python scripts/bench_tiling.py [--slide PATH] [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=None, help="Bench slide (default: built/reused by wsi_pipeline.synth)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.slide.open import open_slide
    from wsi_pipeline.synth.bench import make_bench_slide
    from wsi_pipeline.tiling.grid import TileSpec, select_tiles
    from wsi_pipeline.tiling.stage import tissue_level
    from wsi_pipeline.tiling.tissue import TissueParams, detect_tissue

    t = time.perf_counter()
    slide_path = args.slide or make_bench_slide()
    print(f"bench slide: {slide_path} (ready in {time.perf_counter() - t:.1f} s)")
    cfg = TilingConfig()  # 224 px @ 0.5 µm/px
    spec = TileSpec(cfg.target_mpp, cfg.tile_size, cfg.overlap)
    reads, detects, grids, totals, cpu = [], [], [], [], []
    n_tiles = 0
    with open_slide(slide_path) as s:
        print(f"slide: {s.dimensions[0]}×{s.dimensions[1]} @ {s.mpp} µm/px, levels {s.level_downsamples}")
        level = tissue_level(s, cfg.tissue_mpp)
        for _ in range(args.repeats + 1):  # first round warms caches, not counted
            t0 = time.perf_counter()
            rgb, _ = s.read_at_downsample(cfg.tissue_mpp / s.mpp, level=level)
            t1 = time.perf_counter()
            c1 = time.process_time()
            l0_per_px = (s.dimensions[0] / rgb.shape[1], s.dimensions[1] / rgb.shape[0])
            mask = detect_tissue(rgb, TissueParams(mask_mpp=l0_per_px[0] * s.mpp,
                                                   min_area_um2=cfg.min_tissue_area_um2))
            t2 = time.perf_counter()
            l0_xy, _ = select_tiles(mask, l0_per_px, s.dimensions, s.mpp, spec, cfg.min_tissue)
            t3 = time.perf_counter()
            reads.append(t1 - t0)
            detects.append(t2 - t1)
            grids.append(t3 - t2)
            totals.append(t3 - t0)
            cpu.append(time.process_time() - c1)
            n_tiles = len(l0_xy)
        reads, detects, grids, totals, cpu = (x[1:] for x in (reads, detects, grids, totals, cpu))
    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    print(f"mask level: {level} ({rgb.shape[1]}×{rgb.shape[0]} px, {l0_per_px[0] * s.mpp:.1f} µm/px)")
    print(f"low-res read        : {ms(reads):7.2f} ms (median of {args.repeats})")
    print(f"tissue detection    : {ms(detects):7.2f} ms")
    print(f"tile coordinates    : {ms(grids):7.2f} ms")
    print(f"detection + coords  : {ms(detects) + ms(grids):7.2f} ms   (target ≤ 25 ms)")
    print(f"detection + coords  : {ms(cpu):7.2f} ms CPU time (robust to other load on the machine)")
    print(f"read + detect + grid: {ms(totals):7.2f} ms")
    print(f"tiles kept          : {n_tiles} (224 px @ 0.5 µm/px)")

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "wsi_pipeline", "tile", str(slide_path), "--out", tmp,
                            "--workers", "1"], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(f"wsi tile failed:\n{r.stderr}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"`wsi tile` whole process: {wall:.2f} s wall, peak RSS {peak_mb:.0f} MB   (target ≤ 1024 MB)")


if __name__ == "__main__":
    main()
