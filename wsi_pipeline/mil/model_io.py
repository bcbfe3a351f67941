"""The model directory written by ``wsi train`` and read by ``wsi predict`` / ``wsi subgroups``.

```
DIR/
  config.yaml                      resolved TrainConfig
  model.json                       model card: targets + class names, encoder (name, dim, µm/px), variants
                                   (per-fold scalers / covariate encoders, calibrators, t_pred cut-offs),
                                   subgroup cut-offs, patient folds, how the head was chosen
  weights/<variant>/fold<k>.safetensors
  metrics.json · metrics.md        pooled out-of-fold metrics with patient-level bootstrap CIs
  oof_predictions.csv              one row per (model, patient): out-of-fold predictions and truth
  history.json                     per model and fold: training loss and validation losses per epoch
```
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from wsi_pipeline.errors import FormatError, WeightsError
from wsi_pipeline.formats import api as F
from wsi_pipeline.mil.data import EncoderInfo
from wsi_pipeline.mil.targets import TargetSpec

MODEL_CARD_VERSION = F.MODEL_JSON_VERSION  # 2: regression bounds (see mil.targets); 3: stacked calibrators


@dataclass
class FoldCard:
    fold: int
    weights: str  # relative to DIR
    regression_scalers: dict[str, list[float]] = field(default_factory=dict)  # target → [mean, std]
    covariates: dict[str, Any] | None = None  # CovariateEncoder.to_dict()
    best_epoch: int = 0
    val_loss: float = float("nan")
    n_train: int = 0
    n_val: int = 0
    lr: float = 0.0


@dataclass
class VariantCard:
    name: str
    head: str  # registered head name, or "covariates"
    head_kwargs: dict[str, Any]
    in_dim: int  # tile feature width the head takes (embed_dim · (1 + context rings used))
    image: bool = True
    covariates: bool = False
    context_rings: int = 0
    folds: list[FoldCard] = field(default_factory=list)
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)  # target → calibrator (mil.calibration)
    thresholds: dict[str, float] = field(default_factory=dict)  # binary target → t_pred cut-off (default 0.5)


@dataclass
class ModelCard:
    name: str
    main_variant: str
    targets: list[dict[str, Any]]
    encoder: dict[str, Any]
    variants: dict[str, VariantCard]
    covariate_columns: list[str] = field(default_factory=list)
    subgroups: dict[str, Any] = field(default_factory=dict)
    head_selection: dict[str, Any] = field(default_factory=dict)
    patient_folds: dict[str, int] = field(default_factory=dict)
    train_run: str = ""
    labels: str = ""
    seed: int = 0
    version: int = MODEL_CARD_VERSION

    @property
    def target_specs(self) -> list[TargetSpec]:
        return [TargetSpec.from_dict(t) for t in self.targets]

    @property
    def encoder_info(self) -> EncoderInfo:
        return EncoderInfo.from_dict(self.encoder)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        variants = {}
        for k, v in d["variants"].items():
            folds = [FoldCard(**f) for f in v.pop("folds", [])]
            variants[k] = VariantCard(**v, folds=folds)
        rest = {k: v for k, v in d.items() if k != "variants"}
        return cls(**rest, variants=variants)


class ModelDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    @property
    def model_json(self) -> Path:
        return self.root / F.MODEL_JSON

    @property
    def metrics_json(self) -> Path:
        return self.root / "metrics.json"

    @property
    def metrics_md(self) -> Path:
        return self.root / "metrics.md"

    @property
    def oof_csv(self) -> Path:
        return self.root / F.OOF_PREDICTIONS_CSV

    def weights_rel(self, variant: str, fold: int) -> str:
        from wsi_pipeline.runfolder.layout import safe_name

        return f"weights/{safe_name(variant)}/fold{fold}.safetensors"

    def write_card(self, card: ModelCard) -> None:
        F.write_model_json(self.model_json, asdict(card))

    def read_card(self) -> ModelCard:
        d = F.read_model_json(self.model_json)  # checks the file, its version and the required keys
        try:
            card = ModelCard.from_dict(d)
        except (TypeError, KeyError, AttributeError) as e:
            raise FormatError(self.model_json, f"unreadable model card ({e}); re-run `wsi train`") from e
        if card.version < 2:  # newer than supported: refused by F.read_model_json
            self._add_legacy_bounds(card)
        return card

    def _add_legacy_bounds(self, card: ModelCard) -> None:
        """Version-1 cards predate bounds: a regression target gets the bounds that training detects today,
        from the training labels the directory keeps (``oof_predictions.csv``, column ``<target>_true``)."""
        import pandas as pd

        from wsi_pipeline.mil.targets import REGRESSION, detect_bounds

        todo = [t for t in card.targets if t.get("kind") == REGRESSION and "bounds" not in t]
        if not todo:
            return
        oof = pd.read_csv(self.oof_csv) if self.oof_csv.is_file() else pd.DataFrame()
        for t in todo:
            col = f"{t['name']}_true"
            if col in oof.columns:
                t["bounds"] = list(detect_bounds(pd.to_numeric(oof[col], errors="coerce").to_numpy(float)))


def save_weights(path: str | Path, module: nn.Module) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with F.atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_weights(path: str | Path, module: nn.Module) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: weights file missing; re-run `wsi train`")
    try:
        state = load_file(str(path))
        missing = [k for k in _optional_keys(module) if k not in state]
        if missing:  # weights written before these buffers existed: keep the module's defaults
            state.update({k: v for k, v in module.state_dict().items() if k in missing})
        module.load_state_dict(state)
    except (SafetensorError, RuntimeError) as e:
        raise WeightsError(f"{path}: cannot load weights ({e}); the file may be corrupt — re-run `wsi train`") from e
    return module


def _optional_keys(module: nn.Module) -> list[str]:
    """State keys (with their submodule prefix) that older weight files may lack: each submodule's
    ``optional_state_keys`` (e.g. the MIL heads' feature-standardisation buffers, identity by default)."""
    out = []
    for prefix, m in module.named_modules():
        for k in getattr(m, "optional_state_keys", ()):
            out.append(f"{prefix}.{k}" if prefix else k)
    return out
