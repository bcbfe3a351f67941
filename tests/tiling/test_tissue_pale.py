"""Pale tissue (adipose, loose stroma) is kept; blank glass, texture without stain and pen marks are not.

Slides go through the tiler's own path (pyramid → ``tissue_map`` at the default mask resolution), built
from the procedural painter, from real kather16 tiles and from the real CMU slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.config import TilingConfig
from wsi_pipeline.slide.open import open_slide
from wsi_pipeline.synth.layout import TissueClass
from wsi_pipeline.tiling.grid import TileSpec, select_tiles
from wsi_pipeline.tiling.stage import tissue_map
from wsi_pipeline.tiling.tissue import SAT_CEIL, TissueParams, _Colour, detect_tissue, dilate3, pen_mask


def _painted_slide(path: Path, class_map: np.ndarray, cell_um: float = 150.0, mpp: float = 1.0):
    """Write an Aperio-style pyramid painted from ``class_map``; returns the painter (for the truth)."""
    from wsi_pipeline.synth.pyramid import write_pyramid_tiff
    from wsi_pipeline.synth.tissue import TissuePainter

    size = (round(class_map.shape[1] * cell_um / mpp), round(class_map.shape[0] * cell_um / mpp))
    painter = TissuePainter(class_map, cell_um, mpp, size, seed=3)
    write_pyramid_tiff(path, painter, size, mpp, (1, 8))
    return painter


def _truth_at_mask(painter, shape: tuple[int, int], l0_per_px: tuple[float, float]) -> np.ndarray:
    """Class of every mask pixel (at its centre) from the painter's warped class raster."""
    xs = (np.arange(shape[1]) + 0.5) * l0_per_px[0] * painter.mpp
    ys = (np.arange(shape[0]) + 0.5) * l0_per_px[1] * painter.mpp
    return painter.codes_grid(xs, ys) % len(TissueClass)


def test_generated_pale_adipose_region_is_kept(tmp_path: Path) -> None:
    cm = np.zeros((6, 8), np.int8)
    cm[1:5, 1:4] = TissueClass.ADIPOSE
    cm[1:5, 4:6] = TissueClass.STROMA
    painter = _painted_slide(tmp_path / "fat.svs", cm)
    with open_slide(tmp_path / "fat.svs") as s:
        tmap = tissue_map(s, TilingConfig())
    truth = _truth_at_mask(painter, tmap.mask.shape, tmap.l0_per_px)
    fat, stroma, glass = (truth == TissueClass.ADIPOSE), (truth == TissueClass.STROMA), (truth == TissueClass.GLASS)
    # the adipose region is pale: little of it is above the highest saturation threshold used ...
    assert (_Colour.of(tmap.rgb).s > SAT_CEIL)[fat].mean() < 0.2
    # ... but the detector keeps it, with the stroma, and not the glass
    assert tmap.mask[fat].mean() > 0.7
    assert tmap.mask[stroma].mean() > 0.9
    assert tmap.mask[glass].mean() < 0.03


def test_kather_mosaic_keeps_stroma_and_adipose_rejects_empty(kather_dir: Path, tmp_path: Path) -> None:
    """Real kather16 tiles (150 px at 0.495 µm/px): a block of adipose and one of stroma with an
    enclosed 2 × 2 gap, on 08_EMPTY (background glass) tiles; tiled one tile per cell at the default
    ``min_tissue``."""
    from scipy import ndimage as ndi

    from wsi_pipeline.synth.kather import KATHER_MPP, KATHER_TILE_PX, compose_mosaic
    from wsi_pipeline.synth.pyramid import array_painter, write_pyramid_tiff

    cm = np.zeros((10, 12), np.int8)
    cm[2:8, 2:6] = TissueClass.ADIPOSE
    cm[2:8, 6:10] = TissueClass.STROMA
    cm[4:6, 7:9] = TissueClass.GLASS
    rng = np.random.default_rng(0)
    pools = {}
    for c in ("08_EMPTY", "02_STROMA", "07_ADIPOSE"):
        files = sorted(str(p) for p in (kather_dir / c).glob("*.jpg"))
        pools[c] = [files[i] for i in rng.permutation(len(files))[:40]]
    pools["01_TUMOR"] = []  # not drawn
    img, _ = compose_mosaic(cm, pools, rng)
    path = tmp_path / "mosaic.svs"
    write_pyramid_tiff(path, array_painter(img), (img.shape[1], img.shape[0]), KATHER_MPP, (1, 4, 16), quality=90)
    cfg = TilingConfig()
    with open_slide(path) as s:
        tmap = tissue_map(s, cfg)
        xy, _ = select_tiles(tmap.mask, tmap.l0_per_px, s.dimensions, s.mpp, TileSpec(KATHER_MPP, KATHER_TILE_PX),
                             cfg.min_tissue)
    kept = np.zeros(cm.shape, bool)
    kept[xy[:, 1] // KATHER_TILE_PX, xy[:, 0] // KATHER_TILE_PX] = True
    empty = cm == TissueClass.GLASS
    near_tissue = ndi.binary_dilation(~empty, np.ones((3, 3), bool))
    assert kept[cm == TissueClass.STROMA].mean() > 0.95
    assert kept[cm == TissueClass.ADIPOSE].mean() > 0.75
    assert not kept[empty & ~near_tissue].any()
    assert kept[empty].mean() < 0.1


def _glass(h: int, w: int, rng: np.random.Generator, tint: tuple[int, int, int] = (242, 241, 244)) -> np.ndarray:
    """Blank slide glass: a slightly tinted background with sensor noise, shading and dust specks."""
    yy, xx = np.mgrid[0:h, 0:w]
    shade = 4.0 * np.sin(xx / w * 3.0) * np.cos(yy / h * 2.0)
    img = np.asarray(tint, np.float32) + shade[..., None] + rng.normal(0, 1.5, (h, w, 3))
    for y, x in rng.integers(0, [h, w], (25, 2)):
        img[max(0, y - 1) : y + 1, max(0, x - 1) : x + 1] = rng.integers(90, 180)  # dust (1–2 px)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mask_mpp", [2.0, 8.0])
def test_blank_glass_and_texture_without_stain_rejected(mask_mpp: float) -> None:
    rng = np.random.default_rng(1)
    img = _glass(300, 400, rng)
    params = TissueParams(mask_mpp=mask_mpp, min_area_um2=2000.0)
    assert detect_tissue(img, params).mean() == 0.0
    # a coverslip edge (grey line) and an air bubble (grey ring): texture but no stain
    yy, xx = np.mgrid[0:300, 0:400]
    img[np.abs(yy - 0.4 * xx - 60) < 2] = (95, 95, 100)
    ring = np.abs(np.hypot(yy - 180, xx - 280) - 60) < 2.5
    img[ring] = (150, 150, 155)
    assert detect_tissue(img, params).mean() < 0.005


def test_real_glass_of_cmu_stays_out(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as s:
        m = tissue_map(s, TilingConfig()).mask
    h, w = m.shape
    # glass (checked on the slide): upper left, lower left strip, upper right
    assert not m[: int(0.3 * h), : int(0.33 * w)].any()
    assert not m[int(0.45 * h) :, : int(0.17 * w)].any()
    assert not m[: int(0.38 * h), int(0.85 * w) :].any()
    assert m[int(0.55 * h) : int(0.95 * h), int(0.45 * w) : int(0.7 * w)].mean() > 0.95  # dermis and epidermis
    assert 0.25 < m.mean() < 0.5


def test_pen_strokes_over_glass_and_fat_are_rejected() -> None:
    """Green, blue and red marker strokes crossing glass and a pale adipose region (rendered at the
    8-µm/px mask scale): no ink pixel is tissue, the strokes on glass add no tissue, the fat is kept."""
    from wsi_pipeline.synth.tissue import TissuePainter

    cm = np.zeros((6, 8), np.int8)
    cm[1:5, 1:5] = TissueClass.ADIPOSE
    painter = TissuePainter(cm, 150.0, 1.0, (1200, 900), seed=5)
    img = painter((0, 0), (150, 112), 8.0).copy()
    truth = _truth_at_mask(painter, img.shape[:2], (8.0, 8.0))
    clean = detect_tissue(img, TissueParams(mask_mpp=8.0))
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    strokes = {  # colour, pixels (each stroke about 50–70 µm wide, running from the fat onto the glass)
        (40, 150, 110): np.abs(yy - 0.5 * xx - 5) < 4,
        (50, 70, 170): np.abs(xx - 0.6 * yy - 95) < 4,
        (200, 25, 35): np.abs(yy - 95) < 3,
    }
    for colour, where in strokes.items():
        img[where] = colour
    m = detect_tissue(img, TissueParams(mask_mpp=8.0))
    ink = np.logical_or.reduce(list(strokes.values()))
    assert pen_mask(img, mask_mpp=8.0)[ink].mean() > 0.9
    assert not (m & ink).any()
    glass_far = (truth == TissueClass.GLASS) & ~clean
    assert m[glass_far].mean() < 0.005  # strokes on glass do not become tissue
    fat = (truth == TissueClass.ADIPOSE) & clean & ~dilate3(ink, times=6)  # ≥ 50 µm from the strokes
    assert m[fat].mean() > 0.8
