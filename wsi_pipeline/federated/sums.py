"""Figures computed from the sites' sums, counts and histograms, never from rows: feature standardisation,
regression scaling, class names, quantile cut-offs and validation AUROC."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wsi_pipeline.mil.targets import TargetSpec


def histogram(values: np.ndarray, bins: int) -> list[float]:
    """Counts of ``values`` (probabilities) in ``bins`` equal bins of [0, 1]."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    v = v[np.isfinite(v)]
    return np.histogram(v, bins=bins, range=(0.0, 1.0))[0].astype(float).tolist()


def histogram_quantiles(counts: Sequence[float], qs: Sequence[float]) -> list[float]:
    """Quantiles of the values binned in ``counts`` (equal bins of [0, 1]), linear within a bin; exact to
    the bin width."""
    c = np.asarray(counts, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, len(c) + 1)
    cum = np.concatenate([[0.0], np.cumsum(c)])
    total = cum[-1]
    if total <= 0:
        return [float("nan")] * len(qs)
    out = []
    for q in qs:
        target = q * total
        k = int(np.clip(np.searchsorted(cum, target, side="left") - 1, 0, len(c) - 1))
        inside = (target - cum[k]) / c[k] if c[k] > 0 else 0.0
        out.append(float(edges[k] + inside * (edges[k + 1] - edges[k])))
    return out


def histogram_auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """AUROC from the histograms of the positives' and the negatives' scores (ties within a bin count ½):
    the Mann–Whitney statistic at the histograms' resolution."""
    p, n = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if p.sum() <= 0 or n.sum() <= 0:
        return float("nan")
    below = np.concatenate([[0.0], np.cumsum(n)[:-1]])  # negatives in lower bins
    return float((p * (below + 0.5 * n)).sum() / (p.sum() * n.sum()))


def class_names(spec: TargetSpec, vocabularies: Sequence[Sequence[str]]) -> list[str]:
    """The classes of a classification target over all sites: the rule ``wsi train`` applies to one cohort
    (:func:`wsi_pipeline.mil.targets.fit_class_names`), on the union of the sites' label vocabularies."""
    from wsi_pipeline.mil.targets import fit_class_names

    present = sorted({str(v) for vocab in vocabularies for v in vocab})
    return fit_class_names(spec, present, "the sites' labels")
