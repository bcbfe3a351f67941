"""QuPath export of per-tile scores: one detection polygon per tile, measurements = every channel's score,
classification = the top class of a multiclass target. Builds on the GeoJSON primitives of
:mod:`wsi_pipeline.formats.geojson`. ``wsi export-qupath`` runs it on the stage executor (:class:`QupathStage`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.formats import geojson
from wsi_pipeline.formats.cards import read_stage_record, write_stage_record
from wsi_pipeline.formats.hashing import params_hash
from wsi_pipeline.review.scores import (
    SlideScores,
    input_stamps,
    load_slide_scores,
    resolve_model_name,
    scored_slide_ids,
    slide_paths_from_status,
)
from wsi_pipeline.runfolder.executor import Progress, SlideItem, SlideOutcome, StageSummary, run_per_slide
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.tiles.palette import class_colours

STAGE = "export-qupath"


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


# ---------------------------------------------------------------- a RUN folder
class QupathStage:
    """The QuPath export as a per-slide stage (:mod:`wsi_pipeline.runfolder.executor`), one component per
    model. Resume key: the model, the targets, ``attention`` and the tiles and scores files
    (:func:`~wsi_pipeline.review.scores.input_stamps`). Done: the GeoJSON is the one written under that key
    (``RUN/heatmaps/<slide_id>/qupath.json`` holds the key and the GeoJSON's size and modification time, so
    a GeoJSON rewritten since, e.g. by ``wsi heatmap``, is written again)."""

    name = STAGE

    def __init__(self, layout: RunLayout, model: str, targets: list[str] | None, attention: bool) -> None:
        self.layout, self.component, self.targets, self.attention = layout, model, targets, attention

    def key(self, item: SlideItem) -> str:
        paths = (self.layout.tiles_h5(item.slide_id), self.layout.scores_h5(self.component, item.slide_id))
        if not all(p.exists() for p in paths):
            return ""  # not done; process() raises the error that names the missing file
        return params_hash({"model": self.component, "targets": sorted(self.targets or []),
                            "attention": self.attention, "inputs": input_stamps(paths)})

    def done(self, item: SlideItem, key: str) -> SlideOutcome | None:
        record = read_stage_record(self.layout.qupath_record_json(item.slide_id))
        out = self.layout.qupath_geojson(item.slide_id)
        if not key or record.get("key") != key or not out.exists() or record.get("geojson") != _stamp(out):
            return None
        return SlideOutcome(item.slide_id, n_tiles=record.get("n_tiles"), value=out)

    def process(self, item: SlideItem, key: str) -> SlideOutcome:
        sid = item.slide_id
        sc = load_slide_scores(self.layout, sid, self.component, self.targets, attention=self.attention)
        out = export_slide_geojson(sc, self.layout.qupath_geojson(sid))
        write_stage_record(self.layout.qupath_record_json(sid), {
            "stage": STAGE, "component": self.component, "slide_id": sid, "key": key, "n_tiles": len(sc),
            "geojson": _stamp(out)})
        return SlideOutcome(sid, n_tiles=len(sc), value=out)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def run_export_qupath(run_root: str | Path, model: str | None = None, targets: list[str] | None = None,
                      slide_ids: list[str] | None = None, attention: bool = False, force: bool = False,
                      progress: Progress | None = None) -> StageSummary:
    """Write ``RUN/heatmaps/<slide_id>/<slide_id>_tiles.geojson`` for every scored slide (or ``slide_ids``);
    slides whose GeoJSON is up to date are skipped. Failures are recorded in RUN/slides.csv (stage
    "export-qupath", component = the model) and the others go on. Each outcome's ``value`` is the GeoJSON."""
    layout = RunLayout(run_root)
    name = resolve_model_name(layout, model)
    paths = slide_paths_from_status(layout)
    items = [SlideItem(sid, paths.get(sid, "")) for sid in slide_ids or scored_slide_ids(layout, name)]
    return run_per_slide(QupathStage(layout, name, targets, attention), items, layout, workers=0, force=force,
                         progress=progress)


def top_class_counts(sc: SlideScores, target: str) -> dict[str, int]:
    names = sc.class_names[target]
    top = sc.top_class[target]
    return {n: int(np.sum(top == i)) for i, n in enumerate(names)}
