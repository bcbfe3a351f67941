#!/usr/bin/env python
"""Training at cohort scale (issue #22 item 3): `wsi train`'s training-data throughput and peak RSS at 1k, 10k
(and, with --sizes, 100k) slides, on synthetic feature files, on one small machine.

Each size gets a simulated RUN folder (``wsi_pipeline.mil.simulate``: ``--grid``² tiles per slide, ``--dim``
dimensions, labels with a response, a TIL fraction and survival). `wsi train` then runs in a fresh process
(2 folds, 1 epoch, mean-pool head, no baseline, one thread) with the bag cache bounded by ``--cache-mb``:
bags stream from their feature files and only the cache holds them, so the peak RSS must not grow with
the cohort beyond the per-slide bookkeeping (labels, out-of-fold rows). Printed per size: slides, tiles,
bags read (every read of a feature file: the standardisation pass, the training epoch, validation and the
out-of-fold predictions of each fold), wall seconds, bags/s and tiles/s read and trained, peak RSS.

    python scripts/bench_train_scale.py                      # 1k and 10k slides, ~5 min on 2 cores
    python scripts/bench_train_scale.py --sizes 1000,10000,100000 --cache-mb 64
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from wsi_pipeline.mil import data
from wsi_pipeline.mil.config import TrainConfig
from wsi_pipeline.mil.train import run_train

reads = [0]
orig = data.read_features_h5
def counted(*a, **k):
    if k.get("load_features", True):
        reads[0] += 1
    return orig(*a, **k)
data.read_features_h5 = counted
cfg = TrainConfig(**json.loads(sys.argv[1]))
t0 = time.perf_counter()
run_train(cfg)
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "bag_reads": reads[0],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_run(root: Path, n_slides: int, grid: int, dim: int) -> tuple[Path, Path, int]:
    from wsi_pipeline.mil.simulate import SimSpec, simulate_feature_cohort

    spec = SimSpec(n_patients=max(2, round(n_slides / 1.25)), embed_dim=dim, grid=grid, seed=1)
    labels = simulate_feature_cohort(root / "run", root / "labels.csv", spec)
    n = sum(1 for _ in (root / "run" / "features" / "sim").glob("*.h5"))
    return root / "run", labels, n


def bench(root: Path, n: int, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    run, labels, n_slides = make_run(root / f"n{n}", n, args.grid, args.dim)
    built = time.perf_counter() - t0
    cfg = {"run": str(run), "labels": str(labels), "targets": "response:binary,til_fraction:regression",
           "model_out": str(root / f"model{n}"), "head": "meanpool", "baseline": False, "folds": 2, "epochs": 1,
           "n_bootstrap": 10, "threads": 1, "cache_mb": args.cache_mb, "context_rings": 0, "device": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    tiles = n_slides * args.grid * args.grid
    out.update(slides=n_slides, tiles=tiles, build_s=built, bags_per_s=out["bag_reads"] / out["wall_s"],
               tiles_per_s=out["bag_reads"] * args.grid * args.grid / out["wall_s"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000", help="comma-separated cohort sizes (slides)")
    ap.add_argument("--grid", type=int, default=8, help="tiles per side of each simulated slide")
    ap.add_argument("--dim", type=int, default=64, help="embedding dimensions")
    ap.add_argument("--cache-mb", type=int, default=64, help="`wsi train --cache-mb` (the bag cache bound)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        rows = [bench(root, int(s), args) for s in args.sizes.split(",")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"wsi train, 2 folds x 1 epoch, mean-pool, 1 thread, --cache-mb {args.cache_mb}, "
          f"{args.grid * args.grid} tiles x {args.dim} dims per slide")
    print("| slides | tiles | bag reads | wall s | bags/s | tiles/s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['slides']:,} | {r['tiles']:,} | {r['bag_reads']:,} | {r['wall_s']:.1f} | "
              f"{r['bags_per_s']:,.0f} | {r['tiles_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
