"""Shared fixtures: real slides from ../shared/data and small generated slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from blob_images import blob_image as _blob_image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSI_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.fail(f"shared data not found at {SHARED}; set WSI_SHARED_DATA")
    return SHARED


@pytest.fixture(scope="session")
def cmu_svs(shared_data: Path) -> Path:
    return shared_data / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def tcga_svs(shared_data: Path) -> Path:
    return shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"


@pytest.fixture(scope="session")
def generic_tiff(shared_data: Path) -> Path:
    return shared_data / "slides" / "CMU-1-Small-Region_pyramid_generic.tiff"


@pytest.fixture(scope="session")
def bad_dcm(shared_data: Path) -> Path:
    return shared_data / "bad" / "TCGA-XK-AAJU_nonconformant_sm.dcm"


@pytest.fixture(scope="session")
def kather_dir(shared_data: Path) -> Path:
    return shared_data / "kather16"


@pytest.fixture(scope="session")
def small_svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2048×1536 Aperio-style pyramid at 0.5 MPP with one tissue blob in the centre (30% radii)."""
    from wsi_pipeline.synth.pyramid import array_painter, write_pyramid_tiff

    path = tmp_path_factory.mktemp("slides") / "blob.svs"
    write_pyramid_tiff(path, array_painter(_blob_image(2048, 1536)), (2048, 1536), mpp=0.5, downsamples=(1, 4, 16))
    return path


@pytest.fixture(scope="session")
def small_svs_no_mpp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wsi_pipeline.synth.pyramid import array_painter, write_pyramid_tiff

    path = tmp_path_factory.mktemp("slides") / "nompp.svs"
    write_pyramid_tiff(path, array_painter(_blob_image(1024, 768, 1)), (1024, 768), mpp=None, objective_power=20,
                       downsamples=(1, 4))
    return path


@pytest.fixture(scope="session")
def synth_cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated cohort (wsi_pipeline.synth): 5 H&E-like .svs slides (2400×2000 @ 0.5 MPP, levels
    1/4/16) of 4 patients in two arms, all three immune phenotypes, one on-treatment slide; labels.csv and
    truth/<slide_id>.npz class maps. Takes ~15 s of CPU the first time it is used in a session."""
    from wsi_pipeline.synth.cohort import CohortParams, WriteOptions, write_cohort

    out = tmp_path_factory.mktemp("synth_cohort")
    write_cohort(out, CohortParams(n_patients=4, seed=6, size_l0=(2400, 2000), two_arms=True,
                                   timepoint_fraction=0.3, multi_slide_fraction=0.0),
                 WriteOptions(workers=0, thumbnail_max=256))
    return out
