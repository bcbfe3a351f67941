"""Overall survival of the synthetic cohorts: drawn from what the slide shows, with the true hazard recorded."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from wsi_pipeline.evaluate.metrics import c_index
from wsi_pipeline.synth.cohort import CohortParams, OutcomeModel, labels_frame, plan_cohort

OS_COLUMNS = ["os_months", "os_event", "os_true_log_hazard"]


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    """300 patients, one baseline slide each (patient = slide)."""
    return labels_frame(plan_cohort(CohortParams(n_patients=300, seed=5, size_l0=(2400, 2000),
                                                 multi_slide_fraction=0.0)))


def test_oracle_c_index_is_well_above_one_half(cohort: pd.DataFrame) -> None:
    """Harrell's C of the recorded true hazard on the observed, censored times: the best any model can do."""
    t, e, h = cohort.os_months.to_numpy(), cohort.os_event.to_numpy(), cohort.os_true_log_hazard.to_numpy()
    assert 0.3 < e.mean() < 0.9  # censoring happens, but most patients have an event
    oracle = float(c_index(t, e, h)[0])
    assert oracle >= 0.70, oracle
    shuffled = float(c_index(t, e, np.random.default_rng(0).permutation(h))[0])
    assert abs(shuffled - 0.5) < 0.06, shuffled  # a hazard unrelated to these patients is at chance


def test_true_hazard_is_the_documented_function_of_the_image(cohort: pd.DataFrame) -> None:
    om = OutcomeModel()
    for _, r in cohort.iterrows():
        h = om.os_log_hazard(r.til_fraction, r.tumour_fraction, r.immune_phenotype, r.response, r.stage)
        assert r.os_true_log_hazard == pytest.approx(h, abs=0.01)  # labels carry 4-decimal fractions
    # not visible in the image, so not in the hazard by default
    assert om.response_log_hr == 0.0 and om.stage_log_hr == 0.0
    assert om.os_log_hazard(0.08, 0.3, "inflamed") < om.os_log_hazard(0.08, 0.3, "excluded") \
        < om.os_log_hazard(0.08, 0.3, "desert")
    assert om.os_log_hazard(0.12, 0.3, "excluded") < om.os_log_hazard(0.04, 0.3, "excluded")  # TILs protect
    assert om.os_log_hazard(0.08, 0.4, "excluded") > om.os_log_hazard(0.08, 0.2, "excluded")  # tumour burden


def test_survival_follows_phenotype_til_and_tumour(cohort: pd.DataFrame) -> None:
    """A Cox model fitted on the generated times recovers the generator's coefficients."""
    from lifelines import CoxPHFitter

    om = OutcomeModel()
    x = pd.DataFrame({
        "inflamed": (cohort.immune_phenotype == "inflamed").astype(float),
        "desert": (cohort.immune_phenotype == "desert").astype(float),
        "til_z": (cohort.til_fraction - om.til_ref) / om.til_scale,
        "tumour_z": (cohort.tumour_fraction - om.tumour_ref) / om.tumour_scale,
        "t": cohort.os_months, "e": cohort.os_event,
    })
    beta = CoxPHFitter().fit(x, "t", "e").params_
    assert beta["inflamed"] == pytest.approx(om.os_inflamed_log_hr, abs=0.45)
    assert beta["desert"] == pytest.approx(om.os_desert_log_hr, abs=0.6)
    assert beta["tumour_z"] == pytest.approx(om.os_tumour_log_hr, abs=0.2)
    assert beta["til_z"] < 0.1
    median = cohort.groupby("immune_phenotype").os_months.median()
    assert median["inflamed"] > median["excluded"] > median["desert"]


def test_survival_draws_leave_every_other_label_unchanged() -> None:
    """Survival coefficients change the survival columns only: images, response, arms are the same draws."""
    params = CohortParams(n_patients=12, seed=3, size_l0=(2000, 1600), two_arms=True, timepoint_fraction=0.5)
    a = labels_frame(plan_cohort(params))
    flat = replace(params, outcome=replace(params.outcome, os_inflamed_log_hr=0.0, os_desert_log_hr=0.0,
                                           os_til_log_hr=0.0, os_tumour_log_hr=0.0))
    b = labels_frame(plan_cohort(flat))
    pd.testing.assert_frame_equal(a.drop(columns=OS_COLUMNS), b.drop(columns=OS_COLUMNS))
    assert (b.os_true_log_hazard == 0).all() and not (a.os_true_log_hazard == 0).all()
    pd.testing.assert_frame_equal(a, labels_frame(plan_cohort(params)))  # deterministic
    # survival is a patient label: the same on every slide of a patient (on-treatment slides included)
    assert (a.groupby("patient_id")[OS_COLUMNS].nunique() == 1).all().all()
