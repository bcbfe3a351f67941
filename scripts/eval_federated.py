#!/usr/bin/env python
"""Was federated training worth it? (issue #20) Federated vs pooled vs single-site, on one held-out test set.

A generated feature cohort (``wsi_pipeline.mil.simulate``: planted response / phenotype signals in the tile
embeddings of one simulated encoder) is split by patient into ``--sites`` sites and a held-out test set.
The last site gets a scanner/stain shift: a constant offset of its tile embeddings (``--shift`` standard
deviations along a random direction) that no other site and not the test set has. Then, each with the same
head and settings:

* **federated**: ``wsi federated simulate`` over the sites (Flower SuperLink + one SuperNode per site), a
  ``--fed-folds``-member fold ensemble (default 3, the command's default; 1: one model);
* **pooled**: ``wsi train`` on all the sites' patients together (what federated training approximates);
* **site X alone**: ``wsi train`` on one site's patients.

Every model predicts the test set with ``wsi predict`` (calibrated, patient level); AUROC of response and
macro one-vs-rest AUROC of the immune phenotype, with 95% CIs from ``--n-boot`` patient-bootstrap resamples
(the same resamples for every model), and the paired difference federated − pooled. The table also gives the
pooled ensemble's fold models on their own (mean, min–max): how much an ensemble adds over one model. Prints
a markdown table and writes ``<work>/results.md`` / ``.json``.

    nice python scripts/eval_federated.py --work /tmp/fed-eval            # 600 patients: 3 sites of 140
    nice python scripts/eval_federated.py --work /tmp/fed-small --patients 420 --test-fraction 0.7  # sites of 42
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

TARGETS = "response:binary,immune_phenotype:multiclass"
MEMBERS_ROW = "pooled: one of its fold models (mean; min–max)"


def _link_run(src_run: Path, dst_run: Path, slides: list[str], encoder: str, shift: np.ndarray | None) -> None:
    """A RUN folder with ``slides``' feature files: links, or shifted copies (the scanner-shift site)."""
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout

    src, dst = RunLayout(src_run), RunLayout(dst_run)
    for sid in slides:
        target = dst.features_h5(encoder, sid)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            continue
        if shift is None:
            target.symlink_to(src.features_h5(encoder, sid).resolve())
            continue
        fs = F.read_features_h5(src.features_h5(encoder, sid))
        F.write_features_h5(target, (fs.features + shift).astype(np.float32), fs.l0_xy, dict(fs.attrs))


def build_cohort(work: Path, args: argparse.Namespace) -> dict[str, tuple[Path, Path]]:
    """``work/all`` (the generated cohort) split by patient into sites, ``test`` and ``pooled``."""
    import pandas as pd

    from wsi_pipeline.formats import api as F
    from wsi_pipeline.mil.simulate import SimSpec, simulate_feature_cohort

    spec = SimSpec(n_patients=args.patients, embed_dim=args.dim, grid=args.grid, amplitude=args.amplitude,
                   signal_fraction=0.1, seed=args.seed)
    all_labels = work / "all" / "labels.csv"
    if not all_labels.exists():
        simulate_feature_cohort(work / "all" / "run", all_labels, spec)
    table = pd.read_csv(all_labels, dtype=str, keep_default_na=False)
    rng = np.random.default_rng(args.seed)
    patients = sorted(set(table["patient_id"]))
    rng.shuffle(patients)
    n_test = round(args.test_fraction * len(patients))
    groups = {"test": patients[:n_test]}
    for k, chunk in enumerate(np.array_split(np.array(patients[n_test:]), args.sites)):
        groups[chr(ord("A") + k)] = list(chunk)
    direction = np.random.default_rng(args.seed + 1).normal(size=args.dim)
    shift = args.shift * direction / np.linalg.norm(direction)
    shifted = chr(ord("A") + args.sites - 1)
    out = {}
    for name, pats in groups.items():
        rows = table[table["patient_id"].isin(pats)]
        _link_run(work / "all" / "run", work / name / "run", list(rows["slide_id"]), spec.encoder,
                  shift if name == shifted and args.shift > 0 else None)
        out[name] = (work / name / "run", F.write_labels_csv(work / name / "labels.csv", rows))
    sites = [n for n in groups if n != "test"]
    pooled_rows = table[table["patient_id"].isin([p for n in sites for p in groups[n]])]
    for n in sites:
        _link_run(out[n][0], work / "pooled" / "run", list(table[table["patient_id"].isin(groups[n])]["slide_id"]),
                  spec.encoder, None)
    out["pooled"] = (work / "pooled" / "run", F.write_labels_csv(work / "pooled" / "labels.csv", pooled_rows))
    return out


def _seconds(model: Path, seconds: float | None = None) -> float:
    """The training time of a model, kept beside it (a rerun reuses the model)."""
    path = model.parent / f"{model.name}.seconds"
    if seconds is not None:
        path.write_text(f"{seconds:.1f}")
    return float(path.read_text()) if path.exists() else float("nan")


def train_central(run: Path, labels: Path, model: Path, args: argparse.Namespace) -> float:
    from wsi_pipeline.mil.config import TrainConfig
    from wsi_pipeline.mil.train import run_train

    if (model / "model.json").exists():
        return _seconds(model)
    t0 = time.perf_counter()
    cfg = TrainConfig(run=str(run), labels=str(labels), targets=TARGETS, model_out=str(model), head=args.head,
                      folds=args.folds, epochs=args.epochs, seed=args.seed, hidden=args.hidden, baseline=False,
                      n_bootstrap=100, threads=1, context_rings=1).validate()
    run_train(cfg)
    return _seconds(model, time.perf_counter() - t0)


def train_federated(cohort: dict[str, tuple[Path, Path]], model: Path, sites: list[str],
                    args: argparse.Namespace) -> float:
    from wsi_pipeline.federated.config import FederatedConfig, SiteConfig
    from wsi_pipeline.federated.launch import run_simulate

    if (model / "model.json").exists():
        return _seconds(model)
    t0 = time.perf_counter()
    cfg = FederatedConfig(targets=TARGETS, model_out=str(model), min_sites=len(sites), rounds=args.rounds,
                          local_epochs=args.local_epochs, head=args.head, seed=args.seed, hidden=args.hidden,
                          strategy=args.strategy, round_timeout=1800, context_rings=1,
                          patience=args.patience, folds=args.fed_folds)
    run_simulate(cfg, [SiteConfig(run=str(cohort[n][0]), labels=str(cohort[n][1]), name=n) for n in sites])
    return _seconds(model, time.perf_counter() - t0)


def fold_members(model: Path) -> list[Path]:
    """One model folder per fold model of ``model`` (the same weights and calibration, one member each): how
    much of a fold ensemble's score is the ensemble's. Written once beside ``model``."""
    import os
    from dataclasses import replace

    from wsi_pipeline.mil.model_io import ModelDir

    card = ModelDir(model).read_card()
    variant = card.variants[card.main_variant]
    out = []
    for fc in variant.folds:
        dst = model.parent / f"{model.name}.fold{fc.fold}"
        if not (dst / "model.json").exists():
            dst.mkdir(parents=True, exist_ok=True)
            if not (dst / "weights").exists():
                os.symlink((model / "weights").resolve(), dst / "weights")
            one = replace(variant, folds=[fc])
            ModelDir(dst).write_card(replace(card, variants={**card.variants, card.main_variant: one}))
        out.append(dst)
    return out


def predict(test_run: Path, labels: Path, model: Path) -> Any:
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.mil.config import PredictConfig
    from wsi_pipeline.mil.predict import run_predict

    run_predict(PredictConfig(run=str(test_run), model=str(model), labels=str(labels), write_scores=False,
                              device="cpu", force=True))  # labels: slide → patient
    return F.read_patient_predictions_csv(test_run / "patient_predictions.csv").copy()


def scores(pred: Any, truth: Any, boot: np.ndarray, draws: dict[str, np.ndarray] | None = None
           ) -> dict[str, tuple[float, float, float]]:
    """Patient-level AUROCs (point, 95% CI) on the same bootstrap resamples; ``draws`` receives the resampled
    values (for paired differences)."""
    draws = {} if draws is None else draws
    from sklearn.metrics import roc_auc_score

    df = truth.merge(pred, on="patient_id", how="left")  # truth's order: the same resamples for every model
    assert df["response_prob"].notna().all(), "a test patient has no prediction"
    classes = sorted(c[len("immune_phenotype_prob_"):] for c in df.columns if c.startswith("immune_phenotype_prob_"))

    def response(d: Any) -> float:
        d = d[d["response"].isin(["0", "1"])]
        y = d["response"].astype(int).to_numpy()
        return float(roc_auc_score(y, d["response_prob"])) if 0 < y.sum() < len(y) else float("nan")

    def phenotype(d: Any) -> float:
        d = d[d["immune_phenotype"].isin(classes)]
        if d["immune_phenotype"].nunique() < len(classes):
            return float("nan")
        p = d[[f"immune_phenotype_prob_{c}" for c in classes]].to_numpy()
        p = p / p.sum(1, keepdims=True)
        return float(roc_auc_score(d["immune_phenotype"], p, multi_class="ovr", labels=classes))

    out = {}
    for name, fn in (("response", response), ("phenotype", phenotype)):
        point = fn(df)
        vals = np.array([fn(df.iloc[idx]) for idx in boot if len(idx)])
        draws[name] = vals
        vals = vals[np.isfinite(vals)]
        out[name] = (point, float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5)))
    return out


def main() -> None:
    from wsi_pipeline.federated.config import FederatedConfig as Fed  # the command's defaults are evaluated

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--patients", type=int, default=600)
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--amplitude", type=float, default=1.5)
    ap.add_argument("--shift", type=float, default=2.0, help="scanner shift of the last site (std units)")
    ap.add_argument("--head", default="abmil")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=Fed.rounds)
    ap.add_argument("--local-epochs", type=int, default=Fed.local_epochs)
    ap.add_argument("--patience", type=int, default=Fed.patience, help="federated early stopping (rounds)")
    ap.add_argument("--fed-folds", type=int, default=Fed.folds,
                    help="members of the federated fold ensemble (`wsi federated --folds`; 1: one model)")
    ap.add_argument("--strategy", default=Fed.strategy)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    cohort = build_cohort(work, args)
    sites = sorted(n for n in cohort if n not in ("test", "pooled"))
    fed_dir = "federated" if args.fed_folds == 1 else f"federated-{args.fed_folds}folds"
    seconds = {"federated": train_federated(cohort, work / "models" / fed_dir, sites, args),
               "pooled": train_central(*cohort["pooled"], work / "models" / "pooled", args)}
    for n in sites:
        seconds[f"site {n} alone"] = train_central(*cohort[n], work / "models" / f"site-{n}", args)

    import pandas as pd

    truth = pd.read_csv(cohort["test"][1], dtype=str, keep_default_na=False)
    truth = truth.groupby("patient_id", as_index=False).first()[["patient_id", "response", "immune_phenotype"]]
    rng = np.random.default_rng(12345)
    boot = [rng.integers(0, len(truth), len(truth)) for _ in range(args.n_boot)]
    models = {"federated": fed_dir, "pooled": "pooled", **{f"site {n} alone": f"site-{n}" for n in sites}}
    results, draws = {}, {}
    for label, folder in models.items():
        pred = predict(*cohort["test"], work / "models" / folder)
        results[label] = scores(pred, truth, boot, draws.setdefault(label, {}))
    members = [scores(predict(*cohort["test"], m), truth, boot) for m in fold_members(work / "models" / "pooled")]
    results[MEMBERS_ROW] = {
        k: (float(np.mean([r[k][0] for r in members])), min(r[k][0] for r in members), max(r[k][0] for r in members))
        for k in ("response", "phenotype")}
    single = [results[f"site {n} alone"] for n in sites]
    n_train = {n: int(pd.read_csv(cohort[n][1], dtype=str)["patient_id"].nunique()) for n in sites}
    lines = [f"Held-out test set: {len(truth)} patients; sites {', '.join(f'{n} ({k} patients)' for n, k in n_train.items())}"
             f"; site {sites[-1]} with a scanner shift ({args.shift} SD). Head {args.head}, 95% patient-bootstrap "
             f"CIs ({args.n_boot} resamples). Federated: "
             + ("one model" if args.fed_folds == 1 else f"a {args.fed_folds}-fold ensemble (`--folds {args.fed_folds}`)")
             + f", ≤ {args.rounds} rounds of {args.local_epochs} local epochs, patience {args.patience}; pooled and "
             f"single-site: `wsi train`, {args.folds}-fold ensembles.", "",
             "| model | response AUROC (95% CI) | phenotype macro AUROC (95% CI) | train time (s) |", "|---|---|---|---|"]
    for label, r in results.items():
        cells = [f"{r[k][0]:.3f} ({r[k][1]:.3f}–{r[k][2]:.3f})" for k in ("response", "phenotype")]
        secs = f"{seconds[label]:.0f}" if label in seconds else ""
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {secs} |")
    means = [float(np.nanmean([r[k][0] for r in single])) for k in ("response", "phenotype")]
    lines.append(f"| mean of the single-site models | {means[0]:.3f} | {means[1]:.3f} | |")
    diffs = {}
    for k in ("response", "phenotype"):
        d = draws["federated"][k] - draws["pooled"][k]
        d = d[np.isfinite(d)]
        diffs[k] = (results["federated"][k][0] - results["pooled"][k][0], float(np.percentile(d, 2.5)),
                    float(np.percentile(d, 97.5)))
    lines += ["", "Federated − pooled (paired bootstrap 95% CI): " + "; ".join(
        f"{k} {v[0]:+.3f} ({v[1]:+.3f} to {v[2]:+.3f})" for k, v in diffs.items())
        + ". Target: within 0.02 of pooled, above the mean single-site model."]
    text = "\n".join(lines)
    print(text)
    (work / "results.md").write_text(text + "\n")
    (work / "results.json").write_text(json.dumps({"results": results, "federated_minus_pooled": diffs, "seconds": seconds,
                                                   "args": vars(args)},
                                                  default=str, indent=1))


if __name__ == "__main__":
    main()
