"""Feature extraction: fast tile reading, the tile dataset, and the resumable, distributed engine.

    from wsi_pipeline.features import ExtractConfig, run_extract
    summary = run_extract("RUN", ExtractConfig(encoder="timm:resnet18"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.extract import extract_slide_features, run_extract
    from wsi_pipeline.features.reader import ReadSpec, open_tile_reader

_WHERE = {
    "ExtractConfig": "wsi_pipeline.features.config",
    "run_extract": "wsi_pipeline.features.extract",
    "extract_slide_features": "wsi_pipeline.features.extract",
    "ReadSpec": "wsi_pipeline.features.reader",
    "open_tile_reader": "wsi_pipeline.features.reader",
}

__all__ = [
    "ExtractConfig",
    "ReadSpec",
    "extract_slide_features",
    "open_tile_reader",
    "run_extract",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'wsi_pipeline.features' has no attribute {name!r}")
