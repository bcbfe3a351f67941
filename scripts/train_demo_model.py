#!/usr/bin/env python
"""Train the shipped demo MIL model (`models/wsip-demo-mil/`) on a cohort from the project's own generator.

Steps: draw a synthetic cohort (wsi_pipeline.synth) → `wsi tile` → `wsi extract` with the shipped demo
encoder → `wsi train` (patient-level 5-fold CV, ABMIL with spatial context + the mean-pool baseline) for
response, immune phenotype and TIL fraction → model card with the out-of-fold metrics.

    python scripts/train_demo_model.py [--work ~/.cache/wsi-pipeline/demo-cohort] [--patients 60]

Everything but the model folder goes to --work (never into the repository).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

TARGETS = "response:binary,immune_phenotype:multiclass,til_fraction:regression"

CARD = """# wsip-demo-mil — demo multi-task MIL model (synthetic data; NOT for clinical use)

Predicts, from the bag of tile embeddings of one slide: **response** (binary), **immune_phenotype**
(inflamed / excluded / desert) and **til_fraction** (regression). It exists so that
`wsi run data_samples --out runs/demo` works out of the box and so that tests exercise a real model.

- **Trained on:** {n_slides} synthetic slides of {n_patients} patients drawn by the project's own generator
  (`wsi_pipeline/synth`, seed {seed}, slides {size[0]}×{size[1]} px at 0.5 µm/px). The images are procedural
  drawings of tumour nests, stroma and lymphocytes, not tissue. Labels follow the generative model in
  `wsi_pipeline/synth/cohort.py`; the phenotype is the geometry of lymphocytes relative to tumour nests.
- **Features:** encoder `{encoder}` (the shipped demo encoder, {embed_dim}-d) on 224-px tiles at
  **{target_mpp} µm/px**; predicting from other features or another µm/px is refused.
- **Head:** `{head}` (gated-attention MIL over tile embeddings concatenated with the mean of their grid
  neighbours), one output per target; final model = ensemble of the {folds} fold models.
- **Recipe:** `python scripts/train_demo_model.py --patients {n_patients_arg} --seed {seed}` ({minutes:.0f} min on
  2 CPU cores, including slide generation, tiling and extraction).
- **Intended use:** demonstration and testing of wsi-pipeline. Not a medical device; not for clinical use;
  its metrics say nothing about real tissue.

## Out-of-fold metrics (patient-level 5-fold CV, 95% CI from 1000 patient bootstrap resamples)

{metrics_md}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "wsi-pipeline" / "demo-cohort")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "wsip-demo-mil")
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--size", type=int, nargs=2, default=(2600, 2200))
    ap.add_argument("--encoder", default=None, help="default: the shipped demo encoder")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--head", default="abmil")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prepare-only", action="store_true", help="generate and tile the cohort, then stop")
    args = ap.parse_args()

    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.encoders import default_encoder_name
    from wsi_pipeline.features import ExtractConfig, run_extract
    from wsi_pipeline.mil.config import TrainConfig
    from wsi_pipeline.mil.train import train_cv
    from wsi_pipeline.slide import find_slides
    from wsi_pipeline.synth.cohort import CohortParams, WriteOptions, write_cohort
    from wsi_pipeline.tiling.stage import run_tile

    t0 = time.perf_counter()
    encoder = args.encoder or default_encoder_name()
    slides_dir, run = args.work / "slides", args.work / "run"
    labels_csv = slides_dir / "labels.csv"
    params = CohortParams(n_patients=args.patients, seed=args.seed, size_l0=tuple(args.size))
    if not labels_csv.exists():
        print(f"generating {args.patients} patients into {slides_dir} ...", flush=True)
        write_cohort(slides_dir, params, WriteOptions(workers=args.workers))
    paths = find_slides([slides_dir])
    print(f"tiling {len(paths)} slides ...", flush=True)
    s = run_tile(paths, run, TilingConfig(), workers=args.workers)
    assert s.ok, s.failed
    if args.prepare_only:
        return
    print(f"extracting with {encoder} ...", flush=True)
    e = run_extract(run, ExtractConfig(encoder=encoder))
    assert e.ok, e.failed
    if args.out.exists():
        shutil.rmtree(args.out)
    print("training ...", flush=True)
    res = train_cv(TrainConfig(run=str(run), labels=str(labels_csv), targets=TARGETS, model_out=str(args.out),
                               head=args.head, folds=5, seed=args.seed, encoder=encoder, epochs=args.epochs),
                   progress=lambda m: print("  " + m, flush=True))
    from wsi_pipeline.formats import read_labels_csv, read_model_json

    card = read_model_json(args.out)
    n_slides = len(read_labels_csv(labels_csv))
    text = CARD.format(
        n_slides=n_slides, n_patients=args.patients, n_patients_arg=args.patients, seed=args.seed, size=args.size,
        encoder=card["encoder"]["name"], embed_dim=card["encoder"]["embed_dim"],
        target_mpp=card["encoder"]["target_mpp"], head=args.head, folds=5,
        minutes=(time.perf_counter() - t0) / 60, metrics_md=(args.out / "metrics.md").read_text())
    (args.out / "README.md").write_text(text)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s; metrics:\n{(args.out / 'metrics.md').read_text()}")
    del res


if __name__ == "__main__":
    main()
