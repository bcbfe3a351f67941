"""The out-of-fold (OOF) predictions of one ``wsi train`` run, calibrated honestly, and the cut-offs chosen
on them.

For every model variant:

1. slide-level OOF probabilities: each slide predicted by the fold model that never saw its patient;
2. per classification target, a post-hoc calibrator (:mod:`wsi_pipeline.mil.calibration`) fitted on all of
   them, the one recorded in the model, and the *cross-fitted* calibrated OOF probabilities: fold k
   recalibrated by a calibrator fitted on the other folds' OOF predictions only, so the "after" figures
   are not in-sample;
3. patient-level tables (mean of the patient's slides), uncalibrated and calibrated;
4. cut-offs chosen on the calibrated OOF patient probabilities: the ``t_pred`` cut-off of each binary
   target (:func:`~wsi_pipeline.mil.calibration.balanced_threshold`) and, for the main variant, the
   responder subgroups' tertiles (:func:`wsi_pipeline.mil.report.subgroup_cutoffs`).

:func:`before_after` gives the calibration figures (ECE, slope, intercept, Brier with patient-bootstrap
CIs, reliability-diagram points) of the uncalibrated and the cross-fitted calibrated OOF predictions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_pipeline.evaluate.bootstrap import Truth, calibration_metrics
from wsi_pipeline.evaluate.metrics import reliability_bins
from wsi_pipeline.mil.calibration import TargetCalibrator, balanced_threshold, calibrate_target
from wsi_pipeline.mil.tables import patient_frame, slide_frame
from wsi_pipeline.mil.targets import BINARY, MULTICLASS, TargetSpec

if TYPE_CHECKING:
    from wsi_pipeline.mil.cv import Cohort

UNCALIBRATED_SUFFIX = "_uncalibrated"
CALIBRATION_PROTOCOL = (
    "calibrators fitted on the slide-level out-of-fold predictions (the recorded calibrator: all folds); "
    "'after' = cross-fitted: each fold's OOF predictions recalibrated by a calibrator fitted on the other "
    "folds' OOF predictions only; figures at patient level (mean of slides) with patient-bootstrap 95% CIs"
)
THRESHOLD_RULE = (
    "t_pred = positive when the calibrated probability >= the mean calibrated out-of-fold patient "
    "probability (an estimate of the prevalence; the rule that maximises the expected balanced accuracy)"
)


@dataclass
class VariantOOF:
    """One variant's OOF predictions: patient tables (``fold`` first) uncalibrated and calibrated (cross-
    fitted; ``t_pred`` with the variant's cut-offs), the recorded calibrators and cut-offs."""

    name: str
    raw: Any
    calibrated: Any
    calibrators: dict[str, TargetCalibrator] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)

    def table(self) -> Any:
        """The OOF table of this variant: calibrated columns, then the uncalibrated probabilities
        (``<column>_uncalibrated``) of the calibrated targets."""
        out = self.calibrated.copy()
        for t in self.calibrators:
            for col in [c for c in self.raw.columns if c == f"{t}_prob" or c.startswith(f"{t}_prob_")]:
                out[col + UNCALIBRATED_SUFFIX] = self.raw[col].to_numpy()
        return out


def _stack(preds: Sequence[Mapping[str, np.ndarray]], spec: TargetSpec) -> np.ndarray:
    """One target's predictions of every row: n (one output) or n×C (multiclass)."""
    arr = np.array([np.asarray(p[spec.name], dtype=np.float64).reshape(-1) for p in preds])
    return arr if spec.kind == MULTICLASS else arr[:, 0]


def variant_oof(name: str, oof: Mapping[str, Mapping[str, np.ndarray]], cohort: Cohort, method: str) -> VariantOOF:
    """Calibrate one variant's slide-level OOF predictions (``oof[slide][target]``) with ``method``
    (``--calibration``; a stacked calibrator reads the same slides' OOF outputs of the other targets) and
    choose its cut-offs."""
    labels, specs = cohort.labels, cohort.specs
    slides = labels.slide_ids
    fold = np.array([cohort.folds[cohort.patient_of[s]] for s in slides])
    raw_preds = [dict(oof[s]) for s in slides]
    cal_preds = [dict(p) for p in raw_preds]
    calibrators: dict[str, TargetCalibrator] = {}
    for s in specs:
        if not s.is_classification:
            continue
        others = [(o, _stack(raw_preds, o)) for o in specs if o.name != s.name]
        crossed, calibrators[s.name] = calibrate_target(method, s, _stack(raw_preds, s), labels.values[s.name],
                                                        fold, others)
        for p, v in zip(cal_preds, crossed, strict=True):
            p[s.name] = np.atleast_1d(v)

    def patients(preds: list[dict[str, np.ndarray]], thresholds: Mapping[str, float] | None) -> Any:
        sl = slide_frame(slides, labels.patient_ids, preds, specs, thresholds)
        sl.insert(0, "fold", fold)
        return patient_frame(sl, specs, extra_first=("fold",), thresholds=thresholds)

    calibrated = patients(cal_preds, None)
    thresholds = {s.name: balanced_threshold(calibrated[f"{s.name}_prob"].to_numpy()) for s in specs
                  if s.kind == BINARY}
    return VariantOOF(name, patients(raw_preds, None), patients(cal_preds, thresholds), calibrators, thresholds)


def before_after(truth: Truth, before: np.ndarray, after: np.ndarray, weights: np.ndarray,
                 calibrator: TargetCalibrator) -> dict[str, Any]:
    """Calibration figures of one target, uncalibrated vs cross-fitted calibrated (same resamples)."""
    out: dict[str, Any] = {
        "method": calibrator.method, "params": calibrator.params, "fold_scales": calibrator.scale,
        "before": {k: v.to_dict() for k, v in calibration_metrics(truth, before, weights).items()},
        "after": {k: v.to_dict() for k, v in calibration_metrics(truth, after, weights).items()},
    }
    if calibrator.context:
        out["features"] = ["own logit", *(f"{c.target}[{j}]" for c in calibrator.context for j in c.columns)]
    if calibrator.selection:
        out["selection"] = calibrator.selection
    if truth.kind == BINARY:
        out["reliability"] = {"before": reliability_bins(truth.y, before), "after": reliability_bins(truth.y, after)}
    return out


def calibration_rows(calibration: Mapping[str, Any], specs: Sequence[TargetSpec]) -> list[str]:
    """The markdown section of ``metrics.json["calibration"]``."""
    from wsi_pipeline.evaluate.bootstrap import CALIBRATION_METRICS, MetricCI

    def fmt(d: Mapping[str, Any] | None) -> str:
        if not d or d.get("estimate") is None:
            return "n/a"
        return MetricCI(*(np.nan if d[k] is None else d[k] for k in ("estimate", "ci_low", "ci_high"))).fmt()

    titles = {"ece": "ECE", "calibration_slope": "cal. slope", "calibration_intercept": "cal. intercept",
              "brier": "Brier"}
    lines = ["## Calibration (out-of-fold, before → after; after = cross-fitted)", "",
             str(calibration.get("protocol", "")), ""]
    for s in specs:
        rows = [(m, r[s.name]) for m, r in calibration.get("models", {}).items() if s.name in r]
        if not rows:
            continue
        keys = [k for k in CALIBRATION_METRICS if k in rows[0][1]["before"]]
        lines += [f"### {s.name}", "", "| model | method | | " + " | ".join(titles[k] for k in keys) + " |",
                  "|---|---|---|" + "---|" * len(keys)]
        for m, r in rows:
            sel = r.get("selection")
            if sel:
                lines.append(f"| {m} | auto → {sel['chosen']} | cross-fitted log loss | " + ", ".join(
                    f"{k} {v:.4f}" for k, v in sel["log_loss"].items()) + " |" + " |" * (len(keys) - 1))
            for when in ("before", "after"):
                lines.append(f"| {m} | {r['method']} | {when} | " + " | ".join(fmt(r[when].get(k)) for k in keys)
                             + " |")
        lines.append("")
    return lines

