"""Independent checks of what QuPath needs from a GeoJSON FeatureCollection (shared by the tests of the
GeoJSON format and of the exports that write it)."""

from __future__ import annotations

import math

import numpy as np

from wsi_pipeline.formats import geojson


def shoelace(ring: list[list[float]]) -> float:
    a = np.asarray(ring[:-1], dtype=np.float64)
    return 0.5 * float(np.dot(a[:, 0], np.roll(a[:, 1], -1)) - np.dot(np.roll(a[:, 0], -1), a[:, 1]))


def assert_qupath_structure(fc: dict) -> None:
    """Independent checks of what QuPath needs, besides geojson.validate_feature_collection."""
    assert fc["type"] == "FeatureCollection"
    for f in fc["features"]:
        assert f["type"] == "Feature"
        assert f["geometry"]["type"] == "Polygon"
        rings = f["geometry"]["coordinates"]
        for j, ring in enumerate(rings):
            assert len(ring) >= 4 and ring[0] == ring[-1], "rings must be closed"
            area = shoelace(ring)
            assert (area > 0) if j == 0 else (area < 0), "exterior counter-clockwise, holes clockwise"
        props = f["properties"]
        assert props["objectType"] in ("detection", "annotation", "tile", "cell")
        for k, v in props.get("measurements", {}).items():
            assert isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v)
        if "classification" in props:
            c = props["classification"]
            assert isinstance(c["name"], str)
            assert len(c["color"]) == 3 and all(isinstance(x, int) and 0 <= x <= 255 for x in c["color"])
    assert geojson.validate_feature_collection(fc) == []
