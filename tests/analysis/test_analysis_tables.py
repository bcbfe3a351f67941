"""Joining labels, predictions.csv and tme.csv on slide_id; column resolution; patient aggregation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_pipeline.analysis.tables import (
    Sources,
    aggregate_patients,
    apply_select,
    read_labels,
    resolve_column,
    slide_frame,
)
from wsi_pipeline.errors import ConfigError, LabelsError


def _sources() -> Sources:
    labels = pd.DataFrame({
        "slide_id": ["s1", "s2", "s3", "s4"],
        "patient_id": ["p1", "p1", "p2", "p3"],
        "arm": ["drug", "drug", "control", "drug"],
        "timepoint": ["baseline", "baseline", "baseline", "progression"],
        "til_fraction": [0.1, 0.2, 0.3, 0.4],  # e.g. a pathologist's estimate
    })
    preds = pd.DataFrame({
        "slide_id": ["s2", "s1", "s3", "s_unlabelled"],  # other order; s4 missing; one unlabelled slide
        "response_prob": [0.8, 0.6, 0.3, 0.9],
        "immune_phenotype_pred": ["inflamed", "excluded", "desert", "desert"],
    })
    tme = pd.DataFrame({"slide_id": ["s1", "s2", "s3", "s4"], "til_fraction": [0.11, 0.19, 0.28, 0.41],
                        "immune_phenotype": ["inflamed", "inflamed", "desert", "excluded"]})
    return Sources(labels=labels, predictions=preds, tme=tme)


def test_read_labels_defaults_patient_id_and_rejects_duplicates(tmp_path: Path) -> None:
    p = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": ["001", "002"], "response": [1, 0]}).to_csv(p, index=False)
    df = read_labels(p)
    assert list(df["patient_id"]) == ["001", "002"]  # string ids keep their leading zeros
    pd.DataFrame({"slide_id": ["a", "a"]}).to_csv(p, index=False)
    with pytest.raises(LabelsError, match="appears twice"):
        read_labels(p)
    pd.DataFrame({"slide": ["a"]}).to_csv(p, index=False)
    with pytest.raises(LabelsError, match="slide_id"):
        read_labels(p)


def test_resolve_column_rules() -> None:
    src = _sources()
    assert resolve_column("response_prob", src).label == "pred:response_prob"
    assert resolve_column("response", src).label == "pred:response_prob"  # target name → its probability
    assert resolve_column("arm", src).label == "label:arm"
    with pytest.raises(ConfigError, match="tme:til_fraction"):  # in labels and tme.csv: must say which
        resolve_column("til_fraction", src)
    assert resolve_column("tme:til_fraction", src).label == "tme:til_fraction"
    assert resolve_column("label:til_fraction", src).label == "label:til_fraction"
    with pytest.raises(ConfigError, match="not found"):
        resolve_column("nope", src)
    with pytest.raises(ConfigError, match="no column"):
        resolve_column("tme:response_prob", src)


def test_slide_frame_joins_on_slide_id() -> None:
    src = _sources()
    refs = {"bm": resolve_column("response_prob", src), "til": resolve_column("tme:til_fraction", src),
            "arm": resolve_column("arm", src)}
    df = slide_frame(src, refs)
    assert list(df["slide_id"]) == ["s1", "s2", "s3", "s4"]  # the labels define the cohort
    np.testing.assert_allclose(df["bm"].to_numpy(), [0.6, 0.8, 0.3, np.nan])  # matched by id, not by row
    np.testing.assert_allclose(df["til"].to_numpy(), [0.11, 0.19, 0.28, 0.41])
    assert list(df["arm"]) == ["drug", "drug", "control", "drug"]


def test_aggregate_patients_mean_mode_and_consistency() -> None:
    src = _sources()
    refs = {"bm": resolve_column("response_prob", src), "ph": resolve_column("tme:immune_phenotype", src),
            "arm": resolve_column("arm", src)}
    df = slide_frame(src, refs)
    agg = aggregate_patients(df, readouts=["bm", "ph"], patient_level=["arm"]).set_index("patient_id")
    assert agg.loc["p1", "n_slides"] == 2
    assert agg.loc["p1", "bm"] == pytest.approx(0.7)  # mean of its two slides
    assert agg.loc["p1", "ph"] == "inflamed"
    assert np.isnan(agg.loc["p3", "bm"])
    bad = df.copy()
    bad.loc[1, "arm"] = "control"  # p1's two slides disagree on the arm
    with pytest.raises(LabelsError, match="differs between the slides"):
        aggregate_patients(bad, readouts=["bm"], patient_level=["arm"])


def test_apply_select_filters_slides() -> None:
    src = _sources()
    df = slide_frame(src, {"bm": resolve_column("response_prob", src)})
    kept = apply_select(df, src, ["timepoint=baseline"])
    assert list(kept["slide_id"]) == ["s1", "s2", "s3"]
    with pytest.raises(LabelsError, match="keeps no slide"):
        apply_select(df, src, ["timepoint=week99"])
    with pytest.raises(ConfigError, match="COL=VALUE"):
        apply_select(df, src, ["timepoint"])
