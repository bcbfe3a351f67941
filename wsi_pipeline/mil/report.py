"""Assembling the cross-validation results: calibrated OOF tables, metrics with CIs (before/after
calibration), comparisons, how the head was chosen, cut-offs, model card."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_pipeline.errors import LabelsError
from wsi_pipeline.evaluate.bootstrap import (
    PRIMARY_METRIC,
    MetricCI,
    bootstrap_metrics,
    bootstrap_weights,
    paired_difference,
)
from wsi_pipeline.formats.atomic import write_text_atomic
from wsi_pipeline.formats.tables import write_oof_predictions_csv
from wsi_pipeline.mil.data import EncoderInfo
from wsi_pipeline.mil.model_io import ModelCard, ModelDir, VariantCard
from wsi_pipeline.mil.oof import (
    CALIBRATION_PROTOCOL,
    THRESHOLD_RULE,
    VariantOOF,
    before_after,
    calibration_rows,
    variant_oof,
)
from wsi_pipeline.mil.selection import HeadSelection, baseline_check, fixed_head, selection_markdown
from wsi_pipeline.mil.tables import (
    patient_frame,
    patient_truth,
    prediction_array,
    truth_columns,
    truth_for,
)
from wsi_pipeline.mil.targets import BINARY, MULTICLASS, PATIENT_ID, TargetSpec

if TYPE_CHECKING:
    from wsi_pipeline.mil.config import TrainConfig
    from wsi_pipeline.mil.cv import Cohort, FoldResult, Variant

log = logging.getLogger(__name__)

SUBGROUP_LABELS = ["low", "intermediate", "high"]
METRIC_TITLES = {
    "auroc": "AUROC", "balanced_accuracy": "balanced acc.", "brier": "Brier", "calibration_slope": "cal. slope",
    "calibration_intercept": "cal. intercept", "spearman": "Spearman ρ", "mae": "MAE", "c_index": "C-index",
    "ece": "ECE",
}


def evaluate_frames(
    frames: dict[str, Any], truth: Any, specs: Sequence[TargetSpec], n_boot: int, seed: int,
    thresholds: dict[str, dict[str, float]] | None = None,
) -> tuple[dict[str, dict[str, Any]], np.ndarray]:
    """Metrics with CIs of every model's patient-level predictions (frames aligned on ``truth.index``);
    ``thresholds[model][t]``: the binary cut-off for balanced accuracy (default 0.5)."""
    weights = bootstrap_weights(len(truth), n_boot, seed)
    out: dict[str, dict[str, Any]] = {}
    for name, fr in frames.items():
        fr = fr.set_index(PATIENT_ID).loc[truth.index]
        res: dict[str, Any] = {}
        for s in specs:
            tr, mask = truth_for(s, truth, (thresholds or {}).get(name, {}).get(s.name, 0.5))
            if mask.sum() < 2:
                continue
            pred = prediction_array(fr, s)[mask]
            res[s.name] = {"n": int(mask.sum()),
                           **{k: v.to_dict() for k, v in bootstrap_metrics(tr, pred, weights[:, mask]).items()}}
        out[name] = res
    return out, weights


def compare(
    frames: dict[str, Any], truth: Any, specs: Sequence[TargetSpec], pairs: Sequence[tuple[str, str]],
    weights: np.ndarray,
) -> list[dict[str, Any]]:
    """Paired-bootstrap differences of the primary metric (a − b) for each pair and target."""
    rows = []
    for a, b in pairs:
        fa = frames[a].set_index(PATIENT_ID).loc[truth.index]
        fb = frames[b].set_index(PATIENT_ID).loc[truth.index]
        for s in specs:
            tr, mask = truth_for(s, truth)
            if mask.sum() < 2:
                continue
            metric = PRIMARY_METRIC[s.kind]
            d = paired_difference(tr, prediction_array(fa, s)[mask], prediction_array(fb, s)[mask], metric,
                                  weights[:, mask])
            rows.append({"target": s.name, "metric": metric, "model_a": a, "model_b": b, **d.to_dict()})
    return rows


def comparison_pairs(variants: Sequence[Variant]) -> list[tuple[str, str]]:
    names = [v.name for v in variants]
    main = names[0]
    pairs = []
    base = next((v.name for v in variants if v.name.endswith("-baseline")), None)
    if base:
        pairs.append((main, base))
    cov = next((v for v in variants if not v.image), None)
    if cov is not None:
        img = next(v.name for v in variants if v.image and not v.covariates and not v.name.endswith("-baseline"))
        pairs += [(main, img), (main, cov.name), (img, cov.name)]
    return pairs


def _fmt(d: dict[str, Any] | None) -> str:
    if not d:
        return "n/a"
    return MetricCI(*(np.nan if d[k] is None else d[k] for k in ("estimate", "ci_low", "ci_high"))).fmt()


def metrics_markdown(title: str, metrics: dict[str, Any], specs: Sequence[TargetSpec]) -> str:
    c = metrics["cohort"]
    grouped = f" (every {c['group_by']!r} value in one fold)" if c.get("group_by") else ""
    how = f"{c['folds']}-fold patient-level CV{grouped}, pooled out-of-fold predictions" if c.get("folds") else \
        "held-out cohort (the model never saw these patients)"
    lines = [
        f"# {title}", "",
        f"{c['n_patients']} patients, {c['n_slides']} slides; {how}; 95% CIs from {c['n_bootstrap']} "
        f"patient-level bootstrap resamples" + (f". Main model: `{metrics['main_model']}`." if
                                                metrics.get("main_model") else "."),
        "",
    ]
    for s in specs:
        rows = [(m, r[s.name]) for m, r in metrics["models"].items() if s.name in r]
        if not rows:
            continue
        keys = [k for k in rows[0][1] if k != "n"]
        extra = f"; positive = {s.classes[1]}" if s.kind == BINARY else (
            f"; classes {', '.join(s.classes)}" if s.kind == MULTICLASS else "")
        lines += [f"## {s.name} ({s.kind}{extra})", "",
                  "| model | n | " + " | ".join(METRIC_TITLES.get(k, k) for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        lines += [f"| {m} | {r['n']} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for m, r in rows]
        lines.append("")
    if metrics.get("thresholds"):
        thr = metrics["thresholds"]
        cut = "; ".join(f"{m}: " + ", ".join(f"{t} {v:.3f}" for t, v in d.items()) for m, d in thr["models"].items()
                        if d)
        if cut:
            lines += [f"Balanced accuracy at the recorded `t_pred` cut-offs ({cut}); {thr['rule']}.", ""]
    if metrics.get("calibration"):
        lines += calibration_rows(metrics["calibration"], specs)
    if metrics.get("head_selection") or metrics.get("baseline_check"):
        lines += selection_markdown(metrics.get("head_selection") or {}, metrics.get("baseline_check") or {})
    if metrics["comparisons"]:
        lines += ["## Paired comparisons (same bootstrap resamples)", "",
                  "| target | metric | model A − model B | difference (95% CI) |", "|---|---|---|---|"]
        for r in metrics["comparisons"]:
            lines.append(f"| {r['target']} | {METRIC_TITLES.get(r['metric'], r['metric'])} | "
                         f"{r['model_a']} − {r['model_b']} | {_fmt(r)} |")
        lines.append("")
    return "\n".join(lines)


def subgroup_cutoffs(frame: Any, specs: Sequence[TargetSpec]) -> dict[str, Any]:
    """Tertiles of the calibrated OOF patient-level probability of the first binary target (fixed at
    training, recorded in the model card)."""
    t = next((s for s in specs if s.kind == BINARY), None)
    if t is None:
        return {}
    p = frame[f"{t.name}_prob"].to_numpy(dtype=np.float64)
    p = p[np.isfinite(p)]
    if len(p) < 3:
        return {}
    q = np.quantile(p, [1 / 3, 2 / 3]).tolist()
    return {"target": t.name, "cutoffs": q, "labels": SUBGROUP_LABELS,
            "source": "tertiles of the calibrated out-of-fold patient-level probabilities of the main model"}


def write_training_outputs(
    cfg: TrainConfig, cohort: Cohort, info: EncoderInfo, variants: Sequence[Variant],
    results: Sequence[FoldResult], mdir: ModelDir, selection: HeadSelection | None = None,
) -> tuple[ModelCard, dict[str, Any]]:
    import pandas as pd
    import yaml

    from wsi_pipeline.mil.config import resolved_config
    from wsi_pipeline.runfolder.resolved import save_resolved

    specs = cohort.specs
    labels = cohort.labels
    selection = selection or fixed_head(variants[0].head)
    oofs: dict[str, VariantOOF] = {}
    for v in variants:
        oof: dict[str, dict[str, np.ndarray]] = {}
        for r in results:
            if r.variant == v.name and r.inner < 0:
                oof.update(r.oof)
        oofs[v.name] = variant_oof(v.name, oof, cohort, cfg.calibration)
    frames = {n: o.calibrated for n, o in oofs.items()}
    thresholds = {n: o.thresholds for n, o in oofs.items()}
    truth = patient_truth(labels)
    models, weights = evaluate_frames(frames, truth, specs, cfg.n_bootstrap, cfg.seed, thresholds)
    comparisons = compare(frames, truth, specs, comparison_pairs(variants), weights)
    metrics = {
        "cohort": {"n_patients": len(truth), "n_slides": len(labels.slide_ids), "folds": cfg.folds,
                   "group_by": cfg.group_by, "n_bootstrap": cfg.n_bootstrap, "seed": cfg.seed, "encoder": info.to_dict()},
        "main_model": variants[0].name,
        "protocol": "pooled out-of-fold patient-level predictions (mean of slide predictions); percentile CIs "
                    "from patient-level bootstrap resamples shared by all models",
        "models": models,
        "comparisons": comparisons,
        "calibration": {"requested": cfg.calibration, "protocol": CALIBRATION_PROTOCOL,
                        "models": calibration_figures(oofs, truth, specs, weights)},
        "thresholds": {"rule": THRESHOLD_RULE, "models": thresholds},
        "head_selection": selection.to_dict(),
        "baseline_check": baseline_check(models, variants[0].name, specs),
    }
    tc = truth_columns(truth, specs)
    oof_rows = []
    for name, o in oofs.items():
        f2 = o.table().set_index(PATIENT_ID).join(tc).reset_index()
        f2.insert(0, "model", name)
        oof_rows.append(f2)
    name = mdir.root.resolve().name
    vcards = {}
    for v in variants:
        folds = sorted((r.card for r in results if r.variant == v.name), key=lambda c: c.fold)
        in_dim = info.embed_dim * (1 + v.context_rings) if v.image else 0
        vcards[v.name] = VariantCard(v.name, v.head, v.head_kwargs, in_dim, v.image, v.covariates,
                                     v.context_rings, folds,
                                     calibration={t: c.to_dict() for t, c in oofs[v.name].calibrators.items()},
                                     thresholds=oofs[v.name].thresholds)
    card = ModelCard(
        name=name, main_variant=variants[0].name, targets=[s.to_dict() for s in specs], encoder=info.to_dict(),
        variants=vcards, covariate_columns=list(cfg.covariates),
        subgroups=subgroup_cutoffs(frames[variants[0].name], specs), head_selection=selection.to_dict(),
        patient_folds=dict(sorted(cohort.folds.items())), train_run=str(cohort.store.layout.root.resolve()),
        labels=str(cfg.labels), seed=cfg.seed,
    )
    resolved = resolved_config(cfg)
    write_text_atomic(mdir.config_yaml, yaml.safe_dump(resolved, sort_keys=False))
    write_text_atomic(mdir.metrics_json, json.dumps(metrics, indent=2))
    write_text_atomic(mdir.metrics_md, metrics_markdown(f"Out-of-fold metrics — {name}", metrics, specs))
    write_oof_predictions_csv(mdir.oof_csv, pd.concat(oof_rows, ignore_index=True))
    history = {v.name: {str(r.fold): r.history for r in sorted(results, key=lambda r: r.fold) if r.variant == v.name}
               for v in variants}
    write_text_atomic(mdir.root / "history.json", json.dumps(history, indent=1))
    mdir.write_card(card)
    save_resolved(cfg.run, "train", {"train": resolved})
    return card, metrics


def calibration_figures(oofs: dict[str, VariantOOF], truth: Any, specs: Sequence[TargetSpec],
                        weights: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per variant and calibrated target: the figures before (uncalibrated OOF) and after (cross-fitted
    calibrated OOF) calibration, on the shared patient-bootstrap resamples."""
    out: dict[str, dict[str, Any]] = {}
    for name, o in oofs.items():
        raw = o.raw.set_index(PATIENT_ID).loc[truth.index]
        cal = o.calibrated.set_index(PATIENT_ID).loc[truth.index]
        res = {}
        for s in specs:
            if s.name not in o.calibrators:
                continue
            tr, mask = truth_for(s, truth)
            if mask.sum() < 2:
                continue
            res[s.name] = before_after(tr, prediction_array(raw, s)[mask], prediction_array(cal, s)[mask],
                                       weights[:, mask], o.calibrators[s.name])
        out[name] = res
    return out


def evaluate_heldout(
    slide_frames: dict[str, Any], labels_df: Any, specs: Sequence[TargetSpec], n_boot: int = 1000, seed: int = 0,
    pairs: Sequence[tuple[str, str]] = (), thresholds: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Held-out metrics with patient-level bootstrap CIs for one or more models' slide predictions
    (``RUN/predictions.csv`` tables) against a labels table; the same resamples for every model.
    ``thresholds[model][t]``: the model's recorded binary cut-off (balanced accuracy; default 0.5).

    Patients come from the labels (``patient_id``); targets whose columns the labels lack are skipped.
    """
    from wsi_pipeline.mil.targets import SLIDE_ID, encode_labels, unmatched_slides_error

    path = labels_df.attrs.get("path", "labels CSV")
    columns = set(labels_df.columns)
    have_specs = [s for s in specs if set(s.label_columns) <= columns]
    if not have_specs:
        raise LabelsError(f"{path}: none of the model's target columns "
                          f"({sorted({c for s in specs for c in s.label_columns})}); nothing to evaluate")
    specs = have_specs
    predicted = set.intersection(*[set(f[SLIDE_ID].astype(str)) for f in slide_frames.values()])
    slides = sorted(predicted & set(labels_df.index.astype(str)))
    if not slides:
        raise unmatched_slides_error(path, [str(s) for s in labels_df.index], sorted(predicted),
                                     "a slide of the predictions")
    lab = encode_labels(labels_df.loc[slides], specs, fit_classes=False)
    pmap = dict(zip(lab.slide_ids, lab.patient_ids, strict=True))
    frames = {}
    for name, f in slide_frames.items():
        f = f[f[SLIDE_ID].astype(str).isin(slides)].copy()
        f[PATIENT_ID] = [pmap[s] for s in f[SLIDE_ID].astype(str)]
        frames[name] = patient_frame(f, specs, thresholds=(thresholds or {}).get(name))
    truth = patient_truth(lab)
    models, weights = evaluate_frames(frames, truth, specs, n_boot, seed, thresholds)
    return {
        "cohort": {"n_patients": len(truth), "n_slides": len(slides), "n_bootstrap": n_boot, "seed": seed},
        "protocol": "held-out patient-level predictions (mean of slide predictions); percentile CIs from "
                    "patient-level bootstrap resamples shared by all models",
        "models": models,
        "comparisons": compare(frames, truth, specs, pairs, weights),
    }
