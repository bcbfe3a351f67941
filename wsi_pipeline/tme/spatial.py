"""Spatial TME metrics on the tile grid (pure functions, no I/O).

Tiles are rasterised to a grid whose cell is the tile stride (tile side minus overlap, in µm); every
distance below is in µm on that grid.

Compartments
------------
* **tissue**: tiles whose class is not ``non_tissue`` (empty glass / background).
* **tumour region**: tumour tiles, morphologically closed with a disk of ``tumour_closing_um`` (default:
  one stride, a 4-neighbour cross, which fills one-tile-wide cracks between tumour tiles) and with
  holes filled (tissue enclosed by tumour, e.g. lymphocytes inside a nest, is intratumoural), restricted
  to tissue tiles.
* **peri-tumoural band** (invasive margin): tissue tiles outside the tumour region whose centre lies within
  ``band_um`` of the tumour region's edge. The distance is the Euclidean distance between tile centres on
  the grid minus half a stride (the edge of the nearest tumour-region tile along the grid axes).

Metrics (area fractions are tile counts over tile counts; every tile has the same area)
---------------------------------------------------------------------------------------
* ``area_frac_<class>``: tiles of the class / tissue tiles, for every tissue class (they sum to 1);
  ``nontissue_fraction``: non-tissue (empty) tiles / all tiles.
* ``til_fraction``: lymphocyte tiles / tissue tiles; ``til_fraction_soft``: the same with expected areas
  (Σ P(lymphocytes) / Σ P(tissue) over all tiles), less sensitive to tiles of mixed tissue.
* ``lymph_density_tumour``: lymphocyte tiles / tissue tiles, inside the tumour region.
* ``lymph_density_margin``: lymphocyte tiles / (stroma + lymphocyte tiles), inside the band: the
  stromal-TIL score of the invasive margin (TILs-WG: stroma denominator).
* ``stromal_til_fraction``: lymphocyte / (stroma + lymphocyte) tiles over tumour region + band.
* ``tumour_stroma_ratio``: tumour / (tumour + stroma) tiles (1 = all tumour, 0 = all stroma).
* areas in mm² (``tissue_area_mm2``, ``tumour_area_mm2``, ``margin_area_mm2``).

A ratio with an empty denominator is NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_pipeline.tiles.folders import class_key
from wsi_pipeline.tme.config import (
    ROLE_LYMPHOCYTES,
    ROLE_NON_TISSUE,
    ROLE_STROMA,
    ROLE_TUMOUR,
    SpatialConfig,
)

NO_TILE = -1


@dataclass
class TileGrid:
    """Class labels rasterised at the tile stride: ``labels[row, col]`` is a class index or ``NO_TILE``."""

    labels: np.ndarray  # H×W int64
    rows: np.ndarray  # N: grid row of each input tile
    cols: np.ndarray  # N: grid column of each input tile
    stride_um: float
    origin_l0: tuple[int, int]  # level-0 (x, y) of cell (0, 0)
    stride_l0: float


def infer_stride_l0(l0_xy: np.ndarray) -> float | None:
    """The smallest positive step between tile corners along x or y (None for a single tile)."""
    steps = []
    for axis in (0, 1):
        v = np.unique(np.asarray(l0_xy)[:, axis])
        if len(v) > 1:
            steps.append(float(np.diff(v).min()))
    return min(steps) if steps else None


def rasterise(
    l0_xy: np.ndarray, tile_labels: np.ndarray, stride_l0: float, l0_mpp: float
) -> TileGrid:
    """Place N tiles (level-0 top-left corners) on a grid of cell ``stride_l0`` level-0 pixels.

    ``l0_mpp`` is µm per level-0 pixel. Two tiles that fall in one cell keep the later one (only happens
    with inconsistent coordinates).
    """
    xy = np.asarray(l0_xy, dtype=np.float64).reshape(-1, 2)
    lab = np.asarray(tile_labels, dtype=np.int64).reshape(-1)
    if len(xy) != len(lab):
        raise ValueError(f"{len(xy)} tile coordinates but {len(lab)} labels")
    if stride_l0 <= 0:
        raise ValueError(f"stride_l0 must be > 0 (got {stride_l0})")
    if len(xy) == 0:
        return TileGrid(np.full((0, 0), NO_TILE, np.int64), np.empty(0, np.int64), np.empty(0, np.int64),
                        stride_l0 * l0_mpp, (0, 0), float(stride_l0))
    x0, y0 = xy.min(axis=0)
    cols = np.rint((xy[:, 0] - x0) / stride_l0).astype(np.int64)
    rows = np.rint((xy[:, 1] - y0) / stride_l0).astype(np.int64)
    grid = np.full((rows.max() + 1, cols.max() + 1), NO_TILE, np.int64)
    grid[rows, cols] = lab
    return TileGrid(grid, rows, cols, float(stride_l0) * float(l0_mpp), (int(x0), int(y0)), float(stride_l0))


def _disk(radius_cells: float) -> np.ndarray:
    r = int(np.floor(radius_cells))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx**2 + yy**2) <= radius_cells**2 + 1e-9


@dataclass
class Compartments:
    tissue: np.ndarray  # H×W bool
    tumour_tiles: np.ndarray
    tumour_region: np.ndarray
    band: np.ndarray
    distance_um: np.ndarray  # distance of each cell centre to the tumour region's edge (0 inside)


def compartments(
    labels: np.ndarray,
    roles: Mapping[str, Sequence[int]],
    stride_um: float,
    spatial: SpatialConfig,
    default_closing_um: float | None = None,
) -> Compartments:
    """Tissue, tumour region and peri-tumoural band masks on a label grid (see module docstring).
    ``default_closing_um``: the closing radius when ``spatial.tumour_closing_um`` is None (None: one stride;
    the dense map passes the classifier's field of view)."""
    from scipy import ndimage

    labels = np.asarray(labels)
    present = labels != NO_TILE
    tissue = present & ~np.isin(labels, list(roles.get(ROLE_NON_TISSUE, [])))
    tumour = np.isin(labels, list(roles[ROLE_TUMOUR])) & present
    region = tumour.copy()
    closing_um = spatial.tumour_closing_um
    if closing_um is None:
        closing_um = stride_um if default_closing_um is None else default_closing_um
    r_cells = closing_um / stride_um if stride_um > 0 else 0.0
    if r_cells >= 1.0 and tumour.any():
        pad = int(np.ceil(r_cells)) + 1
        padded = np.pad(tumour, pad)
        region = ndimage.binary_closing(padded, structure=_disk(r_cells))[pad:-pad, pad:-pad] | tumour
    if spatial.fill_holes and region.any():
        region = ndimage.binary_fill_holes(region)
    region = (region & tissue) | tumour
    if region.any():
        centre_dist = ndimage.distance_transform_edt(~region, sampling=stride_um)
        distance = np.where(region, 0.0, np.maximum(centre_dist - stride_um / 2.0, 0.0))
    else:
        distance = np.full(labels.shape, np.inf)
    band = tissue & ~region & (distance <= spatial.band_um)
    return Compartments(tissue, tumour, region, band, distance)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def class_column(class_name: str) -> str:
    """Column suffix for a class: '01_TUMOR' → 'tumor', 'Complex stroma' → 'complex_stroma'
    (:func:`wsi_pipeline.tiles.folders.class_key`, the key of the class palette too)."""
    return class_key(class_name)


def grid_metrics(
    labels: np.ndarray,
    class_names: Sequence[str],
    roles: Mapping[str, Sequence[int]],
    stride_um: float,
    spatial: SpatialConfig,
    probs: np.ndarray | None = None,
) -> dict[str, Any]:
    """All per-slide metrics of a label grid (see the module docstring for definitions); ``probs``
    (H×W×C class probabilities on the same grid, zeros where there is no tile) adds the soft metrics."""
    labels = np.asarray(labels)
    comp = compartments(labels, roles, stride_um, spatial)
    present = labels != NO_TILE
    n_tiles = int(present.sum())
    lym = np.isin(labels, list(roles[ROLE_LYMPHOCYTES])) & present
    stroma = np.isin(labels, list(roles.get(ROLE_STROMA, []))) & present
    tum = comp.tumour_tiles
    cell_mm2 = (stride_um / 1000.0) ** 2
    out: dict[str, Any] = {"n_tiles": n_tiles, "n_tissue_tiles": int(comp.tissue.sum())}
    non_tissue = set(roles.get(ROLE_NON_TISSUE, []))
    n_tissue = int(comp.tissue.sum())
    for ci, name in enumerate(class_names):
        if ci not in non_tissue:
            out[f"area_frac_{class_column(name)}"] = _ratio(int((labels == ci).sum()), n_tissue)
    out["nontissue_fraction"] = _ratio(n_tiles - n_tissue, n_tiles)
    n_tum, n_str, n_lym = int(tum.sum()), int(stroma.sum()), int(lym.sum())
    out["n_tumour_tiles"] = n_tum
    out["n_lymphocyte_tiles"] = n_lym
    out["til_fraction"] = _ratio(n_lym, int(comp.tissue.sum()))
    if probs is not None:
        p = np.asarray(probs, np.float64)
        tissue_cls = [i for i in range(p.shape[-1]) if i not in non_tissue]
        out["til_fraction_soft"] = _ratio(float(p[..., list(roles[ROLE_LYMPHOCYTES])].sum()),
                                          float(p[..., tissue_cls].sum()))
    out["tumour_stroma_ratio"] = _ratio(n_tum, n_tum + n_str)
    region, band = comp.tumour_region, comp.band
    out["lymph_density_tumour"] = _ratio(int((lym & region).sum()), int((comp.tissue & region).sum()))
    out["lymph_density_margin"] = _ratio(int((lym & band).sum()), int(((stroma | lym) & band).sum()))
    both = region | band
    out["stromal_til_fraction"] = _ratio(int((lym & both).sum()), int(((stroma | lym) & both).sum()))
    out["tissue_area_mm2"] = float(comp.tissue.sum()) * cell_mm2
    out["tumour_area_mm2"] = float(region.sum()) * cell_mm2
    out["margin_area_mm2"] = float(band.sum()) * cell_mm2
    out["n_margin_tiles"] = int(band.sum())
    out["tile_stride_um"] = float(stride_um)
    return out


# ---------------------------------------------------------------- the dense map
def map_metrics(
    probs: np.ndarray,
    area: np.ndarray,
    class_names: Sequence[str],
    roles: Mapping[str, Sequence[int]],
    cell_um: float,
    fov_um: float,
    spatial: SpatialConfig,
    correct: Any = None,
    refined: np.ndarray | None = None,
) -> tuple[dict[str, Any], Compartments]:
    """All per-slide metrics of a dense class-probability map (H×W×C over the cells of ``area``).

    Compartments come from the map's top class (:func:`compartments`; closing radius one field of view
    ``fov_um`` unless configured). Every fraction and density is a ratio of **expected areas**: the class
    probabilities summed over the compartment's cells (not votes). The slide's composition (``area_frac_*``,
    ``til_fraction``, ``tumour_stroma_ratio``, ``nontissue_fraction``) is also passed through ``correct`` (a
    C-vector → C-vector correction of the classifier's confusions, e.g.
    :meth:`wsi_pipeline.tme.classifier.TissueClassifier.correct_areas`) when given, or taken from ``refined``
    (the same map passed through the classifier's map refinement, :mod:`wsi_pipeline.tme.refine`: per-cell
    class-area estimates read with their neighbourhood) when given; ``til_fraction_soft``, the compartments and
    their densities (the phenotype's inputs) stay the window map's expected areas. Tile counts
    (``n_tumour_tiles``, ``n_lymphocyte_tiles``, ``n_margin_tiles``) are areas in classifier fields of view
    (cells × (cell_um / fov_um)²), so ``rules.min_tumour_tiles`` keeps its meaning."""
    p = np.asarray(probs, np.float64)
    area = np.asarray(area, bool)
    labels = np.where(area, p.argmax(axis=-1) if p.size else 0, NO_TILE)
    comp = compartments(labels, roles, cell_um, spatial, default_closing_um=fov_um)
    non_tissue = list(roles.get(ROLE_NON_TISSUE, []))
    tissue_cls = [i for i in range(len(class_names)) if i not in set(non_tissue)]
    lym, tum, stroma = (list(roles.get(r, [])) for r in (ROLE_LYMPHOCYTES, ROLE_TUMOUR, ROLE_STROMA))

    raw = p[area].sum(axis=0) if area.any() else np.zeros(len(class_names))
    whole = np.asarray(correct(raw), np.float64) if correct is not None and raw.sum() > 0 else raw
    if refined is not None and area.any():
        whole = np.asarray(refined, np.float64)[area].sum(axis=0)
    fov_cells = (cell_um / fov_um) ** 2 if fov_um > 0 else 1.0
    n_tissue = float(whole[tissue_cls].sum())
    out: dict[str, Any] = {"n_map_cells": int(area.sum()), "map_cell_um": float(cell_um),
                           "n_tissue_tiles": round(float(comp.tissue.sum()) * fov_cells, 2)}
    for ci, name in enumerate(class_names):
        if ci not in non_tissue:
            out[f"area_frac_{class_column(name)}"] = _ratio(whole[ci], n_tissue)
    out["nontissue_fraction"] = _ratio(float(whole[non_tissue].sum()), float(whole.sum()))
    out["n_tumour_tiles"] = round(float(comp.tumour_tiles.sum()) * fov_cells, 2)
    out["n_lymphocyte_tiles"] = round(float((np.isin(labels, lym) & area).sum()) * fov_cells, 2)
    out["til_fraction"] = _ratio(whole[lym].sum(), n_tissue)
    out["til_fraction_soft"] = _ratio(raw[lym].sum(), raw[tissue_cls].sum())
    out["tumour_stroma_ratio"] = _ratio(whole[tum].sum(), whole[tum].sum() + whole[stroma].sum())
    region, band = comp.tumour_region, comp.band
    r, b, rb = (p[m].sum(axis=0) for m in (region & area, band & area, (region | band) & area))
    out["lymph_density_tumour"] = _ratio(r[lym].sum(), r[tissue_cls].sum())
    out["lymph_density_margin"] = _ratio(b[lym].sum(), b[lym].sum() + b[stroma].sum())
    out["stromal_til_fraction"] = _ratio(rb[lym].sum(), rb[lym].sum() + rb[stroma].sum())
    cell_mm2 = (cell_um / 1000.0) ** 2
    out["tissue_area_mm2"] = float(comp.tissue.sum()) * cell_mm2
    out["tumour_area_mm2"] = float(region.sum()) * cell_mm2
    out["margin_area_mm2"] = float(band.sum()) * cell_mm2
    out["n_margin_tiles"] = round(float(band.sum()) * fov_cells, 2)
    out["tile_stride_um"] = float(cell_um)
    return out, comp
