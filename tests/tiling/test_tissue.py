"""Tissue detection on real QC tiles (no tissue, almost white, pen marks, tissue)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.tiling.tissue import TissueParams, detect_tissue, otsu_threshold, pen_mask

PARAMS = TissueParams(mask_mpp=2.0, min_area_um2=2000.0)


def _load(shared_data: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(shared_data / "qc_tiles" / f"{name}.png").convert("RGB"))


@pytest.mark.parametrize("name", ["no-tissue", "no-tissue2", "no-tissue-line", "almost-white-1", "almost-white-2",
                                  "no-tissue-green-pen"])
def test_no_tissue(shared_data: Path, name: str) -> None:
    assert detect_tissue(_load(shared_data, name), PARAMS).mean() < 0.03


@pytest.mark.parametrize("name", ["tissue-level2-4640-4649-8736-8746", "tcga-lung-rgb", "medium-nuclei-score-level1-2",
                                  "high-nuclei-score-level0"])
def test_tissue_found(shared_data: Path, name: str) -> None:
    assert detect_tissue(_load(shared_data, name), PARAMS).mean() > 0.5


@pytest.mark.parametrize("name", ["tcga-green-pen", "medium-nuclei-score-green-pen-level1", "tcga-red-pen",
                                  "no-tissue-red-pen"])
def test_pen_marks_rejected(shared_data: Path, name: str) -> None:
    img = _load(shared_data, name)
    with_rejection = detect_tissue(img, PARAMS)
    without = detect_tissue(img, TissueParams(mask_mpp=2.0, min_area_um2=2000.0, reject_pen=False))
    pen = pen_mask(img, mask_mpp=2.0)  # pen strokes at the mask's scale (scattered ink-hued pixels are no pen)
    assert pen.mean() > 0.02
    # ink pixels are never tissue, and rejection removes a real share of the area
    assert not (with_rejection & pen).any()
    assert with_rejection.mean() < without.mean() - 0.02


def test_holes_kept_small_holes_filled() -> None:
    img = np.full((200, 200, 3), 240, np.uint8)
    img[20:180, 20:180] = (190, 110, 170)  # tissue square
    img[60:140, 60:140] = 245  # large lumen (80×80 px = 320 µm²·... at 2 µm/px → 25600 µm²): kept open
    img[30:33, 30:33] = 245  # tiny hole: filled
    m = detect_tissue(img, TissueParams(mask_mpp=2.0, min_area_um2=100.0, min_hole_um2=2000.0))
    assert not m[100, 100]
    assert m[31, 31]
    assert m[25, 100]


def test_min_area_drops_specks() -> None:
    img = np.full((200, 200, 3), 240, np.uint8)
    img[10:14, 10:14] = (190, 110, 170)  # 16 px × 4 µm² = 64 µm²
    img[100:180, 100:180] = (190, 110, 170)
    m = detect_tissue(img, TissueParams(mask_mpp=2.0, min_area_um2=1000.0))
    assert not m[11, 11] and m[140, 140]


def test_otsu_separates_two_modes() -> None:
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0.1, 0.02, 1000), rng.normal(0.6, 0.05, 1000)]).clip(0, 1)
    assert 0.13 < otsu_threshold(v) < 0.45  # anywhere in the gap between the modes
