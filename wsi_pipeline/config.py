"""Configuration as dataclasses: one per stage. The resolved config is written next to every output."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from wsi_pipeline.errors import ConfigError

C = TypeVar("C")


@dataclasses.dataclass
class TilingConfig:
    target_mpp: float = 0.5
    tile_size: int = 224
    overlap: int = 0
    min_tissue: float = 0.25
    slide_mpp: float | None = None  # µm/px for slides whose file has no MPP (--slide-mpp)
    force_slide_mpp: float | None = None  # µm/px for every slide, even those with MPP (--force-slide-mpp)
    mpp_from_objective: bool = False  # opt-in fallback: MPP = 10 / objective power
    tissue_mpp: float = 8.0  # resolution of the tissue mask (µm/px)
    min_tissue_area_um2: float = 20000.0  # drop tissue blobs smaller than this
    reject_pen: bool = True

    def validate(self) -> TilingConfig:
        if self.target_mpp <= 0:
            raise ConfigError(f"--target-mpp must be > 0 (got {self.target_mpp})")
        if self.tile_size < 8:
            raise ConfigError(f"--tile-size must be >= 8 (got {self.tile_size})")
        if not 0 <= self.overlap < self.tile_size:
            raise ConfigError(f"--overlap must be in [0, tile_size) (got {self.overlap})")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue must be in [0, 1] (got {self.min_tissue})")
        for name in ("slide_mpp", "force_slide_mpp"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0 (got {v})")
        return self

    def params(self) -> dict[str, Any]:
        """The parameters that change the tiling output (the resume key)."""
        return dataclasses.asdict(self)


def to_dict(cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}
    return {k: plain(v) for k, v in dict(cfg).items()}


def plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    return v


def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Build a config dataclass from a mapping, rejecting unknown keys with a helpful error."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} option(s): {sorted(unknown)}; known: {sorted(names)}")
    return cls(**dict(data))


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
