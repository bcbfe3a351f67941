#!/usr/bin/env python
"""Train the shipped demo MIL model (`models/wsip-demo-mil/`) on a cohort from the project's own generator.

Steps: build a cohort (``--cohort kather``, the default: mosaics of real kather16 tiles from the **training**
source images only — the side of the project's source split the shipped encoder and tissue classifier were
trained on — in the design of `data_samples/`, which is built from the held-out side;
``--cohort synthetic``: the procedural slides of wsi_pipeline.synth) → `wsi tile` → `wsi extract` with the
shipped demo encoder → `wsi train` (patient-level 5-fold CV; head chosen by `--head auto` among mean-pool and ABMIL with
spatial context, by inner CV within the training folds; the mean-pool baseline beside; post-hoc calibration on
the out-of-fold predictions) for response, immune phenotype and TIL fraction → held-out check on `data_samples/`
(held-out source images: predicted vs true phenotype, TIL fraction and response probability) → model card with
that check, the out-of-fold metrics, before/after calibration figures and how the head was chosen
(``--card-only MINUTES`` redoes only the check and the card).

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

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_samples"

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
- **Recipe:** `python scripts/train_demo_model.py --cohort {cohort} --patients {n_patients_arg} --seed {seed}{recipe_flags}`
  ({minutes:.0f} min on 2 CPU cores shared with other jobs, including slide generation, tiling and extraction;
  it also runs the held-out check below).
- **Intended use:** demonstration and testing of wsi-pipeline. Not a medical device; not for clinical use;
  its metrics say nothing about real tissue.

## Held-out check on `data_samples/`

{samples_md}
{heldout_md}## Out-of-fold metrics (patient-level {folds}-fold CV, 95% CI from 1000 patient bootstrap resamples)

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
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--selection-folds", type=int, default=3, help="inner CV folds of --head auto")
    ap.add_argument("--selection-epochs", type=int, default=20, help="epochs of each --head auto inner training")
    ap.add_argument("--head", default="auto", help="auto (default: chosen by inner CV) or a registered head")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prepare-only", action="store_true", help="generate and tile the cohort, then stop")
    ap.add_argument("--heldout-md", type=Path, nargs="*", default=[], metavar="MD",
                    help="tables printed by scripts/eval_calibration.py / scripts/eval_survival.py (their --out "
                         "files) to copy into the card's held-out section")
    ap.add_argument("--card-only", type=float, default=None, metavar="MINUTES",
                    help="only rerun the data_samples check and rewrite the card of the model already in --out "
                         "(MINUTES: the recorded training time)")
    args = ap.parse_args()
    if args.card_only is not None:
        write_card(args, args.work / args.cohort / "slides" / "labels.csv", args.card_only)
        return

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
    run_train(TrainConfig(run=str(run), labels=str(labels_csv), targets=TARGETS, model_out=str(args.out),
                          head=args.head, folds=args.folds, seed=args.seed, encoder=encoder, epochs=args.epochs,
                          selection_folds=args.selection_folds, selection_epochs=args.selection_epochs),
              progress=lambda m: print("  " + m, flush=True))
    write_card(args, labels_csv, (time.perf_counter() - t0) / 60)


def samples_check(model_dir: Path, work: Path, workers: int) -> tuple[str, int, int]:
    """Predict `data_samples/` (mosaics of held-out kather16 source images) with the model and compare with
    the generator's truth: (markdown table and summary, slides whose phenotype agrees, slides)."""
    import pandas as pd

    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.extract import run_extract
    from wsi_pipeline.formats.cards import read_model_json
    from wsi_pipeline.mil.config import PredictConfig
    from wsi_pipeline.mil.predict import predict_run
    from wsi_pipeline.slide.open import find_slides
    from wsi_pipeline.tiling.stage import run_tile

    encoder = read_model_json(model_dir)["encoder"]["name"]
    run = work / "data_samples_run"
    s = run_tile(find_slides([SAMPLES]), run, TilingConfig(), workers=workers)
    assert s.ok, s.failed
    e = run_extract(run, ExtractConfig(encoder=encoder))
    assert e.ok, e.failed
    predict_run(PredictConfig(run=str(run), model=str(model_dir), encoder=encoder, write_scores=False, force=True))
    truth = pd.read_csv(SAMPLES / "labels.csv").set_index("slide_id")
    pred = pd.read_csv(run / "predictions.csv").set_index("slide_id").loc[truth.index]
    agree = pred["immune_phenotype_pred"] == truth["immune_phenotype"]
    mae = (pred["response_prob"] - truth["response_prob"]).abs().mean()
    lines = ["| slide | truth phenotype | MIL phenotype | truth TIL fraction | MIL TIL fraction | "
             "true P(response) | MIL `response_prob` |", "|---|---|---|---|---|---|---|"]
    for sid, t in truth.iterrows():
        p = pred.loc[sid]
        lines.append(f"| {sid} | {t.immune_phenotype} | {p.immune_phenotype_pred} | {t.til_fraction:.3f} | "
                     f"{p.til_fraction_pred:.3f} | {t.response_prob:.2f} | {p.response_prob:.2f} |")
    text = ("`data_samples/` is built from the **held-out** kather16 source images (never seen by the encoder, the "
            "tissue classifier or this model). `wsi run data_samples` (default tiling; "
            "`tests/mil/test_mil_demo_data_samples.py` checks ≥ 6 of 7):\n\n" + "\n".join(lines) + "\n\n"
            f"Immune phenotype: **{int(agree.sum())} of {len(agree)} agree**. Mean absolute error of "
            f"`response_prob` against the generator's true response probability on these {len(agree)} slides: "
            f"{mae:.3f} (seven slides: descriptive only; the held-out calibration tables with CIs are in the "
            "README, \"Training on your cohort\").\n")
    return text, int(agree.sum()), len(agree)


def recipe_flags(args: argparse.Namespace) -> str:
    """The training flags that differ from the script's defaults, as they would be typed."""
    defaults = {"folds": 5, "selection_folds": 3, "selection_epochs": 20, "epochs": 40, "head": "auto"}
    return "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k, v in defaults.items()
                   if getattr(args, k) != v)


def heldout_section(files: list[Path]) -> str:
    """The card section holding the held-out tables of the recipe on larger cohorts, as the evaluation
    scripts printed them ('' without files)."""
    if not files:
        return ""
    parts = ["## Held-out evaluation of the recipe on larger cohorts", "",
             "Same encoder, heads and training code on cohorts of patients the models never saw, as printed by "
             "`scripts/eval_calibration.py` (calibration before/after, MAE against the generator's true response "
             "probability, head chosen by `--head auto`) and `scripts/eval_survival.py` (Cox head alone against the "
             "oracle C-index); commands and discussion in the README, \"Training on your cohort\".", ""]
    for f in files:  # their headings one level down, under this section
        parts += ["#" + line if line.startswith("#") else line for line in f.read_text().strip().splitlines()]
        parts.append("")
    return "\n".join(parts) + "\n"


def write_card(args: argparse.Namespace, labels_csv: Path, minutes: float) -> None:
    """Run the held-out check on `data_samples/` and write the model card (README.md) of ``args.out``."""
    from wsi_pipeline.formats.cards import read_model_json
    from wsi_pipeline.formats.tables import read_labels_csv

    card = read_model_json(args.out)
    n_slides = len(read_labels_csv(labels_csv))
    main = card["variants"][card["main_variant"]]
    sel = card.get("head_selection") or {}
    metrics = json.loads((args.out / "metrics.json").read_text())
    check = metrics.get("baseline_check") or {}
    head_note = (f"Chosen by `--head auto` (candidates {', '.join(sel.get('candidates', []))}; inner CV within "
                 f"the training folds only): {sel.get('reason', '')}." if sel.get("requested") == "auto"
                 else f"Fixed with `--head {args.head}`.")
    if check.get("loses_to_baseline"):
        pairs = [c for c in metrics.get("comparisons", [])
                 if (c["model_a"], c["model_b"]) == (check["main"], check["baseline"])]
        diffs = "; ".join(f"{c['target']} {c['estimate']:+.3f} ({c['ci_low']:+.3f} to {c['ci_high']:+.3f})"
                          for c in pairs)
        noise = (" — every paired 95% CI includes 0, so the two are indistinguishable on these patients"
                 if pairs and all(c["ci_low"] <= 0 <= c["ci_high"] for c in pairs) else "")
        what = (" (the same head on the raw tile embeddings, without the context ring)"
                if check["baseline"] == f"{check['main']}-baseline" else "")
        head_note += (f" **It scores below its own mean-pool baseline `{check['baseline']}`{what} out of fold** "
                      f"(mean primary metric {check['main_score']:.3f} vs {check['baseline_score']:.3f}; paired "
                      f"differences {diffs}{noise}); see the tables below.")
    elif check:
        head_note += (f" Out of fold it scores at least as well as its own mean-pool baseline (mean primary metric "
                      f"{check['main_score']:.3f} vs {check['baseline_score']:.3f}).")
    samples_md, agree, n = samples_check(args.out, args.work / args.cohort, args.workers)
    text = CARD.format(
        data_kind="kather16 mosaics" if args.cohort == "kather" else "synthetic data", cohort=args.cohort,
        trained_on=trained_on(args), head_note=head_note,
        calibration=", ".join(f"{t}: {c['method']}" for t, c in main.get("calibration", {}).items()) or "none",
        threshold=", ".join(f"{t} ≥ {v:.3f}" for t, v in main.get("thresholds", {}).items()) or "0.5",
        n_slides=n_slides, n_patients=args.patients, n_patients_arg=args.patients, seed=args.seed, size=args.size,
        encoder=card["encoder"]["name"], embed_dim=card["encoder"]["embed_dim"],
        target_mpp=card["encoder"]["target_mpp"], head=main["head"], folds=args.folds, recipe_flags=recipe_flags(args),
        minutes=minutes, samples_md=samples_md, heldout_md=heldout_section(args.heldout_md), metrics_md=(args.out / "metrics.md").read_text())
    (args.out / "README.md").write_text(text)
    print(f"wrote {args.out}; data_samples immune phenotype: {agree} of {n} agree\n{samples_md}\nmetrics:\n"
          f"{(args.out / 'metrics.md').read_text()}")

if __name__ == "__main__":
    main()
