"""Evaluation metrics, vectorised over bootstrap resamples.

Every metric takes per-sample arrays (length n) and a weight matrix ``w`` of shape (B, n): row b holds how
many times each sample appears in resample b (``w = np.ones((1, n))`` is the plain estimate). It returns
an array of B values, computed for all resamples at once with numpy (no Python loop over resamples), so
1000 patient-level bootstrap resamples cost about as much as a handful of plain evaluations.

Conventions (the same as scikit-learn / lifelines, checked in tests/evaluate):

- AUROC: ties in scores count one half. Undefined (NaN) when a resample lacks one class.
- Macro one-vs-rest AUROC (multiclass): unweighted mean of per-class AUROCs (scikit-learn
  ``roc_auc_score(multi_class="ovr", average="macro")``).
- Balanced accuracy: mean recall over the classes present in the resample.
- Brier score: binary ``mean((p - y)^2)``; multiclass ``mean(sum_c (p_c - [y = c])^2)`` (Brier 1950).
- ECE (binary): expected calibration error over 10 equal-width bins of the predicted probability,
  ``Σ_b (n_b / n)·|observed rate_b − mean prediction_b|`` (Naeini et al. 2015); 0 for perfect calibration.
- Calibration (binary): logistic recalibration ``logit P(y=1) = a + b·logit(p)``; the slope is ``b``
  of that fit, the intercept is the calibration-in-the-large ``a`` of the fit with the slope fixed at 1
  (Van Calster et al., J Clin Epidemiol 2019). A perfectly calibrated model has slope 1, intercept 0.
- Spearman: Pearson correlation of average ranks within the resample (``scipy.stats.spearmanr``).
- Harrell's C-index (survival, higher risk = earlier event): pair (i, j) comparable when i had the event
  and ``t_i < t_j``, or ``t_i == t_j`` and j is censored (lifelines' convention); risk ties count one half.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-7


def _as_weights(w: np.ndarray | None, n: int) -> np.ndarray:
    if w is None:
        return np.ones((1, n))
    w = np.asarray(w, dtype=np.float64)
    return w.reshape(1, -1) if w.ndim == 1 else w


def _group_sorted(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order that sorts ``values``, start index of each tie group in that order, group id per sorted item."""
    order = np.argsort(values, kind="mergesort")
    sv = values[order]
    starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
    gid = np.cumsum(np.r_[True, sv[1:] != sv[:-1]]) - 1
    return order, starts, gid


# ---------------------------------------------------------------- classification
def auroc(y: np.ndarray, score: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Weighted AUROC for binary ``y`` (0/1) and scores; NaN where a resample has only one class."""
    y = np.asarray(y, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    w = _as_weights(w, len(y))
    order, starts, _ = _group_sorted(score)
    wpos = (w * y)[:, order]
    wneg = (w * (1.0 - y))[:, order]
    gpos = np.add.reduceat(wpos, starts, axis=1)
    gneg = np.add.reduceat(wneg, starts, axis=1)
    neg_below = np.cumsum(gneg, axis=1) - gneg
    num = (gpos * (neg_below + 0.5 * gneg)).sum(axis=1)
    den = gpos.sum(axis=1) * gneg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def macro_auroc_ovr(y: np.ndarray, probs: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Macro-averaged one-vs-rest AUROC; ``y`` holds class indices, ``probs`` is n×C."""
    y = np.asarray(y).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    per_class = np.stack([auroc((y == c).astype(float), probs[:, c], w) for c in range(probs.shape[1])], axis=1)
    # a class absent from a resample makes its OvR AUROC undefined, and the macro average with it (NaN)
    return per_class.mean(axis=1)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, n_classes: int, w: np.ndarray | None = None) -> np.ndarray:
    """Mean per-class recall over the classes present (scikit-learn ``balanced_accuracy_score``)."""
    y = np.asarray(y).astype(int)
    pred = np.asarray(pred).astype(int)
    w = _as_weights(w, len(y))
    recalls = []
    for c in range(n_classes):
        den = (w * (y == c)).sum(axis=1)
        num = (w * ((y == c) & (pred == c))).sum(axis=1)
        recalls.append(np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan))
    r = np.stack(recalls, axis=1)
    present = ~np.isnan(r)
    return np.where(present.any(axis=1), np.nansum(r, axis=1) / np.maximum(present.sum(axis=1), 1), np.nan)


def brier(y: np.ndarray, probs: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Brier score. Binary: ``probs`` is the positive-class probability (n); multiclass: n×C, ``y`` indices."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y)
    w = _as_weights(w, len(y))
    if probs.ndim == 1:
        err = (probs - y.astype(np.float64)) ** 2
    else:
        onehot = np.eye(probs.shape[1])[y.astype(int)]
        err = ((probs - onehot) ** 2).sum(axis=1)
    return (w * err).sum(axis=1) / w.sum(axis=1)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _loglik(y: np.ndarray, w: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Weighted Bernoulli log-likelihood of linear predictors ``z`` (B×n), per resample."""
    return (w * (y * z - np.logaddexp(0.0, z))).sum(1)


def calibration_slope_intercept(
    y: np.ndarray, prob: np.ndarray, w: np.ndarray | None = None, iters: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Logistic recalibration of a binary probability: (slope, calibration-in-the-large intercept).

    Vectorised over resamples. Slope: weighted Newton-Raphson for ``y ~ a + b·logit(p)`` from the
    intercept-only fit (b = 0), with step halving whenever the likelihood would drop (saturated
    probabilities make plain Newton overshoot without end). Intercept (slope fixed at 1, offset
    logit(p)): the root of its monotone score, by bisection. Slope: NaN for resamples that lack a class,
    are separated by logit(p) or do not converge; intercept: NaN for resamples that lack a class.
    """
    from scipy.special import expit

    y = np.asarray(y, dtype=np.float64)
    x = _logit(prob)
    w = _as_weights(w, len(y))
    npos = (w * y).sum(1)
    nneg = (w * (1 - y)).sum(1)
    no_class = (npos == 0) | (nneg == 0)
    # -- slope: two-parameter fit  y ~ a + b x
    a = _logit(np.where(no_class, 0.5, npos / np.maximum(npos + nneg, 1e-300)))
    b = np.zeros(w.shape[0])
    ll = _loglik(y, w, a[:, None] + b[:, None] * x)
    step = np.full(w.shape[0], np.inf)
    for _ in range(iters):
        mu = expit(a[:, None] + b[:, None] * x)
        r = w * (y - mu)
        v = w * mu * (1 - mu)
        g0, g1 = r.sum(1), (r * x).sum(1)
        h00, h01, h11 = v.sum(1), (v * x).sum(1), (v * x * x).sum(1)
        ridge = 1e-12 * (h00 + h11) + 1e-300
        det = (h00 + ridge) * (h11 + ridge) - h01**2
        ok = det > 0
        det = np.where(ok, det, 1.0)
        da = np.where(ok, ((h11 + ridge) * g0 - h01 * g1) / det, 0.0)
        db = np.where(ok, ((h00 + ridge) * g1 - h01 * g0) / det, 0.0)
        t = np.ones_like(a)
        for _ in range(40):  # halve the step where the likelihood would drop
            new_ll = _loglik(y, w, (a + t * da)[:, None] + (b + t * db)[:, None] * x)
            worse = ~(new_ll >= ll - 1e-12 * np.abs(ll))
            if not worse.any():
                break
            t = np.where(worse, t / 2, t)
        t = np.where(worse, 0.0, t)
        a, b, ll = a + t * da, b + t * db, np.where(worse, ll, new_ll)
        step = np.maximum(np.abs(t * da), np.abs(t * db))
        if np.nanmax(step) < 1e-10:
            break
    # -- intercept with the slope fixed at 1 (offset x): the score sum w (y - expit(c + x)) falls with c
    lo = np.full(w.shape[0], -2 * np.log(1 / _EPS) - 1)  # score > 0 here whenever there is a positive
    hi = -lo
    for _ in range(80):
        c = (lo + hi) / 2
        up = (w * (y - expit(c[:, None] + x))).sum(1) > 0
        lo, hi = np.where(up, c, lo), np.where(up, hi, c)
    c = (lo + hi) / 2
    # (quasi-)complete separation by logit(p): the slope's likelihood has no maximum
    seen = w > 0
    pos, neg = seen & (y[None, :] == 1), seen & (y[None, :] == 0)
    separated = (np.where(neg, x, -np.inf).max(1) <= np.where(pos, x, np.inf).min(1)) | \
        (np.where(pos, x, -np.inf).max(1) <= np.where(neg, x, np.inf).min(1))
    bad = no_class | separated | ~np.isfinite(b) | (np.abs(b) > 1e3) | (step > 1e-6)
    return np.where(bad, np.nan, b), np.where(no_class, np.nan, c)


ECE_BINS = 10


def _bin_onehot(prob: np.ndarray, n_bins: int) -> np.ndarray:
    p = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
    return np.eye(n_bins)[np.minimum((p * n_bins).astype(int), n_bins - 1)]


def ece(y: np.ndarray, prob: np.ndarray, w: np.ndarray | None = None, n_bins: int = ECE_BINS) -> np.ndarray:
    """Expected calibration error of a binary probability (equal-width bins), per resample."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(prob, dtype=np.float64)
    w = _as_weights(w, len(y))
    onehot = _bin_onehot(p, n_bins)
    gap = np.abs((w * y) @ onehot - (w * p) @ onehot).sum(1)
    return gap / w.sum(1)


def reliability_bins(y: np.ndarray, prob: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list]:
    """The points of a reliability diagram (the bins of :func:`ece`, empty bins left out): mean predicted
    probability, observed fraction positive and number of samples per bin."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(prob, dtype=np.float64)
    onehot = _bin_onehot(p, n_bins)
    n = onehot.sum(0)
    keep = n > 0
    return {"mean_prob": ((p @ onehot)[keep] / n[keep]).tolist(),
            "observed": ((y @ onehot)[keep] / n[keep]).tolist(), "n": n[keep].astype(int).tolist()}


# ---------------------------------------------------------------- regression
def _weighted_avg_ranks(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average (1-based) rank of every sample inside each weighted resample; B×n."""
    order, starts, gid = _group_sorted(np.asarray(values, dtype=np.float64))
    gw = np.add.reduceat(w[:, order], starts, axis=1)
    before = np.cumsum(gw, axis=1) - gw
    grank = before + (gw + 1.0) / 2.0
    ranks = np.empty_like(w)
    ranks[:, order] = grank[:, gid]
    return ranks


def _weighted_pearson(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    sw = w.sum(1, keepdims=True)
    ma = (w * a).sum(1, keepdims=True) / sw
    mb = (w * b).sum(1, keepdims=True) / sw
    cov = (w * (a - ma) * (b - mb)).sum(1)
    va = (w * (a - ma) ** 2).sum(1)
    vb = (w * (b - mb) ** 2).sum(1)
    den = np.sqrt(va * vb)
    return np.where(den > 1e-12, cov / np.where(den > 1e-12, den, 1.0), np.nan)


def spearman(y: np.ndarray, pred: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    w = _as_weights(w, len(y))
    return _weighted_pearson(_weighted_avg_ranks(y, w), _weighted_avg_ranks(pred, w), w)


def mae(y: np.ndarray, pred: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    w = _as_weights(w, len(y))
    return (w * np.abs(np.asarray(pred, dtype=np.float64) - y)).sum(1) / w.sum(1)


# ---------------------------------------------------------------- survival
def c_index(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, w: np.ndarray | None = None, chunk: int = 256
) -> np.ndarray:
    """Harrell's C-index of a risk score (higher = earlier event); weighted over resamples.

    O(B·n²) with a dense pair matrix, processed in chunks of resamples; fine for the few thousand
    patients of a cohort.
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    risk = np.asarray(risk, dtype=np.float64)
    w = _as_weights(w, len(time))
    comparable = event[:, None] & (
        (time[:, None] < time[None, :]) | ((time[:, None] == time[None, :]) & ~event[None, :])
    )
    concord = np.where(risk[:, None] > risk[None, :], 1.0, np.where(risk[:, None] == risk[None, :], 0.5, 0.0))
    cmat = comparable.astype(np.float64)
    kmat = cmat * concord
    out = np.empty(w.shape[0])
    for s in range(0, w.shape[0], chunk):
        wc = w[s : s + chunk]
        num = ((wc @ kmat) * wc).sum(1)
        den = ((wc @ cmat) * wc).sum(1)
        out[s : s + chunk] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out
