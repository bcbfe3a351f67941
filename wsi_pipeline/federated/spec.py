"""The run specification the server sends with every message: targets (with their classes once the sites
have joined), how each site splits its patients, and the model to build (variant, input width, regression
scalers). A site keeps no state between messages: everything it needs comes with the message."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from wsi_pipeline.errors import FederatedError
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
    folds: int = 1  # members of the fold ensemble (1: one model, ``val_fraction`` held out)

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

    @property
    def members(self) -> int:
        return max(1, int(self.folds))

    def member_states(self, arrays: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The state of each member in ``arrays`` (one model: the arrays themselves; a fold ensemble: member
        k's entries are named ``m<k>.<name>``)."""
        if self.members == 1:
            return [dict(arrays)]
        out: list[dict[str, Any]] = [{} for _ in range(self.members)]
        for key, value in arrays.items():
            head, _, name = key.partition(".")
            k = int(head[1:]) if head[:1] == "m" and head[1:].isdigit() else -1
            if not 0 <= k < self.members or not name:
                raise FederatedError(f"model array {key!r} names no member of a {self.members}-fold ensemble")
            out[k][name] = value
        return out

    def join_states(self, states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The inverse of :meth:`member_states`."""
        if self.members == 1:
            return dict(states[0])
        return {f"m{k}.{name}": v for k, st in enumerate(states) for name, v in st.items()}
