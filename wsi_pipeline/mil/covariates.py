"""Clinical / molecular covariates for late fusion with the slide embedding.

``fit_covariates`` learns the encoding on the training folds only: numeric columns are standardised
(mean/std of the training slides; a missing value becomes the mean, i.e. 0), categorical columns are
one-hot encoded over the categories seen in training (an unseen or missing category is all zeros).
A column is numeric when every non-missing value parses as a number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from wsi_pipeline.errors import LabelsError


@dataclass
class CovariateEncoder:
    columns: list[str]
    numeric: dict[str, list[float]] = field(default_factory=dict)  # column → [mean, std]
    categorical: dict[str, list[str]] = field(default_factory=dict)  # column → categories

    @property
    def feature_names(self) -> list[str]:
        names: list[str] = []
        for c in self.columns:
            if c in self.numeric:
                names.append(c)
            else:
                names.extend(f"{c}={v}" for v in self.categorical[c])
        return names

    @property
    def dim(self) -> int:
        return len(self.feature_names)

    def transform(self, df: Any) -> np.ndarray:
        """n × dim float32 matrix for the rows of ``df`` (a labels DataFrame)."""
        import pandas as pd

        _check_columns(df, self.columns)
        blocks = []
        for c in self.columns:
            if c in self.numeric:
                mean, std = self.numeric[c]
                v = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64)
                blocks.append(np.nan_to_num((v - mean) / std, nan=0.0)[:, None])
            else:
                cats = self.categorical[c]
                vals = df[c].astype("string").str.strip().fillna("").to_numpy()
                blocks.append(np.stack([(vals == k) for k in cats], axis=1).astype(np.float64))
        return np.concatenate(blocks, axis=1).astype(np.float32) if blocks else np.zeros((len(df), 0), np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "numeric": dict(self.numeric), "categorical": dict(self.categorical)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CovariateEncoder:
        return cls(list(d["columns"]), {k: list(v) for k, v in d.get("numeric", {}).items()},
                   {k: list(v) for k, v in d.get("categorical", {}).items()})


def _check_columns(df: Any, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        path = df.attrs.get("path", "labels CSV")
        raise LabelsError(f"{path}: covariate column(s) {missing} not found; columns are {list(df.columns)}")


def fit_covariates(df: Any, columns: Sequence[str]) -> CovariateEncoder:
    """Fit the encoding on the (training) rows of ``df``."""
    import pandas as pd

    _check_columns(df, columns)
    enc = CovariateEncoder(list(columns))
    for c in columns:
        raw = df[c]
        num = pd.to_numeric(raw, errors="coerce")
        if raw.notna().any() and not (raw.notna() & num.isna()).any():
            v = num.to_numpy(dtype=np.float64)
            mean = float(np.nanmean(v))
            std = float(np.nanstd(v))
            enc.numeric[c] = [mean, std if std > 1e-12 else 1.0]
        else:
            cats = sorted({str(s).strip() for s in raw.dropna().tolist()})
            if not cats:
                raise LabelsError(f"covariate {c!r} has no values in the training slides")
            enc.categorical[c] = cats
    return enc


def parse_covariates(text: str | Sequence[str] | None) -> list[str]:
    if not text:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    return [s.strip() for s in items if s.strip()]


class CovariatesOnly(nn.Module):
    """The covariates-only comparator: one linear model per target (logistic / multinomial / linear /
    Cox-linear, depending on the loss it is trained with). Same interface as a MIL head."""

    registry_name = "covariates"
    default_lr = 1e-2  # a linear model on a handful of standardised columns

    def __init__(self, tasks: dict[str, int], cov_dim: int) -> None:
        super().__init__()
        self.tasks, self.cov_dim = dict(tasks), cov_dim
        self.lins = nn.ModuleDict({t: nn.Linear(cov_dim, n) for t, n in self.tasks.items()})

    def forward(self, x: Tensor | None = None, coords: Tensor | None = None,
                covariates: Tensor | None = None) -> Any:
        from wsi_pipeline.mil.heads import MILOutput

        if covariates is None:
            raise ValueError("the covariates-only model needs covariates")
        n = 0 if x is None else x.shape[0]
        logits = {t: lin(covariates) for t, lin in self.lins.items()}
        inst = {t: v.expand(n, -1) for t, v in logits.items()}
        return MILOutput(logits, inst, {}, torch.as_tensor(covariates))
