"""The interaction test on simulated trials (power and false-positive rate), and the effect summaries."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from wsi_pipeline.analysis.predictive import analyse_cohort
from wsi_pipeline.analysis.simulate import TrialEffects, simulate_binary_trial, simulate_survival_trial
from wsi_pipeline.analysis.stats import (
    INTERACTION,
    binary_effect,
    compare_groups,
    fit_interaction,
    survival_effect,
)
from wsi_pipeline.errors import LabelsError


def test_strong_logistic_interaction_is_detected() -> None:
    data = simulate_binary_trial(200, TrialEffects(b_int=1.5), np.random.default_rng(7))
    fit = fit_interaction(data, "logistic")
    assert fit.interaction.term == INTERACTION
    assert fit.interaction.p < 0.01
    assert fit.interaction.ci_low > 1.0  # benefit grows with the biomarker
    assert fit.interaction.ci_low < math.exp(1.5) < fit.interaction.ci_high
    assert fit.n == 200 and fit.n_events == int(data["outcome"].sum())


def test_strong_cox_interaction_is_detected() -> None:
    data = simulate_survival_trial(200, TrialEffects(b_int=-0.9), np.random.default_rng(8))
    fit = fit_interaction(data, "cox")
    assert fit.interaction.p < 0.01
    assert fit.interaction.ci_high < 1.0  # hazard falls with the biomarker in the treated arm
    assert fit.interaction.ci_low < math.exp(-0.9) < fit.interaction.ci_high


def test_null_false_positive_rate_is_near_alpha() -> None:
    """100 cohorts without interaction (treatment effect + prognostic biomarker): FPR at 0.05 in a loose
    band (binomial sd at 100 cohorts is 0.022; scripts/sim_predictive.py does >= 1000)."""
    rng = np.random.default_rng(11)
    null = TrialEffects(b_arm=0.5, b_bm=0.8)
    ps = np.array([analyse_cohort(simulate_binary_trial(200, null, rng), "logistic", overall=False)
                   .fit.interaction.p for _ in range(100)])
    assert 0.0 < np.mean(ps < 0.05) <= 0.11
    assert 0.35 < np.median(ps) < 0.65  # roughly uniform p-values under the null


def test_covariates_with_awkward_names_and_categories() -> None:
    rng = np.random.default_rng(3)
    data = simulate_binary_trial(150, TrialEffects(b_int=1.0), rng)
    data["age (years)"] = rng.normal(60, 10, len(data))
    data["stage"] = rng.choice(["I", "II", "III"], len(data))
    fit = fit_interaction(data, "logistic", ["age (years)", "stage"])
    names = {t.term for t in fit.terms}
    assert {"arm", "biomarker", INTERACTION, "age (years)"} <= names
    assert any(n.startswith("stage[") for n in names)
    assert "age (years)" in fit.formula


def test_one_arm_only_is_a_clear_error() -> None:
    data = simulate_binary_trial(50, TrialEffects(), np.random.default_rng(0))
    data["arm"] = 1.0
    with pytest.raises(LabelsError, match="two arms"):
        fit_interaction(data, "logistic")


def test_binary_effect_on_a_known_table() -> None:
    # treated: 12/20 responders, control: 5/20
    arm = np.r_[np.ones(20), np.zeros(20)]
    y = np.r_[np.ones(12), np.zeros(8), np.ones(5), np.zeros(15)]
    g = binary_effect("all", arm, y)
    assert (g.n_treated, g.events_treated, g.n_control, g.events_control) == (20, 12, 20, 5)
    assert g.rate_treated == pytest.approx(0.6) and g.rate_control == pytest.approx(0.25)
    assert g.risk_difference == pytest.approx(0.35)
    assert g.effect == pytest.approx((12 * 15) / (8 * 5))
    assert g.rate_treated_ci_low < 0.6 < g.rate_treated_ci_high
    assert g.risk_difference_ci_low < 0.35 < g.risk_difference_ci_high
    assert g.effect_ci_low < g.effect < g.effect_ci_high
    from scipy.stats import fisher_exact

    assert g.effect_p == pytest.approx(fisher_exact([[12, 8], [5, 15]])[1])  # 0.054


def test_survival_effect_reports_hr_and_logrank() -> None:
    data = simulate_survival_trial(300, TrialEffects(b_arm=-0.8), np.random.default_rng(5))
    g = survival_effect("all", data["arm"], data["time"], data["event"])
    assert g.effect_ci_low < math.exp(-0.8) < g.effect_ci_high
    assert g.logrank_p < 0.05 and g.median_treated > g.median_control


def test_compare_groups_cliffs_delta() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(0.8, 1, 25), rng.normal(0, 1, 30)
    res = compare_groups(x, y, n_boot=500, seed=0)
    brute = np.mean(np.sign(x[:, None] - y[None, :]))
    assert res.cliffs_delta == pytest.approx(brute)
    assert res.ci_low < res.cliffs_delta < res.ci_high
    assert res.p < 0.05 and res.n_x == 25 and res.n_y == 30


def test_analyse_cohort_subgroups() -> None:
    data = simulate_binary_trial(200, TrialEffects(b_int=1.5), np.random.default_rng(4))
    high = (data["biomarker"] > 0).to_numpy()
    res = analyse_cohort(data, "logistic", subgroups=[("low", ~high), ("high", high)])
    assert [g.group for g in res.effects] == ["low", "high", "all patients"]
    low_g, high_g = res.subgroups
    assert high_g.risk_difference > low_g.risk_difference  # the drug helps the biomarker-high patients
    assert low_g.n + high_g.n == 200
    assert isinstance(pd.DataFrame([g.to_dict() for g in res.effects]), pd.DataFrame)
