"""Dichotomising a continuous biomarker at a cut-off fixed before the test data are looked at.

``--cutoff`` takes either a number (a pre-specified value, e.g. ``0.5``) or a quantile learned on a
training subset: ``median-train`` or ``q<p>-train`` (``q0.67-train``: the 67th percentile). The training
subset is either the labelled slides matching ``--train-split COL=VALUE`` (they are then excluded from the
analysis) or the model's out-of-fold predictions (``--model DIR`` → ``DIR/oof_predictions.csv``). The test
data never enter the cut-off.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from wsi_pipeline.errors import ConfigError

_QUANTILE = re.compile(r"^q(0?\.\d+|[1-9]\d?)-train$")


@dataclass(frozen=True)
class CutoffSpec:
    value: float | None = None  # a fixed, pre-specified cut-off
    quantile: float | None = None  # learned on the training subset

    @property
    def needs_training(self) -> bool:
        return self.quantile is not None


@dataclass(frozen=True)
class Cutoff:
    value: float
    source: str  # how it was fixed, in words (goes to the outputs)
    n_train: int = 0


def parse_cutoff(text: str | None) -> CutoffSpec | None:
    """``None`` | ``"0.42"`` | ``"median-train"`` | ``"q0.33-train"`` | ``"q33-train"``."""
    if text is None or str(text).strip() == "":
        return None
    t = str(text).strip().lower()
    if t == "median-train":
        return CutoffSpec(quantile=0.5)
    m = _QUANTILE.match(t)
    if m:
        q = float(m.group(1))
        q = q / 100.0 if q >= 1 else q
        if not 0.0 < q < 1.0:
            raise ConfigError(f"--cutoff {text}: the quantile must lie strictly between 0 and 1")
        return CutoffSpec(quantile=q)
    try:
        return CutoffSpec(value=float(t))
    except ValueError:
        raise ConfigError(
            f"--cutoff {text!r}: expected a number (e.g. 0.5), 'median-train' or 'q0.67-train'"
        ) from None


def learn_cutoff(spec: CutoffSpec, train_values: np.ndarray | None = None, train_desc: str = "") -> Cutoff:
    """Fix the cut-off: the given value, or the quantile of ``train_values`` (NaN ignored)."""
    if spec.value is not None:
        return Cutoff(value=float(spec.value), source="pre-specified value")
    if train_values is None:
        raise ConfigError(
            "a quantile cut-off (e.g. median-train) needs a training subset: pass --train-split COL=VALUE "
            "or --model DIR (its oof_predictions.csv)"
        )
    vals = np.asarray(train_values, dtype=float)
    vals = vals[np.isfinite(vals)]
    if len(vals) < 5:
        raise ConfigError(f"only {len(vals)} training value(s) to learn the cut-off from {train_desc}; need >= 5")
    q = float(spec.quantile)  # type: ignore[arg-type]
    value = float(np.quantile(vals, q))
    name = "median" if q == 0.5 else f"{q:g} quantile"
    return Cutoff(value=value, source=f"{name} of {len(vals)} training patients ({train_desc})", n_train=len(vals))


def dichotomise(values: np.ndarray, cutoff: Cutoff) -> np.ndarray:
    """1.0 where value >= cut-off ('high'), 0.0 below, NaN stays NaN."""
    v = np.asarray(values, dtype=float)
    out = (v >= cutoff.value).astype(float)
    out[~np.isfinite(v)] = np.nan
    return out
