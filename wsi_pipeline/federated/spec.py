"""The run specification the server sends with every message: targets (with their classes once the sites
have joined), how each site splits its patients, and the model to build (variant, input width, regression
scalers). A site keeps no state between messages: everything it needs comes with the message."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from wsi_pipeline.federated.protocol import dumps, loads
from wsi_pipeline.mil.model_io import VariantCard
from wsi_pipeline.mil.targets import TargetSpec


@dataclass
class RunSpec:
    targets: list[dict[str, Any]]
    val_fraction: float
    seed: int
    context_rings: int
    max_tiles: int = 4096
    batch_bags: int = 4
    variant: dict[str, Any] = field(default_factory=dict)  # VariantCard fields, without folds (set after join)
    scalers: dict[str, list[float]] = field(default_factory=dict)  # regression target → [mean, std]
    encoder: dict[str, Any] = field(default_factory=dict)  # EncoderInfo every site must have (after join)
    histogram_bins: int = 100

    def to_json(self) -> str:
        return dumps(asdict(self))

    @classmethod
    def from_json(cls, text: Any) -> RunSpec:
        return cls(**loads(text, "run specification"))

    @property
    def specs(self) -> list[TargetSpec]:
        return [TargetSpec.from_dict(t) for t in self.targets]

    @property
    def target_names(self) -> list[str]:
        return [str(t["name"]) for t in self.targets]

    def variant_card(self) -> VariantCard:
        return VariantCard(**self.variant)

    def build_model(self) -> nn.Module:
        from wsi_pipeline.mil.ensemble import build_model

        return build_model(self.variant_card(), self.specs, 0)
