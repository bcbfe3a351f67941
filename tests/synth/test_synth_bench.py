"""The benchmark slide builder (at a small size): Aperio pyramid, MPP 0.25, tissue coverage, reuse."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.synth.bench import (
    BenchSlideParams,
    bench_slide_is_current,
    default_bench_path,
    make_bench_slide,
)

SMALL = BenchSlideParams(size=(5120, 3840), downsamples=(1, 4, 16), blob_sigma_cells=2.5)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bench_slide(tmp_path_factory.mktemp("bench") / "bench.svs", SMALL)


def test_bench_slide_is_an_aperio_pyramid_at_025_mpp(bench: Path) -> None:
    import openslide

    with openslide.OpenSlide(str(bench)) as s:
        assert s.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert s.dimensions == (5120, 3840)
        assert s.level_downsamples == pytest.approx((1, 4, 16))
        assert s.properties["openslide.level[0].tile-width"] == "256"
        low = np.asarray(s.read_region((0, 0), 2, s.level_dimensions[2]).convert("RGB")).astype(int)
    tissue = (low.max(axis=2) - low.min(axis=2)) > 20  # coloured, not grey glass
    assert 0.3 < tissue.mean() < 0.7


def test_bench_slide_is_reused_then_rebuilt_when_parameters_change(bench: Path) -> None:
    assert bench_slide_is_current(bench, SMALL)
    mtime = bench.stat().st_mtime_ns
    assert make_bench_slide(bench, SMALL) == bench
    assert bench.stat().st_mtime_ns == mtime  # reused
    other = replace(SMALL, seed=1)
    assert not bench_slide_is_current(bench, other)


def test_default_location_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WSI_BENCH_DIR", str(tmp_path))
    assert default_bench_path().parent == tmp_path
    assert default_bench_path().name == "bench_40000x30000_0.25mpp.svs"
    monkeypatch.delenv("WSI_BENCH_DIR")
    assert default_bench_path().parent == Path.home() / ".cache" / "wsi-pipeline" / "bench"
