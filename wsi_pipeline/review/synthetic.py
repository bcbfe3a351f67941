"""A scored RUN folder from a slide without a trained model: real tiling, then per-tile scores with known
values (a smooth spatial pattern plus chosen "hot" tiles). For demos, tests of the review stage and the
viewer screenshot; the scores mean nothing clinically."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_pipeline.formats import api as F
from wsi_pipeline.runfolder.layout import RunLayout

PHENOTYPES = ("inflamed", "excluded", "desert")
TARGET_KINDS = {"response": "binary", "immune_phenotype": "multiclass", "til_fraction": "regression"}


@dataclass
class ScoredRun:
    root: Path
    slide_id: str
    model: str
    l0_xy: np.ndarray
    tile_size_l0: int
    scores: dict[str, np.ndarray]


def pattern_scores(l0_xy: np.ndarray, tile_size_l0: int, level0_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Deterministic per-tile scores: response rises left → right (0.05 … 0.60), immune phenotype
    probabilities vary with the position, TIL fraction falls top → bottom."""
    w0, h0 = level0_size
    cx = (l0_xy[:, 0] + tile_size_l0 / 2) / max(w0, 1)
    cy = (l0_xy[:, 1] + tile_size_l0 / 2) / max(h0, 1)
    response = 0.05 + 0.55 * cx
    logits = np.stack([3 * cx, 3 * cy, 3 * (1 - cx) * (1 - cy)], axis=1)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    til = 0.6 * (1 - cy)
    return {"response": response, "immune_phenotype": probs, "til_fraction": til}


def build_scored_run(
    root: str | Path,
    slide_path: str | Path,
    model: str = "demo-mil",
    tiling: object | None = None,
    hot: Mapping[int, float] | None = None,
    response_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ScoredRun:
    """Tile ``slide_path`` into ``root`` with the real tiler, then write ``scores/<model>/<slide>.h5``,
    a predictions.csv row and the slides.csv "tile" row. ``response_fn(tile centres N×2, level 0)``
    replaces the default response pattern; ``hot`` then sets the response of chosen tiles."""
    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.runfolder.status import SlideStatus, update_status
    from wsi_pipeline.tiling.stage import tile_slide

    layout = RunLayout(root)
    cfg = tiling if tiling is not None else TilingConfig()
    res = tile_slide(slide_path, layout, cfg)
    update_status(layout.slides_csv, SlideStatus(res.slide_id, "tile", path=str(Path(slide_path).resolve()),
                                                 n_tiles=res.n_tiles, slide_mpp=res.slide_mpp))
    ts = F.read_tiles_h5(layout.tiles_h5(res.slide_id))
    size = (int(ts.attrs[F.A_LEVEL0_W]), int(ts.attrs[F.A_LEVEL0_H]))
    scores = pattern_scores(ts.l0_xy, ts.tile_size_l0, size)
    if response_fn is not None:
        scores["response"] = np.asarray(response_fn(ts.l0_xy + ts.tile_size_l0 / 2), dtype=np.float64)
    for i, v in (hot or {}).items():
        scores["response"][int(i)] = float(v)
    attention = {"response": scores["response"] / max(float(scores["response"].sum()), 1e-9)}
    F.write_scores_h5(layout.scores_h5(model, res.slide_id), F.ScoreSet(
        l0_xy=ts.l0_xy, scores=scores, attention=attention,
        attrs={F.A_MODEL: model, F.A_TARGETS: sorted(scores), F.A_SLIDE_ID: res.slide_id,
               "target_kinds": [TARGET_KINDS[t] for t in sorted(scores)],
               f"{F.A_CLASS_NAMES}_immune_phenotype": list(PHENOTYPES)},
    ))
    _append_prediction(layout, res.slide_id, scores)
    return ScoredRun(Path(root), res.slide_id, model, ts.l0_xy, ts.tile_size_l0, scores)


def _append_prediction(layout: RunLayout, slide_id: str, scores: dict[str, np.ndarray]) -> None:
    resp = float(np.mean(scores["response"]))
    probs = scores["immune_phenotype"].mean(axis=0)
    row = {"slide_id": slide_id, "patient_id": slide_id, "response_prob": round(resp, 4),
           "response_pred": int(resp >= 0.5)}
    for name, p in zip(PHENOTYPES, probs, strict=True):
        row[f"immune_phenotype_prob_{name}"] = round(float(p), 4)
    row["immune_phenotype_pred"] = PHENOTYPES[int(np.argmax(probs))]
    row["til_fraction_pred"] = round(float(np.mean(scores["til_fraction"])), 4)
    import pandas as pd

    rows: dict[str, dict[str, object]] = {}
    if layout.predictions_csv.exists():
        old = F.read_predictions_csv(layout.predictions_csv, text=True).to_dict("records")
        rows = {str(r["slide_id"]): r for r in old}
    rows[slide_id] = row
    table = pd.DataFrame([rows[sid] for sid in sorted(rows)], columns=list(row))
    F.write_predictions_csv(layout.predictions_csv, table)
