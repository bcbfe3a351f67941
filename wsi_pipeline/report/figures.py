"""Report figures as PNG bytes (matplotlib Figure objects on the Agg canvas; no pyplot state).

Curves come from scikit-learn / lifelines; metric values and their CIs come from
:mod:`wsi_pipeline.evaluate` and are only drawn here.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

ACCENT = "#0b6e99"
PALETTE = ("#0b6e99", "#e07b39", "#3f9c5a", "#b5446e", "#7a5cc7", "#8c8c8c")
PHENOTYPE_COLOURS = {"inflamed": "#d9534f", "excluded": "#f0ad4e", "desert": "#5b8fd6"}


def new_figure(w: float, h: float) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    fig.set_layout_engine("constrained")
    return fig


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def via_file(draw: Callable[[Path], Any]) -> bytes:
    """PNG bytes of a plotting function that writes to a path (e.g. wsi_pipeline.evaluate.subgroups)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fig.png"
        draw(path)
        return path.read_bytes()


def _style(ax: Any) -> None:
    ax.grid(alpha=0.25)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


# ---------------------------------------------------------------- classification
def roc_binary(y: np.ndarray, score: np.ndarray, weights: np.ndarray, auc_text: str, title: str) -> bytes:
    """ROC curve with a 95% band from the bootstrap resamples in ``weights`` (B×n counts)."""
    from sklearn.metrics import roc_curve

    grid = np.linspace(0, 1, 101)
    fpr, tpr, _ = roc_curve(y, score)
    curves = [np.interp(grid, f, t) for f, t in _weighted_roc(np.asarray(y, float), np.asarray(score, float),
                                                              np.atleast_2d(weights))]
    fig = new_figure(4.6, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    if curves:
        lo, hi = np.quantile(np.array(curves), [0.025, 0.975], axis=0)
        ax.fill_between(grid, lo, hi, color=ACCENT, alpha=0.18, lw=0, label="95% bootstrap band")
    ax.plot(fpr, tpr, color=ACCENT, lw=2, label=f"AUROC {auc_text}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.set_aspect("equal")
    _style(ax)
    return to_png(fig)


def _weighted_roc(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(FPR, TPR) of every resample (row of ``weights``) at the distinct score thresholds, all rows at
    once; resamples lacking a class are left out."""
    order = np.argsort(-score, kind="mergesort")
    s = score[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last position of each tied score group
    w = weights[:, order]
    tps = np.cumsum(w * y[order], axis=1)[:, last]
    fps = np.cumsum(w * (1.0 - y[order]), axis=1)[:, last]
    ok = (tps[:, -1] > 0) & (fps[:, -1] > 0)
    tpr = np.hstack([np.zeros((ok.sum(), 1)), tps[ok] / tps[ok, -1:]])
    fpr = np.hstack([np.zeros((ok.sum(), 1)), fps[ok] / fps[ok, -1:]])
    return list(zip(fpr, tpr, strict=True))


def roc_multiclass(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], aucs: Sequence[str],
                   title: str) -> bytes:
    from sklearn.metrics import roc_curve

    fig = new_figure(4.6, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for k, c in enumerate(classes):
        yk = (y == k).astype(int)
        if yk.min() == yk.max():
            continue
        f, t, _ = roc_curve(yk, probs[:, k])
        ax.plot(f, t, lw=2, color=PHENOTYPE_COLOURS.get(c, PALETTE[k % len(PALETTE)]), label=f"{c}: {aucs[k]}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8, frameon=False, title="one-vs-rest AUROC", title_fontsize=8)
    ax.set_aspect("equal")
    _style(ax)
    return to_png(fig)


def calibration(y: np.ndarray, p: np.ndarray, text: str, title: str) -> bytes:
    """Reliability diagram (quantile bins) with the histogram of predicted probabilities."""
    from sklearn.calibration import calibration_curve

    n_bins = int(np.clip(len(y) // 15, 3, 10))
    frac, mean_p = calibration_curve(y, p, n_bins=n_bins, strategy="quantile")
    fig = new_figure(4.6, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
    ax.plot(mean_p, frac, marker="o", color=ACCENT, lw=2, label=f"{n_bins} quantile bins")
    ax.hist(p, bins=20, range=(0, 1), color="#9fb3c8", alpha=0.5, weights=np.full(len(p), 1.0 / max(len(p), 1)),
            label="share of patients")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed fraction positive")
    ax.set_title(title, fontsize=10)
    ax.text(0.02, 0.97, text, transform=ax.transAxes, va="top", fontsize=8)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.set_aspect("equal")
    _style(ax)
    return to_png(fig)


def reliability(curves: Sequence[tuple[str, Sequence[float], Sequence[float], Sequence[int]]], text: str,
                title: str) -> bytes:
    """Reliability diagram of binned probabilities (``label, mean predicted, observed fraction, n`` per
    curve; e.g. before and after calibration), marker area ∝ patients in the bin."""
    fig = new_figure(4.8, 5.4)
    grid = fig.add_gridspec(2, 1, height_ratios=[5, 1])
    ax = fig.add_subplot(grid[0])
    note = fig.add_subplot(grid[1])
    note.axis("off")
    note.text(0.0, 1.0, text, transform=note.transAxes, va="top", fontsize=7.5, family="monospace")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
    for k, (label, mean_p, frac, n) in enumerate(curves):
        size = 12 + 120 * np.asarray(n, dtype=float) / max(float(np.sum(n)), 1.0)
        colour = PALETTE[k % len(PALETTE)]
        ax.plot(mean_p, frac, color=colour, lw=1.5, alpha=0.8)
        ax.scatter(mean_p, frac, s=size, color=colour, label=label, zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability (10 equal-width bins)")
    ax.set_ylabel("observed fraction positive")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_aspect("equal")
    _style(ax)
    return to_png(fig)


def confusion(y: np.ndarray, pred: np.ndarray, classes: Sequence[str], title: str) -> bytes:
    """Counts, coloured by the row-normalised fraction (recall per true class)."""
    from sklearn.metrics import confusion_matrix

    k = len(classes)
    cm = confusion_matrix(y.astype(int), pred.astype(int), labels=list(range(k)))
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = new_figure(max(4.6, 1.6 + 0.9 * k), max(4.2, 1.3 + 0.8 * k))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, f"{v}\n{frac[i, j]:.0%}", ha="center", va="center", fontsize=9,
                color="white" if frac[i, j] > 0.6 else "#1f2933")
    ax.set_xticks(range(k), list(classes), rotation=30 if k > 2 else 0, fontsize=8)
    ax.set_yticks(range(k), list(classes), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return to_png(fig)


# ---------------------------------------------------------------- regression
def scatter(y: np.ndarray, pred: np.ndarray, text: str, title: str, label: str) -> bytes:
    fig = new_figure(4.6, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(y, pred, s=16, alpha=0.7, color=ACCENT, edgecolor="white", lw=0.4)
    lo = float(np.nanmin([np.nanmin(y), np.nanmin(pred)]))
    hi = float(np.nanmax([np.nanmax(y), np.nanmax(pred)]))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", color="grey", lw=1)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"true {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.set_title(title, fontsize=10)
    ax.text(0.02, 0.97, text, transform=ax.transAxes, va="top", fontsize=8)
    _style(ax)
    return to_png(fig)


# ---------------------------------------------------------------- distributions
def distributions(panels: Sequence[tuple[str, str, Any]]) -> bytes:
    """Small multiples: (title, kind, data) with kind ``hist`` (values) or ``bar`` (pandas value counts)."""
    n = len(panels)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = new_figure(3.3 * cols, 2.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (title, kind, data) in zip(axes, panels, strict=False):
        if kind == "hist":
            vals = np.asarray(data, dtype=float)
            vals = vals[np.isfinite(vals)]
            ax.hist(vals, bins=min(20, max(5, len(vals) // 3)), color=ACCENT, alpha=0.85, edgecolor="white")
            ax.set_ylabel("slides")
        else:
            names = [str(k) for k in data.index]
            colours = [PHENOTYPE_COLOURS.get(k, PALETTE[i % len(PALETTE)]) for i, k in enumerate(names)]
            ax.bar(names, data.to_numpy(), color=colours)
            ax.tick_params(axis="x", labelsize=8)
            ax.set_ylabel("slides")
        ax.set_title(title, fontsize=9)
        _style(ax)
    for ax in axes[n:]:
        ax.set_visible(False)
    return to_png(fig)


def tme_overview(tme: pd.DataFrame, phenotype_col: str | None, til_col: str | None,
                 frac_cols: Sequence[str]) -> bytes:
    """Immune phenotype counts, TIL fraction distribution and mean tissue composition."""
    panels = [c for c in (phenotype_col, til_col) if c] + (["composition"] if frac_cols else [])
    fig = new_figure(3.6 * len(panels), 3.0)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
    i = 0
    if phenotype_col:
        counts = tme[phenotype_col].astype(str).value_counts()
        names = list(counts.index)
        axes[i].bar(names, counts.to_numpy(), color=[PHENOTYPE_COLOURS.get(k, "#8c8c8c") for k in names])
        axes[i].set_title("immune phenotype", fontsize=9)
        axes[i].set_ylabel("slides")
        _style(axes[i])
        i += 1
    if til_col:
        vals = tme[til_col].to_numpy(dtype=float)
        axes[i].hist(vals[np.isfinite(vals)], bins=15, color=ACCENT, edgecolor="white")
        axes[i].set_title(til_col, fontsize=9)
        axes[i].set_ylabel("slides")
        _style(axes[i])
        i += 1
    if frac_cols:
        means = tme[list(frac_cols)].mean().sort_values()
        labels = [c.replace("area_frac_", "") for c in means.index]
        axes[i].barh(labels, means.to_numpy(), color="#9fb3c8")
        axes[i].set_title("mean area fraction", fontsize=9)
        axes[i].tick_params(axis="y", labelsize=8)
        _style(axes[i])
    return to_png(fig)


def thumbnail_png(path: Path, max_px: int) -> bytes | None:
    """A small PNG of a RUN thumbnail (None when it cannot be read)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((max_px, max_px))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
            return buf.getvalue()
    except (OSError, UnidentifiedImageError):
        return None
