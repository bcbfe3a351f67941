"""Statistical fits used by the analyses, all delegated to maintained libraries.

- :func:`fit_interaction`: logistic regression ``outcome ~ arm * biomarker (+ covariates)`` (statsmodels)
  or Cox proportional hazards ``hazard ~ arm * biomarker (+ covariates)`` (lifelines); Wald CIs and p.
- :func:`binary_effect` / :func:`survival_effect`: the treatment effect within one group of patients.
- :func:`compare_groups`: Mann–Whitney U with Cliff's delta (= rank-biserial correlation) and a
  bootstrap CI (scipy).

The frames passed in carry standard column names: ``arm`` (1 treated, 0 control), ``biomarker``, and
``outcome`` (0/1) or ``time`` + ``event`` (0/1), plus covariate columns.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from wsi_pipeline.errors import LabelsError

log = logging.getLogger(__name__)

MODEL_LOGISTIC = "logistic"
MODEL_COX = "cox"
SCALES = {MODEL_LOGISTIC: "odds ratio", MODEL_COX: "hazard ratio"}
SHORT = {MODEL_LOGISTIC: "OR", MODEL_COX: "HR"}
INTERACTION = "arm:biomarker"
NAN = float("nan")
# |log OR| or |log HR| beyond this means a (quasi-)separated fit, not an estimate
MAX_ABS_LOG_RATIO = 10.0


@dataclass
class Term:
    """One model term on the ratio scale (exp(coef)) with its 95% Wald CI and p."""

    term: str
    estimate: float
    ci_low: float
    ci_high: float
    p: float
    coef: float = NAN
    se: float = NAN


@dataclass
class InteractionFit:
    model: str  # logistic | cox
    formula: str
    interaction: Term
    terms: list[Term]
    n: int
    n_events: int
    warnings: list[str] = field(default_factory=list)

    @property
    def scale(self) -> str:
        return SCALES[self.model]


def _formula_names(covariates: Sequence[str]) -> dict[str, str]:
    """Covariate column → a formula-safe name (c0, c1, ...)."""
    return {c: f"c{i}" for i, c in enumerate(covariates)}


def _prepare(df: pd.DataFrame, model: str, covariates: Sequence[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    names = _formula_names(covariates)
    needed = ["arm", "biomarker", *(["outcome"] if model == MODEL_LOGISTIC else ["time", "event"])]
    data = df[needed + list(covariates)].rename(columns=names).dropna().reset_index(drop=True)
    for c in names.values():
        if not pd.api.types.is_numeric_dtype(data[c]) or pd.api.types.is_bool_dtype(data[c]):
            data[c] = data[c].astype(str)
    for c in needed:
        data[c] = data[c].astype(float)
    if data["arm"].nunique() < 2:
        raise LabelsError("only one treatment arm among the analysable patients; an interaction needs two arms")
    if data["biomarker"].nunique() < 2:
        raise LabelsError("the biomarker takes a single value among the analysable patients; nothing to test")
    return data, names


def _rhs(covariate_names: Sequence[str]) -> str:
    return " + ".join(["arm * biomarker", *covariate_names])


def fit_interaction(df: pd.DataFrame, model: str, covariates: Sequence[str] = ()) -> InteractionFit:
    """Fit the interaction model and return every term on the ratio scale; see the module docstring."""
    data, names = _prepare(df, model, covariates)
    back = {v: k for k, v in names.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if model == MODEL_LOGISTIC:
            terms, formula, n_events = _fit_logit(data, names)
        elif model == MODEL_COX:
            terms, formula, n_events = _fit_cox(data, names)
        else:
            raise ValueError(f"unknown model {model!r}")
    msgs = sorted({str(w.message).splitlines()[0] for w in caught if issubclass(w.category, Warning)})
    for t in terms:
        for safe, orig in back.items():
            if t.term == safe or t.term.startswith(safe + "[") or t.term.startswith(safe + "T"):
                t.term = orig + t.term[len(safe):]
    formula = re.sub(r"\bc\d+\b", lambda m: back.get(m.group(0), m.group(0)), formula)
    inter = next(t for t in terms if t.term in (INTERACTION, "biomarker:arm"))
    inter.term = INTERACTION
    unstable = [t.term for t in terms if not abs(t.coef) < MAX_ABS_LOG_RATIO]
    if unstable:
        msgs.append(f"|log {SHORT[model]}| > {MAX_ABS_LOG_RATIO:g} for {unstable}: the fit is (quasi-)separated; "
                    "estimates and CIs of those terms are not reliable")
    return InteractionFit(model=model, formula=formula, interaction=inter, terms=terms, n=len(data),
                          n_events=n_events, warnings=msgs)


def _fit_logit(data: pd.DataFrame, names: dict[str, str]) -> tuple[list[Term], str, int]:
    import statsmodels.formula.api as smf
    from statsmodels.tools.sm_exceptions import PerfectSeparationError

    formula = "outcome ~ " + _rhs(list(names.values()))
    if not set(np.unique(data["outcome"])) <= {0.0, 1.0}:
        raise LabelsError("the binary outcome must be coded 0/1 (or true/false)")
    try:
        res = smf.logit(formula, data=data).fit(disp=0, maxiter=200)
    except (PerfectSeparationError, np.linalg.LinAlgError) as e:
        raise LabelsError(
            f"the logistic model cannot be fitted ({e}); the outcome is perfectly separated or the design is "
            "singular — too few patients or events per arm × biomarker cell"
        ) from e
    ci = res.conf_int()
    terms = [
        Term(term=str(k), estimate=_exp(res.params[k]), ci_low=_exp(ci.loc[k, 0]), ci_high=_exp(ci.loc[k, 1]),
             p=float(res.pvalues[k]), coef=float(res.params[k]), se=float(res.bse[k]))
        for k in res.params.index if k != "Intercept"
    ]
    return terms, formula, int(data["outcome"].sum())


def _fit_cox(data: pd.DataFrame, names: dict[str, str]) -> tuple[list[Term], str, int]:
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    rhs = _rhs(list(names.values()))
    if data["event"].sum() < 2:
        raise LabelsError("fewer than 2 events among the analysable patients; a Cox model needs events")
    try:
        cph = CoxPHFitter().fit(data, duration_col="time", event_col="event", formula=rhs)
    except ConvergenceError as e:
        raise LabelsError(f"the Cox model did not converge ({str(e).splitlines()[0]}); too few events per "
                          "arm × biomarker cell, or a covariate separates the events") from e
    s = cph.summary
    terms = [
        Term(term=str(k), estimate=float(s.loc[k, "exp(coef)"]), ci_low=float(s.loc[k, "exp(coef) lower 95%"]),
             ci_high=float(s.loc[k, "exp(coef) upper 95%"]), p=float(s.loc[k, "p"]), coef=float(s.loc[k, "coef"]),
             se=float(s.loc[k, "se(coef)"]))
        for k in s.index
    ]
    return terms, "hazard ~ " + rhs, int(data["event"].sum())


def _exp(x: float) -> float:
    try:
        return math.exp(float(x))
    except OverflowError:
        return math.inf


# ------------------------------------------------------------------ within-group treatment effects
@dataclass
class GroupEffect:
    """Treatment effect (treated vs control) within one group of patients. Binary outcome: responder
    rates with Wilson CIs, risk difference (Newcombe CI), odds ratio (Woolf CI, 0.5 added to empty cells)
    and Fisher's exact p. Survival: events, Kaplan–Meier medians, Cox HR with CI and log-rank p."""

    group: str
    n: int
    n_control: int
    n_treated: int
    events_control: int
    events_treated: int
    effect: float = NAN  # OR (binary) or HR (survival), treated vs control
    effect_ci_low: float = NAN
    effect_ci_high: float = NAN
    effect_p: float = NAN
    rate_control: float = NAN
    rate_control_ci_low: float = NAN
    rate_control_ci_high: float = NAN
    rate_treated: float = NAN
    rate_treated_ci_low: float = NAN
    rate_treated_ci_high: float = NAN
    risk_difference: float = NAN
    risk_difference_ci_low: float = NAN
    risk_difference_ci_high: float = NAN
    median_control: float = NAN
    median_treated: float = NAN
    logrank_p: float = NAN
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class CohortAnalysis:
    """The interaction fit of a cohort and the treatment effect overall and per biomarker subgroup."""

    fit: InteractionFit
    overall: GroupEffect | None
    subgroups: list[GroupEffect]

    @property
    def effects(self) -> list[GroupEffect]:
        """Subgroup effects, then the overall one: the rows of the tables and the forest plot."""
        return [*self.subgroups, *([self.overall] if self.overall is not None else [])]


def wilson(count: int, n: int) -> tuple[float, float, float]:
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return NAN, NAN, NAN
    lo, hi = proportion_confint(count, n, alpha=0.05, method="wilson")
    return count / n, float(lo), float(hi)


def binary_effect(group: str, arm: np.ndarray, outcome: np.ndarray) -> GroupEffect:
    from scipy.stats import fisher_exact
    from statsmodels.stats.contingency_tables import Table2x2
    from statsmodels.stats.proportion import confint_proportions_2indep

    arm, outcome = np.asarray(arm, float), np.asarray(outcome, float)
    t, c = arm == 1, arm == 0
    nt, nc = int(t.sum()), int(c.sum())
    et, ec = int(outcome[t].sum()), int(outcome[c].sum())
    ge = GroupEffect(group=group, n=nt + nc, n_control=nc, n_treated=nt, events_control=ec, events_treated=et)
    ge.rate_control, ge.rate_control_ci_low, ge.rate_control_ci_high = wilson(ec, nc)
    ge.rate_treated, ge.rate_treated_ci_low, ge.rate_treated_ci_high = wilson(et, nt)
    if nt == 0 or nc == 0:
        ge.note = "one arm is empty"
        return ge
    ge.risk_difference = et / nt - ec / nc
    lo, hi = confint_proportions_2indep(et, nt, ec, nc, method="newcomb", compare="diff")
    ge.risk_difference_ci_low, ge.risk_difference_ci_high = float(lo), float(hi)
    table = np.array([[et, nt - et], [ec, nc - ec]], dtype=float)
    t22 = Table2x2(table, shift_zeros=True)
    ge.effect = float(t22.oddsratio)
    ge.effect_ci_low, ge.effect_ci_high = (float(x) for x in t22.oddsratio_confint())
    ge.effect_p = float(fisher_exact(table.astype(int))[1])
    if (table == 0).any():
        ge.note = "empty cell: 0.5 added for the odds ratio"
    return ge


def survival_effect(group: str, arm: np.ndarray, time: np.ndarray, event: np.ndarray) -> GroupEffect:
    from lifelines import CoxPHFitter, KaplanMeierFitter
    from lifelines.exceptions import ConvergenceError
    from lifelines.statistics import logrank_test

    arm, time, event = (np.asarray(a, float) for a in (arm, time, event))
    t, c = arm == 1, arm == 0
    ge = GroupEffect(group=group, n=len(arm), n_control=int(c.sum()), n_treated=int(t.sum()),
                     events_control=int(event[c].sum()), events_treated=int(event[t].sum()))
    for mask, attr in ((c, "median_control"), (t, "median_treated")):
        if mask.sum():
            kmf = KaplanMeierFitter().fit(time[mask], event[mask])
            setattr(ge, attr, float(kmf.median_survival_time_))
    if not (t.sum() and c.sum()) or event.sum() < 2:
        ge.note = "one arm is empty or fewer than 2 events"
        return ge
    ge.logrank_p = float(logrank_test(time[t], time[c], event[t], event[c]).p_value)
    data = pd.DataFrame({"time": time, "event": event, "arm": arm})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = CoxPHFitter().fit(data, duration_col="time", event_col="event").summary
    except ConvergenceError as e:
        ge.note = f"Cox model did not converge ({str(e).splitlines()[0]})"
        return ge
    if not abs(float(s.loc["arm", "coef"])) < MAX_ABS_LOG_RATIO:
        ge.note = "HR not estimable: the events of one arm all precede or follow the other's (monotone likelihood)"
        return ge
    ge.effect = float(s.loc["arm", "exp(coef)"])
    ge.effect_ci_low = float(s.loc["arm", "exp(coef) lower 95%"])
    ge.effect_ci_high = float(s.loc["arm", "exp(coef) upper 95%"])
    ge.effect_p = float(s.loc["arm", "p"])
    return ge


# ------------------------------------------------------------------ two-group comparison (evolution)
@dataclass
class GroupComparison:
    """Mann–Whitney U of x vs y; Cliff's delta = P(x > y) − P(x < y) (= rank-biserial r) with a percentile
    bootstrap 95% CI (each group resampled independently)."""

    n_x: int
    n_y: int
    median_x: float
    median_y: float
    u: float
    p: float
    cliffs_delta: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _cliffs_delta(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(x, y, alternative="two-sided", axis=axis).statistic
    return 2.0 * u / (x.shape[axis] * y.shape[axis]) - 1.0


def compare_groups(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0) -> GroupComparison:
    from scipy.stats import bootstrap, mannwhitneyu

    x = np.asarray(x, float)
    y = np.asarray(y, float)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if len(x) < 1 or len(y) < 1:
        return GroupComparison(len(x), len(y), NAN, NAN, NAN, NAN, NAN, NAN, NAN)
    res = mannwhitneyu(x, y, alternative="two-sided")
    delta = float(2.0 * res.statistic / (len(x) * len(y)) - 1.0)
    lo = hi = NAN
    if len(x) >= 2 and len(y) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate resamples (all ties) give a NaN-free but flat CI
            ci = bootstrap((x, y), _cliffs_delta, n_resamples=n_boot, method="percentile", vectorized=True,
                           rng=np.random.default_rng(seed)).confidence_interval
        lo, hi = float(ci.low), float(ci.high)
    return GroupComparison(n_x=len(x), n_y=len(y), median_x=float(np.median(x)), median_y=float(np.median(y)),
                           u=float(res.statistic), p=float(res.pvalue), cliffs_delta=delta, ci_low=lo, ci_high=hi)
