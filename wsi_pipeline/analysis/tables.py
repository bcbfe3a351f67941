"""Join the labels CSV with a RUN folder's ``predictions.csv`` and ``tme.csv``, and aggregate to patients.

The labels define the cohort: one row per slide with ``slide_id`` and ``patient_id`` (``patient_id``
defaults to ``slide_id``) plus clinical columns (treatment arm, outcome, timepoint, covariates).
``predictions.csv`` and ``tme.csv`` are joined on ``slide_id``; slides missing there get NaN.

A column is named by its bare name when exactly one source has it, or with a source prefix —
``pred:response_prob``, ``tme:til_fraction``, ``label:til_fraction`` — when several do. A bare target name
such as ``response`` that only exists in predictions resolves to ``response_prob`` / ``response_risk`` /
``response_pred`` (in that order).

Patient aggregation (several slides per patient): numeric read-outs are averaged over the patient's
slides; categorical ones take the most frequent value (ties: alphabetical first). Patient-level variables
(arm, outcome, event, covariates) must agree across a patient's slides, otherwise :class:`LabelsError`.
Slide-level ``predictions.csv`` is used rather than ``patient_predictions.csv`` so that slides can be
selected first (e.g. baseline biopsies only, ``--select timepoint=baseline``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_pipeline.errors import ConfigError, FormatError, LabelsError
from wsi_pipeline.formats import api as F
from wsi_pipeline.runfolder.layout import RunLayout

log = logging.getLogger(__name__)

SLIDE_ID = F.SLIDE_ID
PATIENT_ID = F.PATIENT_ID
KEYS = (SLIDE_ID, PATIENT_ID)

SRC_PRED = "pred"
SRC_TME = "tme"
SRC_LABEL = "label"
SOURCE_NAMES = {SRC_PRED: F.PREDICTIONS_CSV, SRC_TME: F.TME_CSV, SRC_LABEL: "labels"}
_PRED_SUFFIXES = ("_prob", "_risk", "_pred")


def read_labels(path: str | Path) -> pd.DataFrame:
    """The labels CSV by the one parsing rule of :func:`wsi_pipeline.formats.read_labels_csv` (the same
    `wsi train` uses), with numeric columns as numbers: ``slide_id``/``patient_id`` as stripped text,
    ``patient_id`` defaulting to ``slide_id``."""
    return F.read_labels_csv(path, numeric=True)


def _read_optional(read: Callable[[Path], pd.DataFrame], path: Path) -> pd.DataFrame | None:
    """A per-slide table of the RUN folder through its owner's reader, or None when the file does not exist."""
    return read(path) if path.exists() else None


@dataclass
class Sources:
    """The per-slide tables an analysis can draw columns from."""

    labels: pd.DataFrame
    predictions: pd.DataFrame | None = None
    tme: pd.DataFrame | None = None
    labels_path: str = "labels"

    @classmethod
    def load(cls, run: str | Path, labels: str | Path) -> Sources:
        layout = RunLayout(run)
        return cls(
            labels=read_labels(labels),
            predictions=_read_optional(F.read_predictions_csv, layout.predictions_csv),
            tme=_read_optional(F.read_tme_csv, layout.tme_csv),
            labels_path=str(labels),
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        out = {SRC_PRED: self.predictions, SRC_TME: self.tme, SRC_LABEL: self.labels}
        return {k: v for k, v in out.items() if v is not None}

    def columns(self, source: str) -> list[str]:
        df = self.tables().get(source)
        return [] if df is None else [c for c in df.columns if c not in KEYS]


@dataclass(frozen=True)
class ColumnRef:
    source: str  # pred | tme | label
    column: str

    @property
    def label(self) -> str:
        return f"{self.source}:{self.column}"


def resolve_column(name: str, sources: Sources, what: str = "column") -> ColumnRef:
    """Find ``name`` (optionally ``source:name``) in the sources; see the module docstring for the rules."""
    tables = sources.tables()
    if ":" in name:
        prefix, col = name.split(":", 1)
        if prefix not in SOURCE_NAMES:
            raise ConfigError(f"{what} '{name}': unknown source prefix '{prefix}'; use pred:, tme: or label:")
        if prefix not in tables:
            raise ConfigError(f"{what} '{name}': the RUN folder has no {SOURCE_NAMES[prefix]}")
        if col not in sources.columns(prefix):
            raise ConfigError(
                f"{what} '{name}': no column '{col}' in {SOURCE_NAMES[prefix]} "
                f"(columns: {sources.columns(prefix)})"
            )
        return ColumnRef(prefix, col)
    hits = [src for src in tables if name in sources.columns(src)]
    if len(hits) == 1:
        return ColumnRef(hits[0], name)
    if len(hits) > 1:
        options = ", ".join(f"{h}:{name}" for h in hits)
        raise ConfigError(f"{what} '{name}' exists in several tables; say which one: {options}")
    if SRC_PRED in tables:
        for suffix in _PRED_SUFFIXES:
            if name + suffix in sources.columns(SRC_PRED):
                return ColumnRef(SRC_PRED, name + suffix)
    avail = "; ".join(f"{SOURCE_NAMES[s]}: {sources.columns(s)}" for s in tables)
    raise ConfigError(f"{what} '{name}' not found. Available columns — {avail}")


def slide_frame(sources: Sources, refs: Mapping[str, ColumnRef]) -> pd.DataFrame:
    """One row per labelled slide: ``slide_id``, ``patient_id`` and one column per entry of ``refs``
    (keyed by the mapping's keys), joined on ``slide_id``."""
    out = sources.labels[list(KEYS)].copy()
    tables = sources.tables()
    for src, df in tables.items():
        wanted = {key: ref.column for key, ref in refs.items() if ref.source == src}
        if not wanted:
            continue
        if src != SRC_LABEL:
            n_unknown = int((~df[SLIDE_ID].isin(out[SLIDE_ID])).sum())
            if n_unknown:
                log.info("%d slide(s) of %s have no row in the labels; ignored", n_unknown, SOURCE_NAMES[src])
            if df[SLIDE_ID].duplicated().any():
                raise FormatError(SOURCE_NAMES[src], "slide_id appears twice; one row per slide expected")
        part = df[[SLIDE_ID, *dict.fromkeys(wanted.values())]]
        joined = out[[SLIDE_ID]].merge(part, on=SLIDE_ID, how="left")
        for key, col in wanted.items():
            out[key] = joined[col].to_numpy()
    return out


def apply_select(frame: pd.DataFrame, sources: Sources, select: Sequence[str]) -> pd.DataFrame:
    """Keep slides whose column equals a value: each item ``COL=VALUE`` (compared as text)."""
    if not select:
        return frame
    refs = {}
    wanted = {}
    for item in select:
        if "=" not in item:
            raise ConfigError(f"--select '{item}': expected COL=VALUE, e.g. timepoint=baseline")
        col, value = item.split("=", 1)
        refs[f"_sel{len(refs)}"] = resolve_column(col.strip(), sources, "--select column")
        wanted[f"_sel{len(wanted)}"] = value.strip()
    sel = slide_frame(sources, refs)
    mask = pd.Series(True, index=sel.index)
    for key, value in wanted.items():
        mask &= sel[key].astype(str).str.strip() == value
    kept = set(sel.loc[mask, SLIDE_ID])
    out = frame[frame[SLIDE_ID].isin(kept)].reset_index(drop=True)
    if out.empty:
        raise LabelsError(f"--select {list(select)} keeps no slide; check the column values")
    return out


def _mode(values: pd.Series) -> object:
    counts = values.dropna().astype(str).value_counts()
    if counts.empty:
        return float("nan")
    top = counts[counts == counts.max()].index
    return sorted(top)[0]


def is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def aggregate_patients(
    frame: pd.DataFrame,
    readouts: Iterable[str] = (),
    patient_level: Iterable[str] = (),
    by: Sequence[str] = (PATIENT_ID,),
) -> pd.DataFrame:
    """One row per ``by`` group (patient, or patient × timepoint): read-outs aggregated (mean / mode),
    patient-level variables checked to agree. Adds ``n_slides``."""
    readouts, patient_level = list(readouts), list(patient_level)
    groups = frame.groupby(list(by), sort=True, dropna=False)
    out = groups.size().rename("n_slides").reset_index()
    for col in patient_level:
        nunique = groups[col].nunique(dropna=True)
        bad = nunique[nunique > 1]
        if len(bad):
            key = bad.index[0]
            raise LabelsError(
                f"labels: '{col}' differs between the slides of {by[0]} {key!r}; "
                "a patient-level variable must have one value per patient"
            )
        out[col] = groups[col].first().to_numpy()
    for col in readouts:
        if is_numeric(frame[col]):
            out[col] = groups[col].mean().to_numpy()
        else:
            out[col] = groups[col].agg(_mode).to_numpy()
    n_multi = int((out["n_slides"] > 1).sum())
    if n_multi:
        log.info("%d %s group(s) have several slides: read-outs averaged (numeric) or majority (categorical)",
                 n_multi, "/".join(by))
    return out


def as_text(values: pd.Series) -> pd.Series:
    """Values as text, integral floats without '.0' (1.0 → '1'), NaN kept."""
    def one(v: Any) -> Any:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return np.nan
        if isinstance(v, (bool, np.bool_)):
            return str(bool(v))
        if isinstance(v, (int, float, np.integer, np.floating)) and float(v).is_integer():
            return str(int(v))
        return str(v).strip()

    return values.map(one)


def encode_binary(values: pd.Series, column: str) -> np.ndarray:
    """0/1, true/false, yes/no → 1.0/0.0, NaN kept."""
    mapping = {"1": 1.0, "0": 0.0, "true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0}
    text = as_text(values)
    low = text.dropna().str.lower()
    bad = sorted(set(low) - set(mapping))
    if bad:
        raise LabelsError(f"labels: binary column '{column}' has values {bad}; code it 0/1 (1 = responder/event)")
    return text.map(lambda v: mapping[v.lower()] if isinstance(v, str) else np.nan).to_numpy(dtype=float)
