"""Prediction tables: slide rows, patient rows and their column names (one definition for OOF files and
``RUN/predictions.csv``).

Columns per target t: binary ``t_prob`` (P of the positive class, calibrated when the model has a
calibrator) and ``t_pred`` (class name: positive when ``t_prob`` ≥ the model's recorded cut-off, 0.5 for a
model without one); multiclass ``t_prob_<class>`` for every class and ``t_pred`` (argmax); regression ``t_pred``;
survival ``t_risk`` (log relative hazard; higher = earlier event).

Patient-level prediction = mean of the patient's slide predictions (probabilities, values, risks), then
``t_pred`` is recomputed from the mean. Patient-level truth: classification → the most frequent label
among the patient's slides (ties → lowest class index); regression → mean; survival → the first
labelled slide's (time, event).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wsi_pipeline.evaluate.bootstrap import Truth
from wsi_pipeline.mil.targets import BINARY, MULTICLASS, PATIENT_ID, REGRESSION, SLIDE_ID, SURVIVAL, Labels, TargetSpec


def prob_columns(spec: TargetSpec) -> list[str]:
    if spec.kind == BINARY:
        return [f"{spec.name}_prob"]
    if spec.kind == MULTICLASS:
        return [f"{spec.name}_prob_{c}" for c in spec.classes]
    if spec.kind == REGRESSION:
        return [f"{spec.name}_pred"]
    return [f"{spec.name}_risk"]


def prediction_columns(spec: TargetSpec) -> list[str]:
    cols = prob_columns(spec)
    return [*cols, f"{spec.name}_pred"] if spec.is_classification else cols


def pred_labels(spec: TargetSpec, values: np.ndarray, threshold: float = 0.5) -> list[str]:
    """Predicted class names: binary ``values`` (P positive) against ``threshold``; multiclass arg-max."""
    if spec.kind == BINARY:
        return [spec.classes[1] if v >= threshold else spec.classes[0] for v in values]
    return [spec.classes[i] for i in np.argmax(values, axis=1)]


def slide_frame(
    slide_ids: Sequence[str], patient_ids: Sequence[str], preds: Sequence[Mapping[str, np.ndarray]],
    specs: Sequence[TargetSpec], thresholds: Mapping[str, float] | None = None,
) -> Any:
    """One row per slide. ``preds[i][t]``: binary/regression/survival scalar, multiclass C probabilities;
    ``thresholds[t]``: the cut-off of binary target t (default 0.5)."""
    import pandas as pd

    data: dict[str, Any] = {SLIDE_ID: list(slide_ids), PATIENT_ID: list(patient_ids)}
    for s in specs:
        vals = np.array([np.asarray(p[s.name], dtype=np.float64).reshape(-1) for p in preds]).reshape(len(preds), -1)
        for j, col in enumerate(prob_columns(s)):
            data[col] = vals[:, j]
        if s.is_classification:
            data[f"{s.name}_pred"] = pred_labels(s, vals[:, 0] if s.kind == BINARY else vals,
                                                 (thresholds or {}).get(s.name, 0.5))
    return pd.DataFrame(data, columns=[SLIDE_ID, PATIENT_ID, *[c for s in specs for c in prediction_columns(s)]])


def patient_frame(slides: Any, specs: Sequence[TargetSpec], extra_first: Sequence[str] = (),
                  thresholds: Mapping[str, float] | None = None) -> Any:
    """Mean of slide predictions per patient (sorted by patient_id), with ``n_slides``; ``t_pred`` from the
    mean with ``thresholds[t]`` (binary; default 0.5)."""
    import pandas as pd

    num_cols = [c for s in specs for c in prob_columns(s)]
    g = slides.groupby(PATIENT_ID, sort=True)
    out = g[num_cols].mean()
    out.insert(0, "n_slides", g.size())
    for col in extra_first:
        out.insert(0, col, g[col].first())
    for s in specs:
        if s.is_classification:
            vals = out[prob_columns(s)].to_numpy()
            out[f"{s.name}_pred"] = pred_labels(s, vals[:, 0] if s.kind == BINARY else vals,
                                                (thresholds or {}).get(s.name, 0.5))
    out = out.reset_index()
    order = [*extra_first, PATIENT_ID, "n_slides", *[c for s in specs for c in prediction_columns(s)]]
    return pd.DataFrame(out, columns=order)


def prediction_array(frame: Any, spec: TargetSpec) -> np.ndarray:
    """The metric input of one target from a prediction table: n (binary/regression/survival) or n×C."""
    cols = prob_columns(spec)
    arr = frame[cols].to_numpy(dtype=np.float64)
    return arr if spec.kind == MULTICLASS else arr[:, 0]


def patient_truth(labels: Labels) -> Any:
    """One row per patient (index patient_id): ``t`` (class index / value / time) and ``t_event`` (survival)."""
    import pandas as pd

    df = pd.DataFrame({PATIENT_ID: labels.patient_ids})
    for s in labels.targets:
        df[s.name] = labels.values[s.name]
        if s.kind == SURVIVAL:
            df[f"{s.name}_event"] = labels.events[s.name]
    rows: dict[str, dict[str, float]] = {}
    for pid, grp in df.groupby(PATIENT_ID, sort=True):
        row: dict[str, float] = {}
        for s in labels.targets:
            v = grp[s.name].to_numpy(dtype=np.float64)
            ok = ~np.isnan(v)
            if s.kind == REGRESSION:
                row[s.name] = float(v[ok].mean()) if ok.any() else np.nan
            elif s.kind == SURVIVAL:
                ev = grp[f"{s.name}_event"].to_numpy(dtype=np.float64)
                ok = ok & ~np.isnan(ev)
                i = int(np.flatnonzero(ok)[0]) if ok.any() else -1
                row[s.name] = float(v[i]) if i >= 0 else np.nan
                row[f"{s.name}_event"] = float(ev[i]) if i >= 0 else np.nan
            else:
                if ok.any():
                    vals, counts = np.unique(v[ok], return_counts=True)
                    row[s.name] = float(vals[np.argmax(counts)])
                else:
                    row[s.name] = np.nan
        rows[str(pid)] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(PATIENT_ID)


def truth_for(spec: TargetSpec, truth: Any, threshold: float = 0.5) -> tuple[Truth, np.ndarray]:
    """Patient truth of one target (rows of :func:`patient_truth`) and the mask of patients that have it;
    ``threshold``: the binary ``t_pred`` cut-off used for balanced accuracy."""
    y = truth[spec.name].to_numpy(dtype=np.float64)
    mask = ~np.isnan(y)
    if spec.kind == SURVIVAL:
        ev = truth[f"{spec.name}_event"].to_numpy(dtype=np.float64)
        mask &= ~np.isnan(ev)
        return Truth(SURVIVAL, y[mask], event=ev[mask].astype(int)), mask
    n_classes = len(spec.classes) if spec.kind == MULTICLASS else 2
    return Truth(spec.kind, y[mask], n_classes=n_classes, threshold=threshold), mask


def truth_columns(truth: Any, specs: Sequence[TargetSpec]) -> Any:
    """Human-readable truth columns for the OOF table: ``t_true`` (class name / value), ``t_time``/``t_event``."""
    import pandas as pd

    out = pd.DataFrame(index=truth.index)
    for s in specs:
        v = truth[s.name].to_numpy(dtype=np.float64)
        if s.is_classification:
            out[f"{s.name}_true"] = [s.classes[int(x)] if np.isfinite(x) else "" for x in v]
        elif s.kind == REGRESSION:
            out[f"{s.name}_true"] = v
        else:
            out[f"{s.name}_time"] = v
            out[f"{s.name}_event"] = truth[f"{s.name}_event"].to_numpy()
    return out
