"""QuPath GeoJSON: the shared helpers (wsi_pipeline.qupath) and the per-tile score export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from wsi_pipeline import qupath
from wsi_pipeline.errors import FormatError


def _shoelace(ring: list[list[float]]) -> float:
    a = np.asarray(ring[:-1], dtype=np.float64)
    return 0.5 * float(np.dot(a[:, 0], np.roll(a[:, 1], -1)) - np.dot(np.roll(a[:, 0], -1), a[:, 1]))


def assert_qupath_structure(fc: dict) -> None:
    """Independent checks of what QuPath needs, besides qupath.validate_feature_collection."""
    assert fc["type"] == "FeatureCollection"
    for f in fc["features"]:
        assert f["type"] == "Feature"
        assert f["geometry"]["type"] == "Polygon"
        rings = f["geometry"]["coordinates"]
        for j, ring in enumerate(rings):
            assert len(ring) >= 4 and ring[0] == ring[-1], "rings must be closed"
            area = _shoelace(ring)
            assert (area > 0) if j == 0 else (area < 0), "exterior counter-clockwise, holes clockwise"
        props = f["properties"]
        assert props["objectType"] in ("detection", "annotation", "tile", "cell")
        for k, v in props.get("measurements", {}).items():
            assert isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v)
        if "classification" in props:
            c = props["classification"]
            assert isinstance(c["name"], str)
            assert len(c["color"]) == 3 and all(isinstance(x, int) and 0 <= x <= 255 for x in c["color"])
    assert qupath.validate_feature_collection(fc) == []


def test_polygon_feature_closes_and_orients_rings() -> None:
    # exterior given clockwise (negative shoelace area), hole given counter-clockwise, neither closed
    f = qupath.polygon_feature(
        [[(0, 0), (0, 10), (10, 10), (10, 0)], [(2, 2), (4, 2), (4, 4), (2, 4)]],
        object_type="annotation", classification="Tissue", measurements={"area_um2": 12.5, "bad": float("nan")},
    )
    ext, hole = f["geometry"]["coordinates"]
    assert ext[0] == ext[-1] and hole[0] == hole[-1]
    assert _shoelace(ext) > 0 and _shoelace(hole) < 0
    assert f["properties"]["classification"]["name"] == "Tissue"
    assert f["properties"]["measurements"] == {"area_um2": 12.5}  # NaN dropped
    assert_qupath_structure(qupath.feature_collection([f]))


def test_polygon_feature_rejects_degenerate_rings() -> None:
    with pytest.raises(ValueError, match="3 distinct"):
        qupath.polygon_feature([[(0, 0), (1, 1)]])
    with pytest.raises(ValueError, match="zero area"):
        qupath.polygon_feature([[(0, 0), (1, 1), (2, 2)]])
    with pytest.raises(ValueError, match="object_type"):
        qupath.polygon_feature([[(0, 0), (1, 0), (1, 1)]], object_type="blob")


def test_tile_feature_collection_geometry_measurements_classes(tmp_path) -> None:
    xy = np.array([[0, 0], [448, 224], [896, 0]])
    fc = qupath.tile_polygons_feature_collection(
        xy, 224, {"response score": np.array([0.1, np.nan, 0.9])},
        classes=["inflamed", None, "desert"], class_colors={"inflamed": (220, 50, 47)},
    )
    assert_qupath_structure(fc)
    f0, f1, f2 = fc["features"]
    assert f1["geometry"]["coordinates"][0] == [[448, 224], [672, 224], [672, 448], [448, 448], [448, 224]]
    assert f0["properties"]["classification"] == {"name": "inflamed", "color": [220, 50, 47]}
    assert "classification" not in f1["properties"] and "measurements" not in f1["properties"]
    assert f2["properties"]["measurements"] == {"response score": 0.9}
    path = qupath.write_geojson(tmp_path / "t.geojson", fc)
    assert qupath.read_geojson(path) == json.loads(json.dumps(fc))
    assert [p.name for p in tmp_path.iterdir()] == ["t.geojson"]  # no temporary file left behind


def test_validator_reports_problems() -> None:
    bad = {"type": "FeatureCollection", "features": [{
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [0, 5], [5, 5], [5, 0]]]},
        "properties": {"objectType": "detection", "measurements": {"a": "x"}, "classification": {"name": 3}},
    }]}
    problems = qupath.validate_feature_collection(bad)
    assert any("not closed" in p for p in problems)
    assert any("counter-clockwise" in p for p in problems)
    assert any("measurement 'a'" in p for p in problems)
    assert any("classification" in p for p in problems)
    with pytest.raises(FormatError, match="invalid QuPath GeoJSON"):
        qupath.check_feature_collection(bad, "x.geojson")
    with pytest.raises(ValueError):
        qupath.write_geojson("/tmp/never.geojson", {"type": "FeatureCollection", "features": [
            {"properties": {"m": float("nan")}}]})


def test_export_of_a_scored_run(review_run) -> None:
    from wsi_pipeline.review.export import export_qupath
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
