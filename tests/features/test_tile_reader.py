"""The fast JPEG-TIFF reader returns OpenSlide's pixels (read_region + area resize) up to JPEG/resampling
noise, on real Aperio and generic-TIFF pyramids and on generated slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.features.dataset import plan_batches, read_order
from wsi_pipeline.features.reader import ReadSpec, open_tile_reader
from wsi_pipeline.slide.open import open_slide


def _coords(dims: tuple[int, int], step: int, n: int, seed: int = 0) -> np.ndarray:
    """Random tile corners, some hanging over the right/bottom/top-left edges."""
    rng = np.random.default_rng(seed)
    w, h = dims
    xs = rng.integers(-step // 3, w - step // 2, n)
    ys = rng.integers(-step // 3, h - step // 2, n)
    return np.stack([xs, ys], 1)


def _compare(path: Path, target_mpp: float, slide_mpp: float | None = None, n: int = 12,
             expect_kind: str = "tiff-jpeg") -> tuple[float, float]:
    with open_slide(path, mpp=slide_mpp) as s:
        spec = ReadSpec(target_mpp, 224, s.mpp)
        step = round(224 * target_mpp / s.mpp)
        coords = _coords(s.dimensions, step, n)
        ref = np.stack([s.read_region_at_mpp((int(x), int(y)), target_mpp, 224) for x, y in coords])
    with open_tile_reader(path, spec) as reader:
        assert reader.kind == expect_kind
        got = reader.read_many(coords)
    assert got.shape == ref.shape == (n, 224, 224, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16)).mean(axis=(1, 2, 3))
    return float(diff.mean()), float(diff.max())


@pytest.mark.parametrize("target_mpp", [0.5, 1.0])
def test_aperio_svs_matches_openslide(cmu_svs: Path, target_mpp: float) -> None:
    mean, worst = _compare(cmu_svs, target_mpp)
    assert mean < 0.5 and worst < 2.0


@pytest.mark.parametrize("target_mpp", [0.5, 1.0, 2.0])
def test_generic_tiff_matches_openslide(generic_tiff: Path, target_mpp: float) -> None:
    """Levels 1-2 sit at fractional level positions: OpenSlide's bilinear placement is reproduced."""
    mean, worst = _compare(generic_tiff, target_mpp)
    assert mean < 1.0 and worst < 6.0


def test_generated_slide_matches_openslide(small_svs: Path) -> None:
    mean, worst = _compare(small_svs, 0.5)
    assert mean < 0.5 and worst < 2.0


@pytest.fixture(scope="module")
def fine_svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.25 µm/px (40x) textured slide: 0.5 µm/px tiles are decoded at half scale in the DCT."""
    from wsi_pipeline.synth.pyramid import array_painter, write_pyramid_tiff

    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, (96, 128, 3))
    img = np.kron(base, np.ones((16, 16, 1)))  # 1536 x 2048 blobs, plus fine noise
    img = np.clip(170 + 40 * img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("fine") / "fine.svs"
    write_pyramid_tiff(path, array_painter(img), (2048, 1536), mpp=0.25, downsamples=(1, 4))
    return path


def test_reduced_scale_decode_matches_openslide(fine_svs: Path) -> None:
    with open_slide(fine_svs) as s:
        spec = ReadSpec(0.5, 224, s.mpp)
    with open_tile_reader(fine_svs, spec) as r:
        assert r._reduce == 2
    mean, worst = _compare(fine_svs, 0.5)
    assert mean < 2.0 and worst < 4.0
    with open_tile_reader(fine_svs, spec, reduced_decode=False) as r_full, \
            open_slide(fine_svs) as s:
        xy = (448, 448)
        full = r_full.read(xy).astype(np.int16)
        ref = s.read_region_at_mpp(xy, 0.5, 224).astype(np.int16)
    assert np.abs(full - ref).mean() < 0.5


def test_jpeg2000_slide_falls_back_to_openslide(tcga_svs: Path) -> None:
    mean, worst = _compare(tcga_svs, 0.5, slide_mpp=0.25, n=4, expect_kind="slide")
    assert mean == 0 and worst == 0


def test_outside_the_slide_is_white(small_svs: Path) -> None:
    with open_slide(small_svs) as s, open_tile_reader(small_svs, ReadSpec(0.5, 224, s.mpp)) as r:
        far = r.read((s.dimensions[0] + 1000, 10))
    assert (far == 255).all()


def test_read_order_is_a_blocked_permutation() -> None:
    xs, ys = np.meshgrid(np.arange(20) * 224, np.arange(10) * 224)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)[::-1].copy()
    order = read_order(coords, 224)
    assert sorted(order.tolist()) == list(range(len(coords)))
    first_block = coords[order[:32]]
    assert first_block[:, 0].max() < 8 * 224 and first_block[:, 1].max() < 4 * 224
    from wsi_pipeline.features.dataset import SlideSource

    items = plan_batches([SlideSource("x", coords, ReadSpec(0.5, 224, 0.5), 224)], 32)
    assert sum(len(p) for _, p in items) == len(coords) and all(len(p) <= 32 for _, p in items)


@pytest.mark.parametrize("target_mpp", [0.5, 1.0])
def test_threaded_batch_reading_gives_the_same_pixels(generic_tiff: Path, fine_svs: Path, target_mpp: float) -> None:
    for path in (generic_tiff, fine_svs):
        with open_slide(path) as s:
            spec = ReadSpec(target_mpp, 224, s.mpp)
            coords = _coords(s.dimensions, round(224 * target_mpp / s.mpp), 24, seed=7)
        with open_tile_reader(path, spec, threads=1) as one, open_tile_reader(path, spec, threads=3) as many:
            np.testing.assert_array_equal(many.read_many(coords), one.read_many(coords))
            np.testing.assert_array_equal(many.read_many(coords[::-1]), one.read_many(coords[::-1]))
            np.testing.assert_array_equal(many.read_many(coords[:1]), one.read_many(coords[:1]))  # one tile
        big = ReadSpec(target_mpp, 1024, spec.slide_mpp)  # one output tile over many stored tiles (a TME region)
        with open_tile_reader(path, big, threads=1) as one, open_tile_reader(path, big, threads=3) as many:
            np.testing.assert_array_equal(many.read_many(coords[:1]), one.read_many(coords[:1]))
