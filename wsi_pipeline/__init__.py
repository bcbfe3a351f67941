"""wsi-pipeline: MPP-true whole-slide image pipeline for response and TME prediction."""

from wsi_pipeline._version import __version__

__all__ = ["__version__"]
