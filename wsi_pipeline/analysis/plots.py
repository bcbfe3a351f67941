"""PNG figures of the analyses (matplotlib, Agg canvas; no pyplot state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from wsi_pipeline.analysis.stats import SHORT, CohortAnalysis, GroupEffect
from wsi_pipeline.formats.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ARM_COLOURS = {"control": "#7f7f7f", "treated": "#d62728"}
GROUP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")
FOREST_MAX = 1000.0  # forest-plot axis limit (ratio scale)


def new_figure(w: float, h: float) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    fig.set_layout_engine("constrained")
    return fig


def save_png(fig: Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _finite(*xs: float) -> bool:
    return all(x is not None and math.isfinite(x) and x > 0 for x in xs)


def _plain_log_ticks(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    lo, hi = ax.get_xlim()
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)))
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def forest_plot(a: CohortAnalysis, treatment: dict[str, str], biomarker: str, path: str | Path) -> None:
    """Treatment effect (OR/HR, treated vs control) per biomarker subgroup and overall, log scale;
    ``treatment`` names the ``treated`` and ``control`` arms."""
    short = SHORT[a.fit.model]
    rows: list[GroupEffect] = a.effects
    fig = new_figure(8.0, 1.2 + 0.55 * (len(rows) + 1))
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(rows), 0, -1))
    vals = []
    for y, g in zip(ys, rows, strict=True):
        if _finite(g.effect, g.effect_ci_low, g.effect_ci_high):
            colour = "black" if g is a.overall else "#1f77b4"
            ax.plot([g.effect_ci_low, g.effect_ci_high], [y, y], color=colour, lw=2)
            ax.plot([g.effect], [y], marker="D" if g is a.overall else "s", color=colour, ms=8)
            vals += [g.effect_ci_low, g.effect_ci_high]
            label = f"{g.effect:.2f} ({g.effect_ci_low:.2f}–{g.effect_ci_high:.2f})"
        else:
            label = "not estimable"
        ax.annotate(label, xy=(1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=9)
    ax.axvline(1.0, color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    if vals:  # extreme (quasi-separated) intervals are cut at 1/FOREST_MAX and FOREST_MAX
        lo, hi = max(min(vals), 1 / FOREST_MAX), min(max(vals), FOREST_MAX)
        ax.set_xlim(min(lo, 1.0) / 1.3, max(hi, 1.0) * 1.3)
    ax.set_yticks(ys, [f"{g.group}\n(n={g.n})" for g in rows], fontsize=9)
    ax.set_ylim(0.4, len(rows) + 0.6)
    c = treatment
    favours = "< 1 favours treated" if a.fit.model == "cox" else "> 1 favours treated"
    ax.set_xlabel(f"{short} ({c['treated']} vs {c['control']}, 95% CI) — {favours}")
    _plain_log_ticks(ax)
    t = a.fit.interaction
    ax.set_title(f"Treatment effect by {biomarker}\ninteraction {short} {t.estimate:.3g} "
                 f"({t.ci_low:.3g}–{t.ci_high:.3g}), p = {t.p:.2g}", fontsize=10)
    ax.grid(axis="x", alpha=0.3, which="both")
    save_png(fig, path)


def rates_by_subgroup(groups: Sequence[GroupEffect], treatment: dict[str, str], path: str | Path) -> None:
    """Responder rate per arm per subgroup with Wilson 95% CIs."""
    fig = new_figure(1.6 + 1.6 * len(groups), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(groups))
    for k, (arm, key) in enumerate((("control", "control"), ("treated", "treated"))):
        rate = np.array([getattr(g, f"rate_{key}") for g in groups], float)
        lo = np.array([getattr(g, f"rate_{key}_ci_low") for g in groups], float)
        hi = np.array([getattr(g, f"rate_{key}_ci_high") for g in groups], float)
        xs = x + (k - 0.5) * 0.38
        ax.bar(xs, np.nan_to_num(rate), width=0.36, color=ARM_COLOURS[arm], alpha=0.85,
               label=f"{treatment[key]} ({arm})")
        yerr = np.clip(np.nan_to_num(np.vstack([rate - lo, hi - rate])), 0, None)  # Wilson ends may round
        ax.errorbar(xs, rate, yerr=yerr, fmt="none", ecolor="black", capsize=4, lw=1)
    ax.set_xticks(x, [f"{g.group}\n(n={g.n})" for g in groups], fontsize=9)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("responder rate (95% Wilson CI)")
    ax.legend(frameon=False, fontsize=9)
    ax.set_title("Responders per arm within biomarker subgroups", fontsize=10)
    save_png(fig, path)


def km_by_subgroup(
    data: pd.DataFrame,
    subgroups: Sequence[tuple[str, np.ndarray]],
    treatment: dict[str, str],
    path: str | Path,
    effects: Sequence[GroupEffect] = (),
    time_label: str = "time",
) -> None:
    """Kaplan–Meier curves per arm (95% CI bands), one panel per biomarker subgroup, titled with the
    subgroup's HR (treated vs control) and log-rank p when ``effects`` are given."""
    from lifelines import KaplanMeierFitter

    fig = new_figure(4.2 * len(subgroups), 3.8)
    axes = fig.subplots(1, len(subgroups), sharey=True, squeeze=False)[0]
    by_name = {g.group: g for g in effects}
    for ax, (name, mask) in zip(axes, subgroups, strict=True):
        d = data[np.asarray(mask, bool)]
        for arm_value, key in ((0.0, "control"), (1.0, "treated")):
            s = d[d["arm"] == arm_value]
            if len(s) == 0:
                continue
            kmf = KaplanMeierFitter(label=f"{treatment[key]} (n={len(s)})").fit(s["time"], s["event"])
            kmf.plot_survival_function(ax=ax, color=ARM_COLOURS[key], ci_show=True, ci_alpha=0.15)
        g = by_name.get(name)
        title = name
        if g is not None:
            hr = (f"HR {g.effect:.2f} ({g.effect_ci_low:.2f}–{g.effect_ci_high:.2f})"
                  if _finite(g.effect, g.effect_ci_low, g.effect_ci_high) else "HR not estimable")
            title += f"\n{hr}, log-rank p = {g.logrank_p:.2g}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(time_label)
        ax.set_ylim(0, 1.02)
        ax.legend(frameon=False, fontsize=8)
    axes[0].set_ylabel("survival probability")
    save_png(fig, path)


# ------------------------------------------------------------------ evolution
def trajectories(
    long: pd.DataFrame, metric: str, order: Sequence[str], response_labels: dict[Any, str], path: str | Path
) -> None:
    """Left: one line per patient (spaghetti), coloured by response group. Right: group mean ± 95% CI."""
    d = long[long["metric"] == metric]
    fig = new_figure(9.0, 3.6)
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    pos = {t: i for i, t in enumerate(order)}
    groups = list(response_labels)
    colours = {g: GROUP_COLOURS[i % len(GROUP_COLOURS)] for i, g in enumerate(groups)}
    for _, p in d.groupby("patient_id"):
        p = p.sort_values("timepoint", key=lambda s: s.map(pos))
        g = p["group"].iloc[0]
        ax1.plot(p["timepoint"].map(pos), p["value"], color=colours.get(g, "grey"), alpha=0.45, lw=1,
                 marker="o", ms=3)
    for g in groups:
        s = d[d["group"] == g].groupby("timepoint")["value"]
        stats = pd.DataFrame({"mean": s.mean(), "sem": s.sem(), "n": s.count()}).reindex(order)
        xs = np.arange(len(order)) + (groups.index(g) - (len(groups) - 1) / 2) * 0.06
        ax2.errorbar(xs, stats["mean"], yerr=1.96 * stats["sem"].fillna(0), color=colours[g], marker="o",
                     capsize=4, label=f"{response_labels[g]}")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(order)), list(order), fontsize=9)
        ax.set_xlim(-0.25, len(order) - 0.75)
        ax.grid(alpha=0.3)
    ax1.set_ylabel(metric)
    ax1.set_title("per patient", fontsize=10)
    ax2.set_title("group mean ± 95% CI", fontsize=10)
    if groups:
        handles = [ax1.plot([], [], color=colours[g], label=response_labels[g])[0] for g in groups]
        ax1.legend(handles=handles, frameon=False, fontsize=8)
    fig.suptitle(metric, fontsize=11)
    save_png(fig, path)


def transition_heatmaps(tables: Sequence[tuple[str, pd.DataFrame]], path: str | Path) -> None:
    """One count matrix (rows: from, columns: to) per (variable, interval)."""
    fig = new_figure(3.6 * len(tables), 3.4)
    axes = fig.subplots(1, len(tables), squeeze=False)[0]
    for ax, (title, tab) in zip(axes, tables, strict=False):
        m = tab.to_numpy(dtype=float)
        ax.imshow(m, cmap="Blues", vmin=0)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{int(v)}", ha="center", va="center",
                    color="white" if v > 0.6 * max(m.max(), 1) else "black", fontsize=10)
        ax.set_xticks(range(tab.shape[1]), list(tab.columns), rotation=30, fontsize=8)
        ax.set_yticks(range(tab.shape[0]), list(tab.index), fontsize=8)
        ax.set_xlabel("to")
        ax.set_ylabel("from")
        ax.set_title(title, fontsize=9)
    save_png(fig, path)
