"""open_slide over real slides (Aperio JPEG, TCGA JPEG 2000 without MPP, generic TIFF) and broken files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.errors import CorruptSlideError, MissingMPPError, SlideNotFoundError, UnsupportedFormatError
from wsi_pipeline.slide.open import open_slide


def test_aperio_mpp_and_levels(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as s:
        assert s.backend == "openslide"
        assert s.vendor == "aperio"
        assert s.mpp == pytest.approx(0.499)
        assert s.mpp_info.source == "metadata"
        assert s.objective_power == 20
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1


def test_generic_tiff_mpp_from_resolution_tags(generic_tiff: Path) -> None:
    with open_slide(generic_tiff) as s:
        assert s.vendor == "generic-tiff"
        assert s.mpp == pytest.approx(0.499, abs=1e-3)
        assert s.mpp_info.source == "tiff-tags"
        assert s.level_count == 4
        assert s.level_downsamples[:3] == pytest.approx((1.0, 2.0, 4.0), abs=0.01)


def test_tifffile_backend_matches_openslide(generic_tiff: Path) -> None:
    with open_slide(generic_tiff) as a, open_slide(generic_tiff, backend="tifffile") as b:
        assert b.mpp == pytest.approx(a.mpp, rel=1e-3)
        assert b.level_dimensions == a.level_dimensions
        for level in (0, 2):
            ra = a.read_region((600, 900), level, (128, 96)).astype(int)
            rb = b.read_region((600, 900), level, (128, 96)).astype(int)
            assert np.abs(ra - rb).mean() < 4.0  # JPEG decoder differences only
            assert np.abs(ra.mean((0, 1)) - rb.mean((0, 1))).max() < 1.0


def test_tcga_without_mpp_raises_and_fallback_works(tcga_svs: Path) -> None:
    with open_slide(tcga_svs) as s:
        assert s.mpp_or_none is None
        with pytest.raises(MissingMPPError) as exc:
            _ = s.mpp
    msg = str(exc.value)
    assert str(tcga_svs) in msg and "--slide-mpp" in msg
    with open_slide(tcga_svs, mpp_fallback=0.25) as s:
        assert s.mpp == 0.25
        assert s.level_count == 2
        assert s.level_mpp(1) == pytest.approx(0.5, rel=1e-3)


def test_fallback_does_not_override_file_mpp_but_force_does(cmu_svs: Path) -> None:
    with open_slide(cmu_svs, mpp_fallback=0.25) as s:
        assert s.mpp == pytest.approx(0.499)
    with open_slide(cmu_svs, mpp=0.3) as s:
        assert s.mpp == 0.3 and s.mpp_info.source == "override"


def test_objective_fallback_is_opt_in(small_svs_no_mpp: Path) -> None:
    with open_slide(small_svs_no_mpp) as s, pytest.raises(MissingMPPError, match="--mpp-from-objective"):
        _ = s.mpp
    with open_slide(small_svs_no_mpp, mpp_from_objective=True) as s:
        assert s.mpp == pytest.approx(0.5)
        assert s.mpp_info.source == "objective"


def test_read_region_at_mpp_picks_coarsest_sufficient_level(generic_tiff: Path) -> None:
    with open_slide(generic_tiff) as s:
        assert s.best_level_for_mpp(0.5) == 0
        assert s.best_level_for_mpp(1.0) == 1
        assert s.best_level_for_mpp(2.0) == 2
        assert s.best_level_for_mpp(0.25) == 0
        tile = s.read_region_at_mpp((400, 400), 1.0, 112)
        assert tile.shape == (112, 112, 3) and tile.dtype == np.uint8
        # same physical area read from level 0 and shrunk
        ref = s.read_region((400, 400), 0, (224, 224))
        from wsi_pipeline.slide.base import resize_rgb

        assert np.abs(resize_rgb(ref, (112, 112)).astype(int) - tile.astype(int)).mean() < 6


def test_outside_reads_white(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as s:
        r = s.read_region((5000, 5000), 0, (16, 16))
        assert (r == 255).all()


def test_missing_file() -> None:
    with pytest.raises(SlideNotFoundError, match="no such file"):
        open_slide("/nonexistent/slide.svs")


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.svs"
    p.write_bytes(b"")
    with pytest.raises(CorruptSlideError, match="empty file"):
        open_slide(p)


def test_truncated_file(tmp_path: Path, cmu_svs: Path) -> None:
    p = tmp_path / "trunc.svs"
    p.write_bytes(cmu_svs.read_bytes()[:1_000_000])
    with pytest.raises(CorruptSlideError) as exc:
        open_slide(p)
    assert str(p) in str(exc.value)


def test_non_slide_file(tmp_path: Path) -> None:
    p = tmp_path / "notes.svs"
    p.write_text("this is not a slide\n" * 100)
    with pytest.raises(CorruptSlideError, match="no reader recognises"):
        open_slide(p)
    q = tmp_path / "table.csv"
    q.write_text("a,b\n1,2\n")
    with pytest.raises(UnsupportedFormatError, match="unsupported file type"):
        open_slide(q)


def test_malformed_dicom(bad_dcm: Path) -> None:
    with pytest.raises(CorruptSlideError) as exc:
        open_slide(bad_dcm)
    msg = str(exc.value)  # the true cause from the header, OpenSlide's own words, and a fix
    assert str(bad_dcm) in msg and "image flavor" in msg
    assert "ImageType (0008,0008) is missing" in msg and "PYDICOM 2.1.2" in msg and "conformant DICOM WSI" in msg


def test_plain_png_image(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "qc_tiles" / "tcga-lung-rgb.png"
    p = tmp_path / "tile.png"
    shutil.copy(src, p)
    with open_slide(p, mpp_fallback=0.5) as s:
        assert s.backend == "pillow" and s.level_count == 1
        assert s.read_region((0, 0), 0, (32, 32)).shape == (32, 32, 3)


def test_ome_tiff(tmp_path: Path) -> None:
    import tifffile

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
    p = tmp_path / "x.ome.tif"
    with tifffile.TiffWriter(p, ome=True) as tw:
        tw.write(img, photometric="rgb", tile=(256, 256), subifds=1,
                 metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
        tw.write(img[::2, ::2], photometric="rgb", tile=(256, 256), subfiletype=1)
    with open_slide(p) as s:
        assert s.backend == "tifffile" and s.vendor == "ome-tiff"
        assert s.mpp == pytest.approx(0.25)
        assert s.level_count == 2
        assert s.slide_id == "x"
        np.testing.assert_array_equal(s.read_region((100, 50), 0, (20, 10)), img[50:60, 100:120])


def test_read_at_downsample_blockwise_matches_whole(cmu_svs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wsi_pipeline.slide.base as base

    with open_slide(cmu_svs) as s:
        whole, ds = s.read_at_downsample(8.0)
        monkeypatch.setattr(base, "READ_BLOCK_PX", 512)  # many blocks: bounded memory on pyramid-less slides
        blocks, ds2 = s.read_at_downsample(8.0)
    assert ds == ds2 and whole.shape == blocks.shape == (round(2967 / 8), round(2220 / 8), 3)
    assert np.abs(whole.astype(int) - blocks.astype(int)).mean() < 8  # block seams: sub-pixel shifts only
    assert np.abs(whole.mean((0, 1)) - blocks.mean((0, 1))).max() < 1
