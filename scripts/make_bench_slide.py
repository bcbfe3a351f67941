#!/usr/bin/env python
"""Build (or reuse) the benchmark slide: a 40000×30000, 0.25-µm/px Aperio-style JPEG pyramid
(downsamples 1, 4, 16, 64; 256-px tiles) with about half of it covered by tissue.

    python scripts/make_bench_slide.py                 # → $WSI_BENCH_DIR or ~/.cache/wsi-pipeline/bench/
    python scripts/make_bench_slide.py --out /tmp/b.svs --force
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
from pathlib import Path

from wsi_pipeline.synth.bench import BenchSlideParams, default_bench_path, make_bench_slide


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="slide path (default: %(default)s → bench dir)")
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"))
    ap.add_argument("--mpp", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="rebuild even when a current copy exists")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kw = {k: v for k, v in (("size", tuple(a.size) if a.size else None), ("mpp", a.mpp), ("seed", a.seed))
          if v is not None}
    params = BenchSlideParams(**kw)
    path = a.out or default_bench_path(params)
    t0 = time.perf_counter()
    out = make_bench_slide(path, params, force=a.force)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{out}  ({out.stat().st_size / 2**20:.0f} MiB)  {time.perf_counter() - t0:.1f} s, "
          f"peak RSS {rss_mb:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
