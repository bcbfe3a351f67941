"""QuPath export of per-tile scores (wsi_pipeline.review.qupath) on a scored RUN folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from geojson_checks import assert_qupath_structure


def test_export_of_a_scored_run(review_run) -> None:
    from wsi_pipeline.review.qupath import export_qupath
    from wsi_pipeline.runfolder.layout import RunLayout

    summary = export_qupath(review_run.root, model=review_run.model)
    assert not summary.failed
    layout = RunLayout(review_run.root)
    path = layout.qupath_geojson(review_run.slide_id)
    assert summary.written == [path]
    fc = json.loads(path.read_text())
    assert_qupath_structure(fc)
    assert len(fc["features"]) == len(review_run.l0_xy)
    hot = fc["features"][review_run.hot]
    x, y = (int(v) for v in review_run.l0_xy[review_run.hot])
    s = review_run.tile_size_l0
    assert hot["geometry"]["coordinates"][0][0] == [x, y]
    assert hot["geometry"]["coordinates"][0][2] == [x + s, y + s]
    meas = hot["properties"]["measurements"]
    assert meas["response score"] == pytest.approx(0.97, abs=1e-6)
    assert {"immune_phenotype: inflamed", "immune_phenotype: excluded", "immune_phenotype: desert",
            "til_fraction score"} <= set(meas)
    # classification = the top immune-phenotype class of the tile
    probs = [meas[f"immune_phenotype: {c}"] for c in ("inflamed", "excluded", "desert")]
    assert hot["properties"]["classification"]["name"] == ("inflamed", "excluded", "desert")[int(np.argmax(probs))]
