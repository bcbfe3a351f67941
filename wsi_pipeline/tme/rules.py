"""The immune-phenotype rule table (pure): inflamed / excluded / desert from the spatial metrics."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.tme.config import (
    PHENOTYPE_DESERT,
    PHENOTYPE_EXCLUDED,
    PHENOTYPE_INFLAMED,
    PHENOTYPE_NOT_EVALUABLE,
    PHENOTYPES,
    PhenotypeRules,
)


def _value(metrics: Mapping[str, Any], key: str) -> float:
    v = metrics.get(key)
    if v is None:
        return 0.0
    v = float(v)
    return 0.0 if math.isnan(v) else v


def immune_phenotype(metrics: Mapping[str, Any], rules: PhenotypeRules) -> tuple[str, str]:
    """Apply the rule table of :class:`PhenotypeRules` (first match wins); returns (phenotype, reason).

    Missing or NaN densities count as 0 (no band → no lymphocytes held in it).
    """
    n_tum = float(metrics.get("n_tumour_tiles", 0) or 0)
    if n_tum < rules.min_tumour_tiles:
        return PHENOTYPE_NOT_EVALUABLE, f"{n_tum:g} tumour tiles < min_tumour_tiles={rules.min_tumour_tiles}"
    d_tum = _value(metrics, "lymph_density_tumour")
    if d_tum >= rules.inflamed_min_tumour_density:
        return PHENOTYPE_INFLAMED, (
            f"lymph_density_tumour={d_tum:.3f} >= "
            f"inflamed_min_tumour_density={rules.inflamed_min_tumour_density}"
        )
    d_mar = _value(metrics, "lymph_density_margin")
    if d_mar >= rules.excluded_min_margin_density:
        return PHENOTYPE_EXCLUDED, (
            f"lymph_density_tumour={d_tum:.3f} < {rules.inflamed_min_tumour_density} and "
            f"lymph_density_margin={d_mar:.3f} >= "
            f"excluded_min_margin_density={rules.excluded_min_margin_density}"
        )
    return PHENOTYPE_DESERT, (
        f"lymph_density_tumour={d_tum:.3f} < {rules.inflamed_min_tumour_density} and "
        f"lymph_density_margin={d_mar:.3f} < {rules.excluded_min_margin_density}"
    )


BORDERLINE_MARGIN = 0.1  # a phenotype_margin under this: a borderline call (viewer and report say so)


def is_borderline(margin: Any) -> bool:
    """Whether a ``phenotype_margin`` marks a borderline call (False when missing or not finite)."""
    try:
        m = float(margin)
    except (TypeError, ValueError):
        return False
    return bool(np.isfinite(m) and m < BORDERLINE_MARGIN)


def phenotype_margin(metrics: Mapping[str, Any], rules: PhenotypeRules) -> float:
    """How far the call of :func:`immune_phenotype` lies from flipping: the smallest relative distance
    ``|density − threshold| / threshold`` over the thresholds that decided it (inflamed: the tumour density
    against ``inflamed_min_tumour_density``; excluded and desert: that, and the margin density against
    ``excluded_min_margin_density``). NaN when the slide is not evaluable. A margin of 0.05 means a density
    within 5 % of its threshold: a borderline call that a small change of the map can turn."""
    n_tum = float(metrics.get("n_tumour_tiles", 0) or 0)
    if n_tum < rules.min_tumour_tiles:
        return float("nan")
    d_tum = _value(metrics, "lymph_density_tumour")
    t_inf, t_exc = rules.inflamed_min_tumour_density, rules.excluded_min_margin_density
    gaps = [abs(d_tum - t_inf) / max(t_inf, 1e-9)]
    if d_tum < t_inf:
        gaps.append(abs(_value(metrics, "lymph_density_margin") - t_exc) / max(t_exc, 1e-9))
    return float(min(gaps))


# ---------------------------------------------------------------- fitting the thresholds
def _candidates(values: np.ndarray, keep: float) -> np.ndarray:
    """Thresholds between consecutive distinct values (midpoints), below the smallest, and ``keep``."""
    v = np.unique(values[np.isfinite(values)])
    mids = (v[:-1] + v[1:]) / 2 if len(v) > 1 else np.zeros(0)
    return np.unique(np.clip(np.concatenate([mids, v[:1] / 2, [keep]]), 0.0, 1.0))


def _accuracy_grid(d_tum: np.ndarray, d_mar: np.ndarray, evaluable: np.ndarray, truth: np.ndarray,
                   t_inf: np.ndarray, t_exc: np.ndarray) -> np.ndarray:
    """Accuracy of the rule table for every (inflamed, excluded) threshold pair → (len(t_inf), len(t_exc))."""
    inflamed = d_tum[None, :] >= t_inf[:, None]  # (I, N)
    excluded = d_mar[None, :] >= t_exc[:, None]  # (E, N)
    is_inf, is_exc, is_des = (truth == PHENOTYPE_INFLAMED), (truth == PHENOTYPE_EXCLUDED), (truth == PHENOTYPE_DESERT)
    ev = evaluable[None, None, :]
    pred_inf = inflamed[:, None, :] & ev
    pred_exc = ~inflamed[:, None, :] & excluded[None, :, :] & ev
    pred_des = ~inflamed[:, None, :] & ~excluded[None, :, :] & ev
    ok = (pred_inf & is_inf).sum(-1) + (pred_exc & is_exc).sum(-1) + (pred_des & is_des).sum(-1)
    return ok / max(1, len(truth))


def _fit(d_tum: np.ndarray, d_mar: np.ndarray, evaluable: np.ndarray, truth: np.ndarray,
         base: PhenotypeRules) -> tuple[float, float, float]:
    """The threshold pair of highest accuracy; ties go to the pair closest to ``base`` (relative distance)."""
    t_inf = _candidates(d_tum, base.inflamed_min_tumour_density)
    t_exc = _candidates(d_mar, base.excluded_min_margin_density)
    acc = _accuracy_grid(d_tum, d_mar, evaluable, truth, t_inf, t_exc)
    best = acc.max()
    ii, ee = np.nonzero(acc >= best - 1e-12)
    dist = (np.log((t_inf[ii] + 1e-3) / (base.inflamed_min_tumour_density + 1e-3)) ** 2
            + np.log((t_exc[ee] + 1e-3) / (base.excluded_min_margin_density + 1e-3)) ** 2)
    k = int(np.argmin(dist))
    return float(t_inf[ii[k]]), float(t_exc[ee[k]]), float(best)


def fit_rules(rows: Sequence[Mapping[str, Any]], truth: Sequence[str], base: PhenotypeRules, folds: int = 5,
              seed: int = 0) -> tuple[PhenotypeRules, dict[str, Any]]:
    """Fit ``inflamed_min_tumour_density`` and ``excluded_min_margin_density`` to labelled slides (``rows``:
    the tme.csv rows of a training cohort, ``truth``: their immune phenotypes) by maximising the accuracy of
    the rule table (grid over the midpoints of the observed densities; ``min_tumour_tiles`` kept).

    Returns the rules fitted on every slide and a report: the accuracy of ``base`` and of the fitted rules on
    these slides, and the ``folds``-fold cross-validated accuracy of the fitting itself (thresholds fitted
    on the other folds, applied to each fold: what to expect on new slides)."""
    truth_a = np.asarray([str(t) for t in truth])
    unknown = sorted(set(truth_a) - set(PHENOTYPES))
    if unknown:
        raise ConfigError(f"--labels: immune_phenotype values {unknown} are not among {list(PHENOTYPES)}")
    if len(truth_a) < max(2, folds):
        raise ConfigError(f"--fit-rules needs at least {max(2, folds)} labelled slides (got {len(truth_a)})")
    d_tum = np.array([_value(r, "lymph_density_tumour") for r in rows])
    d_mar = np.array([_value(r, "lymph_density_margin") for r in rows])
    evaluable = np.array([float(r.get("n_tumour_tiles", 0) or 0) >= base.min_tumour_tiles for r in rows])
    t_inf, t_exc, acc = _fit(d_tum, d_mar, evaluable, truth_a, base)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(truth_a), np.int64)
    for ph in PHENOTYPES:  # stratified folds
        idx = rng.permutation(np.flatnonzero(truth_a == ph))
        fold[idx] = np.arange(len(idx)) % folds
    correct, per_fold = 0, []
    for f in range(folds):
        tr, te = fold != f, fold == f
        if not te.any() or not tr.any():
            continue
        fi, fe, _ = _fit(d_tum[tr], d_mar[tr], evaluable[tr], truth_a[tr], base)
        per_fold.append({"inflamed_min_tumour_density": fi, "excluded_min_margin_density": fe})
        correct += int(_accuracy_grid(d_tum[te], d_mar[te], evaluable[te], truth_a[te], np.array([fi]),
                                      np.array([fe]))[0, 0] * te.sum() + 0.5)
    base_acc = float(_accuracy_grid(d_tum, d_mar, evaluable, truth_a, np.array([base.inflamed_min_tumour_density]),
                                    np.array([base.excluded_min_margin_density]))[0, 0])
    fitted = dataclasses.replace(base, inflamed_min_tumour_density=round(t_inf, 4),
                                 excluded_min_margin_density=round(t_exc, 4)).validate()
    report = {"n_slides": len(truth_a), "folds": folds, "seed": seed, "accuracy_base_rules": base_acc,
              "accuracy_fitted_rules": acc, "cv_accuracy": correct / len(truth_a), "per_fold": per_fold,
              "fitted": {"inflamed_min_tumour_density": fitted.inflamed_min_tumour_density,
                         "excluded_min_margin_density": fitted.excluded_min_margin_density}}
    return fitted, report
