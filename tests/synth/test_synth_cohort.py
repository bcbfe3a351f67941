"""Synthetic cohorts: slides OpenSlide opens with the right MPP and levels, labels from the documented model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_pipeline.synth.cohort import LABEL_COLUMNS, CohortParams, OutcomeModel, labels_frame, plan_cohort

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    cmd = [sys.executable, str(REPO / "scripts" / "make_synthetic_slides.py"), "--out", str(out), "--n", "2",
           "--seed", "3", "--size", "1200", "1000", "--two-arms", "--timepoints"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    return out


def test_script_writes_slides_labels_and_truth(cohort_dir: Path) -> None:
    labels = pd.read_csv(cohort_dir / "labels.csv")
    assert list(labels.columns[: len(LABEL_COLUMNS)]) == list(LABEL_COLUMNS)
    assert len(labels) >= 4  # two patients, each with baseline + on_treatment
    assert set(labels.timepoint) == {"baseline", "on_treatment"}
    for sid in labels.slide_id:
        assert (cohort_dir / f"{sid}.svs").is_file()
        truth = np.load(cohort_dir / "truth" / f"{sid}.npz")
        row = labels.set_index("slide_id").loc[sid]
        assert float(truth["til_fraction"]) == pytest.approx(row.til_fraction, abs=1e-4)
        assert str(truth["immune_phenotype"]) == row.immune_phenotype
    assert not list(cohort_dir.glob(".*.tmp"))


def test_slides_open_in_openslide_with_mpp_and_levels(cohort_dir: Path) -> None:
    import openslide

    for path in sorted(cohort_dir.glob("*.svs")):
        with openslide.OpenSlide(str(path)) as s:
            assert s.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
            assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
            assert s.dimensions == (1200, 1000)
            assert s.level_count == 3
            assert s.level_downsamples == pytest.approx((1, 4, 16), rel=0.02)
            region = np.asarray(s.read_region((0, 0), 2, s.level_dimensions[2]).convert("RGB"))
            assert region[0, 0].min() > 225  # glass frame
            assert region.mean() < 235  # and some tissue


def test_cohort_plan_is_deterministic_and_complete() -> None:
    params = CohortParams(n_patients=8, seed=11, size_l0=(2400, 2000), two_arms=True, timepoint_fraction=0.5,
                          multi_slide_fraction=0.5)
    a, b = labels_frame(plan_cohort(params)), labels_frame(plan_cohort(params))
    pd.testing.assert_frame_equal(a, b)
    assert a.slide_id.is_unique
    assert a.patient_id.nunique() == 8
    assert set(a.arm) <= {"control", "treatment"} and set(a.response) <= {0, 1}
    assert set(a.immune_phenotype) <= {"inflamed", "excluded", "desert"}
    assert (a.os_months > 0).all() and set(a.os_event) <= {0, 1}
    # patient-level labels are shared by all slides of a patient
    assert (a.groupby("patient_id")[["response", "arm", "age", "stage", "os_months"]].nunique() == 1).all().all()
    assert (a.groupby("patient_id").size() > 1).any()


def test_response_model_is_image_driven_and_predictive() -> None:
    om = OutcomeModel()
    lo, hi = om.response_logit(0.02, "excluded", True, 63, 2), om.response_logit(0.12, "excluded", True, 63, 2)
    assert hi > lo  # more TILs → more response
    assert (om.response_logit(0.06, "inflamed", True, 63, 2) > om.response_logit(0.06, "excluded", True, 63, 2)
            > om.response_logit(0.06, "desert", True, 63, 2))
    # the image matters more in the treatment arm: a treatment × biomarker interaction
    gain_t = om.response_logit(0.12, "inflamed", True, 63, 2) - om.response_logit(0.01, "desert", True, 63, 2)
    gain_c = om.response_logit(0.12, "inflamed", False, 63, 2) - om.response_logit(0.01, "desert", False, 63, 2)
    assert gain_t > 2 * gain_c > 0


def test_cohort_response_depends_on_the_image_with_noise() -> None:
    from sklearn.metrics import roc_auc_score

    df = labels_frame(plan_cohort(CohortParams(n_patients=80, seed=2, size_l0=(2400, 2000),
                                               multi_slide_fraction=0.0)))
    auc = roc_auc_score(df.response, df.response_prob)
    assert 0.7 < auc < 0.99  # informative, but never perfect
    assert df.groupby("immune_phenotype").response.mean()["desert"] < df.response.mean()


def test_shared_fixture_cohort_has_every_phenotype_and_both_arms(synth_cohort_dir: Path) -> None:
    labels = pd.read_csv(synth_cohort_dir / "labels.csv")
    assert set(labels.immune_phenotype) == {"inflamed", "excluded", "desert"}
    assert set(labels.arm) == {"control", "treatment"}
    assert "on_treatment" in set(labels.timepoint)
    assert sorted(p.stem for p in synth_cohort_dir.glob("*.svs")) == sorted(labels.slide_id)
