"""Fixtures of the review tests: a RUN folder scored with known per-tile values on a generated slide."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

HOT_SCORE = 0.97


@dataclass
class ReviewRun:
    root: Path
    slide_id: str
    model: str
    l0_xy: np.ndarray
    tile_size_l0: int
    hot: int  # index of the tile with the known high response score
    cold: int  # index of the lowest-scoring tile
    response: np.ndarray

    def centre(self, i: int) -> tuple[float, float]:
        return (float(self.l0_xy[i, 0] + self.tile_size_l0 / 2), float(self.l0_xy[i, 1] + self.tile_size_l0 / 2))


def _build(root: Path, slide: Path) -> ReviewRun:
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.review.synthetic import build_scored_run
    from wsi_pipeline.runfolder.layout import RunLayout

    run = build_scored_run(root, slide, model="demo-mil")
    xy = run.l0_xy
    # the hot tile: an interior tile (all four neighbours are tiles too), nearest the slide centre
    have = {tuple(p) for p in xy.tolist()}
    s = run.tile_size_l0
    interior = [i for i, (x, y) in enumerate(xy.tolist())
                if all((x + dx, y + dy) in have for dx, dy in ((s, 0), (-s, 0), (0, s), (0, -s)))]
    assert interior, "the generated slide should have interior tiles"
    c = np.array([1024, 768])
    hot = min(interior, key=lambda i: float(np.sum((xy[i] + s / 2 - c) ** 2)))
    path = RunLayout(root).scores_h5("demo-mil", run.slide_id)
    ss = F.read_scores_h5(path)
    ss.scores["response"][hot] = HOT_SCORE
    F.write_scores_h5(path, ss)
    response = ss.scores["response"].astype(np.float64)
    return ReviewRun(root, run.slide_id, "demo-mil", xy, s, hot, int(np.argmin(response)), response)


@pytest.fixture(scope="session")
def review_run(small_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> ReviewRun:
    """RUN folder: real tiles of ``small_svs`` (224 px at 0.5 µm/px), scores with one hot tile."""
    return _build(tmp_path_factory.mktemp("review") / "run", small_svs)
