#!/usr/bin/env python
"""Rebuild `data_samples/`: seven small slides of six patients, mosaics of real kather16 H&E tiles taken only
from the **held-out** side of the project's source split — source images that the shipped encoder
(`wsip-dino-r10`), the shipped tissue classifier (`wsip-tissue-kather16`) and the demo MIL never trained on.

Tiles: Kather JN, Weis CA, Bianconi F, Melchers SM, Schad LR, Gaiser T, Marx A, Zöllner FG. *Multi-class
texture analysis in colorectal cancer histology.* Sci Rep 6:27988 (2016), doi:10.1038/srep27988; data
doi:10.5281/zenodo.53169, CC BY 4.0.

The cohort follows the generative model of `wsi_pipeline/synth/cohort.py` (two arms randomised in permuted
blocks, on-treatment slides, response and survival drawn from what the slide shows) with each class map
filled by kather16 tiles (`wsi_pipeline.synth.kather.write_kather_cohort`). The seed is the first one
(from ``--seed``) whose cohort has the demo's structure: six patients with one baseline slide each, exactly one
on-treatment slide (``P005_on``), both arms, and every immune phenotype among the baseline slides; it is
chosen on that structure only, before any slide is drawn or read.

    python scripts/make_data_samples.py                  # rewrites data_samples/ (deterministic)
    python scripts/make_data_samples.py --out /tmp/ds    # elsewhere
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
N_PATIENTS = 6
ON_TREATMENT = "P005_on"
QUALITY = 75
THUMBNAIL = 512


def demo_params(seed: int) -> Any:
    """The demo design of `wsi_pipeline.synth.kather` (`demo_cohort_params`: 16 × 20 tiles of 150 px),
    six patients, one baseline slide each, on-treatment slides for some."""
    from wsi_pipeline.synth.kather import demo_cohort_params

    return demo_cohort_params(N_PATIENTS, seed, timepoint_fraction=0.15, multi_slide_fraction=0.0)


def has_demo_structure(labels: Any) -> bool:
    """Six patients, one baseline slide each plus exactly ``P005_on``, both arms, every phenotype at baseline."""
    base = labels[labels.timepoint == "baseline"]
    on = labels[labels.timepoint == "on_treatment"]
    return (len(base) == N_PATIENTS and base.patient_id.is_unique and list(on.slide_id) == [ON_TREATMENT]
            and set(labels.arm) == {"control", "treatment"}
            and set(base.immune_phenotype) == {"inflamed", "excluded", "desert"})


def find_seed(start: int, tries: int = 10_000) -> int:
    from wsi_pipeline.synth.cohort import labels_frame, plan_cohort

    for seed in range(start, start + tries):
        if has_demo_structure(labels_frame(plan_cohort(demo_params(seed)))):
            return seed
    raise SystemExit(f"no seed in [{start}, {start + tries}) gives the demo structure")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_kather = Path(os.environ.get("WSI_SHARED_DATA", REPO.parent / "shared" / "data")) / "kather16"
    ap.add_argument("--kather-dir", type=Path, default=default_kather)
    ap.add_argument("--out", type=Path, default=REPO / "data_samples")
    ap.add_argument("--seed", type=int, default=0, help="first seed tried (default 0)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from wsi_pipeline.synth.kather import KatherWriteOptions, write_kather_cohort

    t0 = time.perf_counter()
    seed = find_seed(a.seed)
    for old in [*a.out.glob("*.svs"), *(a.out / "truth").glob("*.npz")]:  # keep README.md
        old.unlink()
    shutil.rmtree(a.out / "truth", ignore_errors=True)
    options = KatherWriteOptions(split="test", quality=QUALITY, thumbnail_max=THUMBNAIL, tile_split_csv=False,
                                 crop_to_tissue=True)
    df = write_kather_cohort(a.kather_dir, a.out, demo_params(seed), options)
    size = sum(p.stat().st_size for p in a.out.rglob("*") if p.is_file())
    print(f"seed {seed}: wrote {len(df)} slides of {df.patient_id.nunique()} patients to {a.out} "
          f"({size / 1e6:.1f} MB in all) in {time.perf_counter() - t0:.1f} s")
    print(df.drop(columns=["response_prob"]).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
