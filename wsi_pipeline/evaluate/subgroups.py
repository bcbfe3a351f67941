"""Responder subgroups: patients stratified by a predicted score with fixed cut-offs, the responder rate
per subgroup (Wilson 95% CI), crossed with a second grouping (e.g. predicted TME phenotype), and for a
survival endpoint Kaplan–Meier curves with a log-rank test. Pure functions plus matplotlib (Agg) plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def assign_subgroups(scores: np.ndarray, cutoffs: Sequence[float], labels: Sequence[str]) -> np.ndarray:
    """``labels[i]`` for scores in [cutoffs[i-1], cutoffs[i]) (first: below cutoffs[0]; last: ≥ cutoffs[-1])."""
    if len(labels) != len(cutoffs) + 1:
        raise ValueError(f"{len(cutoffs)} cut-offs need {len(cutoffs) + 1} labels, got {len(labels)}")
    idx = np.searchsorted(np.asarray(cutoffs, dtype=np.float64), np.asarray(scores, dtype=np.float64),
                          side="right")
    return np.asarray(labels, dtype=object)[idx]


def wilson_ci(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return float("nan"), float("nan")
    lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson")
    return float(lo), float(hi)


def responder_table(
    groups: np.ndarray, responders: np.ndarray, order: Sequence[str], cross: np.ndarray | None = None,
    cross_order: Sequence[str] = (), cross_name: str = "phenotype",
) -> Any:
    """Rows: every subgroup (``cross`` = "all"), then every subgroup × cross level. Columns: n, responders,
    responder_rate, ci_low, ci_high (Wilson). Patients with a missing response (NaN) are left out."""
    import pandas as pd

    ok = ~np.isnan(np.asarray(responders, dtype=np.float64))
    g, r = np.asarray(groups, dtype=object)[ok], np.asarray(responders, dtype=np.float64)[ok].astype(int)
    c = None if cross is None else np.asarray(cross, dtype=object)[ok]
    rows = []
    levels = [("all", None)] + ([(lv, lv) for lv in cross_order] if c is not None else [])
    for lv_name, lv in levels:
        for sg in order:
            m = g == sg
            if lv is not None:
                m &= c == lv
            n, k = int(m.sum()), int(r[m].sum())
            lo, hi = wilson_ci(k, n)
            rows.append({"subgroup": sg, cross_name: lv_name, "n": n, "responders": k,
                         "responder_rate": k / n if n else float("nan"), "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def association_test(groups: np.ndarray, responders: np.ndarray) -> dict[str, float]:
    """Chi-square test of equal responder rates across subgroups."""
    from scipy.stats import chi2_contingency

    ok = ~np.isnan(np.asarray(responders, dtype=np.float64))
    g = np.asarray(groups, dtype=object)[ok]
    r = np.asarray(responders, dtype=np.float64)[ok].astype(int)
    levels = list(dict.fromkeys(g.tolist()))
    table = np.array([[np.sum((g == lv) & (r == 1)), np.sum((g == lv) & (r == 0))] for lv in levels])
    table = table[table.sum(1) > 0]
    if table.shape[0] < 2 or (table.sum(0) == 0).any():
        return {"chi2": float("nan"), "dof": 0.0, "p": float("nan")}
    chi2, p, dof, _ = chi2_contingency(table)
    return {"chi2": float(chi2), "dof": float(dof), "p": float(p)}


def logrank(time: np.ndarray, event: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """Log-rank test across all subgroups (``statistic``, ``p``) and between every pair (``pairwise``:
    "a vs b" → p, unadjusted)."""
    from lifelines.statistics import logrank_test, multivariate_logrank_test

    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event, dtype=np.float64)
    ok = ~(np.isnan(t) | np.isnan(e))
    g = np.asarray(groups, dtype=object)[ok]
    t, e = t[ok], e[ok].astype(int)
    levels = list(dict.fromkeys(g.tolist()))
    if len(levels) < 2:
        return {"statistic": float("nan"), "p": float("nan"), "pairwise": {}}
    res = multivariate_logrank_test(t, g, e)
    pairwise = {}
    for i, a in enumerate(levels):
        for b in levels[i + 1:]:
            r = logrank_test(t[g == a], t[g == b], e[g == a], e[g == b])
            pairwise[f"{a} vs {b}"] = float(r.p_value)
    return {"statistic": float(res.test_statistic), "p": float(res.p_value), "pairwise": pairwise}


def plot_responder_rates(table: Any, order: Sequence[str], path: str | Path, title: str,
                         cross_name: str = "phenotype") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wsi_pipeline.formats.atomic import atomic_path

    levels = list(dict.fromkeys(table[cross_name].tolist()))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(order), 3.6), dpi=120)
    width = 0.8 / max(1, len(levels))
    for j, lv in enumerate(levels):
        sub = table[table[cross_name] == lv].set_index("subgroup").reindex(order)
        x = np.arange(len(order)) + (j - (len(levels) - 1) / 2) * width
        rate = sub["responder_rate"].to_numpy(dtype=float)
        err = np.vstack([rate - sub["ci_low"].to_numpy(dtype=float), sub["ci_high"].to_numpy(dtype=float) - rate])
        err = np.clip(np.nan_to_num(err), 0, None)  # Wilson bounds can sit a rounding error past the rate
        ax.bar(x, np.nan_to_num(rate), width * 0.95, label=f"{lv}", yerr=err, capsize=3)
        for xi, n in zip(x, sub["n"].to_numpy(), strict=True):
            ax.text(xi, 0.01, f"n={n}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(np.arange(len(order)), order)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("responder rate (95% Wilson CI)")
    ax.set_xlabel("predicted-response subgroup")
    ax.set_title(title, fontsize=10)
    if len(levels) > 1:
        ax.legend(fontsize=7, title=cross_name, title_fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_km(time: np.ndarray, event: np.ndarray, groups: np.ndarray, order: Sequence[str], path: str | Path,
            title: str, time_label: str = "time") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter

    from wsi_pipeline.formats.atomic import atomic_path

    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event, dtype=np.float64)
    ok = ~(np.isnan(t) | np.isnan(e))
    g = np.asarray(groups, dtype=object)
    fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=120)
    for sg in order:
        m = ok & (g == sg)
        if m.sum() == 0:
            continue
        KaplanMeierFitter(label=f"{sg} (n={int(m.sum())})").fit(t[m], e[m].astype(int)).plot_survival_function(
            ax=ax, ci_show=True)
    ax.set_xlabel(time_label)
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
