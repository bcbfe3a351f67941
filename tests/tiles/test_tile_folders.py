"""Labelled tile folders, image listing, RGB reading and source ids of tile file names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.tiles.folders import class_key, list_images, load_labelled_folder, parse_source_id, read_rgb


def _write(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    (im.convert(mode) if mode else im).save(path)


def test_parse_source_id() -> None:
    assert parse_source_id("10009_CRC-Prim-HE-03_009.tif_Row_301_Col_151.jpg") == "CRC-Prim-HE-03_009"
    assert parse_source_id("1000E_CRC-Prim-HE-07.tif_Row_901_Col_4201.jpg") == "CRC-Prim-HE-07"
    assert parse_source_id("slideA_x1024_y2048.png") == "slideA"
    assert parse_source_id("slide-B_1024_2048.png") == "slide-B"
    assert parse_source_id("tile.png") is None


def test_list_images_is_recursive_sorted_and_skips_hidden(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for rel in ("b/2.png", "a/1.jpg", "a/deep/3.tif", ".hidden/4.png", "a/.5.png"):
        _write(tmp_path / rel, rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a/1.jpg", "a/deep/3.tif", "b/2.png"]
    with pytest.raises(ConfigError, match="not a folder"):
        list_images(tmp_path / "missing")


def test_read_rgb_turns_any_mode_into_rgb_uint8(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (6, 9, 3), dtype=np.uint8)
    _write(tmp_path / "rgba.png", rgb, "RGBA")
    _write(tmp_path / "grey.png", rgb[..., 0])
    a = read_rgb(tmp_path / "rgba.png")
    assert a.dtype == np.uint8 and a.shape == (6, 9, 3)
    np.testing.assert_array_equal(a, rgb)
    g = read_rgb(tmp_path / "grey.png")
    assert g.shape == (6, 9, 3) and np.array_equal(g[..., 0], g[..., 2]) and np.array_equal(g[..., 0], rgb[..., 0])


def test_labelled_folder_classes_labels_sources_and_subset(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for c, names in {"02_STROMA": ["s_x0_y0.png", "s_x1_y0.png"], "01_TUMOR": ["t_x0_y0.png"],
                     "03_EMPTY_FOLDER": []}.items():
        (tmp_path / c).mkdir()
        for n in names:
            _write(tmp_path / c / n, rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    tiles = load_labelled_folder(tmp_path)
    assert tiles.class_names == ["01_TUMOR", "02_STROMA"]  # sorted; a class folder without images is dropped
    assert tiles.labels.tolist() == [0, 1, 1] and tiles.sources == ["t", "s", "s"]
    sub = tiles.subset(np.array([False, True, False]))
    assert len(sub) == 1 and sub.paths == [tiles.paths[1]] and sub.labels.tolist() == [1] and sub.sources == ["s"]
    assert sub.class_names == tiles.class_names


def test_labelled_folder_needs_two_classes(tmp_path: Path) -> None:
    _write(tmp_path / "only" / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ConfigError, match="needs ≥ 2"):
        load_labelled_folder(tmp_path)
    with pytest.raises(ConfigError, match="no such folder"):
        load_labelled_folder(tmp_path / "missing")


def test_kather_folder_loads_with_its_sources(kather_dir: Path) -> None:
    tiles = load_labelled_folder(kather_dir)
    assert tiles.class_names[0] == "01_TUMOR" and len(tiles.class_names) == 8 and len(tiles) == 3627
    assert all(s is not None for s in tiles.sources)


def test_class_key() -> None:
    assert class_key("01_TUMOR") == "tumor"
    assert class_key("Complex stroma") == "complex_stroma"
    assert class_key(" 08-EMPTY ") == "empty"
    assert class_key("___") == "___"
