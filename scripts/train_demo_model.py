#!/usr/bin/env python
"""Train the shipped demo MIL model (`models/wsip-demo-mil/`) on a cohort from the project's own generator.

Steps: build a cohort (``--cohort kather``, the default: mosaics of real kather16 tiles from the **training**
source images only — the side of the project's source split the shipped encoder and tissue classifier were
trained on — in the design of `data_samples/`, which is built from the held-out side;
``--cohort synthetic``: the procedural slides of wsi_pipeline.synth) → `wsi tile` → `wsi extract` with the
shipped demo encoder → `wsi train` (patient-level 5-fold CV; head chosen by `--head auto` among mean-pool and ABMIL with
spatial context, by inner CV within the training folds; the mean-pool baseline beside; post-hoc calibration on
the out-of-fold predictions) for response, immune phenotype and TIL fraction → model card with the
out-of-fold metrics, before/after calibration figures and how the head was chosen.

    python scripts/train_demo_model.py [--work ~/.cache/wsi-pipeline/demo-cohort] [--patients 60]

Everything but the model folder goes to --work/<cohort> (never into the repository); a cohort already built
there with the same parameters (``cohort.json``) is reused, and so are its tiles and features.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

TARGETS = "response:binary,immune_phenotype:multiclass,til_fraction:regression"

CARD = """# wsip-demo-mil — demo multi-task MIL model ({data_kind}; NOT for clinical use)

Predicts, from the bag of tile embeddings of one slide: **response** (binary), **immune_phenotype**
(inflamed / excluded / desert) and **til_fraction** (regression). It exists so that
`wsi run data_samples --out runs/demo` works out of the box and so that tests exercise a real model.

- **Trained on:** {n_slides} slides of {n_patients} patients: {trained_on}
- **Features:** encoder `{encoder}` (the shipped demo encoder, {embed_dim}-d) on 224-px tiles at
  **{target_mpp} µm/px**; predicting from other features or another µm/px is refused.
- **Head:** `{head}` over tile embeddings concatenated with the mean of their grid neighbours, one output
  per target; final model = ensemble of the {folds} fold models. {head_note}
- **Calibration:** {calibration}; the `response_pred` cut-off ({threshold}) and the responder-subgroup
  cut-offs were chosen on the calibrated out-of-fold predictions and are recorded in `model.json`. Before and
  after figures out of fold are below; on held-out cohorts (kather mosaics of real tiles and the synthetic
  generator, every head) see the README, "Training on your cohort" (`scripts/eval_calibration.py`).
- **Recipe:** `python scripts/train_demo_model.py --cohort {cohort} --patients {n_patients_arg} --seed {seed}`
  ({minutes:.0f} min on 2 CPU cores, including slide generation, tiling and extraction).
- **Intended use:** demonstration and testing of wsi-pipeline. Not a medical device; not for clinical use;
  its metrics say nothing about real tissue.

## Out-of-fold metrics (patient-level 5-fold CV, 95% CI from 1000 patient bootstrap resamples)

{metrics_md}
"""


def cohort_params(args: argparse.Namespace) -> tuple[object, dict]:
    """The cohort's generator parameters and what identifies them (kept in ``cohort.json``)."""
    if args.cohort == "kather":
        from wsi_pipeline.synth.kather import demo_cohort_params

        # one treated arm, as for the synthetic cohort: response then depends on the image for everyone
        params = demo_cohort_params(args.patients, args.seed, two_arms=False, id_prefix="K")
        return params, {"cohort": "kather", "split": "train", "patients": args.patients, "seed": args.seed,
                        "params": repr(params)}
    from wsi_pipeline.synth.cohort import CohortParams

    params = CohortParams(n_patients=args.patients, seed=args.seed, size_l0=tuple(args.size))
    return params, {"cohort": "synthetic", "patients": args.patients, "seed": args.seed, "params": repr(params)}


def build_cohort(args: argparse.Namespace, slides_dir: Path) -> None:
    """Write the cohort's slides and labels.csv, unless ``slides_dir`` already holds the same cohort."""
    from wsi_pipeline.formats.atomic import write_text_atomic

    params, key = cohort_params(args)
    meta = slides_dir / "cohort.json"
    if (slides_dir / "labels.csv").exists() and meta.exists() and json.loads(meta.read_text()) == key:
        print(f"reusing the cohort in {slides_dir}", flush=True)
        return
    shutil.rmtree(slides_dir, ignore_errors=True)
    print(f"generating {args.patients} patients ({args.cohort}) into {slides_dir} ...", flush=True)
    if args.cohort == "kather":
        from wsi_pipeline.synth.kather import KatherWriteOptions, write_kather_cohort

        write_kather_cohort(args.kather_dir, slides_dir, params, KatherWriteOptions(split="train", crop_to_tissue=True))
    else:
        from wsi_pipeline.synth.cohort import WriteOptions, write_cohort

        write_cohort(slides_dir, params, WriteOptions(workers=args.workers))
    write_text_atomic(meta, json.dumps(key))


def trained_on(args: argparse.Namespace) -> str:
    if args.cohort == "kather":
        return ("mosaics of real H&E tiles of Kather et al. 2016 (CC BY 4.0; doi:10.5281/zenodo.53169) laid out by "
                f"the project's generator (`wsi_pipeline.synth.kather.demo_cohort_params`, seed {args.seed}: "
                "16 × 20 tiles of 74 µm at 0.495 µm/px, one treated arm), tiles from the **training** source images "
                "only (the source split of the shipped encoder and tissue classifier, seed 0); `data_samples/` is "
                "built from the held-out ones. Labels follow the generative model in "
                "`wsi_pipeline/synth/cohort.py`; the phenotype is where lymphocyte tiles sit relative to tumour "
                "nests.")
    return (f"synthetic slides drawn by the project's own generator (`wsi_pipeline/synth`, seed {args.seed}, "
            f"slides {args.size[0]}×{args.size[1]} px at 0.5 µm/px). The images are procedural drawings of tumour "
            "nests, stroma and lymphocytes, not tissue. Labels follow the generative model in "
            "`wsi_pipeline/synth/cohort.py`; the phenotype is the geometry of lymphocytes relative to tumour "
            "nests.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "wsi-pipeline" / "demo-cohort")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "wsip-demo-mil")
    ap.add_argument("--cohort", choices=("kather", "synthetic"), default="kather",
                    help="kather (default): mosaics of kather16 training-source tiles in the data_samples design; "
                         "synthetic: procedural slides")
    ap.add_argument("--kather-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "kather16")
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--size", type=int, nargs=2, default=(2600, 2200), help="synthetic slide size (px at 0.5 µm/px)")
    ap.add_argument("--encoder", default=None, help="default: the shipped demo encoder")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--head", default="auto", help="auto (default: chosen by inner CV) or a registered head")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prepare-only", action="store_true", help="generate and tile the cohort, then stop")
    args = ap.parse_args()

    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.encoders.registry import default_encoder_name
    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.extract import run_extract
    from wsi_pipeline.mil.config import TrainConfig
    from wsi_pipeline.mil.train import run_train
    from wsi_pipeline.slide.open import find_slides
    from wsi_pipeline.tiling.stage import run_tile

    t0 = time.perf_counter()
    encoder = args.encoder or default_encoder_name()
    slides_dir, run = args.work / args.cohort / "slides", args.work / args.cohort / "run"
    labels_csv = slides_dir / "labels.csv"
    build_cohort(args, slides_dir)
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
    res = run_train(TrainConfig(run=str(run), labels=str(labels_csv), targets=TARGETS, model_out=str(args.out),
                               head=args.head, folds=5, seed=args.seed, encoder=encoder, epochs=args.epochs),
                   progress=lambda m: print("  " + m, flush=True))
    from wsi_pipeline.formats.cards import read_model_json
    from wsi_pipeline.formats.tables import read_labels_csv

    card = read_model_json(args.out)
    n_slides = len(read_labels_csv(labels_csv))
    main = card["variants"][card["main_variant"]]
    sel = card.get("head_selection") or {}
    metrics = json.loads((args.out / "metrics.json").read_text())
    check = metrics.get("baseline_check") or {}
    head_note = (f"Chosen by `--head auto`: {sel.get('reason', '')}." if sel.get("requested") == "auto"
                 else f"Fixed with `--head {args.head}`.")
    if check.get("loses_to_baseline"):
        head_note += (f" **It scores below its own mean-pool baseline out of fold** (mean primary metric "
                      f"{check['main_score']:.3f} vs {check['baseline_score']:.3f}); see the table below.")
    text = CARD.format(
        data_kind="kather16 mosaics" if args.cohort == "kather" else "synthetic data", cohort=args.cohort,
        trained_on=trained_on(args), head_note=head_note,
        calibration=", ".join(f"{t}: {c['method']}" for t, c in main.get("calibration", {}).items()) or "none",
        threshold=", ".join(f"{t} ≥ {v:.3f}" for t, v in main.get("thresholds", {}).items()) or "0.5",
        n_slides=n_slides, n_patients=args.patients, n_patients_arg=args.patients, seed=args.seed, size=args.size,
        encoder=card["encoder"]["name"], embed_dim=card["encoder"]["embed_dim"],
        target_mpp=card["encoder"]["target_mpp"], head=main["head"], folds=5,
        minutes=(time.perf_counter() - t0) / 60, metrics_md=(args.out / "metrics.md").read_text())
    (args.out / "README.md").write_text(text)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s; metrics:\n{(args.out / 'metrics.md').read_text()}")
    del res


if __name__ == "__main__":
    main()
