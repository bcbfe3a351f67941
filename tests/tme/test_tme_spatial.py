"""Band, compartment and density computations on hand-made tile grids with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsi_pipeline.tme.config import ClassRoles, SpatialConfig
from wsi_pipeline.tme.spatial import NO_TILE, compartments, grid_metrics, infer_stride_l0, rasterise

NAMES = ["01_TUMOR", "02_STROMA", "04_LYMPHO", "08_EMPTY"]
T, S, L, E = 0, 1, 2, 3
ROLES = ClassRoles().resolve(NAMES)

# a 3×3 tumour nest (centre: one lymphocyte tile) in a ring of stroma with two lymphocyte tiles, on glass
GRID = np.array([
    [E, E, E, E, E, E, E],
    [E, S, S, S, S, S, E],
    [E, S, T, T, T, S, E],
    [E, S, T, L, T, S, E],
    [E, S, T, T, T, S, E],
    [E, L, L, S, S, S, E],
    [E, E, E, E, E, E, E],
])


def test_roles_resolve_kather_names_and_keywords() -> None:
    assert ROLES["tumour"] == [0] and ROLES["stroma"] == [1] and ROLES["lymphocytes"] == [2]
    assert ROLES["non_tissue"] == [3]
    roles = ClassRoles().resolve(["Tumour", "stroma", "complex", "lymphocytes", "debris", "background"])
    assert roles["tumour"] == [0] and roles["stroma"] == [1, 2] and roles["lymphocytes"] == [3]
    assert roles["other"] == [4] and roles["non_tissue"] == [5]


def test_known_answers_with_closing() -> None:
    m = grid_metrics(GRID, NAMES, ROLES, stride_um=100.0,
                     spatial=SpatialConfig(band_um=120.0, tumour_closing_um=100.0))
    assert m["n_tiles"] == 49 and m["n_tissue_tiles"] == 25
    assert m["area_frac_tumor"] == pytest.approx(8 / 25)  # of tissue tiles
    assert m["area_frac_stroma"] == pytest.approx(14 / 25)
    assert "area_frac_empty" not in m and m["nontissue_fraction"] == pytest.approx(24 / 49)
    assert sum(v for k, v in m.items() if k.startswith("area_frac_")) == pytest.approx(1.0)
    assert m["til_fraction"] == pytest.approx(3 / 25)
    assert m["tumour_stroma_ratio"] == pytest.approx(8 / (8 + 14))
    # closing (radius 1 cell) pulls the enclosed lymphocyte tile into the tumour region: 1 of 9
    assert m["lymph_density_tumour"] == pytest.approx(1 / 9)
    assert m["tumour_area_mm2"] == pytest.approx(9 * 0.01)
    # band of 120 µm = the 16 tissue tiles around the region (axis 50 µm, diagonal 91 µm from its edge)
    assert m["n_margin_tiles"] == 16
    assert m["lymph_density_margin"] == pytest.approx(2 / 16)
    assert m["margin_area_mm2"] == pytest.approx(16 * 0.01)
    assert m["stromal_til_fraction"] == pytest.approx(3 / (3 + 14))


def test_without_closing_or_filling_the_enclosed_lymphocyte_is_outside_the_tumour() -> None:
    spatial = SpatialConfig(band_um=120.0, tumour_closing_um=0.0, fill_holes=False)
    m = grid_metrics(GRID, NAMES, ROLES, 100.0, spatial)
    assert m["lymph_density_tumour"] == pytest.approx(0.0)
    assert m["n_margin_tiles"] == 17  # the centre tile joins the band
    assert m["lymph_density_margin"] == pytest.approx(3 / 17)


def test_fill_holes_puts_a_lymphocyte_core_inside_the_nest() -> None:
    grid = np.full((9, 9), S)
    grid[1:8, 1:8] = T
    grid[2:7, 2:7] = L  # a 5×5 lymphocyte core in a one-tile tumour rim: too wide for the closing
    closed_only = SpatialConfig(band_um=50.0, tumour_closing_um=100.0, fill_holes=False)
    m = grid_metrics(grid, NAMES, ROLES, 100.0, closed_only)
    assert m["lymph_density_tumour"] < 0.5
    m = grid_metrics(grid, NAMES, ROLES, 100.0, SpatialConfig(band_um=50.0, tumour_closing_um=100.0))
    assert m["lymph_density_tumour"] == pytest.approx(25 / 49)
    # the outer ring without its 4 corners (corner centres are 91 µm from the region, > 50)
    assert m["n_margin_tiles"] == 28 and m["lymph_density_margin"] == pytest.approx(0.0)


def test_default_closing_is_one_tile_and_bridges_one_tile_cracks() -> None:
    grid = np.full((9, 9), S)
    grid[1:8, 1:8] = T
    grid[1:8, 4] = L  # a one-tile-wide lymphocyte streak through the nest, open at both ends
    no_closing = grid_metrics(grid, NAMES, ROLES, 100.0, SpatialConfig(tumour_closing_um=0.0))
    assert no_closing["lymph_density_tumour"] == pytest.approx(0.0)  # open: no hole to fill
    m = grid_metrics(grid, NAMES, ROLES, 100.0, SpatialConfig())  # closing of one stride (a cross)
    assert m["lymph_density_tumour"] == pytest.approx(5 / 47)  # the streak minus its two open ends
    square = grid_metrics(grid, NAMES, ROLES, 100.0, SpatialConfig(tumour_closing_um=150.0))  # 3×3
    assert square["lymph_density_tumour"] == pytest.approx(7 / 49)


def test_empty_tiles_never_join_the_band() -> None:
    # 170 µm reaches the glass ring two cells out, which is not tissue
    m = grid_metrics(GRID, NAMES, ROLES, 100.0, SpatialConfig(band_um=170.0, tumour_closing_um=100.0))
    assert m["n_margin_tiles"] == 16


def test_band_width_in_micrometres_counts_lattice_disk() -> None:
    grid = np.full((9, 9), S)
    grid[4, 4] = T
    comp = compartments(grid, ROLES, stride_um=50.0, spatial=SpatialConfig(band_um=100.0, tumour_closing_um=0))
    assert not comp.tumour_region[4, 3]
    # centre distance ≤ 100 + 25 µm ⇔ dx² + dy² ≤ 6.25 cells²: 21 lattice points minus the tumour tile
    assert int(comp.band.sum()) == 20
    assert comp.distance_um[4, 5] == pytest.approx(25.0)
    assert comp.distance_um[4, 7] == pytest.approx(125.0)
    # the same physical band at half the stride holds about 4× the cells
    grid2 = np.full((17, 17), S)
    grid2[8, 8] = T
    comp2 = compartments(grid2, ROLES, stride_um=25.0, spatial=SpatialConfig(band_um=100.0, tumour_closing_um=0))
    n = sum(1 for dx in range(-8, 9) for dy in range(-8, 9) if (dx or dy) and 25 * math.hypot(dx, dy) <= 112.5)
    assert int(comp2.band.sum()) == n


def test_soft_til_fraction_uses_expected_areas() -> None:
    grid = np.array([[T, L], [S, E]])
    probs = np.zeros((2, 2, 4))
    probs[0, 0] = [0.8, 0.0, 0.2, 0.0]  # a tumour tile with some lymphocytes
    probs[0, 1] = [0.0, 0.4, 0.6, 0.0]  # a mixed lymphocyte / stroma tile
    probs[1, 0] = [0.0, 1.0, 0.0, 0.0]
    probs[1, 1] = [0.0, 0.0, 0.0, 1.0]  # glass
    m = grid_metrics(grid, NAMES, ROLES, 100.0, SpatialConfig(), probs)
    assert m["til_fraction"] == pytest.approx(1 / 3)
    assert m["til_fraction_soft"] == pytest.approx((0.2 + 0.6) / 3.0)
    assert "til_fraction_soft" not in grid_metrics(grid, NAMES, ROLES, 100.0, SpatialConfig())


def test_no_tumour_gives_nan_densities() -> None:
    grid = np.array([[S, L], [S, E]])
    m = grid_metrics(grid, NAMES, ROLES, 100.0, SpatialConfig())
    assert m["n_tumour_tiles"] == 0 and m["n_margin_tiles"] == 0
    assert math.isnan(m["lymph_density_tumour"]) and math.isnan(m["lymph_density_margin"])
    assert m["til_fraction"] == pytest.approx(1 / 3)
    assert m["tumour_stroma_ratio"] == pytest.approx(0.0)


def test_rasterise_places_shuffled_tiles_and_converts_stride_to_um() -> None:
    rng = np.random.default_rng(0)
    rows, cols = np.nonzero(GRID != E)
    xy = np.stack([1000 + cols * 224, 500 + rows * 224], axis=1)
    labels = GRID[rows, cols]
    perm = rng.permutation(len(xy))
    assert infer_stride_l0(xy[perm]) == 224
    grid = rasterise(xy[perm], labels[perm], stride_l0=224, l0_mpp=0.25)
    assert grid.stride_um == pytest.approx(56.0)
    assert grid.origin_l0 == (1000 + 224, 500 + 224)
    expected = GRID[1:6, 1:6]
    assert np.array_equal(grid.labels, expected)
    assert np.array_equal(grid.labels[grid.rows, grid.cols], labels[perm])
    sparse = rasterise(xy[:1], labels[:1], 224, 0.25)
    assert sparse.labels.shape == (1, 1) and (sparse.labels != NO_TILE).sum() == 1
