"""One slide's extraction job: what the planner hands the loop (:mod:`.engine`) and the writer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wsi_pipeline.features.reader import ReadSpec
from wsi_pipeline.formats import api as F


@dataclass
class SlideJob:
    slide_id: str
    slide_path: str
    tiles: F.TileSet | None  # None while planned from its size only (plan_jobs reads this shard's tiles)
    out_path: Path
    params_hash: str = ""
    seconds: float = 0.0  # wall time from its first batch to its last
    size: int = 0  # tiles, before the tiles file is read

    @property
    def n_tiles(self) -> int:
        return len(self.tiles) if self.tiles is not None else self.size

    @property
    def spec(self) -> ReadSpec:
        return ReadSpec(self.tiles.target_mpp, self.tiles.tile_size, self.tiles.slide_mpp)
