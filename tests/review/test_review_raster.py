"""Pure raster code: level-0 alignment, smoothing, pyramid, normalisation, colours."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.review import raster as R


def test_grid_uses_exact_cells_for_aligned_tiles() -> None:
    xy = np.array([[0, 0], [224, 0], [448, 224]])
    g = R.grid_for_tiles(xy, 224, (1000, 700))
    assert g.cell_l0 == 224
    assert (g.height, g.width) == (4, 5)  # ceil(700/224), ceil(1000/224)


def test_grid_for_overlapping_tiles_is_the_stride() -> None:
    xy = np.array([[x, y] for y in range(0, 448, 112) for x in range(0, 448, 112)])
    g = R.grid_for_tiles(xy, 224, (600, 600))
    assert g.cell_l0 == 112


def test_grid_is_capped() -> None:
    g = R.grid_for_tiles(np.array([[0, 0]]), 10, (100_000, 50_000), max_cells=1000)
    assert max(g.width, g.height) <= 1000
    assert g.cell_l0 % 10 == 0


def test_rasterize_puts_each_tile_on_its_level0_cells() -> None:
    xy = np.array([[0, 0], [448, 224], [224, 672]])
    vals = np.array([0.1, 0.9, 0.5])
    g = R.grid_for_tiles(xy, 224, (896, 896))
    r = R.rasterize(xy, 224, vals, g)
    assert r.shape == (4, 4)
    for (x, y), v in zip(xy, vals, strict=True):
        row, col = g.cell_of(x + 112, y + 112)
        assert r[row, col] == pytest.approx(v)
    assert np.isnan(r).sum() == 16 - 3


def test_rasterize_offset_grid_uses_cell_centres() -> None:
    # tiles on a grid offset by 100 px from the origin: each tile covers the cells whose centres it holds
    xy = np.array([[100, 100], [324, 100]])
    g = R.GridSpec(cell_l0=50, width=12, height=8, level0_size=(600, 400))
    r = R.rasterize(xy, 224, np.array([1.0, 2.0]), g)
    # tile 0 covers x in [100, 324): cell centres 125..300 → columns 2..5
    assert np.all(r[2:6, 2:6] == 1.0)
    assert np.all(r[2:6, 6:10] == 2.0)
    assert np.isnan(r[:, :2]).all() and np.isnan(r[:2]).all()


def test_smoothing_averages_overlapping_tiles() -> None:
    xy = np.array([[0, 0], [112, 0]])  # 50% overlap along x
    g = R.grid_for_tiles(xy, 224, (336, 224))
    assert g.cell_l0 == 112
    sharp = R.rasterize(xy, 224, np.array([0.0, 1.0]), g, smooth=False)
    smooth = R.rasterize(xy, 224, np.array([0.0, 1.0]), g, smooth=True)
    assert smooth[0].tolist() == [0.0, 0.5, 1.0]  # the shared column is the mean of both tiles
    assert sharp[0, 0] == 0.0 and sharp[0, 2] == 1.0
    assert sharp[0, 1] in (0.0, 1.0)  # nearest tile centre wins without smoothing


def test_rasterize_ignores_nan_scores() -> None:
    xy = np.array([[0, 0], [0, 0]])
    g = R.GridSpec(224, 1, 1, (224, 224))
    assert R.rasterize(xy, 224, np.array([np.nan, 0.3]), g, smooth=True)[0, 0] == pytest.approx(0.3)


def test_pyramid_is_a_nan_aware_2x_mean() -> None:
    a = np.array([[1, 3, 5], [np.nan, 5, np.nan], [2, 2, 2]], dtype=np.float32)
    d = R.downsample2(a)
    assert d.shape == (2, 2)
    assert d[0, 0] == pytest.approx(3.0) and d[0, 1] == pytest.approx(5.0)
    assert d[1, 0] == pytest.approx(2.0) and d[1, 1] == pytest.approx(2.0)
    levels = R.pyramid(np.zeros((300, 100), np.float32), min_side=32)
    assert [lv.shape for lv in levels] == [(300, 100), (150, 50), (75, 25), (38, 13), (19, 7)]


def test_percentile_and_absolute_normalisation() -> None:
    v = np.array([0.2, 0.4, 0.6, 0.8, np.nan])
    n = R.make_normalizer(v, "percentile")
    assert n(v[:4]).tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert np.isnan(n(np.array([np.nan]))[0])
    a = R.make_normalizer(v, "absolute")
    assert (a.vmin, a.vmax) == (0.0, 1.0)  # probabilities keep [0, 1]
    assert a(np.array([0.25, 2.0])).tolist() == [0.25, 1.0]
    r = R.make_normalizer(np.array([-3.0, 1.0]), "absolute")
    assert (r.vmin, r.vmax) == (-3.0, 1.0)
    assert R.make_normalizer(v, "absolute", vmin=0.5, vmax=0.7)(np.array([0.6]))[0] == pytest.approx(0.5)


def test_colorize_and_sample_raster() -> None:
    lut = R.colormap_lut("RdYlBu_r")
    rgba = R.colorize(np.array([[0.0, 1.0, np.nan]]), lut)
    assert rgba[0, 0, :3].tolist() == lut[0].tolist() and rgba[0, 1, :3].tolist() == lut[-1].tolist()
    assert rgba[0, :, 3].tolist() == [255, 255, 0]
    g = R.GridSpec(100, 2, 1, (200, 100))
    img = R.sample_raster(np.array([[1.0, 2.0]], np.float32), g, (8, 4), (25.0, 25.0))
    assert img.shape == (4, 8)
    assert (img[:, :4] == 1.0).all() and (img[:, 4:] == 2.0).all()


def test_top_bottom_indices() -> None:
    top, bottom = R.top_bottom_indices(np.array([0.5, np.nan, 0.9, 0.1, 0.7]), 2)
    assert top.tolist() == [2, 4] and bottom.tolist() == [3, 0]


def test_absolute_scale_follows_the_target_kind() -> None:
    v = np.array([0.1, 0.3])  # a regression target whose values happen to lie in [0, 1]
    assert (R.make_normalizer(v, "absolute", probability=False).vmin, R.make_normalizer(
        v, "absolute", probability=False).vmax) == (0.1, 0.3)
    assert R.make_normalizer(v, "absolute", probability=True).vmax == 1.0
