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
    groups: dict[str, str] = field(default_factory=dict)  # patient → group (--group-by), empty when ungrouped
    _stats: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def slides_of(self, patients: set[str]) -> list[str]:
        return [s for s in self.labels.slide_ids if self.patient_of[s] in patients]

    def feature_stats(self, slides: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and std of the raw embeddings of every tile of ``slides`` (a fold's training
        slides; cached, as every variant of a fold asks for the same ones). Dimensions (nearly) constant on
        these tiles get std 1, not ~0, so a test tile that differs there is not blown up."""
        key = tuple(sorted(slides))
        if key not in self._stats:
            self._stats[key] = stats_from_sums(*feature_sums(self.store, slides, self.embed_dim))
        return self._stats[key]


def feature_sums(store: BagStore, slides: Sequence[str], dim: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-dimension sum and sum of squares of the raw embeddings (first ``dim`` columns) of every tile of
    ``slides``, and the number of tiles: what :func:`stats_from_sums` needs, and all a federated site sends."""
    s1, s2, n = np.zeros(dim), np.zeros(dim), 0
    for sid in slides:
        f = store.get(sid).features[:, :dim].astype(np.float64)
        s1 += f.sum(0)
        s2 += (f * f).sum(0)
        n += len(f)
    return s1, s2, n


def stats_from_sums(s1: np.ndarray, s2: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std from sums over tiles (summed over sites when federated). Dimensions
    (nearly) constant on these tiles get std 1, not ~0, so a test tile that differs there is not blown up."""
    s1, s2 = np.asarray(s1, dtype=np.float64), np.asarray(s2, dtype=np.float64)
    mean = s1 / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean**2, 0.0))
    floor = 1e-3 * float(np.median(std[std > 0])) if np.any(std > 0) else 0.0
    std = np.where(std > max(floor, 1e-8), std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)
