"""QuPath-compatible GeoJSON: feature builders, a tile-grid FeatureCollection and an atomic writer.

QuPath (≥ 0.4) reads a GeoJSON ``FeatureCollection`` whose features carry in ``properties``:

* ``objectType``: ``"annotation"``, ``"detection"``, ``"tile"`` or ``"cell"`` (absent → annotation);
* ``classification``: ``{"name": str, "color": [r, g, b]}``;
* ``measurements``: ``{name: number}`` (numbers only; JSON has no NaN, so non-finite values are dropped);
* optionally ``name``, ``color`` and ``isLocked``.

Coordinates are level-0 pixels with the origin at the top-left of the full-resolution image, which is
QuPath's own convention. Rings are closed (first vertex repeated) and oriented as RFC 7946 asks when the
numbers are read as plain (x, y): exterior rings have a positive shoelace area ("counter-clockwise"),
holes a negative one. (On screen, with y pointing down, that exterior looks clockwise; QuPath does not
care either way.)

Shared by the review export of per-tile scores (:mod:`wsi_pipeline.review.qupath`), the tissue-contour
export of tiling and the TME class-map export; the tile-grid builder lives here, not in review, because the
TME stage (a lower layer than review) writes tile grids too. No format version: QuPath reads plain GeoJSON.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import FormatError
from wsi_pipeline.formats.atomic import atomic_path

OBJECT_TYPES = ("annotation", "detection", "tile", "cell")

RGB = tuple[int, int, int]


# ---------------------------------------------------------------- small builders
def class_color(name: str) -> RGB:
    """A stable, well-saturated colour for a class name (same name → same colour in every file)."""
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.9)
    return (round(r * 255), round(g * 255), round(b * 255))


def classification(name: str, color: Sequence[int] | None = None) -> dict[str, Any]:
    """QuPath classification object ``{"name", "color": [r, g, b]}``."""
    rgb = class_color(name) if color is None else tuple(int(c) for c in color)
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"class colour must be three integers 0..255, got {color!r}")
    return {"name": str(name), "color": list(rgb)}


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def normalise_ring(ring: Any, exterior: bool = True) -> list[list[float]]:
    """A ring as a closed list of [x, y]: ≥ 3 distinct vertices, first vertex repeated at the end,
    exterior rings with positive shoelace area, holes with negative."""
    arr = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    if len(arr) >= 2 and np.array_equal(arr[0], arr[-1]):
        arr = arr[:-1]
    if len(arr) < 3:
        raise ValueError(f"a polygon ring needs at least 3 distinct vertices, got {len(arr)}")
    if not np.isfinite(arr).all():
        raise ValueError("polygon ring has non-finite coordinates")
    area = _signed_area(arr)
    if area == 0:
        raise ValueError("polygon ring has zero area")
    if (area < 0) == exterior:
        arr = arr[::-1]
    closed = np.vstack([arr, arr[:1]])
    return [[_num(v) for v in p] for p in closed.tolist()]


def _num(v: float) -> float | int:
    """Integers stay integers in the JSON (smaller files); others are rounded to 3 decimals."""
    return int(v) if float(v).is_integer() else round(float(v), 3)


def _clean_measurements(measurements: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (measurements or {}).items():
        f = float(v)
        if math.isfinite(f):
            out[str(k)] = f
    return out


def _feature(
    geometry: dict[str, Any],
    object_type: str,
    classification_: Mapping[str, Any] | str | None,
    measurements: Mapping[str, Any] | None,
    name: str | None,
    feature_id: str | None,
) -> dict[str, Any]:
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    props: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        props["name"] = str(name)
    if classification_ is not None:
        props["classification"] = (
            classification(classification_) if isinstance(classification_, str) else dict(classification_)
        )
    meas = _clean_measurements(measurements)
    if meas:
        props["measurements"] = meas
    feat: dict[str, Any] = {"type": "Feature"}
    if feature_id is not None:
        feat["id"] = str(feature_id)
    feat["geometry"] = geometry
    feat["properties"] = props
    return feat


def polygon_feature(
    rings: Sequence[Any],
    object_type: str = "annotation",
    classification: Mapping[str, Any] | str | None = None,
    measurements: Mapping[str, Any] | None = None,
    name: str | None = None,
    feature_id: str | None = None,
) -> dict[str, Any]:
    """One Polygon feature. ``rings[0]`` is the exterior, the others are holes; each ring is a K×2
    sequence of level-0 (x, y) (closing and orientation are fixed here). ``classification`` is a
    dict from :func:`classification` or a class name (colour derived from the name)."""
    if len(rings) == 0:
        raise ValueError("a polygon needs at least an exterior ring")
    coords = [normalise_ring(r, exterior=(i == 0)) for i, r in enumerate(rings)]
    return _feature({"type": "Polygon", "coordinates": coords}, object_type, classification, measurements,
                    name, feature_id)


def multipolygon_feature(
    polygons: Sequence[Sequence[Any]],
    object_type: str = "annotation",
    classification: Mapping[str, Any] | str | None = None,
    measurements: Mapping[str, Any] | None = None,
    name: str | None = None,
    feature_id: str | None = None,
) -> dict[str, Any]:
    """One MultiPolygon feature: ``polygons`` is a list of ring lists as in :func:`polygon_feature`."""
    if len(polygons) == 0:
        raise ValueError("a multipolygon needs at least one polygon")
    coords = [[normalise_ring(r, exterior=(i == 0)) for i, r in enumerate(rings)] for rings in polygons]
    geometry = {"type": "MultiPolygon", "coordinates": coords}
    return _feature(geometry, object_type, classification, measurements, name, feature_id)


def feature_collection(features: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": [dict(f) for f in features]}


# ---------------------------------------------------------------- tile grids
def tile_polygons_feature_collection(
    l0_xy: np.ndarray,
    tile_size_l0: float,
    measurements: Mapping[str, np.ndarray] | None = None,
    classes: Sequence[str | None] | np.ndarray | None = None,
    class_colors: Mapping[str, Sequence[int]] | None = None,
    object_type: str = "detection",
) -> dict[str, Any]:
    """A FeatureCollection with one square Polygon per tile.

    ``l0_xy``: N×2 level-0 top-left corners; ``tile_size_l0``: tile side in level-0 pixels;
    ``measurements``: name → length-N array (non-finite values are left out of that tile);
    ``classes``: length-N class name per tile (None/"" → unclassified); ``class_colors``: name → RGB
    (missing names get :func:`class_color`). QuPath imports the result as detections by default.
    """
    xy = np.asarray(l0_xy, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    s = float(tile_size_l0)
    if s <= 0:
        raise ValueError(f"tile_size_l0 must be positive, got {tile_size_l0}")
    meas = {str(k): np.asarray(v, dtype=np.float64).reshape(-1) for k, v in (measurements or {}).items()}
    for k, v in meas.items():
        if len(v) != n:
            raise ValueError(f"measurement {k!r} has {len(v)} values for {n} tiles")
    if classes is not None and len(classes) != n:
        raise ValueError(f"classes has {len(classes)} entries for {n} tiles")
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    colors = {str(k): classification(str(k), v) for k, v in (class_colors or {}).items()}
    names = list(meas)
    values = np.stack([meas[k] for k in names], axis=1) if names else np.empty((n, 0))
    finite = np.isfinite(values).tolist()
    values_l = values.tolist()
    # corners as JSON numbers: ints when the grid is integral (the usual case), else rounded floats
    corners = np.concatenate([xy, xy + s], axis=1)
    if np.all(corners == np.round(corners)):
        corner_l = corners.astype(np.int64).tolist()
    else:
        corner_l = np.round(corners, 3).tolist()
    tile_classes = None
    if classes is not None:
        tile_classes = []
        for c in classes:
            if c is None or str(c) == "":
                tile_classes.append(None)
                continue
            c = str(c)
            if c not in colors:
                colors[c] = classification(c)
            tile_classes.append(colors[c])
    features = []
    for i in range(n):
        x, y, x1, y1 = corner_l[i]
        props: dict[str, Any] = {"objectType": object_type}
        if tile_classes is not None and tile_classes[i] is not None:
            cls = tile_classes[i]
            props["classification"] = {"name": cls["name"], "color": list(cls["color"])}  # no shared dicts
        if names:
            row, ok = values_l[i], finite[i]
            tile_meas = {names[j]: row[j] for j in range(len(names)) if ok[j]}
            if tile_meas:
                props["measurements"] = tile_meas
        # closed ring, positive shoelace area: (x,y) → (x+s,y) → (x+s,y+s) → (x,y+s) → (x,y)
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]},
            "properties": props,
        })
    return feature_collection(features)


# ---------------------------------------------------------------- I/O and validation
def write_geojson(path: str | Path, fc: Mapping[str, Any]) -> Path:
    """Write a FeatureCollection atomically (temporary file, then rename). Rejects NaN/Infinity."""
    path = Path(path)
    text = json.dumps(fc, allow_nan=False, separators=(",", ":"))
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def read_geojson(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise FormatError(path, f"not a readable GeoJSON file ({e}); re-create it") from e
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
        raise FormatError(path, "not a GeoJSON FeatureCollection")
    return data


def validate_feature_collection(fc: Mapping[str, Any]) -> list[str]:
    """Problems that would stop QuPath (or a strict GeoJSON reader) from importing ``fc``; [] if none.

    Checks: FeatureCollection/Feature types, Polygon/MultiPolygon rings closed with ≥ 4 positions,
    exterior rings with positive and holes with negative shoelace area, known ``objectType``,
    classification {name: str, color: [3 ints]}, measurements {str: finite number}.
    """
    problems: list[str] = []
    if fc.get("type") != "FeatureCollection" or not isinstance(fc.get("features"), list):
        return ["top level is not a FeatureCollection with a 'features' list"]
    for i, f in enumerate(fc["features"]):
        where = f"feature {i}"
        if not isinstance(f, dict) or f.get("type") != "Feature":
            problems.append(f"{where}: type is not 'Feature'")
            continue
        geom = f.get("geometry") or {}
        gtype = geom.get("type")
        if gtype == "Polygon":
            polys = [geom.get("coordinates")]
        elif gtype == "MultiPolygon":
            polys = geom.get("coordinates") or []
        else:
            polys = []
            if gtype not in ("Point", "MultiPoint", "LineString", "MultiLineString"):
                problems.append(f"{where}: unsupported geometry type {gtype!r}")
        for rings in polys:
            if not rings:
                problems.append(f"{where}: polygon without rings")
                continue
            for j, ring in enumerate(rings):
                arr = np.asarray(ring, dtype=np.float64)
                if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) < 4:
                    problems.append(f"{where}: ring {j} needs ≥ 4 [x, y] positions")
                    continue
                if not np.isfinite(arr).all():
                    problems.append(f"{where}: ring {j} has non-finite coordinates")
                    continue
                if not np.array_equal(arr[0], arr[-1]):
                    problems.append(f"{where}: ring {j} is not closed")
                area = _signed_area(arr[:-1])
                if j == 0 and area <= 0:
                    problems.append(f"{where}: exterior ring is not counter-clockwise (area {area:g})")
                if j > 0 and area >= 0:
                    problems.append(f"{where}: hole {j} is not clockwise (area {area:g})")
        props = f.get("properties")
        if not isinstance(props, dict):
            problems.append(f"{where}: no properties object")
            continue
        if props.get("objectType", "annotation") not in OBJECT_TYPES:
            problems.append(f"{where}: unknown objectType {props.get('objectType')!r}")
        cls = props.get("classification")
        if cls is not None:
            col = cls.get("color") if isinstance(cls, dict) else None
            if not isinstance(cls, dict) or not isinstance(cls.get("name"), str):
                problems.append(f"{where}: classification needs a string 'name'")
            elif col is not None and not _is_rgb(col):
                problems.append(f"{where}: classification color must be [r, g, b] integers 0..255")
        meas = props.get("measurements")
        if meas is not None:
            if not isinstance(meas, dict):
                problems.append(f"{where}: measurements must be an object name → number")
            else:
                for k, v in meas.items():
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                        problems.append(f"{where}: measurement {k!r} is not a finite number ({v!r})")
    return problems


def _is_rgb(col: Any) -> bool:
    return isinstance(col, list) and len(col) == 3 and all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in col
    )


def check_feature_collection(fc: Mapping[str, Any], path: str | Path = "<memory>") -> None:
    """Raise :class:`FormatError` listing the first problems found by :func:`validate_feature_collection`."""
    problems = validate_feature_collection(fc)
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise FormatError(path, "invalid QuPath GeoJSON: " + "; ".join(problems[:5]) + more)
