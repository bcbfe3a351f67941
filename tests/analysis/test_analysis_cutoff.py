"""Dichotomisation: the cut-off is fixed from training data (or given) and never from the test data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_pipeline.analysis.config import PredictiveConfig
from wsi_pipeline.analysis.cutoff import CutoffSpec, dichotomise, learn_cutoff, parse_cutoff
from wsi_pipeline.analysis.predictive import prepare_cohort
from wsi_pipeline.analysis.simulate import simulate_cohort_tables, write_cohort_tables
from wsi_pipeline.analysis.tables import Sources
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.formats import api as F


def test_parse_cutoff() -> None:
    assert parse_cutoff(None) is None
    assert parse_cutoff("0.42") == CutoffSpec(value=0.42)
    assert parse_cutoff("median-train") == CutoffSpec(quantile=0.5)
    assert parse_cutoff("q0.67-train") == CutoffSpec(quantile=0.67)
    assert parse_cutoff("q33-train") == CutoffSpec(quantile=0.33)
    with pytest.raises(ConfigError):
        parse_cutoff("median")  # a median of what? must say -train
    with pytest.raises(ConfigError):
        parse_cutoff("q1.5-train")


def test_learn_cutoff_and_dichotomise() -> None:
    train = np.array([0.1, 0.2, 0.3, 0.4, 0.5, np.nan, 0.9])
    cut = learn_cutoff(CutoffSpec(quantile=0.5), train, "test")
    assert cut.value == pytest.approx(np.nanmedian(train)) and cut.n_train == 6
    assert learn_cutoff(CutoffSpec(value=0.7)).value == 0.7
    with pytest.raises(ConfigError, match="training subset"):
        learn_cutoff(CutoffSpec(quantile=0.5), None)
    out = dichotomise(np.array([0.1, 0.35, 0.35, np.nan]), learn_cutoff(CutoffSpec(value=0.35)))
    np.testing.assert_array_equal(out[:3], [0.0, 1.0, 1.0])
    assert np.isnan(out[3])


def _run(tmp_path: Path, scale_test: float = 1.0) -> tuple[Path, Path]:
    tables = simulate_cohort_tables(n_patients=40, seed=3)
    labels = tables.labels
    test_slides = labels.loc[labels["split"] == "test", "slide_id"]
    preds = tables.predictions
    preds.loc[preds["slide_id"].isin(test_slides), "response_prob"] *= scale_test
    run = tmp_path / f"run{scale_test}"
    write_cohort_tables(tables, run, run / "labels.csv")
    return run, run / "labels.csv"


def test_cutoff_learned_on_training_patients_only(tmp_path: Path) -> None:
    cfgs = []
    for scale in (1.0, 0.5):  # halving every test patient's biomarker must not move the cut-off
        run, labels = _run(tmp_path, scale)
        cfg = PredictiveConfig(run=str(run), labels=str(labels), treatment="arm", outcome="response",
                               biomarker="response_prob", cutoff="median-train", train_split="split=train",
                               select=["timepoint=baseline"]).validate()
        cfgs.append((cfg, prepare_cohort(cfg)))
    (cfg, a), (_, b) = cfgs
    assert a.biomarker.cutoff == b.biomarker.cutoff
    src = Sources.load(cfg.run, cfg.labels)
    lab, pr = src.labels, src.predictions
    base = lab[lab["timepoint"] == "baseline"].merge(pr, on="slide_id")
    train = base[base["split"] == "train"].groupby("patient_id_x")["response_prob"].mean()
    assert a.biomarker.cutoff == pytest.approx(float(np.median(train)))
    assert not set(a.data["patient_id"]) & set(train.index)  # training patients are not analysed
    assert set(a.data["biomarker"].unique()) <= {0.0, 1.0}
    assert a.biomarker.kind == "dichotomised"


def test_cutoff_from_model_oof_predictions(tmp_path: Path) -> None:
    run, labels = _run(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    # `wsi train` writes one row per (model variant, patient); the main variant is named in model.json.
    # Six training patients, two of them also in the RUN (P000, P001): they must leave the analysis.
    pids = ["q0", "q1", "q2", "q3", "P000", "P001"]
    main = [0.2, 0.5, 0.8, 0.15, 0.2, 0.25]
    oof = pd.concat([
        pd.DataFrame({"model": "abmil", "patient_id": pids, "response_prob": main}),
        pd.DataFrame({"model": "meanpool", "patient_id": pids, "response_prob": [0.9] * 6}),
    ])
    oof.to_csv(model / "oof_predictions.csv", index=False)
    F.write_model_json(model / "model.json", {"name": "model", "main_variant": "abmil", "targets": [],
                                              "encoder": {"name": "enc"}, "variants": {}})
    cfg = PredictiveConfig(run=str(run), labels=str(labels), treatment="arm", outcome="response",
                           biomarker="response_prob", cutoff="q0.5-train", model_dir=str(model),
                           select=["timepoint=baseline"]).validate()
    cohort = prepare_cohort(cfg)
    assert cohort.biomarker.cutoff == pytest.approx(float(np.median(main)))  # main variant only
    assert "oof_predictions.csv" in cohort.biomarker.cutoff_source
    assert not {"P000", "P001"} & set(cohort.data["patient_id"])
    assert cohort.counts["n_training_excluded"] == 2 and len(cohort.data) == 38


def test_quantile_cutoff_needs_a_training_subset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="never on the test data"):
        PredictiveConfig(run=str(tmp_path), labels="x.csv", treatment="arm", outcome="response",
                         cutoff="median-train").validate()
