#!/usr/bin/env python
"""Held-out comparison of the MIL heads on two slide cohorts, end to end through the pipeline.

Cohorts (built into --work, never into the repository):

* ``synthetic``: the project's generator (`wsi_pipeline.synth.cohort`): H&E-like slides whose immune
  phenotype is the geometry of lymphocytes relative to tumour nests, response logistic in TIL fraction
  and phenotype (Bernoulli noise: the best achievable AUROC is below 1). Train and test cohorts are drawn
  with different seeds (different patients).
* ``kather``: mosaic slides of real kather16 tiles (`wsi_pipeline.synth.kather`): the phenotype is where
  04_LYMPHO tiles sit relative to 01_TUMOR tiles, not how many there are; train and test mosaics use
  tiles from disjoint *source images* (adipose/empty split by tile).

For each cohort: `wsi tile` (224 px at 0.5 µm/px) → `wsi extract` (the shipped demo encoder by default)
→ for every head `wsi train` on the train cohort (patient-level k-fold CV, fold ensemble) →
`wsi predict` on the test cohort → held-out metrics with 95% CIs from 1000 patient-level bootstrap
resamples (the same resamples for every model: paired differences vs the reference). Reference: mean of
the raw tile embeddings per slide + (multinomial) logistic regression / ridge (scikit-learn), fitted on
the train cohort.

    nice python scripts/eval_mil_heads.py --work /tmp/mil-eval
    nice python scripts/eval_mil_heads.py --work /tmp/mil-eval-quick --n-train 12 --n-test 8 --epochs 3 \\
        --folds 2 --models abmil meanpool@0           # smoke test

Models are given as HEAD[@RINGS][:key=value,...]: RINGS = spatial-context rings appended to each tile
embedding (default 1, as in the pipeline); key=value overrides TrainConfig fields (``epochs=80``) or head
arguments (``head.att_dim=64``). Prints a markdown table per cohort and writes ``<work>/results.json`` and
``<work>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSI_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGETS = "response:binary,immune_phenotype:multiclass,til_fraction:regression,os:survival(os_months,os_event)"
DEFAULT_MODELS = ["abmil@1", "transmil@1", "chowder@1", "meanpool@1", "abmil@0", "meanpool@0"]
REFERENCE = "meanpool+LR (reference)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- cohorts
def build_cohort(kind: str, split: str, out: Path, n: int, grid: tuple[int, int]) -> Path:
    """Write the slides + labels.csv of one cohort (skipped when labels.csv exists); returns labels.csv."""
    labels = out / "labels.csv"
    if labels.exists():
        return labels
    t0 = time.perf_counter()
    if kind == "synthetic":
        from wsi_pipeline.formats import write_text_atomic
        from wsi_pipeline.synth.cohort import CohortParams, labels_frame, plan_cohort
        from wsi_pipeline.synth.slides import save_truth, write_slide

        seed = 11 if split == "train" else 22
        planned = plan_cohort(CohortParams(n_patients=n, seed=seed, id_prefix="P" if split == "train" else "T"))
        for p in planned:  # resumable: slides written by an interrupted build are kept
            path = out / f"{p.spec.slide_id}.svs"
            if not path.exists():
                write_slide(p.spec, path)
                save_truth(p.spec, out / "truth" / f"{p.spec.slide_id}.npz")
        write_text_atomic(labels, labels_frame(planned).to_csv(index=False))
    else:
        from wsi_pipeline.synth.kather import build_kather_mosaic_cohort

        build_kather_mosaic_cohort(SHARED / "kather16", out, n, split=split, seed=0 if split == "train" else 1,
                                   grid=grid)
    log(f"built {kind}/{split}: {n} patients in {time.perf_counter() - t0:.0f}s")
    return labels


def tile_and_extract(slides_dir: Path, run: Path, encoder: str | None, workers: int) -> str:
    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.extract import extract_run
    from wsi_pipeline.run.layout import RunLayout
    from wsi_pipeline.tiling.runner import tile_slides

    paths = sorted(slides_dir.glob("*.svs"))
    t0 = time.perf_counter()
    s = tile_slides(paths, RunLayout(run), TilingConfig(), workers=workers)
    if s.failed:
        raise SystemExit(f"tiling failed: {s.failed[:3]}")
    t1 = time.perf_counter()
    e = extract_run(run, ExtractConfig(encoder=encoder, precision="fp32", num_workers=0, batch_size=64))
    if e.failed:
        raise SystemExit(f"extraction failed: {e.failed[:3]}")
    log(f"{run.name}: tiled {len(paths)} slides in {t1 - t0:.0f}s, extracted {e.tiles} tiles "
        f"({len(e.skipped)} slides already done) in {time.perf_counter() - t1:.0f}s")
    return e.encoder


# ---------------------------------------------------------------- models
def parse_model(spec: str) -> tuple[str, int, dict[str, Any]]:
    """``HEAD[@RINGS][:key=value,...]`` → head, context rings, TrainConfig overrides (``head.X`` → head kwargs)."""
    main, _, opts = spec.partition(":")
    head, _, rings = main.partition("@")
    over: dict[str, Any] = {}
    for kv in filter(None, opts.split(",")):
        k, _, v = kv.partition("=")
        over[k] = json.loads(v) if v[:1].isdigit() or v[:1] in "-[{" or v in ("true", "false") else v
    return head, int(rings) if rings else 1, over


def model_label(spec: str) -> str:
    head, rings, over = parse_model(spec)
    label = f"{head}+ctx{rings}" if rings else head
    return label + "".join(f"_{k}{v}" for k, v in over.items())


def train_and_predict(spec: str, cohort_dir: Path, encoder: str, a: argparse.Namespace) -> Any:
    import pandas as pd

    from wsi_pipeline.mil.config import PredictConfig, TrainConfig
    from wsi_pipeline.mil.predict import predict_run
    from wsi_pipeline.mil.train import train_cv

    head, rings, over = parse_model(spec)
    head_kwargs = {k.split(".", 1)[1]: v for k, v in over.items() if k.startswith("head.")}
    over = {k: v for k, v in over.items() if not k.startswith("head.")}
    mdir = models_dir(cohort_dir, encoder) / model_label(spec)
    if not (mdir / "model.json").exists():
        t0 = time.perf_counter()
        cfg = {"run": str(cohort_dir / "train"), "labels": str(cohort_dir / "train_slides" / "labels.csv"),
               "targets": TARGETS, "model_out": str(mdir), "head": head, "folds": a.folds, "epochs": a.epochs,
               "context_rings": rings, "baseline": False, "seed": a.seed, "encoder": encoder,
               "threads": a.threads, "n_bootstrap": 200, "head_kwargs": head_kwargs, **over}
        train_cv(TrainConfig(**cfg))
        log(f"trained {model_label(spec)} in {time.perf_counter() - t0:.0f}s")
    predict_run(PredictConfig(run=str(cohort_dir / "test"), model=str(mdir), encoder=encoder,
                              labels=str(cohort_dir / "test_slides" / "labels.csv"), write_scores=False))
    pred = pd.read_csv(cohort_dir / "test" / "predictions.csv", dtype={"slide_id": str, "patient_id": str})
    oof = json.loads((mdir / "metrics.json").read_text())["models"][model_label_variant(mdir)]
    return pred, oof


def models_dir(cohort_dir: Path, encoder: str) -> Path:
    from wsi_pipeline.run.layout import safe_name

    return cohort_dir / "models" / safe_name(encoder)


def model_label_variant(mdir: Path) -> str:
    return json.loads((mdir / "model.json").read_text())["main_variant"]


def reference_predictions(cohort_dir: Path, encoder: str, specs: list) -> Any:
    """Mean-pooled raw embeddings + logistic regression / ridge fitted on the train cohort."""
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from wsi_pipeline.formats import read_features_h5
    from wsi_pipeline.mil.tables import slide_frame
    from wsi_pipeline.mil.targets import encode_labels, read_labels_table
    from wsi_pipeline.run.layout import RunLayout

    def pooled(run: Path, ids: list[str]) -> np.ndarray:
        lay = RunLayout(run)
        return np.stack([read_features_h5(lay.features_h5(encoder, s)).features.astype(np.float64).mean(0)
                         for s in ids])

    tr_df = read_labels_table(cohort_dir / "train_slides" / "labels.csv")
    te_df = read_labels_table(cohort_dir / "test_slides" / "labels.csv")
    have_tr = {p.stem for p in RunLayout(cohort_dir / "train").features_dir(encoder).glob("*.h5")}
    have_te = {p.stem for p in RunLayout(cohort_dir / "test").features_dir(encoder).glob("*.h5")}
    tr_df, te_df = tr_df[tr_df.index.isin(have_tr)], te_df[te_df.index.isin(have_te)]
    lab = encode_labels(tr_df, specs, fit_classes=False)
    xtr, xte = pooled(cohort_dir / "train", lab.slide_ids), pooled(cohort_dir / "test", te_df.index.tolist())
    preds: list[dict[str, Any]] = [{} for _ in range(len(xte))]
    for s in specs:
        y = lab.values[s.name]
        ok = ~np.isnan(y)
        if s.kind in ("binary", "multiclass"):
            m = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)).fit(xtr[ok], y[ok].astype(int))
            p = m.predict_proba(xte)
            for i in range(len(xte)):
                preds[i][s.name] = p[i, 1] if s.kind == "binary" else p[i]
        elif s.kind == "regression":
            m = make_pipeline(StandardScaler(), Ridge(alpha=10.0)).fit(xtr[ok], y[ok])
            for i, v in enumerate(m.predict(xte)):
                preds[i][s.name] = v
        else:  # survival: the response logistic model's logit as a risk score (sign: responders live longer)
            ev = lab.events[s.name]
            ok &= ~np.isnan(ev)
            from lifelines import CoxPHFitter
            from sklearn.decomposition import PCA

            pca = make_pipeline(StandardScaler(), PCA(n_components=min(10, int(ok.sum()) - 2)))
            z = pca.fit_transform(xtr[ok])
            df = pd.DataFrame(z, columns=[f"pc{k}" for k in range(z.shape[1])]).assign(t=y[ok], e=ev[ok])
            cph = CoxPHFitter(penalizer=0.1).fit(df, "t", "e")
            risk = cph.predict_log_partial_hazard(pd.DataFrame(pca.transform(xte), columns=df.columns[:-2]))
            for i, v in enumerate(np.asarray(risk)):
                preds[i][s.name] = v
    return slide_frame(te_df.index.tolist(), te_df["patient_id"].tolist(), preds, specs)


# ---------------------------------------------------------------- main
def run_cohort(kind: str, a: argparse.Namespace) -> dict[str, Any]:
    from wsi_pipeline.mil.model_io import ModelDir
    from wsi_pipeline.mil.report import evaluate_heldout, metrics_markdown
    from wsi_pipeline.mil.targets import read_labels_table

    cdir = a.work / kind
    for split, n in (("train", a.n_train), ("test", a.n_test)):
        build_cohort(kind, split, cdir / f"{split}_slides", n, tuple(a.grid))
    encoder = ""
    for split in ("train", "test"):
        encoder = tile_and_extract(cdir / f"{split}_slides", cdir / split, a.encoder, a.workers)
    frames: dict[str, Any] = {}
    oof: dict[str, Any] = {}
    specs = None
    for spec in a.models:
        pred, oof_m = train_and_predict(spec, cdir, encoder, a)
        frames[model_label(spec)] = pred
        oof[model_label(spec)] = oof_m
        specs = ModelDir(models_dir(cdir, encoder) / model_label(spec)).read_card().target_specs
    assert specs is not None
    frames[REFERENCE] = reference_predictions(cdir, encoder, specs)
    pairs = [(m, REFERENCE) for m in frames if m != REFERENCE]
    labels = read_labels_table(cdir / "test_slides" / "labels.csv")
    metrics = evaluate_heldout(frames, labels, specs, n_boot=1000, seed=a.seed, pairs=pairs)
    title = (f"{kind} cohort: held-out test metrics ({len(labels)} test slides; trained on the train cohort, "
             f"encoder {encoder})")
    md = metrics_markdown(title, metrics, specs)
    print(md, flush=True)
    return {"metrics": metrics, "markdown": md, "oof": oof, "encoder": encoder}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (outside the repository)")
    ap.add_argument("--cohorts", nargs="+", default=["synthetic", "kather"], choices=["synthetic", "kather"])
    ap.add_argument("--n-train", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--grid", type=int, nargs=2, default=(16, 20), metavar=("ROWS", "COLS"),
                    help="kather mosaic size in 150-px tiles")
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--encoder", default=None, help="encoder (default: the shipped demo encoder)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="parallel slides when tiling")
    ap.add_argument("--retrain", action="store_true", help="delete trained models of --work first")
    ap.add_argument("--tag", default="", help="name of the results files (default: results)")
    ap.add_argument("--build-only", action="store_true", help="only write the cohorts' slides and labels")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if a.work.resolve().is_relative_to(REPO):
        ap.error("--work must be outside the repository (mosaics of kather16 must not be committed)")
    a.work.mkdir(parents=True, exist_ok=True)
    if a.retrain:
        for c in a.cohorts:
            shutil.rmtree(a.work / c / "models", ignore_errors=True)
    import torch

    torch.set_num_threads(a.threads)
    if a.build_only:
        for kind in a.cohorts:
            for split, n in (("train", a.n_train), ("test", a.n_test)):
                build_cohort(kind, split, a.work / kind / f"{split}_slides", n, tuple(a.grid))
        return 0
    results = {}
    for kind in a.cohorts:
        results[kind] = run_cohort(kind, a)
    tag = a.tag or "results"
    (a.work / f"{tag}.json").write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "markdown"}
                                                     for k, v in results.items()}, indent=2))
    (a.work / f"{tag}.md").write_text("\n\n".join(v["markdown"] for v in results.values()))
    log(f"wrote {a.work / f'{tag}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
