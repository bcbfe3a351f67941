#!/usr/bin/env python
"""Build kather16 mosaic slides (train or test pool, tiles split by source image) for evaluation.

Mosaics are derived from CC BY 4.0 data (Kather et al. 2016, doi:10.5281/zenodo.53169): write them to a
run/tmp folder, never into the repository.

    python scripts/make_kather_cohort.py --out /tmp/kather/train --n 60 --split train --seed 0
    python scripts/make_kather_cohort.py --out /tmp/kather/test  --n 40 --split test  --seed 1
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from wsi_pipeline.synth.kather import build_kather_mosaic_cohort

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_kather = Path(os.environ.get("WSI_SHARED_DATA", REPO.parent / "shared" / "data")) / "kather16"
    ap.add_argument("--kather-dir", type=Path, default=default_kather)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n", type=int, default=40, help="number of mosaic slides")
    ap.add_argument("--split", choices=("train", "test"), default="train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", type=int, nargs=2, default=(24, 32), metavar=("ROWS", "COLS"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.out.resolve().is_relative_to(REPO):
        ap.error(f"--out {a.out} is inside the repository; kather16 mosaics must not be committed")
    t0 = time.perf_counter()
    df = build_kather_mosaic_cohort(a.kather_dir, a.out, a.n, a.split, a.seed, tuple(a.grid))
    print(f"wrote {len(df)} mosaic slides to {a.out} in {time.perf_counter() - t0:.1f} s")
    print(df.groupby("immune_phenotype")[["til_fraction", "response"]].agg(["mean", "min", "max", "count"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
