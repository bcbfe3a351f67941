"""Everything the report reads from a RUN folder (and the optional labels and model directory).

Targets and their classes come from the model card (``DIR/model.json`` of `wsi train`; the model is found
with ``--model`` or in ``RUN/configs/predict.yaml``); without one they are inferred from the columns of
``predictions.csv`` (naming of :mod:`wsi_pipeline.mil.tables`): ``t_prob_<class>`` → multiclass,
``t_prob`` → binary, ``t_pred`` alone → regression, ``t_risk`` → survival (time/event columns of the
labels named ``t_time``/``t_months``/``t_days``/``t_years`` and ``t_event``/``t_status``).

Patient-level evaluation follows the training protocol of `wsi train` (:mod:`wsi_pipeline.mil.tables`):
a patient's prediction is the mean of its slide predictions, patients taken from the labels.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_pipeline.errors import LabelsError
from wsi_pipeline.formats import api as F
from wsi_pipeline.mil.targets import (
    BINARY,
    MULTICLASS,
    PATIENT_ID,
    REGRESSION,
    SLIDE_ID,
    SURVIVAL,
    TargetSpec,
    encode_labels,
    read_labels_table,
)
from wsi_pipeline.report.config import ReportConfig
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.runfolder.status import SlideStatus, read_status

log = logging.getLogger(__name__)

TIME_SUFFIXES = ("time", "months", "days", "years", "weeks")
EVENT_SUFFIXES = ("event", "status")
_MULTI = re.compile(r"^(.+)_prob_(.+)$")


@dataclass
class ReportData:
    cfg: ReportConfig
    layout: RunLayout
    status: list[SlideStatus]
    predictions: pd.DataFrame | None = None
    patient_predictions: pd.DataFrame | None = None
    tme: pd.DataFrame | None = None
    labels: pd.DataFrame | None = None  # indexed by slide_id, text columns (read_labels_table)
    specs: list[TargetSpec] = field(default_factory=list)
    model_dir: Path | None = None
    card: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def out_path(self) -> Path:
        return Path(self.cfg.out) if self.cfg.out else self.layout.report_html


def _read_optional(read: Callable[[Path], pd.DataFrame], path: Path) -> pd.DataFrame | None:
    """A table of the RUN folder through its owner's reader; None when the file does not exist."""
    return read(path) if path.exists() else None


def find_model_dir(cfg: ReportConfig, layout: RunLayout) -> Path | None:
    """``--model``, else the model `wsi predict` used (RUN/configs/predict.yaml)."""
    if cfg.model:
        return Path(cfg.model)
    path = layout.command_config_yaml("predict")
    if not path.exists():
        return None
    import yaml

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return None
    model = (doc.get("predict") or {}).get("model") if isinstance(doc, dict) else None
    return Path(model) if model else None


def read_card(model_dir: Path | None) -> dict[str, Any] | None:
    if model_dir is None:
        return None
    path = model_dir / F.MODEL_JSON
    if not path.exists():
        log.warning("%s: no model card; targets are inferred from predictions.csv", path)
        return None
    return F.read_model_json(path)


def _binary_classes(preds: pd.DataFrame | None, name: str) -> list[str]:
    """[negative, positive] from the predicted class names when they are two non-boolean labels; else 0/1
    (the labels refine them at evaluation)."""
    col = f"{name}_pred"
    if preds is not None and col in preds.columns:
        vals = sorted(preds[col].dropna().astype(str).unique())
        if len(vals) == 2 and not {v.lower() for v in vals} <= {"0", "1", "true", "false", "yes", "no"}:
            return vals
    return ["0", "1"]


def infer_targets(predictions: pd.DataFrame, labels: pd.DataFrame | None) -> list[TargetSpec]:
    """Targets from prediction column names (see the module docstring)."""
    cols = [c for c in predictions.columns if c not in (SLIDE_ID, PATIENT_ID, "n_slides")]
    multi: dict[str, list[str]] = {}
    for c in cols:
        m = _MULTI.match(c)
        if m:
            multi.setdefault(m.group(1), []).append(m.group(2))
    specs = [TargetSpec(name, MULTICLASS, classes=classes) for name, classes in multi.items()]
    label_cols = set(labels.columns) if labels is not None else set()
    for c in cols:
        if c.endswith("_prob") and c[:-5] not in multi:
            specs.append(TargetSpec(c[:-5], BINARY, classes=_binary_classes(predictions, c[:-5])))
        elif c.endswith("_risk"):
            name = c[:-5]
            time = next((f"{name}_{s}" for s in TIME_SUFFIXES if f"{name}_{s}" in label_cols), "")
            event = next((f"{name}_{s}" for s in EVENT_SUFFIXES if f"{name}_{s}" in label_cols), "")
            if time and event:
                specs.append(TargetSpec(name, SURVIVAL, time=time, event=event))
        elif c.endswith("_pred"):
            name = c[:-5]
            if name not in multi and f"{name}_prob" not in cols:
                specs.append(TargetSpec(name, REGRESSION))
    return specs


def load_report_data(cfg: ReportConfig) -> ReportData:
    layout = RunLayout(cfg.run)
    data = ReportData(cfg=cfg, layout=layout, status=read_status(layout.slides_csv))
    data.predictions = _read_optional(F.read_predictions_csv, layout.predictions_csv)
    data.patient_predictions = _read_optional(F.read_patient_predictions_csv, layout.patient_predictions_csv)
    data.tme = _read_optional(F.read_tme_csv, layout.tme_csv)
    if cfg.labels:
        data.labels = read_labels_table(cfg.labels)
    data.model_dir = find_model_dir(cfg, layout)
    data.card = read_card(data.model_dir)
    if data.card and data.card.get("targets"):
        data.specs = [TargetSpec.from_dict(t) for t in data.card["targets"]]
    elif data.predictions is not None:
        data.specs = infer_targets(data.predictions, data.labels)
    return data


# ---------------------------------------------------------------- patient-level evaluation tables
@dataclass
class Evaluation:
    """Patient-level predictions and truth of the labelled patients, aligned on ``patient_id``."""

    predictions: pd.DataFrame  # patient_frame of mil.tables, indexed by patient_id
    truth: pd.DataFrame  # one column per target (class index / value / time) + t_event
    specs: list[TargetSpec]
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why it is not evaluated


def evaluation_tables(data: ReportData) -> Evaluation | None:
    """Join the slide predictions with the labels at patient level; None without labels/predictions."""
    from wsi_pipeline.mil.tables import patient_frame, patient_truth, prob_columns

    if data.labels is None or data.predictions is None or not data.specs:
        return None
    labels = data.labels
    slides = data.predictions[data.predictions[SLIDE_ID].isin(labels.index)].copy()
    if slides.empty:
        from wsi_pipeline.mil.targets import unmatched_slides_error

        why = unmatched_slides_error(labels.attrs.get("path", "the labels CSV"), [str(s) for s in labels.index],
                                     sorted(data.predictions[SLIDE_ID].astype(str)), "a slide of predictions.csv")
        data.notes.append(f"performance sections skipped: {why}")
        return None
    slides[PATIENT_ID] = labels.loc[slides[SLIDE_ID], PATIENT_ID].to_numpy()
    lab = labels.loc[slides[SLIDE_ID]]
    specs, skipped, truths = [], {}, []
    from_card = bool(data.card)
    for spec in data.specs:
        missing = [c for c in prob_columns(spec) if c not in slides.columns]
        if missing:
            skipped[spec.name] = f"predictions.csv lacks {missing}"
            continue
        try:
            enc = encode_labels(lab, [spec], fit_classes=not from_card and spec.kind == BINARY)
        except LabelsError as e:
            skipped[spec.name] = str(e)
            continue
        truths.append(patient_truth(enc))
        specs.append(spec)
    if not specs:
        return Evaluation(pd.DataFrame(), pd.DataFrame(), [], skipped)
    preds = patient_frame(slides, specs).set_index(PATIENT_ID)
    truth = pd.concat(truths, axis=1)
    return Evaluation(predictions=preds.loc[truth.index], truth=truth, specs=specs, skipped=skipped)


def truth_arrays(spec: TargetSpec, ev: Evaluation) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(y, event or None, mask of patients labelled for this target)."""
    y = ev.truth[spec.name].to_numpy(dtype=np.float64)
    mask = ~np.isnan(y)
    event = None
    if spec.kind == SURVIVAL:
        event = ev.truth[f"{spec.name}_event"].to_numpy(dtype=np.float64)
        mask &= ~np.isnan(event)
    return y, event, mask
