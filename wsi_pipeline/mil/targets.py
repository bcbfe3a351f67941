"""Prediction targets and the labels CSV.

A target is ``name:kind`` with kind binary | multiclass | regression | survival; the label column defaults
to the target name, ``name:kind(column)`` names another column, and a survival target names its time and
event columns: ``os:survival(os_months,os_event)``. The same list can come from YAML::

    targets:
      - {name: response, kind: binary}
      - {name: immune_phenotype, kind: multiclass}
      - {name: os, kind: survival, time: os_months, event: os_event}
      - {name: til_fraction, kind: regression, bounds: [0, 1]}

A regression target may be bounded: ``til_fraction:regression[0,1]`` (``[0,]`` for a lower bound only, ``[,]``
for none). Undeclared, a target whose training labels all lie in [0, 1] is taken as a fraction and bounded to
[0, 1]. Predictions of a bounded target, at slide and tile level, are clamped into its bounds (the heads' link
is the identity on the standardised target); the bounds are stored with the model.

Class names of binary and multiclass targets come from the data (sorted; for binary the positive class is
the second: 0/1, false/true, no/yes, or the later of two sorted strings) and are stored with the model.
A missing label (empty cell) masks that target's loss only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import LabelsError
from wsi_pipeline.formats import api as F

log = logging.getLogger(__name__)

BINARY = "binary"
MULTICLASS = "multiclass"
REGRESSION = "regression"
SURVIVAL = "survival"
TARGET_KINDS = (BINARY, MULTICLASS, REGRESSION, SURVIVAL)

SLIDE_ID = F.SLIDE_ID
PATIENT_ID = F.PATIENT_ID

_SPEC_RE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*:\s*([A-Za-z]+)\s*(?:\(([^)]*)\))?\s*(?:\[([^\]]*)\])?\s*$")
FRACTION_BOUNDS = (0.0, 1.0)  # the bounds of an undeclared regression target whose labels all lie in [0, 1]
Bounds = tuple[float | None, float | None]  # (low, high); None = open on that side
_TRUE = {"1", "1.0", "true", "yes", "y", "t", "positive", "pos"}
_FALSE = {"0", "0.0", "false", "no", "n", "f", "negative", "neg"}


@dataclass
class TargetSpec:
    """One prediction target. ``classes`` is filled from the labels (binary: [negative, positive])."""

    name: str
    kind: str
    column: str = ""  # label column (binary/multiclass/regression); defaults to name
    time: str = ""  # survival time column
    event: str = ""  # survival event column (1 = event, 0 = censored)
    classes: list[str] = field(default_factory=list)
    bounds: Bounds | None = None  # regression: (low, high) predictions are clamped into; None = not declared

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise LabelsError(f"target {self.name!r}: unknown kind {self.kind!r}{did_you_mean(self.kind, TARGET_KINDS)}; "
                              f"use one of {', '.join(TARGET_KINDS)}")
        if self.bounds is not None:
            self.bounds = _check_bounds(self.name, self.kind, self.bounds)
        if self.kind == SURVIVAL:
            if not (self.time and self.event):
                raise LabelsError(
                    f"survival target {self.name!r} needs its time and event columns: "
                    f"{self.name}:survival(TIME_COLUMN,EVENT_COLUMN)"
                )
        elif not self.column:
            self.column = self.name

    @property
    def n_outputs(self) -> int:
        """Width of the head's output for this target."""
        if self.kind == MULTICLASS:
            if len(self.classes) < 2:
                raise LabelsError(f"multiclass target {self.name!r} has fewer than 2 classes in the labels")
            return len(self.classes)
        return 1

    @property
    def is_classification(self) -> bool:
        return self.kind in (BINARY, MULTICLASS)

    @property
    def label_columns(self) -> list[str]:
        """The labels-table columns this target reads."""
        return [self.time, self.event] if self.kind == SURVIVAL else [self.column]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind == SURVIVAL:
            d.update(time=self.time, event=self.event)
        else:
            d["column"] = self.column
        if self.classes:
            d["classes"] = list(self.classes)
        if self.bounds is not None:
            d["bounds"] = list(self.bounds)
        return d

    def clamp(self, values: np.ndarray) -> np.ndarray:
        """``values`` clamped into :attr:`bounds` (unchanged when there are none)."""
        if self.bounds is None or self.bounds == (None, None):
            return values
        return np.clip(values, self.bounds[0], self.bounds[1])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetSpec:
        known = {"name", "kind", "column", "time", "event", "classes", "bounds"}
        unknown = set(d) - known
        if unknown or "name" not in d or "kind" not in d:
            raise LabelsError(f"target entry {dict(d)!r}: needs name and kind; allowed keys {sorted(known)}")
        return cls(
            name=str(d["name"]), kind=str(d["kind"]), column=str(d.get("column", "") or ""),
            time=str(d.get("time", "") or ""), event=str(d.get("event", "") or ""),
            classes=[str(c) for c in d.get("classes", [])],
            bounds=None if d.get("bounds") is None else tuple(d["bounds"]),  # type: ignore[arg-type]
        )


def _check_bounds(name: str, kind: str, bounds: Any) -> Bounds:
    if kind != REGRESSION:
        raise LabelsError(f"target {name!r}: bounds are for regression targets only (it is {kind})")
    try:
        low, high = (None if b is None else float(b) for b in bounds)
    except (TypeError, ValueError) as e:
        raise LabelsError(f"target {name!r}: bounds {bounds!r} must be [low, high] (numbers or empty)") from e
    if low is not None and high is not None and not low < high:
        raise LabelsError(f"target {name!r}: bounds [{low:g}, {high:g}] need low < high")
    return low, high


def _parse_bounds(text: str, part: str) -> Bounds:
    sides = [s.strip() for s in text.split(",")]
    if len(sides) != 2:
        raise LabelsError(f"--targets: {part!r}: bounds are [LOW,HIGH], e.g. til_fraction:regression[0,1]")
    return tuple(None if s == "" else s for s in sides)  # type: ignore[return-value]


def detect_bounds(values: np.ndarray) -> Bounds:
    """Bounds of an undeclared regression target: [0, 1] when every label lies there (a fraction), else none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size and v.min() >= FRACTION_BOUNDS[0] and v.max() <= FRACTION_BOUNDS[1]:
        return FRACTION_BOUNDS
    return (None, None)


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in (s.strip() for s in parts) if p]


def parse_targets(text: str) -> list[TargetSpec]:
    """Parse ``response:binary,immune_phenotype:multiclass,os:survival(os_months,os_event)``."""
    specs: list[TargetSpec] = []
    for part in _split_top_level(text):
        m = _SPEC_RE.match(part)
        if not m:
            raise LabelsError(
                f"--targets: cannot parse {part!r}; expected NAME:KIND, NAME:KIND(COLUMN) or "
                "NAME:survival(TIME,EVENT), e.g. response:binary,os:survival(os_months,os_event)"
            )
        name, kind, args = m.group(1), m.group(2).lower(), [a.strip() for a in (m.group(3) or "").split(",") if a.strip()]
        bounds = None if m.group(4) is None else _parse_bounds(m.group(4), part)
        if bounds is not None and kind != REGRESSION:
            raise LabelsError(f"--targets: {part!r}: [LOW,HIGH] bounds are for regression targets only")
        if kind == SURVIVAL:
            if len(args) != 2:
                raise LabelsError(f"--targets: {part!r}: survival needs (TIME_COLUMN,EVENT_COLUMN)")
            specs.append(TargetSpec(name, kind, time=args[0], event=args[1]))
        else:
            if len(args) > 1:
                raise LabelsError(f"--targets: {part!r}: {kind} takes at most one column name")
            specs.append(TargetSpec(name, kind, column=args[0] if args else name, bounds=bounds))
    _check_unique(specs)
    return specs


def targets_from_config(data: Any) -> list[TargetSpec]:
    """Targets from a YAML value: a list of mappings, a ``{name: kind}`` mapping or a CLI-style string."""
    if isinstance(data, str):
        return parse_targets(data)
    if isinstance(data, Mapping):
        specs = []
        for name, v in data.items():
            if isinstance(v, str):
                specs.extend(parse_targets(f"{name}:{v}"))
            elif isinstance(v, Mapping):
                specs.append(TargetSpec.from_dict({"name": name, **v}))
            else:
                raise LabelsError(f"targets.{name}: expected a kind string or a mapping, got {v!r}")
        _check_unique(specs)
        return specs
    if isinstance(data, Sequence):
        specs = [TargetSpec.from_dict(d) if isinstance(d, Mapping) else parse_targets(str(d))[0] for d in data]
        _check_unique(specs)
        return specs
    raise LabelsError(f"targets: expected a list, mapping or string, got {type(data).__name__}")


def _check_unique(specs: Sequence[TargetSpec]) -> None:
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise LabelsError(f"--targets: duplicate target name(s) {sorted(dup)}")
    if not specs:
        raise LabelsError("--targets: no target given")


# ---------------------------------------------------------------- labels
@dataclass
class Labels:
    """Encoded labels, one row per slide (aligned with ``slide_ids``).

    ``values[name]``: binary → float 0/1, multiclass → float class index, regression → float; NaN = missing.
    Survival: ``values[name]`` is the time and ``events[name]`` the event indicator (NaN = missing).
    """

    slide_ids: list[str]
    patient_ids: list[str]
    targets: list[TargetSpec]
    values: dict[str, np.ndarray]
    events: dict[str, np.ndarray] = field(default_factory=dict)
    extra: Any = None  # the raw pandas DataFrame (covariates are read from it), indexed by slide_id

    def subset(self, slide_ids: Sequence[str]) -> Labels:
        idx = {s: i for i, s in enumerate(self.slide_ids)}
        sel = np.array([idx[s] for s in slide_ids], dtype=int)
        return Labels(
            slide_ids=[self.slide_ids[i] for i in sel], patient_ids=[self.patient_ids[i] for i in sel],
            targets=self.targets, values={k: v[sel] for k, v in self.values.items()},
            events={k: v[sel] for k, v in self.events.items()},
            extra=None if self.extra is None else self.extra.loc[list(slide_ids)],
        )


def read_labels_table(path: str | Path) -> Any:
    """The labels CSV as text columns (the one parsing rule of :func:`wsi_pipeline.formats.read_labels_csv`),
    indexed by slide_id (kept as a column too)."""
    df = F.read_labels_csv(path)
    out = df.set_index(SLIDE_ID, drop=False)
    out.attrs["path"] = df.attrs["path"]
    return out


def _is_boolean_vocab(values: Sequence[str]) -> bool:
    return {v.strip().lower() for v in values} <= (_TRUE | _FALSE)


def _binary_classes(raw: Sequence[str], name: str, path: str) -> list[str]:
    """[negative, positive] class names of a binary target."""
    uniq = sorted(set(raw))
    if _is_boolean_vocab(uniq):
        neg = sorted(u for u in uniq if u.lower() in _FALSE)
        pos = sorted(u for u in uniq if u.lower() in _TRUE)
        return [neg[0] if neg else "0", pos[0] if pos else "1"]
    if len(uniq) != 2:
        raise LabelsError(
            f"{path}: binary target {name!r} has values {uniq[:6]}; use 0/1 (or two labels), or declare it multiclass"
        )
    log.warning("%s: binary target %r: positive class is %r (the later of the sorted labels)", path, name, uniq[1])
    return uniq


def fit_class_names(spec: TargetSpec, present: Sequence[str], path: str = "labels CSV") -> list[str]:
    """The class names of a classification target from the labels present (stripped strings): binary
    [negative, positive], multiclass sorted. Federated training applies it to the union of the sites'
    label vocabularies, so every site encodes the labels as one cohort would."""
    return _binary_classes(present, spec.name, path) if spec.kind == BINARY else sorted(set(present))


def _encode_binary(raw: Sequence[Any], classes: list[str]) -> np.ndarray:
    out = np.full(len(raw), np.nan)
    boolean = _is_boolean_vocab(classes)
    for i, v in enumerate(raw):
        if not isinstance(v, str):
            continue
        s = v.strip()
        if boolean and s.lower() in _TRUE:
            out[i] = 1.0
        elif boolean and s.lower() in _FALSE:
            out[i] = 0.0
        elif s in classes:
            out[i] = float(classes.index(s))
        else:
            raise LabelsError(f"binary label {s!r} is not one of the model's classes {classes}")
    return out


def _to_float(raw: Any, col: str, path: str) -> np.ndarray:
    import pandas as pd

    num = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
    bad = raw.notna().to_numpy() & np.isnan(num)
    if bad.any():
        vals = raw[bad].tolist()[:5]
        raise LabelsError(f"{path}: column {col!r} must be numeric; found {vals}")
    return num


def did_you_mean(name: str, known: Any) -> str:
    """`` (did you mean 'x'?)`` when ``name`` is close to one of ``known``, else ''."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def require_label_columns(columns: Any, targets: list[TargetSpec], path: str) -> None:
    """Raise :class:`LabelsError` naming the first target whose columns the labels table lacks, the closest
    column name and every column there is."""
    have = [str(c) for c in columns]
    for t in targets:
        missing = [c for c in t.label_columns if c not in have]
        if missing:
            hints = "".join(did_you_mean(c, have) for c in missing)
            raise LabelsError(f"{path}: target {t.name!r} needs column(s) {missing}{hints}; the columns are {have}")


def unmatched_slides_error(labels_path: Any, labelled: list[str], have: list[str], what: str) -> LabelsError:
    """The error when no labelled ``slide_id`` is among ``have`` (the slides with features, or with
    predictions: ``what`` says which, e.g. "a feature file in DIR"): examples of both sides and, when the ids
    differ only by a file extension or by case, that difference and its fix."""
    from wsi_pipeline.slide.base import slide_id_from_path

    have_set, have_lower = set(have), {h.lower() for h in have}
    head = f"{labels_path}: no slide_id matches {what} (labels: {labelled[:3]}; there: {sorted(have)[:3]})"
    stripped = [s for s in labelled if slide_id_from_path(s) in have_set]
    if stripped:
        return LabelsError(f"{head}; the labels' slide_id holds file names ({stripped[0]!r}): a slide id is the "
                           f"file name without its extension, so write {slide_id_from_path(stripped[0])!r}")
    if any(s.lower() in have_lower for s in labelled):
        return LabelsError(f"{head}; the ids differ only in upper/lower case: slide ids are case-sensitive, "
                           "write them as the slide files are named")
    return LabelsError(f"{head}; slide_id must be the slide file's name without extension, as RUN/slides.csv "
                       "lists it, and the RUN must hold this encoder's features (`wsi extract`)")


def encode_labels(df: Any, targets: list[TargetSpec], fit_classes: bool = True) -> Labels:
    """Encode the target columns of a labels DataFrame. ``fit_classes`` fills ``TargetSpec.classes`` from the
    data (training); otherwise the stored classes are used and unknown labels are an error."""
    path = str(df.attrs.get("path", "labels CSV"))
    values: dict[str, np.ndarray] = {}
    events: dict[str, np.ndarray] = {}
    require_label_columns(df.columns, targets, path)
    for t in targets:
        if t.kind == SURVIVAL:
            values[t.name] = _to_float(df[t.time], t.time, path)
            ev = _to_float(df[t.event], t.event, path)
            if np.any((ev != 0) & (ev != 1) & ~np.isnan(ev)):
                raise LabelsError(f"{path}: event column {t.event!r} must be 0/1 (1 = event observed)")
            events[t.name] = ev
            values[t.name] = np.where(np.isnan(ev), np.nan, values[t.name])
            events[t.name] = np.where(np.isnan(values[t.name]), np.nan, ev)
        elif t.kind == REGRESSION:
            values[t.name] = _to_float(df[t.column], t.column, path)
            if fit_classes and t.bounds is None:
                t.bounds = detect_bounds(values[t.name])
                if t.bounds != (None, None):
                    log.info("%s: regression target %r: every label lies in [0, 1], so predictions are kept in "
                             "[0, 1]; declare %s:regression[,] for no bounds", path, t.name, t.name)
        else:
            raw = df[t.column]
            present = [v.strip() for v in raw.dropna().tolist()]
            if fit_classes:
                if not present:
                    raise LabelsError(f"{path}: target {t.name!r} has no labels")
                t.classes = fit_class_names(t, present, path)
            if t.kind == BINARY:
                values[t.name] = _encode_binary(raw.tolist(), t.classes)
            else:
                unknown = sorted(set(present) - set(t.classes))
                if unknown:
                    raise LabelsError(
                        f"{path}: target {t.name!r} has labels {unknown} the model was not trained on ({t.classes})"
                    )
                values[t.name] = np.array(
                    [float(t.classes.index(v.strip())) if isinstance(v, str) else np.nan for v in raw.tolist()]
                )
    return Labels(
        slide_ids=df.index.astype(str).tolist(), patient_ids=df[PATIENT_ID].astype(str).tolist(),
        targets=targets, values=values, events=events, extra=df,
    )


def load_labels(path: str | Path, targets: list[TargetSpec], fit_classes: bool = True) -> Labels:
    return encode_labels(read_labels_table(path), targets, fit_classes=fit_classes)


def stratify_target(targets: Sequence[TargetSpec]) -> TargetSpec | None:
    """The first binary or multiclass target: the one folds are stratified on."""
    return next((t for t in targets if t.is_classification), None)
