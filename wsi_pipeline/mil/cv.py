"""The cross-validation of ``wsi train`` as data: the cohort (slides with features and labels, patient
folds), a variant (one model trained in the run) and what one (variant, fold) training returns. The
training loop (:mod:`.train`) produces them and the outputs (:mod:`.report`) read them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsi_pipeline.mil.data import BagStore
from wsi_pipeline.mil.model_io import FoldCard
from wsi_pipeline.mil.targets import Labels, TargetSpec


@dataclass
class Variant:
    name: str
    head: str
    head_kwargs: dict[str, Any]
    image: bool = True
    covariates: bool = False
    context_rings: int = 0


@dataclass
class FoldResult:
    variant: str
    fold: int
    card: FoldCard
    oof: dict[str, dict[str, np.ndarray]]  # slide_id → target → prediction
    history: list[dict[str, float]] = field(default_factory=list)
    inner: int = -1  # >= 0: a head-selection training (inner fold of outer fold `fold`), not a model member


@dataclass
class Cohort:
    """The training cohort: slides with both features and labels."""

    labels: Labels
    store: BagStore
    specs: list[TargetSpec]
    patient_of: dict[str, str]
    folds: dict[str, int]  # patient → fold
    strata: dict[str, Any]
    embed_dim: int = 0
    _stats: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def slides_of(self, patients: set[str]) -> list[str]:
        return [s for s in self.labels.slide_ids if self.patient_of[s] in patients]

    def feature_stats(self, slides: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and std of the raw embeddings of every tile of ``slides`` (a fold's training
        slides; cached, as every variant of a fold asks for the same ones). Dimensions (nearly) constant on
        these tiles get std 1, not ~0, so a test tile that differs there is not blown up."""
        key = tuple(sorted(slides))
        if key not in self._stats:
            d = self.embed_dim
            s1, s2, n = np.zeros(d), np.zeros(d), 0
            for sid in slides:
                f = self.store.get(sid).features[:, :d].astype(np.float64)
                s1 += f.sum(0)
                s2 += (f * f).sum(0)
                n += len(f)
            mean = s1 / max(n, 1)
            std = np.sqrt(np.maximum(s2 / max(n, 1) - mean**2, 0.0))
            floor = 1e-3 * float(np.median(std[std > 0])) if np.any(std > 0) else 0.0
            std = np.where(std > max(floor, 1e-8), std, 1.0)
            self._stats[key] = (mean.astype(np.float32), std.astype(np.float32))
        return self._stats[key]
