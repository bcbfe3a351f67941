"""The source split of labelled tile folders: by source image, deterministic, never straddling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.tiles.folders import LabelledTiles, load_labelled_folder
from wsi_pipeline.tiles.split import seeded_rng, source_split


def test_kather_source_split_is_by_source_and_deterministic(kather_dir: Path) -> None:
    tiles = load_labelled_folder(kather_dir)
    is_test, info = source_split(tiles, 0.3, seed=0)
    again, _ = source_split(tiles, 0.3, seed=0)
    other, _ = source_split(tiles, 0.3, seed=1)
    assert np.array_equal(is_test, again) and not np.array_equal(is_test, other)
    assert info.mode["07_ADIPOSE"] == "tile" and info.mode["08_EMPTY"] == "tile"
    assert all(info.mode[c] == "source" for c in tiles.class_names[:6])
    by_source = [c for c in tiles.class_names if info.mode[c] == "source"]
    src_cls = {tiles.class_names.index(c) for c in by_source}
    sides: dict[str, set[bool]] = {}
    for s, y, t in zip(tiles.sources, tiles.labels, is_test, strict=True):
        if y in src_cls:
            sides.setdefault(s, set()).add(bool(t))
    assert all(len(v) == 1 for v in sides.values()), "a source straddles the split"
    assert set(info.test_sources) == {s for s, v in sides.items() if v == {True}}
    for ci in range(8):  # every class keeps roughly the requested fraction in test
        frac = is_test[tiles.labels == ci].mean()
        assert 0.2 < frac < 0.5
    # the split the shipped demo encoder and tissue classifier were trained on (classifier.json records it)
    assert int((~is_test).sum()) == 2379 and int(is_test.sum()) == 1248


def test_generic_folder_without_source_ids_is_split_by_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / c / f"t{i}.png")
    tiles = load_labelled_folder(tmp_path)
    assert tiles.sources == [None] * 20
    is_test, info = source_split(tiles, 0.3, seed=0)
    assert info.mode == {"a": "tile", "b": "tile"} and is_test.sum() == 6


def _tiles(sources_per_class: list[list[str | None]]) -> LabelledTiles:
    labels = [ci for ci, srcs in enumerate(sources_per_class) for _ in srcs]
    sources = [s for srcs in sources_per_class for s in srcs]
    return LabelledTiles(Path("."), [Path(f"t{i}.png") for i in range(len(sources))], np.asarray(labels, np.int64),
                         [f"c{i}" for i in range(len(sources_per_class))], sources)


def test_a_source_shared_by_two_classes_keeps_one_side() -> None:
    a = [f"s{i}" for i in range(10) for _ in range(3)]
    b = [f"s{i}" for i in range(5, 15) for _ in range(2)]
    tiles = _tiles([a, b])
    is_test, info = source_split(tiles, 0.3, seed=3, min_sources=8)
    assert info.mode == {"c0": "source", "c1": "source"}
    for s in set(a) | set(b):
        sides = {bool(t) for t, src in zip(is_test, tiles.sources, strict=True) if src == s}
        assert len(sides) == 1, s


def test_a_class_with_an_unknown_source_or_few_sources_is_split_by_tile() -> None:
    tiles = _tiles([[f"s{i}" for i in range(10)] + [None], [f"s{i}" for i in range(3)] * 4])
    is_test, info = source_split(tiles, 0.5, seed=0, min_sources=8)
    assert info.mode == {"c0": "tile", "c1": "tile"} and info.test_sources == []
    assert is_test[tiles.labels == 0].sum() == round(0.5 * 11) and is_test[tiles.labels == 1].sum() == 6


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_test_fraction_must_lie_in_the_open_unit_interval(fraction: float) -> None:
    with pytest.raises(ConfigError, match="test fraction"):
        source_split(_tiles([["a", "b"], ["c", "d"]]), fraction)


def test_seeded_rng_depends_on_seed_and_keys() -> None:
    draw = lambda *a: seeded_rng(*a).integers(0, 2**31, 4).tolist()  # noqa: E731
    assert draw(0, "x") == draw(0, "x")
    assert draw(0, "x") != draw(1, "x") and draw(0, "x") != draw(0, "y") and draw(0, "x", "y") != draw(0, "xy")
