#!/usr/bin/env python
"""Write a synthetic H&E-like cohort: Aperio-style .svs pyramids (MPP in the metadata), labels.csv and
truth/<slide_id>.npz class maps. The generative model is documented in wsi_pipeline/synth/cohort.py.

Example (a small two-arm cohort with on-treatment slides; `data_samples/` is built by
scripts/make_data_samples.py from real kather16 tiles instead):
    python scripts/make_synthetic_slides.py --out /tmp/synth --n 6 --seed 7 --size 3000 2500 \
        --multi-slide-fraction 0.2 --two-arms --timepoint-fraction 0.2
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

from wsi_pipeline.synth.cohort import CohortParams, WriteOptions, plan_cohort, write_cohort


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--n", type=int, default=20, help="number of patients (slides may be more)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, nargs=2, default=(4000, 3000), metavar=("W", "H"),
                    help="level-0 size in pixels")
    ap.add_argument("--mpp", type=float, default=0.5, help="µm per level-0 pixel")
    ap.add_argument("--two-arms", action="store_true", help="randomise patients to control / treatment")
    ap.add_argument("--arm-assignment", choices=("random", "blocks"), default="random",
                    help="with --two-arms: independent coin flips, or 1:1 permuted blocks of two (balanced)")
    ap.add_argument("--timepoints", action="store_true",
                    help="every patient also gets an on_treatment slide with a shifted TME")
    ap.add_argument("--timepoint-fraction", type=float, default=None,
                    help="share of patients with an on_treatment slide (--timepoints: 1.0)")
    ap.add_argument("--multi-slide-fraction", type=float, default=0.2,
                    help="share of patients with a second baseline slide")
    ap.add_argument("--downsamples", type=int, nargs="+", default=(1, 4, 16))
    ap.add_argument("--quality", type=int, default=80, help="JPEG quality")
    ap.add_argument("--thumbnail", type=int, default=768, help="longest side of the Aperio thumbnail")
    ap.add_argument("--workers", type=int, default=1, help="slides written in parallel")
    ap.add_argument("--no-truth", action="store_true", help="do not write truth/<slide_id>.npz")
    ap.add_argument("--dry-run", action="store_true", help="print the labels without writing slides")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    tp_fraction = a.timepoint_fraction if a.timepoint_fraction is not None else float(a.timepoints)
    params = CohortParams(n_patients=a.n, seed=a.seed, size_l0=tuple(a.size), mpp=a.mpp, two_arms=a.two_arms,
                          arm_assignment=a.arm_assignment, timepoint_fraction=tp_fraction,
                          multi_slide_fraction=a.multi_slide_fraction)
    if a.dry_run:
        from wsi_pipeline.synth.cohort import labels_frame

        print(labels_frame(plan_cohort(params)).to_string(index=False))
        return 0
    wo = WriteOptions(downsamples=tuple(a.downsamples), quality=a.quality, workers=a.workers,
                      thumbnail_max=a.thumbnail)
    if a.no_truth:
        wo = replace(wo, truth_dir="")
    t0 = time.perf_counter()
    df = write_cohort(a.out, params, wo)
    print(f"wrote {len(df)} slides of {df.patient_id.nunique()} patients to {a.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    print(df.drop(columns=["response_prob"]).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
