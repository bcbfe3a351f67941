"""Post-hoc calibration of classification outputs, fitted on out-of-fold (OOF) predictions.

A MIL head trained with early stopping on a small cohort gives probabilities that rank well but are
shrunk and biased (held-out kather mosaics, before this module: slides whose true response probability is
0.85 got 0.68 on average). ``wsi train`` therefore fits a calibrator per classification target on the
slide-level OOF probabilities of every model variant and records it in the model card; the fold ensemble
(:class:`~wsi_pipeline.mil.ensemble.Ensemble`, i.e. ``wsi predict``) applies it to the slide probabilities
and to the per-tile scores, so ``t_prob`` columns mean what they say.

Methods (one registry: :func:`register_calibrator`, :func:`create_calibrator`, :func:`list_calibrators`):

- ``platt`` (binary): ``p' = σ(a + b·logit p)``, maximum likelihood with Platt's (1999) smoothed targets
  ``(N₊+1)/(N₊+2)`` and ``1/(N₋+2)``, so perfectly separated OOF scores still give finite parameters;
  ``b ≥ 0`` (a fit with b < 0, OOF scores ranking the wrong way, falls back to the base rate: calibration
  never inverts the model's ranking).
  It fixes both the spread (slope) and the calibration-in-the-large (intercept): the binary default.
- ``temperature``: ``p' = softmax(log p / T)`` (binary: ``σ(logit p / T)``), T minimising the negative
  log-likelihood of smoothed targets (T ∈ [0.05, 20]). Keeps the arg-max: the multiclass default. For a
  binary target it cannot move the intercept (measured at 1.2–1.9 before calibration), which is why Platt
  is the binary default.
- ``isotonic`` (option): pool-adjacent-violators, a non-decreasing function of p interpolated linearly
  between its blocks (multiclass: one-vs-rest, then renormalised). Flexible; needs more patients.
- ``stacked`` (binary target of a multi-target model): ``p' = σ(a + b·logit p + Σ wⱼ·xⱼ)``, where x holds the
  same fold model's outputs for the model's *other* targets, each standardised by that fold model's OOF
  statistics (:class:`ContextFeature`): binary the standardised logit; multiclass the row-centred
  log-probabilities over the member's scale, last class dropped; regression and survival the prediction
  z-scored by the member's OOF mean and standard deviation. An L2-penalised logistic regression (sklearn,
  ``C`` = :data:`STACKED_C` = 1 on every coefficient, the intercept free) on Platt's smoothed targets;
  ``b < 0`` falls back to Platt (``w = 0``; calibration never inverts the model's ranking). On small
  cohorts the other heads can read the response's drivers (phenotype, TIL) better than the response head
  does. Held out (``scripts/eval_calibration.py``, MAE against the generator's true P(response)): synthetic
  cohort, abmil 0.117 (platt) → 0.093 (stacked); kather16 mosaics from unseen source images, abmil 0.165 →
  0.212, because the TIL head reads those sources low and stacked leans on it. Opt-in, therefore. The
  recorded calibrator holds the feature layout
  (``context``: per target its kind, columns and per-fold centre/scale), so prediction rebuilds the features
  exactly; it is not available in federated training (the server never sees the other targets' outputs).
- ``none``: identity.

``auto`` (the default of ``--calibration``) resolves per target kind: binary → platt, multiclass →
temperature; for a binary target of a model with other targets, :func:`calibrate_target` also fits stacked
and records both cross-fitted OOF log losses as the calibrator's ``selection`` (:data:`AUTO_RULE`), so a user
can see whether ``--calibration stacked`` would fit their cohort better out of fold. ``platt`` or ``stacked`` asked for a
multiclass target means temperature scaling. One registry serves all methods: ``fit`` and ``__call__`` take
an optional ``context`` (n×m features) that only methods with ``uses_context`` (stacked) read.

Fold models first, then the ensemble (:class:`TargetCalibrator`). Every OOF prediction comes from one fold
model, and fold models stopped early at different epochs differ a lot in scale (the standard deviation of
their OOF logits ranged 1.4–5.2 between the five abmil fold models on the kather mosaics), so one calibrator
fitted on the pooled OOF predictions and applied to the ensemble average fits neither: measured on held-out
mosaics it left the ensemble under-confident (slope 2.3) and made the cross-fitted OOF Brier score worse.
So each fold model's scores are first standardised by its own OOF predictions (binary: the logit's mean
and standard deviation over its OOF slides; multiclass: the spread of its row-centred log-probabilities) —
label-free, recorded per fold — one calibrator is fitted on the pooled standardised OOF scores, and the
ensemble averages its fold models' *calibrated* probabilities (and per-tile scores), each model calibrated
exactly as its OOF predictions were.

Honest evaluation (:func:`cross_fit`): a calibrator fitted on the OOF predictions and scored on the same
predictions is in-sample. The "after" OOF figures use cross-fitted calibrators: the OOF predictions of fold
k are recalibrated by a calibrator fitted on the OOF predictions of the other folds only. The calibrator
recorded in the model is fitted on all OOF predictions.

Recorded form (in ``model.json``, see :mod:`wsi_pipeline.formats.cards`):
``{"method": name, "multiclass": bool, "params": {...}, "members": {"center": [per fold], "scale": [...]}}``,
stacked adding ``"context": [{"target", "kind", "columns", "center": [per fold], "scale": [per fold]}, ...]``
(its params ``a``, ``b``, ``w`` (one weight per context column, in order), ``C``), and ``auto``'s record
``"selection": {"rule", "log_loss": {"platt", "stacked"}, "chosen"}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wsi_pipeline.errors import ConfigError, FormatError
from wsi_pipeline.mil.targets import BINARY, MULTICLASS, TargetSpec

log = logging.getLogger(__name__)

AUTO = "auto"
NONE = "none"
STACKED = "stacked"
STACKED_C = 1.0  # inverse L2 strength of the stacked calibrator (sklearn's C), on per-member standardised features
_EPS = 1e-6
T_RANGE = (0.05, 20.0)
Search = Generator[list[Any], list[Any], Any]  # yields candidate lists, is sent their evaluations

_CALIBRATORS: dict[str, type[Calibrator]] = {}  # the registry of calibration methods


def register_calibrator(name: str) -> Callable[[type[Calibrator]], type[Calibrator]]:
    def deco(cls: type[Calibrator]) -> type[Calibrator]:
        if name in _CALIBRATORS and _CALIBRATORS[name] is not cls:
            raise ValueError(f"calibrator {name!r} is already registered")
        _CALIBRATORS[name] = cls
        cls.method = name
        return cls

    return deco


def list_calibrators() -> list[str]:
    return sorted(_CALIBRATORS)


def calibration_choices() -> list[str]:
    """What ``--calibration`` accepts."""
    return [AUTO, *list_calibrators()]


def create_calibrator(method: str, multiclass: bool = False, params: Mapping[str, Any] | None = None) -> Calibrator:
    if method not in _CALIBRATORS:
        raise ConfigError(f"unknown calibration method {method!r}; available: {', '.join(list_calibrators())}")
    return _CALIBRATORS[method](multiclass, params)


def resolve_method(requested: str, spec: TargetSpec) -> str:
    """The method used for one target: ``auto`` → platt (binary) / temperature (multiclass); Platt scaling
    (and stacked) of a multiclass target is temperature scaling."""
    if requested not in calibration_choices():
        raise ConfigError(f"--calibration {requested!r}: unknown; use one of {', '.join(calibration_choices())}")
    if requested == AUTO:
        return "platt" if spec.kind == BINARY else "temperature"
    if requested in ("platt", STACKED) and spec.kind == MULTICLASS:
        return "temperature"
    return requested


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Calibrator:
    """A fitted map from raw to calibrated probabilities. Binary (``multiclass=False``): arrays of
    P(positive) of any shape; multiclass: arrays whose last axis holds the C class probabilities."""

    method = ""
    uses_context = False  # True: fit and call need the other targets' features (``context``)

    def __init__(self, multiclass: bool = False, params: Mapping[str, Any] | None = None) -> None:
        self.multiclass = bool(multiclass)
        self.params: dict[str, Any] = dict(params or {})

    def fit(self, prob: np.ndarray, y: np.ndarray, context: np.ndarray | None = None) -> Calibrator:
        """Fit on raw probabilities (n, or n×C) and labels (0/1, or class indices); ``context`` (n×m): the
        features of the other targets, read by the methods with ``uses_context`` only."""
        raise NotImplementedError

    def __call__(self, prob: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "multiclass": self.multiclass, "params": dict(self.params)}


def calibrator_from_dict(d: Mapping[str, Any], where: str = "model.json") -> TargetCalibrator:
    try:
        inner = create_calibrator(str(d["method"]), bool(d.get("multiclass", False)), d.get("params") or {})
        members = d.get("members") or {}
        return TargetCalibrator(inner, [float(c) for c in members.get("center", [])],
                                [float(c) for c in members.get("scale", [])],
                                [ContextFeature.from_dict(c) for c in d.get("context") or []], d.get("selection"))
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise FormatError(where, f"unreadable calibrator {dict(d)!r} ({e}); re-run `wsi train`") from e


@register_calibrator(NONE)
class Identity(Calibrator):
    def fit(self, prob: np.ndarray, y: np.ndarray, context: np.ndarray | None = None) -> Calibrator:
        return self

    def __call__(self, prob: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        return np.asarray(prob, dtype=np.float64)


@register_calibrator("platt")
class Platt(Calibrator):
    """``σ(a + b·logit p)`` (binary)."""

    def fit(self, prob: np.ndarray, y: np.ndarray, context: np.ndarray | None = None) -> Calibrator:
        if self.multiclass:
            raise ConfigError("Platt scaling is for binary targets; use temperature for a multiclass target")
        y = np.asarray(y).astype(int)
        t = platt_targets(y)
        a, b = fit_platt(lambda cands: [platt_terms(prob, t, a, b) for a, b in cands],
                         platt_start(int((y == 1).sum()), int((y == 0).sum())))
        self.params = {"a": float(a), "b": float(b)}
        return self

    def __call__(self, prob: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        return _sigmoid(self.params["a"] + self.params["b"] * _logit(prob))


@register_calibrator("temperature")
class Temperature(Calibrator):
    """``softmax(log p / T)``; binary ``σ(logit p / T)``."""

    def fit(self, prob: np.ndarray, y: np.ndarray, context: np.ndarray | None = None) -> Calibrator:
        z, y = temperature_logits(prob, self.multiclass), np.asarray(y).astype(int)
        target = temperature_targets(y, z.shape[1])
        log_t = fit_temperature(lambda xs: [temperature_nll(z, target, x) for x in xs])
        self.params = {"temperature": float(np.exp(log_t))}
        return self

    def __call__(self, prob: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        p = _softmax(temperature_logits(prob, self.multiclass) / self.params["temperature"])
        return p if self.multiclass else p[..., 1]


# ---------------------------------------------------------------- the fits as objectives + optimisers
# Each optimiser asks an ``evaluate`` callback for the objective at a list of candidate parameters at once.
# Above, the callback sums over the rows in memory; federated (wsi_pipeline.federated) every site sums over
# its own rows and the server adds the sites' sums, so a federated fit follows the same iterates as this one
# on the pooled rows. The smoothed targets use the counts of all rows (federated: summed over sites).
PLATT_STEPS = tuple(2.0**-k for k in range(28))  # step halving down to < 1e-8 (the last step is always taken)


def platt_targets(y: np.ndarray, n_pos: int | None = None, n_neg: int | None = None) -> np.ndarray:
    """Platt's smoothed targets ``(N₊+1)/(N₊+2)`` and ``1/(N₋+2)`` (counts of every row fitted on)."""
    y = np.asarray(y).astype(int)
    n_pos = int((y == 1).sum()) if n_pos is None else n_pos
    n_neg = int((y == 0).sum()) if n_neg is None else n_neg
    return np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))


def platt_start(n_pos: int, n_neg: int) -> float:
    """The intercept of the intercept-only fit (``b = 0``): the logit of the mean smoothed target."""
    n = max(n_pos + n_neg, 1)
    mean_t = (n_pos * (n_pos + 1) / (n_pos + 2) + n_neg / (n_neg + 2)) / n
    return float(_logit(np.array(mean_t)))


def platt_terms(prob: np.ndarray, t: np.ndarray, a: float, b: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Sums over rows of the smoothed cross-entropy of ``σ(a + b·logit p)``, its ascent direction's gradient
    ``Σ (t − μ)·[1, x]`` and its Hessian ``Σ μ(1 − μ)·[1, x][1, x]ᵀ`` (Newton: θ += H⁻¹g)."""
    x = _logit(prob)
    z = a + b * x
    mu = _sigmoid(z)
    r, v = t - mu, np.maximum(mu * (1 - mu), 1e-12)
    loss = float((np.logaddexp(0.0, z) - t * z).sum())
    g = np.array([r.sum(), (r * x).sum()])
    h = np.array([[v.sum(), (v * x).sum()], [(v * x).sum(), (v * x * x).sum()]])
    return loss, g, h


def platt_search(a0: float, max_iter: int = 100) -> Search:
    """Newton–Raphson with step halving on the convex smoothed cross-entropy, from ``(a0, 0)``, as a search
    (:func:`run_search`): it yields candidate ``(a, b)`` lists and is sent their :func:`platt_terms`.
    Every iteration asks for all halved steps at once (:data:`PLATT_STEPS`) and takes the longest that does
    not increase the loss. ``b < 0`` (scores ranking the wrong way) falls back to the base rate ``(a0, 0)``:
    calibration never inverts the model's ranking. Returns ``(a, b)``."""
    a, b = a0, 0.0
    (cur, g, h), = yield [(a, b)]
    for _ in range(max_iter):
        da, db = np.linalg.solve(np.asarray(h) + 1e-9 * np.eye(2), np.asarray(g))
        cands = [(a + s * da, b + s * db) for s in PLATT_STEPS]
        res = yield cands
        k = next((i for i, r in enumerate(res) if r[0] <= cur + 1e-12 * abs(cur)), len(res) - 1)
        (a, b), (cur, g, h) = cands[k], res[k]
        if max(abs(PLATT_STEPS[k] * da), abs(PLATT_STEPS[k] * db)) < 1e-10:
            break
    return (float(a), float(b)) if b >= 0 else (a0, 0.0)


def fit_platt(evaluate: Callable[[list[Any]], list[Any]], a0: float, max_iter: int = 100) -> tuple[float, float]:
    return run_search(platt_search(a0, max_iter), evaluate)


def run_search(search: Search, evaluate: Callable[[list[Any]], list[Any]]) -> Any:
    """Drive a search (a generator yielding candidate lists, sent their evaluations) to its result."""
    try:
        cands = next(search)
        while True:
            cands = search.send(evaluate(cands))
    except StopIteration as stop:
        return stop.value


def temperature_logits(prob: np.ndarray, multiclass: bool) -> np.ndarray:
    """Log-probabilities (multiclass), or a binary P(positive) as a two-class softmax ``[0, logit p]``."""
    prob = np.asarray(prob, dtype=np.float64)
    if multiclass:
        return np.log(np.clip(prob, _EPS, 1.0))
    return np.stack([np.zeros_like(prob), _logit(prob)], axis=-1)


def temperature_targets(y: np.ndarray, n_classes: int, n: int | None = None) -> np.ndarray:
    """One-hot targets smoothed by ``1/(n+2)`` (``n``: rows fitted on): a finite optimum on separated scores."""
    y = np.asarray(y).astype(int)
    eps = 1.0 / ((len(y) if n is None else n) + 2)
    target = np.full((len(y), n_classes), eps / n_classes)
    target[np.arange(len(y)), y] += 1 - eps
    return target


def temperature_nll(z: np.ndarray, target: np.ndarray, log_t: float) -> float:
    """Sum over rows of the smoothed cross-entropy of ``softmax(z / T)``."""
    lz = z / np.exp(log_t)
    lz = lz - lz.max(axis=1, keepdims=True)
    return float(-(target * (lz - np.log(np.exp(lz).sum(axis=1, keepdims=True)))).sum())


def temperature_search(grid: int = 401, passes: int = 3) -> Search:
    """log T minimising the NLL in ``T_RANGE``, as a search (:func:`run_search`) sent the NLL of every
    candidate log T: a grid of ``grid`` points, refined ``passes`` times around the best one (the NLL is
    convex in 1/T, so unimodal in log T; final spacing ~4e-7 in log T)."""
    lo, hi = float(np.log(T_RANGE[0])), float(np.log(T_RANGE[1]))
    best = (lo + hi) / 2
    for _ in range(passes):
        xs = np.linspace(lo, hi, grid)
        k = int(np.argmin((yield [float(x) for x in xs])))
        best, lo, hi = float(xs[k]), float(xs[max(k - 1, 0)]), float(xs[min(k + 1, grid - 1)])
    return best


def fit_temperature(evaluate: Callable[[list[Any]], list[Any]]) -> float:
    return run_search(temperature_search(), evaluate)


def _pav(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of y on x (pool adjacent violators, ties in x pooled first);
    returns the blocks' mean x (strictly increasing) and fitted values."""
    ux, inv = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True)
    w = np.bincount(inv).astype(np.float64)
    v = np.bincount(inv, weights=np.asarray(y, dtype=np.float64)) / w
    xs = ux * w
    vals, wts, sx = [], [], []  # block value, weight, weighted x sum
    for i in range(len(ux)):
        vals.append(v[i])
        wts.append(w[i])
        sx.append(xs[i])
        while len(vals) > 1 and vals[-2] >= vals[-1]:
            ww = wts[-2] + wts[-1]
            vals[-2:] = [(vals[-2] * wts[-2] + vals[-1] * wts[-1]) / ww]
            sx[-2:] = [sx[-2] + sx[-1]]
            wts[-2:] = [ww]
    return np.asarray(sx) / np.asarray(wts), np.asarray(vals)


@register_calibrator("isotonic")
class Isotonic(Calibrator):
    """Non-decreasing map of p (multiclass: per class, one-vs-rest, then renormalised)."""

    def fit(self, prob: np.ndarray, y: np.ndarray, context: np.ndarray | None = None) -> Calibrator:
        prob, y = np.asarray(prob, dtype=np.float64), np.asarray(y).astype(int)
        if self.multiclass:
            fits = [_pav(prob[:, c], (y == c).astype(float)) for c in range(prob.shape[1])]
            self.params = {"x": [f[0].tolist() for f in fits], "y": [f[1].tolist() for f in fits]}
        else:
            bx, by = _pav(prob, (y == 1).astype(float))
            self.params = {"x": bx.tolist(), "y": by.tolist()}
        return self

    def __call__(self, prob: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        prob = np.asarray(prob, dtype=np.float64)
        if not self.multiclass:
            return np.clip(np.interp(prob, self.params["x"], self.params["y"]), _EPS, 1 - _EPS)
        out = np.stack([np.interp(prob[..., c], bx, by) for c, (bx, by) in
                        enumerate(zip(self.params["x"], self.params["y"], strict=True))], axis=-1)
        out = np.clip(out, _EPS, None)
        return out / out.sum(axis=-1, keepdims=True)


@register_calibrator(STACKED)
class Stacked(Calibrator):
    """``σ(a + b·logit p + Σⱼ wⱼ·xⱼ)`` (binary): Platt's map of the target's own logit plus the same fold model's
    outputs for the model's other targets ``x`` (``context``, built by :class:`ContextFeature`). An
    L2-penalised logistic regression (``C`` = :data:`STACKED_C` on every coefficient, intercept free; the
    features are standardised per fold model) on Platt's smoothed targets. ``b < 0`` (the own logit ranking
    the wrong way once the others are known) falls back to Platt (``w = 0``, ``params["fallback"]``):
    calibration never inverts the model's ranking."""

    uses_context = True

    def fit(self, prob: np.ndarray, y: np.ndarray, context: np.ndarray | None = None) -> Calibrator:
        from sklearn.linear_model import LogisticRegression

        if self.multiclass:
            raise ConfigError("stacked calibration is for binary targets; use temperature for a multiclass target")
        x = _context_matrix(context, len(prob))
        y = np.asarray(y).astype(int)
        t = platt_targets(y)
        feats = np.column_stack([_logit(prob), x])
        n = len(y)
        # smoothed targets t as the weights of a positive (t) and a negative (1 − t) copy of every row
        lr = LogisticRegression(C=STACKED_C, tol=1e-10, max_iter=2000)
        lr.fit(np.vstack([feats, feats]), np.r_[np.ones(n), np.zeros(n)], sample_weight=np.r_[t, 1 - t])
        b, w = float(lr.coef_[0][0]), [float(v) for v in lr.coef_[0][1:]]
        self.params = {"a": float(lr.intercept_[0]), "b": b, "w": w, "C": STACKED_C}
        if b < 0:
            platt = Platt().fit(prob, y).params
            self.params = {"a": platt["a"], "b": platt["b"], "w": [0.0] * len(w), "C": STACKED_C, "fallback": "platt"}
        return self

    def __call__(self, prob: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        z = _logit(prob)
        x = _context_matrix(context, z.shape, len(self.params["w"]))
        return _sigmoid(self.params["a"] + self.params["b"] * z + x @ np.asarray(self.params["w"], dtype=np.float64))


def _context_matrix(context: np.ndarray | None, lead: int | tuple[int, ...], width: int | None = None) -> np.ndarray:
    if context is None:
        raise ValueError("stacked calibration needs the other targets' features (context)")
    x = np.asarray(context, dtype=np.float64)
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    if x.shape[:-1] != lead or (width is not None and x.shape[-1] != width):
        raise ValueError(f"stacked calibration: context of shape {x.shape} for scores of shape {lead} "
                         f"({width} features expected)")
    return x


def member_stats(prob: np.ndarray, multiclass: bool) -> tuple[float, float]:
    """(centre, scale) of one fold model's OOF scores: binary the mean and standard deviation of its
    logits; multiclass 0 and the standard deviation of its row-centred log-probabilities. Label-free."""
    prob = np.asarray(prob, dtype=np.float64)
    if multiclass:
        z = np.log(np.clip(prob, _EPS, 1.0))
        z = z - z.mean(axis=-1, keepdims=True)
        center = 0.0
    else:
        z = _logit(prob)
        center = float(z.mean()) if z.size else 0.0
    scale = float(z.std()) if z.size > 1 else 1.0
    return center, scale if scale > 1e-3 else 1.0


def standardize(prob: np.ndarray, center: float, scale: float, multiclass: bool) -> np.ndarray:
    """One fold model's probabilities on the common scale: ``σ((logit p − centre)/scale)``; multiclass
    ``softmax((log p − row mean)/scale)``."""
    prob = np.asarray(prob, dtype=np.float64)
    if multiclass:
        z = np.log(np.clip(prob, _EPS, 1.0))
        return _softmax((z - z.mean(axis=-1, keepdims=True)) / scale)
    return _sigmoid((_logit(prob) - center) / scale)


# ---------------------------------------------------------------- the other targets as features (stacked)
def _output_scores(kind: str, values: np.ndarray) -> np.ndarray:
    """A target's output on the scale its features standardise: binary the logit (…), multiclass the
    row-centred log-probabilities (…×C), regression / survival the prediction itself (…)."""
    v = np.asarray(values, dtype=np.float64)
    if kind == MULTICLASS:
        z = np.log(np.clip(v, _EPS, 1.0))
        return z - z.mean(axis=-1, keepdims=True)
    return _logit(v) if kind == BINARY else v


def output_stats(kind: str, values: np.ndarray) -> tuple[float, float]:
    """(centre, scale) of one fold model's OOF outputs of a target (label-free): binary and multiclass as
    :func:`member_stats`; regression / survival the mean and standard deviation of the prediction."""
    if kind in (BINARY, MULTICLASS):
        return member_stats(values, kind == MULTICLASS)
    v = _output_scores(kind, values)
    v = v[np.isfinite(v)]
    sd = float(v.std()) if v.size > 1 else 1.0
    return (float(v.mean()) if v.size else 0.0), (sd if sd > 1e-9 else 1.0)


@dataclass
class ContextFeature:
    """One other target's outputs as features of a stacked calibrator: fold model k's output (see
    :func:`_output_scores`) minus ``center[k]``, divided by ``scale[k]`` (its OOF statistics), columns
    ``columns`` (binary / regression / survival ``[0]``; multiclass the classes but the last)."""

    target: str
    kind: str
    columns: list[int]
    center: list[float]
    scale: list[float]

    def __call__(self, values: np.ndarray, member: int) -> np.ndarray:
        """Features (…×len(columns)) of fold model ``member``'s outputs ``values`` (… or …×C)."""
        if not 0 <= member < len(self.scale):
            raise FormatError("model.json", f"no calibration statistics of {self.target!r} for fold {member}; "
                                            "re-run `wsi train`")
        z = (_output_scores(self.kind, values) - self.center[member]) / self.scale[member]
        return z[..., self.columns] if self.kind == MULTICLASS else z[..., None]

    @classmethod
    def fit(cls, spec: TargetSpec, values: np.ndarray, fold: np.ndarray, n_folds: int) -> ContextFeature:
        """The layout of ``spec``'s OOF outputs (``values[i]`` from the fold model of ``fold[i]``)."""
        stats = [output_stats(spec.kind, values[fold == k]) for k in range(n_folds)]
        columns = list(range(len(spec.classes) - 1)) if spec.kind == MULTICLASS else [0]
        return cls(spec.name, spec.kind, columns, [c for c, _ in stats], [sc for _, sc in stats])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ContextFeature:
        return cls(str(d["target"]), str(d["kind"]), [int(c) for c in d["columns"]],
                   [float(c) for c in d["center"]], [float(c) for c in d["scale"]])


class TargetCalibrator:
    """The calibration of one target of a fold ensemble: each fold model's scores standardised by its own
    OOF statistics (``center[k]``, ``scale[k]`` for fold k; none for ``method none`` or older models), then
    the fitted calibrator ``inner``; ``stacked``: with the same fold model's outputs of the targets in
    ``context`` as features. ``selection``: how ``--calibration auto`` chose the method (or None)."""

    def __init__(self, inner: Calibrator, center: Sequence[float] = (), scale: Sequence[float] = (),
                 context: Sequence[ContextFeature] = (), selection: Mapping[str, Any] | None = None) -> None:
        self.inner, self.center, self.scale = inner, list(center), list(scale)
        self.context = list(context)
        self.selection = dict(selection) if selection else None
        if inner.uses_context and sum(len(c.columns) for c in self.context) != len(inner.params.get("w", [])):
            raise ValueError(f"{inner.method}: {len(inner.params.get('w', []))} weights for the features of "
                             f"{[c.target for c in self.context]}")

    @property
    def method(self) -> str:
        return self.inner.method

    @property
    def params(self) -> dict[str, Any]:
        return self.inner.params

    @property
    def needs(self) -> list[str]:
        """The other targets whose outputs this calibrator reads (stacked; otherwise none)."""
        return [c.target for c in self.context]

    def __call__(self, prob: np.ndarray, member: int | None = None,
                 others: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Calibrated probabilities of fold model ``member`` (None: scores already on the common scale).
        ``others``: the same fold model's raw outputs of the targets in :attr:`needs` (required by
        ``stacked``; broadcast to the shape of ``prob``, e.g. a slide's values against its tiles' scores)."""
        prob = np.asarray(prob, dtype=np.float64)
        if member is not None and self.scale:
            if not 0 <= member < len(self.scale):
                raise FormatError("model.json", f"no calibration statistics for fold {member}; re-run `wsi train`")
            prob = standardize(prob, self.center[member], self.scale[member], self.inner.multiclass)
        if not self.inner.uses_context:
            return self.inner(prob)
        if member is None or others is None or any(t not in others for t in self.needs):
            raise ValueError(f"{self.method} calibration needs the fold model and its outputs for {self.needs}")
        x = np.concatenate([np.broadcast_to(c(others[c.target], member), (*prob.shape, len(c.columns)))
                            for c in self.context], axis=-1)
        return self.inner(prob, x)

    def to_dict(self) -> dict[str, Any]:
        d = self.inner.to_dict()
        if self.scale:
            d["members"] = {"center": list(self.center), "scale": list(self.scale)}
        if self.context:
            d["context"] = [c.to_dict() for c in self.context]
        if self.selection:
            d["selection"] = dict(self.selection)
        return d


def fit_calibrator(method: str, spec: TargetSpec, prob: np.ndarray, y: np.ndarray,
                   context: np.ndarray | None = None) -> Calibrator:
    """Fit ``method`` (already resolved) for one target on labelled raw probabilities (``context``: the
    other targets' features, for ``stacked``); the identity when they hold a single class (nothing to
    calibrate against)."""
    multiclass = spec.kind == MULTICLASS
    y = np.asarray(y)
    if method != NONE and len(np.unique(y)) < 2:
        log.warning("calibration of %r: the OOF predictions hold one class only; left uncalibrated", spec.name)
        method = NONE
    return create_calibrator(method, multiclass).fit(prob, y, context)


Others = Sequence[tuple[TargetSpec, np.ndarray]]  # the other targets' OOF outputs, aligned with a target's


def cross_fit(
    method: str, spec: TargetSpec, prob: np.ndarray, y: np.ndarray, fold: np.ndarray, others: Others = (),
) -> tuple[np.ndarray, TargetCalibrator]:
    """Calibrate OOF predictions (``prob[i]`` from the model of fold ``fold[i]``, folds 0..K−1):
    cross-fitted calibrated probabilities (fold k recalibrated by a calibrator fitted on the other folds'
    labelled rows) and the :class:`TargetCalibrator` fitted on every labelled row. The per-fold
    standardisation uses each fold's own predictions, never a label. ``y`` may hold NaN (unlabelled rows are
    recalibrated, never fitted on). ``others`` (``stacked`` only): the same rows' OOF outputs of the other
    targets, standardised per fold model as well (:class:`ContextFeature`)."""
    prob = np.asarray(prob, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    fold = np.asarray(fold).astype(int)
    multiclass = spec.kind == MULTICLASS
    labelled = ~np.isnan(y)
    n_folds = int(fold.max()) + 1 if fold.size else 0
    center, scale = [], []
    if method != NONE:
        for k in range(n_folds):
            c, sc = member_stats(prob[fold == k], multiclass)
            center.append(c)
            scale.append(sc)
    std = np.empty_like(prob)
    for k in range(n_folds):
        rows = fold == k
        std[rows] = standardize(prob[rows], center[k], scale[k], multiclass) if center else prob[rows]
    context: list[ContextFeature] = []
    x = None
    if create_calibrator(method, multiclass).uses_context:
        if not others:
            raise ConfigError(f"--calibration {method}: target {spec.name!r} is the model's only target; it needs "
                              "the model's other targets (train with more --targets) — use --calibration auto")
        context = [ContextFeature.fit(o, np.asarray(v, dtype=np.float64), fold, n_folds) for o, v in others]
        x = np.zeros((len(prob), sum(len(c.columns) for c in context)))
        for k in range(n_folds):
            rows = fold == k
            x[rows] = np.concatenate([c(np.asarray(v)[rows], k) for c, (_, v) in zip(context, others, strict=True)],
                                     axis=-1)
    def ctx(rows: np.ndarray) -> np.ndarray | None:
        return None if x is None else x[rows]

    out = np.empty_like(prob)
    for k in range(n_folds):
        fit_rows, rows = labelled & (fold != k), fold == k
        cal = fit_calibrator(method, spec, std[fit_rows], y[fit_rows].astype(int), ctx(fit_rows))
        out[rows] = prob[rows] if cal.method == NONE else cal(std[rows], ctx(rows))
    final = fit_calibrator(method, spec, std[labelled], y[labelled].astype(int), ctx(labelled))
    if final.method == NONE:
        center, scale, context = [], [], []
    return out, TargetCalibrator(final, center, scale, context)


AUTO_RULE = ("binary target of a model with other targets: platt; stacked's cross-fitted out-of-fold log loss "
             "(slide level) is recorded beside Platt's for comparison (stacked is opt-in: it leans on the other "
             "heads, and where a source shift moves them more than the response head, as on held-out kather16 "
             "mosaics from unseen source images, it raised the error of P(response))")


def log_loss(prob: np.ndarray, y: np.ndarray) -> float:
    """Mean binary log loss of P(positive) over the labelled rows (``y`` NaN: unlabelled)."""
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y)
    p = np.clip(np.asarray(prob, dtype=np.float64)[ok], _EPS, 1 - _EPS)
    return float(-(y[ok] * np.log(p) + (1 - y[ok]) * np.log1p(-p)).mean()) if ok.any() else float("nan")


def calibrate_target(
    requested: str, spec: TargetSpec, prob: np.ndarray, y: np.ndarray, fold: np.ndarray, others: Others = (),
) -> tuple[np.ndarray, TargetCalibrator]:
    """:func:`cross_fit` with the method ``--calibration requested`` means for this target. ``auto`` for a
    binary target of a model with other targets (``others``) is Platt, with stacked's cross-fitted OOF log
    loss beside Platt's in the calibrator's ``selection`` (:data:`AUTO_RULE`): out-of-fold predictions cannot
    show a source shift, and stacked fitted better out of fold on the kather16 mosaics yet raised the held-out
    error of P(response) from 0.165 to 0.212 (scripts/eval_calibration.py)."""
    method = resolve_method(requested, spec)
    if requested != AUTO or spec.kind != BINARY or not others:
        return cross_fit(method, spec, prob, y, fold, others)
    crossed, cal = cross_fit("platt", spec, prob, y, fold)
    losses = {"platt": log_loss(crossed, y), STACKED: log_loss(cross_fit(STACKED, spec, prob, y, fold, others)[0], y)}
    cal.selection = {"rule": AUTO_RULE, "log_loss": losses, "chosen": "platt"}
    log.info("calibration of %r: platt (cross-fitted OOF log loss %.4f; stacked would have %.4f)", spec.name,
             losses["platt"], losses[STACKED])
    return crossed, cal


def check_requested(requested: str, specs: Sequence[TargetSpec]) -> None:
    """Refuse ``--calibration stacked`` before training when no binary target has another target to read."""
    if requested == STACKED and (len(specs) < 2 or not any(s.kind == BINARY for s in specs)):
        raise ConfigError(f"--calibration stacked needs a binary target and at least one other target (have "
                          f"{', '.join(f'{s.name}:{s.kind}' for s in specs)}); use --calibration auto or platt")


def balanced_threshold(prob: np.ndarray) -> float:
    """The ``t_pred`` cut-off of a binary target: the mean calibrated OOF probability. With calibrated
    probabilities it estimates the prevalence π, and ``p ≥ π`` is the rule that maximises the expected
    balanced accuracy (positive iff p/π > (1 − p)/(1 − π)); 0.5 would maximise plain accuracy, which on an
    unbalanced cohort puts (nearly) every patient on the majority side."""
    p = np.asarray(prob, dtype=np.float64)
    p = p[np.isfinite(p)]
    return float(p.mean()) if len(p) else 0.5
