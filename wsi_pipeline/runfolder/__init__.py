"""The RUN folder: paths, per-slide status table, batch execution with isolation and sharding."""

from wsi_pipeline.runfolder.layout import RunLayout, safe_name

__all__ = ["RunLayout", "safe_name"]
