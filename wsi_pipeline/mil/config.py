"""Configuration dataclasses of the MIL stage (``wsi train``, ``wsi predict``, ``wsi subgroups``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import ConfigError


@dataclass
class TrainConfig:
    """Everything ``wsi train`` needs; saved (resolved) as ``DIR/config.yaml``.

    ``targets`` is the CLI string (``response:binary,...``) or a YAML list/mapping (see mil.targets).
    ``context_rings``: spatial context blocks appended to every tile embedding (0 = none; see mil.data).
    ``max_tiles``: random tiles per bag per training step (0 = all); prediction always uses every tile.
    ``baseline``: also train the mean-pool baseline (raw embeddings, no context) and report it beside.
    ``head``: a registered head, or ``auto``: chosen among ``head_candidates`` (in order of simplicity) by an
    inner ``selection_folds``-fold CV of ≤ ``selection_epochs`` epochs within each outer fold's training
    patients; a later candidate must beat a simpler one by more than ``selection_margin`` (mil.selection).
    ``calibration``: post-hoc calibration of the classification outputs, fitted on the out-of-fold
    predictions: auto (binary platt, multiclass temperature), platt, stacked (binary targets read the model's
    other targets' outputs), temperature, isotonic or none (mil.calibration).
    ``group_by``: a labels column (site, hospital, scanner) whose every value falls in one CV fold, so the
    out-of-fold predictions and everything fitted on them (calibrator, head choice, cut-offs) come from models
    that never saw that group (evaluate.splits.group_folds); None: folds by patient, stratified.
    """

    run: str = ""
    labels: str = ""
    targets: Any = ""
    model_out: str = ""
    head: str = "auto"
    head_candidates: list[str] = field(default_factory=lambda: ["meanpool", "abmil"])
    selection_folds: int = 3
    selection_epochs: int = 20
    selection_margin: float = 0.01
    calibration: str = "auto"
    folds: int = 5
    group_by: str | None = None
    seed: int = 0
    encoder: str | None = None
    covariates: list[str] = field(default_factory=list)
    epochs: int = 40
    lr: float | None = None  # None: the head's default (1e-3; TransMIL 2e-4; covariates-only 1e-2)
    weight_decay: float = 1e-4
    hidden: int = 256
    dropout: float = 0.25
    context_rings: int = 1
    instance_encoder: str = "mlp"  # mlp | interact (tile × neighbourhood interaction; needs context_rings > 0)
    max_tiles: int = 4096
    batch_bags: int = 4
    patience: int = 10
    val_fraction: float = 0.2
    baseline: bool = True
    n_bootstrap: int = 1000
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    threads: int = 0
    cache_mb: int = 2048
    distribute: str = "folds"  # under torchrun: folds (trainings dealt across ranks) | bags (mil.distributed)

    def validate(self) -> TrainConfig:
        if not self.run:
            raise ConfigError("train: RUN folder missing")
        if not self.labels:
            raise ConfigError("train: --labels CSV is required")
        if not self.targets:
            raise ConfigError("train: --targets is required, e.g. --targets response:binary")
        if not self.model_out:
            raise ConfigError("train: --model-out DIR is required")
        checks = [
            (self.folds >= 2, f"--folds must be >= 2 (got {self.folds})"),
            (self.epochs >= 1, f"--epochs must be >= 1 (got {self.epochs})"),
            (self.lr is None or self.lr > 0, f"--lr must be > 0 (got {self.lr})"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1) (got {self.dropout})"),
            (self.context_rings >= 0, f"--context-rings must be >= 0 (got {self.context_rings})"),
            (self.instance_encoder in ("mlp", "interact"),
             f"instance_encoder must be mlp or interact (got {self.instance_encoder!r})"),
            (self.max_tiles >= 0, f"--max-tiles must be >= 0 (got {self.max_tiles})"),
            (self.batch_bags >= 1, f"--batch-bags must be >= 1 (got {self.batch_bags})"),
            (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1) (got {self.val_fraction})"),
            (self.n_bootstrap >= 1, f"--n-bootstrap must be >= 1 (got {self.n_bootstrap})"),
            (self.selection_folds >= 2, f"selection_folds must be >= 2 (got {self.selection_folds})"),
            (self.selection_epochs >= 1, f"--selection-epochs must be >= 1 (got {self.selection_epochs})"),
            (self.selection_margin >= 0, f"selection_margin must be >= 0 (got {self.selection_margin})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        from wsi_pipeline.mil.distributed import check_mode

        check_mode(self.distribute)
        from wsi_pipeline.mil.calibration import STACKED, calibration_choices, check_requested

        if self.calibration not in calibration_choices():
            raise ConfigError(f"--calibration {self.calibration!r}: unknown; use one of "
                              f"{', '.join(calibration_choices())}")
        if self.calibration == STACKED:  # before training: does the model have a target to stack on?
            from wsi_pipeline.mil.targets import targets_from_config

            check_requested(self.calibration, targets_from_config(self.targets))
        return self


@dataclass
class PredictConfig:
    run: str = ""
    model: str = ""
    encoder: str | None = None
    labels: str | None = None  # optional: patient_id (and covariates when the model uses them)
    variant: str | None = None  # which trained model of DIR (default: the main one)
    write_scores: bool = True
    device: str = "auto"
    force: bool = False  # predict even when the tables are up to date with the same inputs
    calibrated: bool = True  # apply the calibrators recorded at training (False: the raw fold average)
    # standardise the features with this RUN's own per-dimension statistics instead of the training folds'
    # (test-time feature alignment for a cohort from another site or scanner; needs a cohort, not a few slides)
    align_features: bool = False


@dataclass
class SubgroupsConfig:
    run: str = ""
    model: str = ""
    labels: str = ""
    target: str | None = None  # binary response target (default: the model's subgroup target)
    phenotype: str | None = None  # multiclass target crossed with the subgroups (default: first multiclass)
    survival: str | None = None  # survival target for KM curves (default: first survival target)
    source: str = "auto"  # auto | oof | predictions
    n_bootstrap: int = 1000
    seed: int = 0


@dataclass
class EvaluateConfig:
    run: str = ""
    model: str = ""
    labels: str = ""
    n_bootstrap: int = 1000
    seed: int = 0


def resolve_model_dir(model: str | Path) -> Path:
    """A MIL model folder (with ``model.json``), or the name of one under models/ (``WSI_MODELS_DIR``), e.g.
    ``wsip-demo-mil``: what every ``--model`` of ``wsi run`` / ``predict`` / ``evaluate`` / ``subgroups`` takes."""
    from wsi_pipeline.encoders.project import find_model_folder, models_dir
    from wsi_pipeline.formats.api import MODEL_JSON

    found = find_model_folder(model, MODEL_JSON)
    if found is not None:
        return found
    raise ConfigError(f"{model}: not a MIL model folder (no {MODEL_JSON}) and no such model under {models_dir()}; "
                      "train one with `wsi train`, or pass --model DIR")


def resolved_config(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as written next to its outputs (``MODEL/config.yaml``, ``RUN/resolved_config.yaml``): targets
    given as a YAML list or mapping are spelled out as specs."""
    from wsi_pipeline.config import to_dict
    from wsi_pipeline.mil.targets import targets_from_config

    d = to_dict(cfg)
    if not isinstance(cfg.targets, str):
        d["targets"] = [t.to_dict() for t in targets_from_config(cfg.targets)]
    return d
