"""QuPath GeoJSON primitives (wsi_pipeline.formats.geojson): feature builders, tile grids, reader, writer,
validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from geojson_checks import assert_qupath_structure, shoelace

from wsi_pipeline.errors import FormatError
from wsi_pipeline.formats import geojson


def test_polygon_feature_closes_and_orients_rings() -> None:
    # exterior given clockwise (negative shoelace area), hole given counter-clockwise, neither closed
    f = geojson.polygon_feature(
        [[(0, 0), (0, 10), (10, 10), (10, 0)], [(2, 2), (4, 2), (4, 4), (2, 4)]],
        object_type="annotation", classification="Tissue", measurements={"area_um2": 12.5, "bad": float("nan")},
    )
    ext, hole = f["geometry"]["coordinates"]
    assert ext[0] == ext[-1] and hole[0] == hole[-1]
    assert shoelace(ext) > 0 and shoelace(hole) < 0
    assert f["properties"]["classification"]["name"] == "Tissue"
    assert f["properties"]["measurements"] == {"area_um2": 12.5}  # NaN dropped
    assert_qupath_structure(geojson.feature_collection([f]))


def test_polygon_feature_rejects_degenerate_rings() -> None:
    with pytest.raises(ValueError, match="3 distinct"):
        geojson.polygon_feature([[(0, 0), (1, 1)]])
    with pytest.raises(ValueError, match="zero area"):
        geojson.polygon_feature([[(0, 0), (1, 1), (2, 2)]])
    with pytest.raises(ValueError, match="object_type"):
        geojson.polygon_feature([[(0, 0), (1, 0), (1, 1)]], object_type="blob")


def test_tile_feature_collection_geometry_measurements_classes(tmp_path) -> None:
    xy = np.array([[0, 0], [448, 224], [896, 0]])
    fc = geojson.tile_polygons_feature_collection(
        xy, 224, {"response score": np.array([0.1, np.nan, 0.9])},
        classes=["inflamed", None, "desert"], class_colors={"inflamed": (220, 50, 47)},
    )
    assert_qupath_structure(fc)
    f0, f1, f2 = fc["features"]
    assert f1["geometry"]["coordinates"][0] == [[448, 224], [672, 224], [672, 448], [448, 448], [448, 224]]
    assert f0["properties"]["classification"] == {"name": "inflamed", "color": [220, 50, 47]}
    assert "classification" not in f1["properties"] and "measurements" not in f1["properties"]
    assert f2["properties"]["measurements"] == {"response score": 0.9}
    path = geojson.write_geojson(tmp_path / "t.geojson", fc)
    assert geojson.read_geojson(path) == json.loads(json.dumps(fc))
    assert [p.name for p in tmp_path.iterdir()] == ["t.geojson"]  # no temporary file left behind


def test_validator_reports_problems() -> None:
    bad = {"type": "FeatureCollection", "features": [{
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [0, 5], [5, 5], [5, 0]]]},
        "properties": {"objectType": "detection", "measurements": {"a": "x"}, "classification": {"name": 3}},
    }]}
    problems = geojson.validate_feature_collection(bad)
    assert any("not closed" in p for p in problems)
    assert any("counter-clockwise" in p for p in problems)
    assert any("measurement 'a'" in p for p in problems)
    assert any("classification" in p for p in problems)
    with pytest.raises(FormatError, match="invalid QuPath GeoJSON"):
        geojson.check_feature_collection(bad, "x.geojson")
    with pytest.raises(ValueError):
        geojson.write_geojson("/tmp/never.geojson", {"type": "FeatureCollection", "features": [
            {"properties": {"m": float("nan")}}]})
