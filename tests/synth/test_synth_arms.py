"""Arm assignment of synthetic cohorts: 1:1 permuted blocks keep every even prefix balanced and leave the
other draws of the generative model unchanged."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.synth.cohort import CohortParams, labels_frame, plan_cohort

SMALL = (1200, 1000)  # class maps only, nothing is rendered


def _patients(params: CohortParams) -> pd.DataFrame:
    return labels_frame(plan_cohort(params)).drop_duplicates("patient_id").set_index("patient_id")


def test_blocks_balance_every_even_prefix_and_keep_other_draws() -> None:
    params = CohortParams(n_patients=20, seed=5, size_l0=SMALL, two_arms=True, arm_assignment="blocks",
                          timepoint_fraction=0.5, multi_slide_fraction=0.0)
    blocks = _patients(params)
    arms = blocks["arm"].tolist()
    for k in range(2, 21, 2):
        assert arms[:k].count("treatment") == k // 2, arms[:k]
    assert arms[0::2] != ["treatment"] * 10 and arms[0::2] != ["control"] * 10  # block order is drawn
    rand = _patients(replace(params, arm_assignment="random"))
    drawn_before_arm = ["age", "stage", "immune_phenotype", "til_fraction"]
    pd.testing.assert_frame_equal(blocks[drawn_before_arm], rand[drawn_before_arm])
    same_arm = blocks["arm"] == rand["arm"]
    assert 0 < same_arm.sum() < len(blocks)
    # the random streams stay aligned: a patient with the same arm gets the same outcomes
    pd.testing.assert_frame_equal(blocks[same_arm], rand[same_arm])
    # a prefix of the cohort is the same patients
    pd.testing.assert_frame_equal(_patients(replace(params, n_patients=8)), blocks.iloc[:8])


def test_unknown_arm_assignment_is_refused() -> None:
    with pytest.raises(ConfigError, match="arm_assignment"):
        plan_cohort(CohortParams(n_patients=2, size_l0=SMALL, two_arms=True, arm_assignment="alternate"))
