"""Metrics agree with scikit-learn / scipy / lifelines / statsmodels on fixed inputs; bootstrap CIs behave."""

from __future__ import annotations

import time

import numpy as np
import pytest

from wsi_pipeline.evaluate import metrics as M
from wsi_pipeline.evaluate.bootstrap import (
    Truth,
    bootstrap_metrics,
    bootstrap_weights,
    paired_difference,
)


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(42)


def _resample(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    idx = rng.integers(0, n, n)
    return idx, np.bincount(idx, minlength=n).astype(float)


def test_auroc_matches_sklearn_with_ties_and_resamples(rng):
    from sklearn.metrics import roc_auc_score

    y = rng.integers(0, 2, 80)
    s = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounding makes ties
    assert M.auroc(y, s)[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    for _ in range(5):
        idx, w = _resample(len(y), rng)
        assert M.auroc(y, s, w)[0] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)
    assert np.isnan(M.auroc(np.ones(5), np.arange(5.0))[0])


def test_macro_auroc_balanced_accuracy_brier_match_sklearn(rng):
    from sklearn.metrics import balanced_accuracy_score, brier_score_loss, roc_auc_score

    n, c = 90, 3
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    idx, w = _resample(n, rng)
    assert M.macro_auroc_ovr(y, p)[0] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert M.macro_auroc_ovr(y, p, w)[0] == pytest.approx(
        roc_auc_score(y[idx], p[idx], multi_class="ovr", average="macro")
    )
    pred = p.argmax(1)
    assert M.balanced_accuracy(y, pred, c)[0] == pytest.approx(balanced_accuracy_score(y, pred))
    assert M.balanced_accuracy(y, pred, c, w)[0] == pytest.approx(balanced_accuracy_score(y[idx], pred[idx]))
    yb = (y == 0).astype(int)
    assert M.brier(yb, p[:, 0])[0] == pytest.approx(brier_score_loss(yb, p[:, 0]))
    assert M.brier(yb, p[:, 0], w)[0] == pytest.approx(brier_score_loss(yb[idx], p[idx, 0]))
    onehot = np.eye(c)[y]
    assert M.brier(y, p)[0] == pytest.approx(((p - onehot) ** 2).sum(1).mean())


def test_calibration_matches_statsmodels(rng):
    import statsmodels.api as sm

    n = 300
    x = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.3 + 0.7 * x)))).astype(int)
    prob = 1 / (1 + np.exp(-x))
    slope, intercept = M.calibration_slope_intercept(y, prob)
    fit = sm.GLM(y, sm.add_constant(x), family=sm.families.Binomial()).fit()
    assert slope[0] == pytest.approx(fit.params[1], rel=1e-6)
    fit_off = sm.GLM(y, np.ones((n, 1)), family=sm.families.Binomial(), offset=x).fit()
    assert intercept[0] == pytest.approx(fit_off.params[0], rel=1e-6, abs=1e-9)
    idx, w = _resample(n, rng)
    s_w, _ = M.calibration_slope_intercept(y, prob, w)
    fit_w = sm.GLM(y[idx], sm.add_constant(x[idx]), family=sm.families.Binomial()).fit()
    assert s_w[0] == pytest.approx(fit_w.params[1], rel=1e-6)



def test_calibration_with_saturated_probabilities():
    """Near-0/1 probabilities (an over-confident model): plain Newton diverged here (intercepts of ±1e11)."""
    import statsmodels.api as sm
    from scipy.special import expit

    g = np.random.default_rng(0)
    y = g.integers(0, 2, 60)
    prob = np.where(g.random(60) < 0.8, y, 1 - y).astype(float)  # 0/1 "probabilities", 20% wrong
    slope, intercept = M.calibration_slope_intercept(y, prob)
    x = M._logit(prob)
    fit = sm.GLM(y, sm.add_constant(x), family=sm.families.Binomial()).fit()
    assert slope[0] == pytest.approx(fit.params[1], rel=1e-6)
    assert np.isfinite(intercept[0]) and abs(intercept[0]) < 40
    assert (y - expit(intercept[0] + x)).sum() == pytest.approx(0, abs=1e-6)  # the intercept's score equation
    sep = (prob > 0.5).astype(int)  # perfectly separated: no slope estimate
    assert np.isnan(M.calibration_slope_intercept(sep, np.clip(prob, 0.1, 0.9))[0][0])

def test_spearman_mae_match_scipy(rng):
    from scipy.stats import spearmanr

    n = 70
    y = np.round(rng.normal(size=n), 1)
    p = np.round(y + rng.normal(size=n), 1)
    assert M.spearman(y, p)[0] == pytest.approx(spearmanr(y, p).statistic, abs=1e-12)
    for _ in range(3):
        idx, w = _resample(n, rng)
        assert M.spearman(y, p, w)[0] == pytest.approx(spearmanr(y[idx], p[idx]).statistic, abs=1e-12)
        assert M.mae(y, p, w)[0] == pytest.approx(np.abs(y[idx] - p[idx]).mean())


def test_c_index_matches_lifelines_with_ties(rng):
    from lifelines.utils import concordance_index

    n = 60
    t = rng.integers(1, 20, n).astype(float)  # tied times
    e = rng.integers(0, 2, n)
    risk = np.round(rng.normal(-0.1 * t, 1.0), 1)  # tied risks
    assert M.c_index(t, e, risk)[0] == pytest.approx(concordance_index(t, -risk, e), abs=1e-12)
    idx, w = _resample(n, rng)
    assert M.c_index(t, e, risk, w)[0] == pytest.approx(concordance_index(t[idx], -risk[idx], e[idx]), abs=1e-12)


def test_bootstrap_ci_covers_point_estimate_and_is_fast(rng):
    n = 400
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-rng.normal(1.2 * (2 * y - 1), 1.5)))
    w = bootstrap_weights(n, 1000, seed=0)
    assert w.shape == (1000, n) and np.all(w.sum(1) == n)
    t0 = time.perf_counter()
    res = bootstrap_metrics(Truth("binary", y.astype(float)), p, w)
    assert time.perf_counter() - t0 < 10
    for name, m in res.items():
        assert m.ci_low <= m.estimate <= m.ci_high, name
        assert m.n_valid >= 990, name
    # width agrees with the Hanley–McNeil standard error of the AUROC (within 25%)
    a, n1, n0 = res["auroc"].estimate, y.sum(), n - y.sum()
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = np.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0))
    assert res["auroc"].ci_high - res["auroc"].ci_low == pytest.approx(2 * 1.96 * se, rel=0.25)

    yt = rng.normal(size=n)
    reg = bootstrap_metrics(Truth("regression", yt), yt + rng.normal(size=n), w)
    assert reg["spearman"].ci_low <= reg["spearman"].estimate <= reg["spearman"].ci_high
    t = rng.exponential(10, n)
    ev = rng.integers(0, 2, n)
    surv = bootstrap_metrics(Truth("survival", t, event=ev), -t + rng.normal(0, 5, n), w[:200])
    assert surv["c_index"].ci_low <= surv["c_index"].estimate <= surv["c_index"].ci_high


def test_paired_difference_uses_same_resamples(rng):
    n = 200
    y = rng.integers(0, 2, n).astype(float)
    good = y + rng.normal(0, 0.8, n)
    bad = y + rng.normal(0, 3.0, n)
    w = bootstrap_weights(n, 1000, seed=1)
    d = paired_difference(Truth("binary", y), good, bad, "auroc", w)
    assert d.ci_low > 0  # the better model is significantly better
    same = paired_difference(Truth("binary", y), good, good, "auroc", w)
    assert same.estimate == 0 and same.ci_low == 0 and same.ci_high == 0
