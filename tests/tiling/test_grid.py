"""The tile grid at a physical resolution and vectorised tissue fractions."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.tiling.grid import TileSpec, grid_l0_xy, select_tiles, tissue_fractions


def test_tile_size_in_level0_follows_mpp() -> None:
    spec = TileSpec(target_mpp=0.5, tile_size=224)
    assert spec.tile_size_l0(0.25) == 448
    assert spec.tile_size_l0(0.5) == 224
    assert spec.tile_size_l0(0.499) == 224
    assert TileSpec(0.5, 224, overlap=32).stride_l0(0.25) == pytest.approx(384)


def test_grid_covers_full_tiles_only() -> None:
    xy = grid_l0_xy((1000, 500), 0.25, TileSpec(0.5, 224))
    assert len(xy) == 2 * 1  # 448-px tiles: 2 across 1000, 1 down 500
    assert (xy[:, 0] + 448 <= 1000).all() and (xy[:, 1] + 448 <= 500).all()
    assert xy.dtype == np.int64


def test_overlap_gives_more_tiles() -> None:
    a = grid_l0_xy((4000, 4000), 0.5, TileSpec(0.5, 224, 0))
    b = grid_l0_xy((4000, 4000), 0.5, TileSpec(0.5, 224, 112))
    assert len(b) > 3 * len(a)
    assert np.diff(np.unique(b[:, 0]))[0] == 112


def test_tissue_fractions_match_brute_force() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((60, 80)) > 0.5
    l0_per_px = (16.0, 16.0)
    xy = grid_l0_xy((80 * 16, 60 * 16), 0.25, TileSpec(0.5, 64))  # tiles = 128 l0 px = 8 mask px
    frac = tissue_fractions(mask, l0_per_px, xy, 128)
    for (x, y), f in zip(xy, frac, strict=True):
        ref = mask[y // 16 : y // 16 + 8, x // 16 : x // 16 + 8].mean()
        assert f == pytest.approx(ref, abs=1e-6)


def test_select_keeps_only_tissue_tiles() -> None:
    mask = np.zeros((100, 100), bool)
    mask[20:60, 30:90] = True
    xy, frac = select_tiles(mask, (10.0, 10.0), (1000, 1000), 0.5, TileSpec(0.5, 100), min_tissue=0.5)
    assert len(xy) > 0 and (frac >= 0.5).all()
    cx, cy = (xy[:, 0] + 50) / 10, (xy[:, 1] + 50) / 10
    assert mask[cy.astype(int), cx.astype(int)].all()
    # every tile of the grid whose fraction ≥ 0.5 is kept (no loss)
    all_xy = grid_l0_xy((1000, 1000), 0.5, TileSpec(0.5, 100))
    all_frac = tissue_fractions(mask, (10.0, 10.0), all_xy, 100)
    assert (all_frac >= 0.5).sum() == len(xy)
