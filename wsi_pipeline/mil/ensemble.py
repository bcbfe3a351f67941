"""Building a variant's model, running it on one bag, and the fold ensemble used for prediction.

The ensemble calibrates each fold model's probabilities (values and per-tile scores) with the variant's
post-hoc calibrators recorded at training, as that model's out-of-fold predictions were calibrated
(:class:`~wsi_pipeline.mil.calibration.TargetCalibrator`), then averages them; a model folder written before
calibrators existed averages uncalibrated probabilities, as it always did."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_pipeline.errors import ConfigError, LabelsError
from wsi_pipeline.mil.calibration import TargetCalibrator, calibrator_from_dict
from wsi_pipeline.mil.covariates import CovariateEncoder, CovariatesOnly
from wsi_pipeline.mil.data import Bag
from wsi_pipeline.mil.heads import MILOutput, create_head
from wsi_pipeline.mil.losses import to_prediction
from wsi_pipeline.mil.model_io import FoldCard, ModelCard, ModelDir, VariantCard, load_weights
from wsi_pipeline.mil.targets import TargetSpec


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(vc: VariantCard, specs: Sequence[TargetSpec], cov_dim: int) -> nn.Module:
    tasks = {s.name: s.n_outputs for s in specs}
    if not vc.image:
        return CovariatesOnly(tasks, cov_dim)
    return create_head(vc.head, vc.in_dim, tasks, cov_dim=cov_dim if vc.covariates else 0, **vc.head_kwargs)


def forward_bag(
    model: nn.Module, bag: Bag | None, in_dim: int, cov: np.ndarray | None, device: torch.device
) -> MILOutput:
    """Run one bag (its first ``in_dim`` feature columns) with an optional covariate vector."""
    x = coords = None
    if bag is not None:
        x = torch.from_numpy(np.ascontiguousarray(bag.features[:, :in_dim])).to(device)
        coords = torch.from_numpy(bag.l0_xy).to(device)
    c = None if cov is None else torch.from_numpy(np.asarray(cov, dtype=np.float32)).to(device)
    return model(x, coords=coords, covariates=c)


@dataclass
class SlidePrediction:
    """Fold-averaged predictions of one slide: ``values[t]`` (scalar or C probabilities), per-tile
    ``tile_scores[t]`` (N or N×C, same units as values) and ``attention[t]`` (N; empty if the head has none)."""

    values: dict[str, np.ndarray]
    tile_scores: dict[str, np.ndarray] = field(default_factory=dict)
    attention: dict[str, np.ndarray] = field(default_factory=dict)


def output_to_prediction(
    out: MILOutput, specs: Sequence[TargetSpec], scalers: dict[str, list[float]], tiles: bool = True
) -> SlidePrediction:
    vals, tiles_d, att = {}, {}, {}
    for s in specs:
        sc = scalers.get(s.name)
        vals[s.name] = np.atleast_1d(to_prediction(s, out.logits[s.name].detach().cpu().numpy(), sc))
        if tiles and s.name in out.instance_scores:
            tiles_d[s.name] = to_prediction(s, out.instance_scores[s.name].detach().cpu().numpy(), sc)
        if tiles and s.name in out.attention:
            att[s.name] = out.attention[s.name].detach().cpu().numpy().astype(np.float64)
    return SlidePrediction(vals, tiles_d, att)


def average(preds: Sequence[SlidePrediction]) -> SlidePrediction:
    first = preds[0]
    return SlidePrediction(
        {k: np.mean([p.values[k] for p in preds], axis=0) for k in first.values},
        {k: np.mean([p.tile_scores[k] for p in preds], axis=0) for k in first.tile_scores},
        {k: np.mean([p.attention[k] for p in preds], axis=0) for k in first.attention},
    )


def calibrate(pred: SlidePrediction, calibrators: dict[str, TargetCalibrator], member: int) -> SlidePrediction:
    """Calibrated copy of fold model ``member``'s prediction: values and per-tile scores of every calibrated
    target; attention is left as it is.

    A stacked calibrator reads the same fold model's raw outputs of the other targets: the slide's values
    for the slide value (the probability contract, exactly as its OOF predictions were calibrated); for the
    per-tile scores, each tile's own scores of those targets when the model gives per-tile scores of every
    target the calibrator needs (every registered head does: ``instance_scores`` holds each target's
    classifier applied to the tile embeddings, on the slide logits' scale), else the tile's own score with
    the slide's values of the other targets (the tile heatmap then varies with the target's own score only)."""

    def tile_others(cal: TargetCalibrator) -> dict[str, np.ndarray]:
        return pred.tile_scores if all(t in pred.tile_scores for t in cal.needs) else pred.values

    vals = {k: calibrators[k](v, member, pred.values) if k in calibrators else v for k, v in pred.values.items()}
    tiles = {k: calibrators[k](v, member, tile_others(calibrators[k])) if k in calibrators else v
             for k, v in pred.tile_scores.items()}
    return SlidePrediction(vals, tiles, pred.attention)


class Ensemble:
    """The fold models of one variant of a model directory; each fold model's predictions are calibrated
    with the variant's calibrators, then averaged over folds (``calibrated=False``: the raw fold average)."""

    def __init__(self, model_dir: str | Path, variant: str | None = None, device: str = "auto",
                 calibrated: bool = True) -> None:
        self.dir = ModelDir(model_dir)
        self.card: ModelCard = self.dir.read_card()
        self.specs = self.card.target_specs
        name = variant or self.card.main_variant
        if name not in self.card.variants:
            raise ConfigError(f"{self.dir.root}: no model variant {name!r}; have {sorted(self.card.variants)}")
        self.variant: VariantCard = self.card.variants[name]
        self.device = pick_device(device)
        self.members: list[tuple[FoldCard, nn.Module, CovariateEncoder | None]] = []
        for fc in self.variant.folds:
            enc = CovariateEncoder.from_dict(fc.covariates) if fc.covariates else None
            model = build_model(self.variant, self.specs, enc.dim if enc else 0)
            load_weights(self.dir.root / fc.weights, model)
            self.members.append((fc, model.to(self.device).eval(), enc))
        where = str(self.dir.model_json)
        self.calibrators: dict[str, TargetCalibrator] = {
            t: calibrator_from_dict(d, where) for t, d in self.variant.calibration.items()} if calibrated else {}

    @property
    def thresholds(self) -> dict[str, float]:
        """Binary target → ``t_pred`` cut-off recorded at training (calibrated probabilities; absent → 0.5).
        Uncalibrated predictions use 0.5."""
        return dict(self.variant.thresholds) if self.calibrators else {}

    @property
    def needs_covariates(self) -> bool:
        return self.variant.covariates

    @property
    def name(self) -> str:
        """The model's name: its directory's name (RUN/scores/<name>/, what `wsi heatmap --model DIR` finds)."""
        return self.dir.root.resolve().name

    def align_features(self, mean: Any, std: Any) -> int:
        """Standardise every fold model's tile embeddings with these per-dimension statistics (a predicted
        cohort's own) instead of those of its training folds; returns how many fold models took them (a
        covariates-only variant takes none)."""
        n = 0
        for _, model, _ in self.members:
            if self.variant.image and hasattr(model, "set_feature_stats"):
                model.set_feature_stats(torch.as_tensor(mean, dtype=torch.float32).to(self.device),
                                        torch.as_tensor(std, dtype=torch.float32).to(self.device))
                n += 1
        return n

    def predict(self, bag: Bag | None, covariate_rows: Any = None, tiles: bool = True) -> SlidePrediction:
        """Predict one slide; ``covariate_rows`` is a one-row labels DataFrame when the model uses covariates."""
        if self.needs_covariates and covariate_rows is None:
            raise LabelsError(
                f"model {self.name!r} uses covariates {self.card.covariate_columns}: pass --labels with those columns"
            )
        preds = []
        with torch.no_grad():
            for fc, model, enc in self.members:
                cov = enc.transform(covariate_rows)[0] if (enc is not None and self.needs_covariates) else None
                out = forward_bag(model, bag if self.variant.image else None, self.variant.in_dim, cov, self.device)
                preds.append(calibrate(output_to_prediction(out, self.specs, fc.regression_scalers, tiles),
                                       self.calibrators, fc.fold))
        return average(preds)
