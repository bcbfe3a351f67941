"""wsi-pipeline: MPP-true whole-slide image pipeline for response and TME prediction."""

__version__ = "0.1.0"
