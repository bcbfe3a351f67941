"""Patient-level bootstrap confidence intervals for every metric, and paired differences between models.

Samples are patients. A resample draws n patients with replacement; it is represented by a count vector
(how often each patient was drawn), so all resamples are one (B, n) matrix and every metric in
:mod:`wsi_pipeline.evaluate.metrics` evaluates them at once. Intervals are percentile intervals over the
resamples where the metric is defined (e.g. both classes present); ``n_valid`` says how many that was.
Two models compared on the same patients use the *same* resamples (paired bootstrap).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wsi_pipeline.evaluate import metrics as M

DEFAULT_N_BOOT = 1000

BINARY = "binary"
MULTICLASS = "multiclass"
REGRESSION = "regression"
SURVIVAL = "survival"

PRIMARY_METRIC = {BINARY: "auroc", MULTICLASS: "auroc", REGRESSION: "spearman", SURVIVAL: "c_index"}
# metrics where larger is better (the others: smaller is better, or closeness to a reference value)
HIGHER_IS_BETTER = {"auroc", "balanced_accuracy", "spearman", "c_index"}
# the calibration figures of a binary probability (before / after post-hoc calibration)
CALIBRATION_METRICS = ("ece", "calibration_slope", "calibration_intercept", "brier")


@dataclass
class MetricCI:
    estimate: float
    ci_low: float
    ci_high: float
    n_valid: int = 0

    def to_dict(self) -> dict[str, float]:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}

    def fmt(self, digits: int = 3) -> str:
        if not np.isfinite(self.estimate):
            return "n/a"
        if not (np.isfinite(self.ci_low) and np.isfinite(self.ci_high)):
            return f"{self.estimate:.{digits}f}"
        return f"{self.estimate:.{digits}f} ({self.ci_low:.{digits}f}–{self.ci_high:.{digits}f})"


def bootstrap_weights(n: int, n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> np.ndarray:
    """(n_boot, n) resample counts: row b says how often each of the n patients was drawn."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def ci_from(point: float, boot: np.ndarray, alpha: float = 0.05) -> MetricCI:
    boot = np.asarray(boot, dtype=np.float64)
    ok = boot[np.isfinite(boot)]
    if ok.size == 0:
        return MetricCI(float(point), float("nan"), float("nan"), 0)
    lo, hi = np.quantile(ok, [alpha / 2, 1 - alpha / 2])
    return MetricCI(float(point), float(lo), float(hi), int(ok.size))


@dataclass
class Truth:
    """Patient-level ground truth of one target; ``y`` is the class index, value or survival time.
    ``threshold``: the cut-off of a binary probability for balanced accuracy (the model's recorded
    ``t_pred`` cut-off; 0.5 when it has none)."""

    kind: str
    y: np.ndarray
    event: np.ndarray | None = None
    n_classes: int = 2
    threshold: float = 0.5


def metric_functions(truth: Truth) -> dict[str, Callable[[Any, np.ndarray], np.ndarray]]:
    """Metric name → f(prediction, weights) for the target's kind.

    Predictions: binary → P(positive) (n); multiclass → class probabilities (n×C); regression → value (n);
    survival → risk (n, higher = earlier event).
    """
    y = truth.y
    if truth.kind == BINARY:
        yi = y.astype(int)
        thr = truth.threshold
        fns: dict[str, Callable[[Any, np.ndarray], np.ndarray]] = {
            "auroc": lambda p, w: M.auroc(yi, p, w),
            "balanced_accuracy": lambda p, w: M.balanced_accuracy(yi, (np.asarray(p) >= thr).astype(int), 2, w),
            "brier": lambda p, w: M.brier(yi, p, w),
            "ece": lambda p, w: M.ece(yi, p, w),
            "calibration_slope": lambda p, w: M.calibration_slope_intercept(yi, p, w)[0],
            "calibration_intercept": lambda p, w: M.calibration_slope_intercept(yi, p, w)[1],
        }
        return fns
    if truth.kind == MULTICLASS:
        yi = y.astype(int)
        c = truth.n_classes
        return {
            "auroc": lambda p, w: M.macro_auroc_ovr(yi, p, w),
            "balanced_accuracy": lambda p, w: M.balanced_accuracy(yi, np.argmax(p, axis=1), c, w),
            "brier": lambda p, w: M.brier(yi, p, w),
        }
    if truth.kind == REGRESSION:
        return {"spearman": lambda p, w: M.spearman(y, p, w), "mae": lambda p, w: M.mae(y, p, w)}
    if truth.kind == SURVIVAL:
        ev = truth.event
        return {"c_index": lambda p, w: M.c_index(y, ev, p, w)}
    raise ValueError(f"unknown target kind {truth.kind!r}")


def _calibration_pair(truth: Truth, pred: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return M.calibration_slope_intercept(truth.y.astype(int), pred, w)


def bootstrap_metrics(
    truth: Truth, pred: np.ndarray, weights: np.ndarray, alpha: float = 0.05
) -> dict[str, MetricCI]:
    """Every metric of the target's kind with its percentile CI over the resamples in ``weights``."""
    ones = np.ones((1, len(truth.y)))
    out: dict[str, MetricCI] = {}
    fns = metric_functions(truth)
    if truth.kind == BINARY:  # slope and intercept come from one fit: do it once
        fns = {k: f for k, f in fns.items() if not k.startswith("calibration")}
    for name, fn in fns.items():
        out[name] = ci_from(float(fn(pred, ones)[0]), fn(pred, weights), alpha)
    if truth.kind == BINARY:
        s1, i1 = _calibration_pair(truth, pred, ones)
        sb, ib = _calibration_pair(truth, pred, weights)
        out["calibration_slope"] = ci_from(float(s1[0]), sb, alpha)
        out["calibration_intercept"] = ci_from(float(i1[0]), ib, alpha)
    return out


def calibration_metrics(truth: Truth, pred: np.ndarray, weights: np.ndarray, alpha: float = 0.05
                        ) -> dict[str, MetricCI]:
    """The :data:`CALIBRATION_METRICS` of a binary probability with percentile CIs (multiclass: Brier)."""
    return {k: v for k, v in bootstrap_metrics(truth, pred, weights, alpha).items() if k in CALIBRATION_METRICS}


def paired_difference(
    truth: Truth, pred_a: np.ndarray, pred_b: np.ndarray, metric: str, weights: np.ndarray, alpha: float = 0.05
) -> MetricCI:
    """metric(a) − metric(b) with a paired bootstrap CI (the same resamples for both models)."""
    fn = metric_functions(truth)[metric]
    ones = np.ones((1, len(truth.y)))
    point = float(fn(pred_a, ones)[0] - fn(pred_b, ones)[0])
    return ci_from(point, fn(pred_a, weights) - fn(pred_b, weights), alpha)
