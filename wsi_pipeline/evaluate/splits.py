"""Patient-level cross-validation splits.

Folds are assigned to patients, never to slides, so that all slides of one patient fall in the same fold.
Stratification: within every stratum (class of the stratification target, or "missing"), patients are
shuffled with the seed and dealt to folds in turn, each time to the fold that is currently smallest, so
every fold gets the same share (±1) of each stratum and the fold sizes stay balanced.

Grouped folds (:func:`group_folds`, ``wsi train --group-by COLUMN``): every patient of one group (a site, a
hospital, a scanner) falls in one fold, so the out-of-fold predictions, and what is fitted on them (the
calibrator, the head choice, the decision cut-off), come from models that never saw that group. Groups are
dealt whole, largest first, each to the fold with the fewest patients.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from wsi_pipeline.errors import ConfigError

MISSING_STRATUM = "__missing__"


def patient_strata(patient_ids: Sequence[str], labels: Sequence[float] | np.ndarray | None) -> dict[str, Hashable]:
    """One stratum per patient: the most frequent non-missing slide label (ties: smallest), else missing."""
    per: dict[str, list[float]] = defaultdict(list)
    for i, p in enumerate(patient_ids):
        v = None if labels is None else labels[i]
        if v is not None and not (isinstance(v, float) and np.isnan(v)):
            per[p].append(v)
        else:
            per.setdefault(p, [])
    out: dict[str, Hashable] = {}
    for p, vals in per.items():
        if not vals:
            out[p] = MISSING_STRATUM
        else:
            counts = Counter(vals)
            best = max(counts.values())
            out[p] = min(v for v, c in counts.items() if c == best)
    return out


def _deal(groups: Mapping[Hashable, list[str]], n_bins: int, rng: np.random.Generator) -> dict[str, int]:
    sizes = np.zeros(n_bins, dtype=int)
    out: dict[str, int] = {}
    for key in sorted(groups, key=str):
        members = sorted(groups[key])
        rng.shuffle(members)
        start = int(rng.integers(n_bins))
        for m in members:
            # smallest bin, ties broken by a rotating start so strata do not all fill fold 0 first
            order = [(start + k) % n_bins for k in range(n_bins)]
            b = min(order, key=lambda j: sizes[j])
            out[m] = b
            sizes[b] += 1
            start = (b + 1) % n_bins
    return out


def patient_folds(strata: Mapping[str, Hashable], n_folds: int, seed: int = 0) -> dict[str, int]:
    """Fold index (0..n_folds-1) of every patient, stratified on ``strata[patient]``."""
    if n_folds < 2:
        raise ConfigError(f"--folds must be >= 2 (got {n_folds})")
    if len(strata) < n_folds:
        raise ConfigError(f"--folds {n_folds}: only {len(strata)} patients with features and labels; use fewer folds")
    groups: dict[Hashable, list[str]] = defaultdict(list)
    for p, s in strata.items():
        groups[s].append(p)
    return _deal(groups, n_folds, np.random.default_rng(seed))


def group_folds(group_of: Mapping[str, Hashable], n_folds: int, seed: int = 0,
                column: str = "group") -> dict[str, int]:
    """Fold index (0..n_folds-1) of every patient of ``group_of`` (patient → group) with every group in one
    fold: groups dealt whole, largest first (ties in seeded random order), each to the fold with the fewest
    patients. ``column`` names the grouping in errors."""
    if n_folds < 2:
        raise ConfigError(f"--folds must be >= 2 (got {n_folds})")
    members: dict[Hashable, list[str]] = defaultdict(list)
    for p, g in group_of.items():
        members[g].append(p)
    if len(members) < n_folds:
        names = ", ".join(map(str, sorted(members, key=str)[:8]))
        fix = (f"use --folds {len(members)}" if len(members) >= 2 else
               "leave out --group-by (one group cannot be held out from itself)")
        raise ConfigError(f"--group-by {column}: {len(members)} group(s) ({names}) for {n_folds} folds, and each "
                          f"group must fall in one fold; {fix}, or group by a column with more values")
    rng = np.random.default_rng(seed)
    keys = sorted(members, key=str)
    ties = {k: float(r) for k, r in zip(keys, rng.random(len(keys)), strict=True)}
    sizes = np.zeros(n_folds, dtype=int)
    out: dict[str, int] = {}
    for g in sorted(keys, key=lambda k: (-len(members[k]), ties[k])):
        b = int(np.argmin(sizes))
        out.update({p: b for p in members[g]})
        sizes[b] += len(members[g])
    return out


def inner_split(
    strata: Mapping[str, Hashable], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Stratified (train, validation) split of patients for early stopping.

    Each stratum with at least 2 patients gives round(val_fraction·n) ≥ 1 of them to validation."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"validation fraction must be in (0, 1) (got {val_fraction})")
    rng = np.random.default_rng(seed)
    groups: dict[Hashable, list[str]] = defaultdict(list)
    for p, s in strata.items():
        groups[s].append(p)
    train: list[str] = []
    val: list[str] = []
    for key in sorted(groups, key=str):
        members = sorted(groups[key])
        rng.shuffle(members)
        n_val = max(1, round(val_fraction * len(members))) if len(members) >= 2 else 0
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    if not val and len(train) >= 2:
        val.append(train.pop())
    return sorted(train), sorted(val)
