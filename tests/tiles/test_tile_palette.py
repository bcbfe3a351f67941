"""The one class palette: the QuPath exports and the TME class map colour every class alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.tiles.palette import NAMED_COLOURS, class_colour, class_colours, hash_colour

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CLASSES = json.loads((REPO / "models" / "wsip-tissue-kather16" / "classifier.json").read_text())["class_names"]
CLASSES = ["tumour", "Tumour", *SHIPPED_CLASSES, "inflamed", "Necrosis", "my own class"]


def test_named_classes_have_fixed_colours_and_others_a_stable_hash() -> None:
    assert class_colour("tumour") == class_colour("01_TUMOR") == class_colour("Tumor") == (220, 20, 40)
    assert class_colour("04_LYMPHO") == NAMED_COLOURS["lympho"]
    assert class_colour("Tissue") == hash_colour("Tissue") == class_colour("Tissue")
    assert hash_colour("Tissue") != hash_colour("Tissue2")
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in class_colours(CLASSES).values())
    shipped = [class_colour(c) for c in SHIPPED_CLASSES]
    assert len(set(shipped)) == len(shipped)  # every shipped class can be told apart on the map


def _tme_map_colours(tmp_path: Path, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Colours as painted by the TME class map: one opaque tile per class on a black thumbnail."""
    from PIL import Image

    from wsi_pipeline.tme.render import class_map_png

    n = len(names)
    xy = np.array([[16 * i, 0] for i in range(n)])
    path = class_map_png(tmp_path / "map.png", np.zeros((16, 16 * n, 3), np.uint8), 1.0, xy, 16, np.arange(n),
                         names, alpha=1.0)
    img = np.asarray(Image.open(path).convert("RGB"))
    return {c: tuple(int(v) for v in img[8, 16 * i + 8]) for i, c in enumerate(names)}


def _tme_geojson_colours(tmp_path: Path, names: list[str]) -> dict[str, tuple[int, ...]]:
    from wsi_pipeline.formats.geojson import read_geojson
    from wsi_pipeline.tme.render import classified_tiles_geojson

    n = len(names)
    probs = np.eye(n, dtype=np.float32)
    path = classified_tiles_geojson(tmp_path / "tme.geojson", np.array([[16 * i, 0] for i in range(n)]), 16, probs,
                                    names)
    return _feature_colours(read_geojson(path))


def _review_export_colours(names: list[str]) -> dict[str, tuple[int, ...]]:
    from wsi_pipeline.review.qupath import tile_scores_feature_collection
    from wsi_pipeline.review.scores import Channel, SlideScores

    n = len(names)
    ch = Channel(key="tissue.x", target="tissue", label="tissue: x", kind="class", class_name=names[0])
    sc = SlideScores("s", "m", np.array([[16 * i, 0] for i in range(n)], np.int64), 16, 16, 0.5, 0.5, (16 * n, 16),
                     "", [ch], {ch.key: np.zeros(n)}, class_names={"tissue": list(names)},
                     top_class={"tissue": np.arange(n)})
    return _feature_colours(tile_scores_feature_collection(sc, "tissue"))


def _feature_colours(fc: dict) -> dict[str, tuple[int, ...]]:
    out = {}
    for f in fc["features"]:
        cl = f["properties"]["classification"]
        out[cl["name"]] = tuple(cl["color"])
    return out


@pytest.mark.parametrize("names", [SHIPPED_CLASSES, CLASSES[:2] + CLASSES[-3:]])
def test_qupath_exports_and_tme_map_agree_on_every_class(tmp_path: Path, names: list[str]) -> None:
    expected = {c: class_colour(c) for c in names}
    assert _tme_map_colours(tmp_path, names) == expected
    assert _tme_geojson_colours(tmp_path, names) == expected
    assert _review_export_colours(names) == expected
    if "01_TUMOR" in names:
        assert expected["01_TUMOR"] == class_colour("tumour") == (220, 20, 40)
