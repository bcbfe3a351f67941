"""QuPath export of per-tile scores: one detection polygon per tile, measurements = every channel's score,
classification = the top class of a multiclass target. Builds on the GeoJSON primitives of
:mod:`wsi_pipeline.formats.geojson`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import WSIPipelineError
from wsi_pipeline.formats import geojson
from wsi_pipeline.review.scores import SlideScores, load_slide_scores, resolve_model_name, scored_slide_ids
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.tiles.palette import class_colours

log = logging.getLogger(__name__)


def measurement_name(label: str) -> str:
    """Measurement names as QuPath shows them: the channel label plus 'score' for plain targets."""
    return label if (":" in label or label.endswith("attention")) else f"{label} score"


def tile_scores_feature_collection(sc: SlideScores, classify_target: str | None = None) -> dict[str, Any]:
    """The QuPath FeatureCollection of one slide's tiles and channel scores."""
    measurements = {measurement_name(c.label): sc.values[c.key] for c in sc.channels}
    classes = None
    colors = None
    target = classify_target or next(iter(sc.top_class), None)
    if target is not None and target in sc.top_class:
        names = sc.class_names[target]
        top = sc.top_class[target]
        classes = [names[i] if i >= 0 else None for i in top.tolist()]
        colors = class_colours(names)
    return geojson.tile_polygons_feature_collection(
        sc.l0_xy, sc.tile_size_l0, measurements, classes=classes, class_colors=colors, object_type="detection"
    )


def export_slide_geojson(sc: SlideScores, out: Path, classify_target: str | None = None) -> Path:
    fc = tile_scores_feature_collection(sc, classify_target)
    geojson.check_feature_collection(fc, out)
    return geojson.write_geojson(out, fc)


@dataclass
class ExportSummary:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def export_qupath(run_root: str | Path, model: str | None = None, targets: list[str] | None = None,
                  slide_ids: list[str] | None = None, attention: bool = False) -> ExportSummary:
    """Write ``RUN/heatmaps/<slide_id>/<slide_id>_tiles.geojson`` for every scored slide."""
    layout = RunLayout(run_root)
    name = resolve_model_name(layout, model)
    summary = ExportSummary()
    for sid in slide_ids or scored_slide_ids(layout, name):
        try:
            sc = load_slide_scores(layout, sid, name, targets, attention=attention)
            summary.written.append(export_slide_geojson(sc, layout.qupath_geojson(sid)))
        except (WSIPipelineError, OSError, ValueError) as e:
            log.error("%s: QuPath export failed: %s", sid, e)
            summary.failed.append((sid, str(e)))
    return summary


def top_class_counts(sc: SlideScores, target: str) -> dict[str, int]:
    names = sc.class_names[target]
    top = sc.top_class[target]
    return {n: int(np.sum(top == i)) for i, n in enumerate(names)}
