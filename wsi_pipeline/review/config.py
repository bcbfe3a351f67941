"""Configuration dataclasses of the review stage (heatmaps, QuPath export, viewer)."""

from __future__ import annotations

from dataclasses import dataclass, field

from wsi_pipeline.errors import ConfigError

SCALES = ("percentile", "absolute")


@dataclass
class HeatmapConfig:
    """``wsi heatmap``: which scores, how to normalise and smooth them, what to write."""

    model: str = ""  # MIL model dir or name; its folder name is the RUN/scores/<name> subfolder
    targets: list[str] = field(default_factory=list)  # empty: every target in the scores files
    scale: str = "percentile"  # percentile within the slide, or absolute (raw values)
    vmin: float | None = None  # absolute scale range (default: [0, 1] for probabilities, else data range)
    vmax: float | None = None
    smooth: bool = False  # average the scores of all overlapping tiles per cell
    top_k: int = 8  # tiles per gallery (top-k and bottom-k); 0 = no galleries
    attention: bool = False  # also map the MIL attention of each target
    cmap: str = "RdYlBu_r"
    alpha: float = 0.5  # overlay opacity on the thumbnail PNG
    thumbnail_px: int = 1024  # longer side of the thumbnail the overlay is drawn on
    max_cells: int = 4096  # cap on the raster's longer side (cells), keeps memory bounded
    zarr: bool = True
    galleries: bool = True
    geojson: bool = True
    force: bool = False  # redo slides whose outputs are up to date
    workers: int | None = None  # slides drawn in parallel processes (None: the cores; 0: in this process)
    slide_dirs: list[str] = field(default_factory=list)  # where to look for slides moved since tiling (by name)

    def validate(self) -> HeatmapConfig:
        if self.scale not in SCALES:
            raise ConfigError(f"--scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be ≥ 0, got {self.top_k}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.vmin is not None and self.vmax is not None and self.vmax <= self.vmin:
            raise ConfigError(f"--vmax ({self.vmax}) must be greater than --vmin ({self.vmin})")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be ≥ 0 (0: in this process), got {self.workers}")
        if self.thumbnail_px < 64:
            raise ConfigError(f"thumbnail size must be ≥ 64 px, got {self.thumbnail_px}")
        return self

    def params(self) -> dict[str, object]:
        """The parameters that change the outputs (resume key)."""
        return {
            "targets": sorted(self.targets), "scale": self.scale, "vmin": self.vmin, "vmax": self.vmax,
            "smooth": self.smooth, "top_k": self.top_k, "attention": self.attention, "cmap": self.cmap,
            "alpha": self.alpha, "thumbnail_px": self.thumbnail_px, "max_cells": self.max_cells,
            "zarr": self.zarr, "galleries": self.galleries, "geojson": self.geojson,
        }


@dataclass
class ViewerConfig:
    """``wsi view``: where to listen and which model's scores to show."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = ""  # scores subfolder name (or model dir); empty: the only one in RUN/scores
    allow_hosts: list[str] = field(default_factory=list)  # Host names answered besides loopback and --host
    tile_cache: int = 2048  # deep-zoom JPEG tiles kept in memory
    slide_cache: int = 8  # open slide handles kept
    cmap: str = "RdYlBu_r"
    slide_dirs: list[str] = field(default_factory=list)  # where to look for slides moved since tiling (by name)

    def validate(self) -> ViewerConfig:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1..65535, got {self.port}")
        if self.tile_cache < 1 or self.slide_cache < 1:
            raise ConfigError("cache sizes must be ≥ 1")
        return self
