"""Patient-level folds: no patient in two folds, strata balanced, deterministic; inner validation split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.evaluate.splits import MISSING_STRATUM, group_folds, inner_split, patient_folds, patient_strata


def _cohort(seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    slides, patients, labels = [], [], []
    for p in range(61):
        y = float(rng.random() < 0.3)  # imbalanced
        for s in range(int(rng.integers(1, 4))):  # 1–3 slides per patient
            slides.append(f"P{p}_S{s}")
            patients.append(f"P{p}")
            labels.append(np.nan if (s == 0 and p % 10 == 0) else y)
    return slides, patients, np.array(labels)


def test_folds_never_split_a_patient_and_are_stratified():
    slides, patients, labels = _cohort()
    strata = patient_strata(patients, labels)
    folds = patient_folds(strata, 5, seed=3)
    assert set(folds) == set(patients)
    slide_fold = {s: folds[p] for s, p in zip(slides, patients, strict=True)}
    for p in set(patients):  # every slide of a patient in the patient's fold
        assert len({slide_fold[s] for s, q in zip(slides, patients, strict=True) if q == p}) == 1
    sizes = Counter(folds.values())
    assert max(sizes.values()) - min(sizes.values()) <= 1
    for stratum in set(strata.values()):
        per_fold = Counter(folds[p] for p, s in strata.items() if s == stratum)
        counts = [per_fold.get(k, 0) for k in range(5)]
        assert max(counts) - min(counts) <= 1, (stratum, counts)
    assert patient_folds(strata, 5, seed=3) == folds  # deterministic
    assert patient_folds(strata, 5, seed=4) != folds


def test_patient_strata_majority_and_missing():
    strata = patient_strata(["a", "a", "a", "b", "c"], np.array([1.0, 0.0, 1.0, np.nan, 0.0]))
    assert strata == {"a": 1.0, "b": MISSING_STRATUM, "c": 0.0}


def test_inner_split_is_stratified_and_disjoint():
    strata = {f"p{i}": i % 3 for i in range(30)}
    tr, va = inner_split(strata, 0.2, seed=1)
    assert not set(tr) & set(va) and set(tr) | set(va) == set(strata)
    assert Counter(strata[p] for p in va) == {0: 2, 1: 2, 2: 2}


def test_too_many_folds_is_a_config_error():
    with pytest.raises(ConfigError, match="fewer folds"):
        patient_folds({"a": 0, "b": 1}, 3)


def test_group_folds_keep_every_group_in_one_fold_and_balance_patients():
    sizes = {"A": 9, "B": 7, "C": 6, "D": 5, "E": 4, "F": 3, "G": 2}
    group_of = {f"{g}{i}": g for g, n in sizes.items() for i in range(n)}
    folds = group_folds(group_of, 3, seed=0, column="site")
    assert set(folds) == set(group_of)
    for g in sizes:  # a site is never split between folds
        assert len({folds[p] for p, q in group_of.items() if q == g}) == 1
    per_fold = Counter(folds.values())
    assert sorted(per_fold) == [0, 1, 2] and max(per_fold.values()) - min(per_fold.values()) <= 2, per_fold
    assert group_folds(group_of, 3, seed=0, column="site") == folds  # deterministic


def test_group_folds_with_too_few_groups_say_how_many_folds_fit():
    group_of = {"p1": "north", "p2": "south", "p3": "south"}
    with pytest.raises(ConfigError, match=r"--group-by site: 2 group\(s\) \(north, south\) for 3 folds.*--folds 2"):
        group_folds(group_of, 3, column="site")
    with pytest.raises(ConfigError, match="leave out --group-by"):
        group_folds({"p1": "x", "p2": "x"}, 2, column="site")
