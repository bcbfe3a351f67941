#!/usr/bin/env python
"""Held-out comparison of the MIL heads on two slide cohorts, end to end through the pipeline (issue #4).

Cohorts (built into --work, never into the repository):

* ``synthetic``: the project's generator (`wsi_pipeline.synth.cohort`): H&E-like slides whose immune
  phenotype is the geometry of lymphocytes relative to tumour nests, response logistic in TIL fraction
  and phenotype (Bernoulli noise: the best achievable AUROC is below 1; the tables say how far below).
  Train and test cohorts are drawn with different seeds (different patients); ~20% of patients have two
  slides (patient-level folds and metrics).
* ``kather``: mosaic slides of real kather16 tiles (`wsi_pipeline.synth.kather`): the phenotype is where
  04_LYMPHO tiles sit relative to 01_TUMOR tiles, not how many there are; train and test mosaics use
  tiles from disjoint *source images* (adipose/empty, which have too few sources, split by tile). This is
  the project's one kather16 split, the one the demo encoder was pretrained on (train side only).

For each cohort: tiling (224 px at 0.5 µm/px) → feature extraction (``--encoder``, default the shipped
default encoder) → for every model `wsi train` on the train cohort (patient-level stratified k-fold CV,
early stopping on an inner split, final model = fold ensemble) → `wsi predict` on the test cohort →
held-out metrics with 95% CIs from ``--n-boot`` (≥ 1000) patient-level bootstrap resamples, the same
resamples for every model (paired differences vs the reference). Two non-MIL comparators, fitted on the
train cohort with scikit-learn / lifelines:

* ``reference: rand-ResNet18 mean+LR``: mean-pooled features of a random-init ResNet18 (fixed seed, its
  weights saved under --work so train and test use the same network) + (multinomial) logistic regression
  / ridge / Cox on 10 PCs: what you get with no pathology knowledge in the encoder;
* ``<encoder> mean+LR``: the same linear models on mean-pooled features of ``--encoder`` (a linear probe).

Everything expensive is cached under --work: cohorts (``<work>/<cohort>/{train,test}_slides``, checked
against the sizes asked for), tiles (``<work>/<cohort>/{train,test}/tiles``), features per encoder and
weights checksum, trained models per (encoder, weights, training settings). Rerunning with another
``--encoder`` re-extracts and retrains only.

    # full evaluation (the numbers for the closing note of issue #4)
    nice python scripts/eval_mil_heads.py --work /tmp/mil-eval --out /tmp/mil-eval/results.md
    # smoke test (minutes): tiny cohorts, small slides, few epochs
    nice python scripts/eval_mil_heads.py --work /tmp/mil-eval-smoke --n-train 10 --n-test 6 \\
        --slide-size 2000 1500 --grid 8 10 --folds 2 --epochs 3

Models are given as HEAD[@RINGS][:key=value,...]: RINGS = spatial-context rings appended to each tile
embedding (default 1, as in the pipeline); key=value overrides TrainConfig fields (``epochs=80``,
``lr=3e-4``) or head arguments (``head.att_dim=64``). Prints a markdown table per cohort and writes
``--out`` (default ``<work>/results.md``) and ``<work>/results.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSI_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGETS = "response:binary,immune_phenotype:multiclass,til_fraction:regression,os:survival(os_months,os_event)"
DEFAULT_MODELS = ["auto@1", "abmil@1", "transmil@1", "chowder@1", "meanpool@1", "abmil@0", "meanpool@0"]
REFERENCE_ENCODER = "timm:resnet18"
REFERENCE = "reference: rand-ResNet18 mean+LR"
RANDOM_INIT_SEED = 0
# cohort sizes (patients) when --n-train/--n-test are not given; synthetic slides take ~13 s each to draw
DEFAULT_SIZES = {"synthetic": (70, 40), "kather": (100, 60)}
SYNTH_SEEDS = {"train": 11, "test": 22}
KATHER_SEEDS = {"train": 0, "test": 1}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- cohorts
def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _split_sha1(table: Any) -> str:
    """Checksum of a kather16 tile → train/test table (``file``, ``split``)."""
    rows = sorted(f"{f},{s}" for f, s in zip(table["file"], table["split"], strict=True))
    return _sha1("\n".join(rows))


def _planned_synthetic(params: dict[str, Any]) -> list[Any]:
    from wsi_pipeline.synth.cohort import CohortParams, plan_cohort

    return plan_cohort(CohortParams(n_patients=params["n_patients"], seed=params["seed"],
                                    size_l0=tuple(params["size_l0"]),
                                    id_prefix="P" if params["split"] == "train" else "T"))


def cohort_params(kind: str, split: str, n: int, a: argparse.Namespace) -> dict[str, Any]:
    """What defines a cohort's slides, as the current code would build them (kept in ``cohort.json``).
    ``labels_sha1``: the synthetic generator's labels for these parameters; ``split_sha1``: the kather16
    tile split (the one the demo encoder was pretrained on), so a cohort built by older code is noticed."""
    if kind == "synthetic":
        p: dict[str, Any] = {"kind": kind, "split": split, "n_patients": n, "seed": SYNTH_SEEDS[split],
                             "size_l0": list(a.slide_size)}
        from wsi_pipeline.synth.cohort import labels_frame

        p["labels_sha1"] = _sha1(labels_frame(_planned_synthetic(p)).to_csv(index=False))
        return p
    from wsi_pipeline.synth.kather import MosaicParams, split_kather_by_source

    mp = MosaicParams()
    p = {"kind": kind, "split": split, "n_patients": n, "seed": KATHER_SEEDS[split], "grid": list(a.grid),
         "split_sha1": _split_sha1(split_kather_by_source(SHARED / "kather16", mp.test_fraction, mp.split_seed))}
    if split == "train" and getattr(a, "sites", 0):  # the test cohort's unseen source images are one more site
        p["sites"] = a.sites
    return p


def cached_params(kind: str, split: str, out: Path) -> dict[str, Any]:
    """The parameters of the cohort in ``out``: its cohort.json (or, for a cohort built before cohort.json
    existed, read back from its labels and truth), with the checksums recomputed from its files."""
    import numpy as np
    import pandas as pd

    from wsi_pipeline.formats.tables import read_labels_csv

    if (out / "cohort.json").exists():
        p = json.loads((out / "cohort.json").read_text())
    else:
        lab = read_labels_csv(out / "labels.csv")
        p = {"kind": kind, "split": split, "n_patients": int(lab["patient_id"].nunique()),
             "seed": (SYNTH_SEEDS if kind == "synthetic" else KATHER_SEEDS)[split]}
        if kind == "synthetic":
            from wsi_pipeline.slide.open import open_slide

            with open_slide(out / f"{lab['slide_id'].iloc[0]}.svs") as sl:
                p["size_l0"] = list(sl.dimensions)
        else:
            with np.load(sorted((out / "truth").glob("*.npz"))[0]) as z:
                p["grid"] = list(z["class_map"].shape)
    if kind == "synthetic":
        p["labels_sha1"] = _sha1((out / "labels.csv").read_text())
    else:
        split_csv = out / "tile_split.csv"
        p["split_sha1"] = _split_sha1(pd.read_csv(split_csv)) if split_csv.exists() else "missing"
    return p


def build_cohort(kind: str, split: str, out: Path, params: dict[str, Any]) -> Path:
    """Write the slides + labels.csv of one cohort (kept when it exists with the same parameters)."""
    from wsi_pipeline.formats.atomic import write_text_atomic
    from wsi_pipeline.formats.tables import write_labels_csv

    labels, meta = out / "labels.csv", out / "cohort.json"
    if labels.exists():
        have = cached_params(kind, split, out)
        if have != params:
            diff = {k: (have.get(k), v) for k, v in params.items() if have.get(k) != v}
            raise SystemExit(f"{out}: the cached cohort differs from what this run asks for (cached, asked): "
                             f"{diff}. Pass matching --n-train/--n-test/--grid/--slide-size, or delete "
                             f"{out.parent} (cohort built by older code) or use another --work")
        if not meta.exists():
            write_text_atomic(meta, json.dumps(params))
        return labels
    t0 = time.perf_counter()
    n = params["n_patients"]
    if kind == "synthetic":
        from wsi_pipeline.synth.cohort import labels_frame
        from wsi_pipeline.synth.slides import save_truth, write_slide

        planned = _planned_synthetic(params)
        out.mkdir(parents=True, exist_ok=True)
        for p in planned:  # resumable: slides written by an interrupted build are kept
            path = out / f"{p.spec.slide_id}.svs"
            if not path.exists():
                write_slide(p.spec, path)
                save_truth(p.spec, out / "truth" / f"{p.spec.slide_id}.npz")
        write_labels_csv(labels, labels_frame(planned))
    else:
        from wsi_pipeline.synth.kather import MosaicParams, build_kather_mosaic_cohort

        build_kather_mosaic_cohort(SHARED / "kather16", out, n, split=split, seed=params["seed"],
                                   grid=tuple(params["grid"]), params=MosaicParams(sites=params.get("sites", 0)))
    write_text_atomic(meta, json.dumps(params))
    if cached_params(kind, split, out) != params:
        raise SystemExit(f"{out}: the cohort just built does not match its parameters {params}")
    log(f"built {kind}/{split}: {n} patients in {time.perf_counter() - t0:.0f}s")
    return labels


# ---------------------------------------------------------------- encoders
def encoder_weights(work: Path, encoder: str) -> str | None:
    """A ``timm:<arch>`` encoder without weights is random-init: draw it once with a fixed seed and save it
    under --work, so the train and test cohorts (and reruns) go through the same network. Others: None."""
    if not encoder.startswith("timm:"):
        return None
    import torch
    from safetensors.torch import save_file

    from wsi_pipeline.formats.atomic import atomic_path
    from wsi_pipeline.runfolder.layout import safe_name

    path = work / "random-init" / f"{safe_name(encoder)}-seed{RANDOM_INIT_SEED}.safetensors"
    if not path.exists():
        import timm

        torch.manual_seed(RANDOM_INIT_SEED)
        net = timm.create_model(encoder.split(":", 1)[1], pretrained=False, num_classes=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    return str(path)


def tile_run(slides_dir: Path, run: Path, workers: int) -> None:
    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.tiling.stage import run_tile

    paths = sorted(slides_dir.glob("*.svs"))
    t0 = time.perf_counter()
    s = run_tile(paths, run, TilingConfig(), workers=workers)
    if s.failed:
        raise SystemExit(f"tiling failed: {s.failed[:3]}")
    if s.done:
        log(f"{run.parent.name}/{run.name}: tiled {len(s.done)} slides in {time.perf_counter() - t0:.0f}s")


def extract(run: Path, encoder: str, weights: str | None) -> tuple[str, str]:
    """Features of every tiled slide (cached: slides done with the same encoder weights are skipped);
    returns (encoder name, weights checksum)."""
    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.extract import run_extract
    from wsi_pipeline.formats.h5 import A_WEIGHTS_SHA256, read_h5_attrs
    from wsi_pipeline.runfolder.layout import RunLayout

    t0 = time.perf_counter()
    e = run_extract(run, ExtractConfig(encoder=encoder, weights=weights, precision="fp32", num_workers=0,
                                       batch_size=64))
    if e.failed:
        raise SystemExit(f"extraction failed: {e.failed[:3]}")
    if e.done:
        log(f"{run.parent.name}/{run.name}: extracted {e.figures['tiles']} tiles of {len(e.done)} slides with "
            f"{e.figures['encoder']} "
            f"in {time.perf_counter() - t0:.0f}s ({len(e.skipped)} slides cached)")
    first = sorted(RunLayout(run).features_dir(e.figures["encoder"]).glob("*.h5"))[0]
    return e.figures["encoder"], str(read_h5_attrs(first).get(A_WEIGHTS_SHA256, ""))


# ---------------------------------------------------------------- models
def parse_model(spec: str) -> tuple[str, int, dict[str, Any]]:
    """``HEAD[@RINGS][:key=value,...]`` → head, context rings, TrainConfig overrides (``head.X`` → head kwargs);
    a value may be a JSON list, e.g. ``abmil@1:covariates=["age","stage"]``."""
    main, _, opts = spec.partition(":")
    head, _, rings = main.partition("@")
    over: dict[str, Any] = {}
    for kv in filter(None, re.split(r",(?![^\[]*\])", opts)):  # commas inside a JSON list stay in the value
        k, _, v = kv.partition("=")
        over[k] = json.loads(v) if v[:1].isdigit() or v[:1] in "-[{" or v in ("true", "false") else v
    return head, int(rings) if rings else 1, over


def model_label(spec: str) -> str:
    head, rings, over = parse_model(spec)
    label = f"{head}+ctx{rings}" if rings else head
    return label + "".join(f"_{k}{'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in over.items())


def models_dir(cohort_dir: Path, encoder: str, weights_sha: str) -> Path:
    from wsi_pipeline.runfolder.layout import safe_name

    return cohort_dir / "models" / f"{safe_name(encoder)}-{weights_sha[:8] or 'na'}"


def train_cached_and_predict(cohort_dir: Path, cfg: dict[str, Any], key_extra: dict[str, Any], label: str) -> Any:
    """`wsi train` with ``cfg`` (its ``model_out`` reused when it was trained with the same settings and
    ``key_extra``, e.g. the encoder weights' checksum), then the test cohort's predictions table."""
    from wsi_pipeline.formats.tables import read_predictions_csv
    from wsi_pipeline.mil.config import PredictConfig, TrainConfig
    from wsi_pipeline.mil.predict import predict_run
    from wsi_pipeline.mil.train import run_train

    mdir = Path(cfg["model_out"])
    key = json.dumps({**cfg, **key_extra, "threads": None}, sort_keys=True)
    key_file = mdir / "eval_key.json"
    if not (mdir / "model.json").exists() or not key_file.exists() or key_file.read_text() != key:
        shutil.rmtree(mdir, ignore_errors=True)
        t0 = time.perf_counter()
        run_train(TrainConfig(**cfg))
        key_file.write_text(key)
        log(f"{cohort_dir.name}: trained {label} in {time.perf_counter() - t0:.0f}s")
    predict_run(PredictConfig(run=str(cohort_dir / "test"), model=str(mdir), encoder=cfg.get("encoder"),
                              labels=str(cohort_dir / "test_slides" / "labels.csv"), write_scores=False))
    return read_predictions_csv(cohort_dir / "test" / "predictions.csv")


def train_and_predict(spec: str, cohort_dir: Path, encoder: str, weights_sha: str, a: argparse.Namespace
                      ) -> tuple[Any, dict[str, Any], Path]:
    """Train ``spec`` on the train cohort (cached when the settings match) and predict the test cohort."""
    from wsi_pipeline.formats.cards import MODEL_JSON_VERSION, read_model_json

    head, rings, over = parse_model(spec)
    head_kwargs = {k.split(".", 1)[1]: v for k, v in over.items() if k.startswith("head.")}
    over = {k: v for k, v in over.items() if not k.startswith("head.")}
    mdir = models_dir(cohort_dir, encoder, weights_sha) / model_label(spec)
    cfg = {"run": str(cohort_dir / "train"), "labels": str(cohort_dir / "train_slides" / "labels.csv"),
           "targets": TARGETS, "model_out": str(mdir), "head": head, "folds": a.folds, "epochs": a.epochs,
           "context_rings": rings, "baseline": False, "seed": a.seed, "encoder": encoder,
           "threads": a.threads, "n_bootstrap": a.n_boot, "head_kwargs": head_kwargs, "calibration": a.calibration,
           **({"group_by": "site"} if getattr(a, "sites", 0) and cohort_dir.name == "kather" else {}), **over}
    pred = train_cached_and_predict(cohort_dir, cfg, {"weights_sha256": weights_sha, "model_json": MODEL_JSON_VERSION},
                                    model_label(spec))
    main = read_model_json(mdir)["main_variant"]
    oof = json.loads((mdir / "metrics.json").read_text())["models"][main]
    return pred, oof, mdir


def linear_predictions(cohort_dir: Path, encoder: str, specs: list) -> Any:
    """Mean-pooled embeddings of ``encoder`` + logistic regression (binary / multinomial), ridge
    (regression) and a penalised Cox model on 10 principal components (survival), fitted on the train
    cohort; the test cohort's slide predictions as a ``predictions.csv``-like frame."""
    import numpy as np
    import pandas as pd
    from lifelines import CoxPHFitter
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from wsi_pipeline.formats.h5 import read_features_h5
    from wsi_pipeline.mil.tables import slide_frame
    from wsi_pipeline.mil.targets import encode_labels, read_labels_table
    from wsi_pipeline.runfolder.layout import RunLayout

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
            yk = y[ok].astype(int)
            present = np.unique(yk)
            full = np.zeros((len(xte), len(s.classes)))
            if len(present) < 2:  # a (tiny) train cohort with one class: predict it
                full[:, present] = 1.0
            else:  # classes absent from the train cohort get probability 0
                m = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
                full[:, present] = m.fit(xtr[ok], yk).predict_proba(xte)
            p = full
            for i in range(len(xte)):
                preds[i][s.name] = p[i, 1] if s.kind == "binary" else p[i]
        elif s.kind == "regression":
            m = make_pipeline(StandardScaler(), Ridge(alpha=10.0)).fit(xtr[ok], y[ok])
            for i, v in enumerate(m.predict(xte)):
                preds[i][s.name] = v
        else:
            ok &= ~np.isnan(lab.events[s.name])
            pca = make_pipeline(StandardScaler(), PCA(n_components=max(1, min(10, int(ok.sum()) - 2))))
            z = pca.fit_transform(xtr[ok])
            cols = [f"pc{k}" for k in range(z.shape[1])]
            df = pd.DataFrame(z, columns=cols).assign(t=y[ok], e=lab.events[s.name][ok])
            cph = CoxPHFitter(penalizer=0.1).fit(df, "t", "e")
            risk = cph.predict_log_partial_hazard(pd.DataFrame(pca.transform(xte), columns=cols))
            for i, v in enumerate(np.asarray(risk)):
                preds[i][s.name] = v
    return slide_frame(te_df.index.tolist(), te_df["patient_id"].tolist(), preds, specs)


def ceiling_note(labels: Any, n_boot: int, seed: int) -> str:
    """AUROC of the generator's true response probability: the best any model can do on this cohort."""
    import numpy as np

    from wsi_pipeline.evaluate.bootstrap import Truth, bootstrap_metrics, bootstrap_weights

    if "response_prob" not in labels.columns:
        return ""
    pat = labels.groupby("patient_id").first()
    y = pat["response"].astype(float).to_numpy()
    p = pat["response_prob"].astype(float).to_numpy()
    ok = ~(np.isnan(y) | np.isnan(p))
    m = bootstrap_metrics(Truth("binary", y[ok]), p[ok], bootstrap_weights(int(ok.sum()), n_boot, seed))["auroc"]
    return (f"\nResponse ceiling (AUROC of the generator's true response probability on these test patients): "
            f"{m.fmt()}.\n")


# ---------------------------------------------------------------- main
def run_cohort(kind: str, a: argparse.Namespace) -> dict[str, Any]:
    from wsi_pipeline.mil.model_io import ModelDir
    from wsi_pipeline.mil.report import evaluate_heldout, metrics_markdown
    from wsi_pipeline.mil.targets import read_labels_table

    t_start = time.perf_counter()
    cdir = a.work / kind
    sizes = {"train": a.n_train or DEFAULT_SIZES[kind][0], "test": a.n_test or DEFAULT_SIZES[kind][1]}
    for split in ("train", "test"):
        build_cohort(kind, split, cdir / f"{split}_slides", cohort_params(kind, split, sizes[split], a))
    encoders = [a.encoder] + ([a.reference_encoder] if a.reference_encoder != a.encoder else [])
    found: dict[str, tuple[str, str]] = {}
    for split in ("train", "test"):
        tile_run(cdir / f"{split}_slides", cdir / split, a.workers)
        for enc in encoders:
            found[enc] = extract(cdir / split, enc, encoder_weights(a.work, enc))
    encoder, sha = found[a.encoder]
    ref_encoder = found[a.reference_encoder][0]
    t_feat = time.perf_counter()

    frames: dict[str, Any] = {}
    oof: dict[str, Any] = {}
    thresholds: dict[str, dict[str, float]] = {}  # each model's recorded t_pred cut-offs (balanced accuracy)
    specs = None
    for spec in a.models:
        pred, oof_m, mdir = train_and_predict(spec, cdir, encoder, sha, a)
        frames[model_label(spec)] = pred
        oof[model_label(spec)] = oof_m
        card = ModelDir(mdir).read_card()
        specs = card.target_specs
        thresholds[model_label(spec)] = dict(card.variants[card.main_variant].thresholds)
    if specs is None:
        raise SystemExit("no --models given")
    t_train = time.perf_counter()
    if ref_encoder != encoder:
        frames[f"{encoder} mean+LR"] = linear_predictions(cdir, encoder, specs)
    frames[REFERENCE] = linear_predictions(cdir, ref_encoder, specs)
    pairs = [(m, REFERENCE) for m in frames if m != REFERENCE]
    labels = read_labels_table(cdir / "test_slides" / "labels.csv")
    metrics = evaluate_heldout(frames, labels, specs, n_boot=a.n_boot, seed=a.seed, pairs=pairs,
                               thresholds=thresholds)
    n_tr = read_labels_table(cdir / "train_slides" / "labels.csv")["patient_id"].nunique()
    title = (f"{kind} cohort: held-out test metrics (encoder {encoder}; trained on {n_tr} train patients, "
             f"{a.folds}-fold CV ensembles, ≤ {a.epochs} epochs)")
    md = metrics_markdown(title, metrics, specs)
    md += (f"\nModels: HEAD+ctxR = R rings of neighbour-mean context features per tile; `{REFERENCE}` = "
           f"mean-pooled features of a random-init ResNet18 ({REFERENCE_ENCODER}, seed {RANDOM_INIT_SEED}) + "
           "logistic regression / ridge / Cox on 10 PCs, fitted on the train cohort"
           + (f"; `{encoder} mean+LR` = the same on {encoder} features" if ref_encoder != encoder else "")
           + ".\n")
    md += ceiling_note(labels, a.n_boot, a.seed)
    t_end = time.perf_counter()
    md += (f"\nTime: cohort + features {t_feat - t_start:.0f}s, training + prediction {t_train - t_feat:.0f}s, "
           f"linear models + metrics {t_end - t_train:.0f}s.\n")
    print(md, flush=True)
    return {"metrics": metrics, "markdown": md, "oof": oof, "encoder": encoder, "weights_sha256": sha,
            "seconds": round(t_end - t_start, 1)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (outside the repository)")
    ap.add_argument("--out", type=Path, default=None, help="markdown file for the tables (default <work>/results.md)")
    ap.add_argument("--cohorts", nargs="+", default=["synthetic", "kather"], choices=["synthetic", "kather"])
    ap.add_argument("--n-train", type=int, default=None,
                    help="train patients per cohort (default: synthetic 70, kather 100)")
    ap.add_argument("--n-test", type=int, default=None, help="test patients per cohort (default: synthetic 40, kather 60)")
    ap.add_argument("--grid", type=int, nargs=2, default=(16, 20), metavar=("ROWS", "COLS"),
                    help="kather mosaic size in 150-px tiles (default 16 20)")
    ap.add_argument("--slide-size", type=int, nargs=2, default=(4000, 3000), metavar=("W", "H"),
                    help="synthetic slide size in px at 0.5 µm/px (default 4000 3000)")
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--encoder", default=None, help="encoder (default: the shipped default encoder)")
    ap.add_argument("--reference-encoder", default=REFERENCE_ENCODER,
                    help=f"encoder of the linear reference (default {REFERENCE_ENCODER}, random init)")
    ap.add_argument("--calibration", default="auto",
                    help="post-hoc calibration of `wsi train` (auto, platt, temperature, isotonic, none)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--sites", type=int, default=0,
                    help="kather: deal the train cohort's source images to this many sites (a `site` column) and "
                         "train with --group-by site, so out-of-fold predictions come from unseen sites as the "
                         "test cohort's do (default 0: one pool, folds by patient)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--n-boot", type=int, default=1000, help="patient-level bootstrap resamples (>= 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--workers", type=int, default=1, help="parallel slides when tiling")
    ap.add_argument("--retrain", action="store_true", help="delete the trained models of --work first")
    ap.add_argument("--tag", default="results", help="name of <work>/<tag>.json (and of the default --out)")
    ap.add_argument("--build-only", action="store_true", help="only write the cohorts' slides and labels")
    a = ap.parse_args(argv)
    if a.work.resolve().is_relative_to(REPO):
        ap.error("--work must be outside the repository (mosaics of kather16 must not be committed)")
    if a.n_boot < 1000:
        ap.error("--n-boot must be >= 1000")
    if a.encoder is None:
        from wsi_pipeline.encoders.registry import default_encoder_name

        a.encoder = default_encoder_name()
    a.out = a.out or a.work / f"{a.tag}.md"
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("wsi_pipeline.encoders.registry").setLevel(logging.ERROR)  # "random initialisation"
    a.work.mkdir(parents=True, exist_ok=True)
    if a.retrain:
        for c in a.cohorts:
            shutil.rmtree(a.work / c / "models", ignore_errors=True)
    import torch

    torch.set_num_threads(a.threads)
    if a.build_only:
        for kind in a.cohorts:
            for split, n in zip(("train", "test"), (a.n_train, a.n_test), strict=True):
                n = n or DEFAULT_SIZES[kind][split == "test"]
                build_cohort(kind, split, a.work / kind / f"{split}_slides", cohort_params(kind, split, n, a))
        return 0
    t0 = time.perf_counter()
    log(f"encoder {a.encoder}; models {' '.join(a.models)}; {a.folds} folds, <= {a.epochs} epochs")
    results = {kind: run_cohort(kind, a) for kind in a.cohorts}
    (a.work / f"{a.tag}.json").write_text(json.dumps(
        {k: {kk: vv for kk, vv in v.items() if kk != "markdown"} for k, v in results.items()}, indent=2))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n\n".join(v["markdown"] for v in results.values()))
    log(f"wrote {a.out} and {a.work / f'{a.tag}.json'} ({time.perf_counter() - t0:.0f}s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
