"""`wsi predictive` and `wsi evolution` end to end on a small RUN folder (predictions.csv + tme.csv)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner, Result

from wsi_pipeline.analysis.simulate import simulate_cohort_tables, write_cohort_tables
from wsi_pipeline.cli import build_app
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.synth.run_tables import run_tables_from_truth

N_PATIENTS = 100
JSON_KEYS = {"interaction_estimate", "interaction_ci_low", "interaction_ci_high", "interaction_p",
             "subgroup_effects", "overall_effect"}


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A generated cohort (wsi_pipeline.synth.cohort: two arms, baseline + on-treatment slides, the image
    predicting response under treatment) with the predictions.csv / tme.csv a pipeline would write for it;
    a quarter of the patients are marked as a training split."""
    from wsi_pipeline.synth.cohort import CohortParams, labels_frame, plan_cohort

    root = tmp_path_factory.mktemp("analysis")
    labels = labels_frame(plan_cohort(CohortParams(n_patients=N_PATIENTS, two_arms=True, timepoint_fraction=1.0,
                                                   seed=4)))
    labels["split"] = ["train" if int(p[1:]) % 4 == 0 else "test" for p in labels["patient_id"]]
    write_cohort_tables(run_tables_from_truth(labels, seed=4), root / "RUN", root / "labels.csv")
    return root / "RUN", root / "labels.csv"


def _invoke(args: list[str]) -> Result:
    return CliRunner().invoke(build_app(), args)


def test_predictive_binary_cli(cohort_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, labels = cohort_run
    out = tmp_path / "result.json"
    res = _invoke(["predictive", str(run), "--labels", str(labels), "--treatment", "arm", "--outcome", "response",
                   "--biomarker", "tme:til_fraction", "--select", "timepoint=baseline", "--covariates", "age",
                   "--json", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    doc = json.loads(out.read_text())
    assert set(doc) >= JSON_KEYS
    assert doc["model"] == "logistic" and doc["interaction_scale"] == "odds ratio"
    assert doc["interaction_ci_low"] < doc["interaction_estimate"] < doc["interaction_ci_high"]
    assert doc["interaction_estimate"] > 1  # the image predicts response more under treatment (generator)
    assert doc["n_patients"] == N_PATIENTS and doc["treatment"]["treated"] == "treatment"
    assert doc["treatment"]["control"] == "control"
    assert len(doc["subgroup_effects"]) == 3  # descriptive tertiles of a continuous biomarker
    for g in doc["subgroup_effects"]:
        assert {"rate_control", "rate_treated", "risk_difference", "effect", "effect_ci_low"} <= set(g)
    layout = RunLayout(run)
    for p in (layout.predictive_md, layout.predictive_forest_png, layout.predictive_effects_png,
              layout.predictive_subgroups_csv, layout.predictive_coefficients_csv, layout.predictive_json):
        assert p.exists(), p
    assert layout.predictive_forest_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = layout.predictive_md.read_text()
    assert "arm:biomarker" in md and "forest.png" in md
    assert "interaction" in res.output


def test_predictive_survival_cli_with_learned_cutoff(cohort_run: tuple[Path, Path]) -> None:
    run, labels = cohort_run
    res = _invoke(["predictive", str(run), "--labels", str(labels), "--treatment", "arm", "--outcome", "os_months",
                   "--event", "os_event", "--biomarker", "pred:response_prob", "--cutoff", "median-train",
                   "--train-split", "split=train", "--select", "timepoint=baseline"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    doc = json.loads(RunLayout(run).predictive_json.read_text())
    assert doc["model"] == "cox" and doc["interaction_scale"] == "hazard ratio"
    assert doc["biomarker"]["kind"] == "dichotomised" and "training patients" in doc["biomarker"]["cutoff_source"]
    assert doc["counts"]["n_training_excluded"] == N_PATIENTS // 4
    assert doc["n_patients"] == N_PATIENTS - N_PATIENTS // 4
    assert [g["group"][:3] for g in doc["subgroup_effects"]] == ["low", "hig"]
    assert all("logrank_p" in g for g in doc["subgroup_effects"])


def test_predictive_reads_padded_labels_like_train(cohort_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A labels CSV with spaces around headers and ids (as spreadsheets export them) gives the analysis it
    gives unpadded: the labels reader `wsi train` uses strips them, and so does `wsi predictive`."""
    from wsi_pipeline.mil.targets import read_labels_table

    run, labels = cohort_run
    df = pd.read_csv(labels, dtype=str, keep_default_na=False)
    padded = tmp_path / "padded.csv"
    padded.write_text(",".join(f" {c} " for c in df.columns) + "\n"
                      + "".join(",".join(f" {v}  " for v in row) + "\n" for row in df.itertuples(index=False)))
    assert list(read_labels_table(padded).index) == list(read_labels_table(labels).index)
    docs = []
    for i, lab in enumerate((labels, padded)):
        out = tmp_path / f"r{i}.json"
        res = _invoke(["predictive", str(run), "--labels", str(lab), "--treatment", "arm", "--outcome", "response",
                       "--biomarker", "pred:response_prob", "--select", "timepoint=baseline", "--json", str(out)])
        assert res.exit_code == 0, res.output + repr(res.exception)
        docs.append(json.loads(out.read_text()))
    assert docs[0]["n_patients"] == docs[1]["n_patients"] == N_PATIENTS
    assert docs[1]["interaction_estimate"] == pytest.approx(docs[0]["interaction_estimate"])


def test_predictive_reports_bad_columns(cohort_run: tuple[Path, Path]) -> None:
    run, labels = cohort_run
    base = ["predictive", str(run), "--labels", str(labels), "--treatment", "arm", "--outcome", "response"]
    res = _invoke([*base, "--biomarker", "til_fraction"])  # in tme.csv and in the labels (the truth)
    assert isinstance(res.exception, ConfigError) and "tme:til_fraction" in str(res.exception)
    res = _invoke([*base, "--biomarker", "no_such_column"])
    assert isinstance(res.exception, ConfigError) and "not found" in str(res.exception)
    res = _invoke([*base, "--biomarker", "tme:immune_phenotype"])  # categorical without --positive
    assert isinstance(res.exception, ConfigError) and "--positive" in str(res.exception)
    res = _invoke([*base, "--biomarker", "tme:immune_phenotype", "--positive", "inflamed",
                   "--select", "timepoint=baseline"])
    assert res.exit_code == 0, res.output + repr(res.exception)


def test_evolution_cli(cohort_run: tuple[Path, Path]) -> None:
    run, labels = cohort_run
    res = _invoke(["evolution", str(run), "--labels", str(labels), "--timepoint", "timepoint",
                   "--response", "response", "--select", "arm=treatment", "--n-boot", "300"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    layout = RunLayout(run)
    lab = pd.read_csv(labels)
    n_treated = lab.loc[lab["arm"] == "treatment", "patient_id"].nunique()
    tests = pd.read_csv(layout.evolution_tests_csv)
    til = tests[tests["metric"] == "til_fraction"].iloc[0]
    assert til["interval"] == "baseline→on_treatment"
    assert til["n_responders"] + til["n_non_responders"] == n_treated
    assert til["cliffs_delta"] > 0  # treated responders' TILs rise (the generator's model)
    assert til["cliffs_delta_ci_low"] <= til["cliffs_delta"] <= til["cliffs_delta_ci_high"]
    assert (tests["q_bh"] >= tests["p"]).all()
    trans = pd.read_csv(layout.evolution_transitions_csv)
    assert {"variable", "interval", "group", "from", "to", "n"} <= set(trans.columns)
    everyone = trans[(trans["variable"] == "immune_phenotype") & (trans["group"] == "all patients")]
    assert everyone["n"].sum() == n_treated  # every treated patient has both timepoints
    traj = pd.read_csv(layout.evolution_trajectories_csv)
    assert set(traj["timepoint"]) == {"baseline", "on_treatment"}
    assert layout.evolution_metric_png("til_fraction").exists() and layout.evolution_transitions_png.exists()
    doc = json.loads(layout.evolution_json.read_text())
    assert doc["order"] == ["baseline", "on_treatment"] and doc["n_patients"] == n_treated
    assert "Phenotype transitions" in layout.evolution_md.read_text()


def test_evolution_needs_an_order_for_unknown_timepoints(cohort_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, labels = cohort_run
    lab = pd.read_csv(labels)
    lab["visit"] = lab["timepoint"].map({"baseline": "V_a", "on_treatment": "V_b"})
    lab = lab.drop(columns=["til_fraction"])  # so that a bare name resolves to tme.csv
    lab.to_csv(tmp_path / "labels.csv", index=False)
    res = _invoke(["evolution", str(run), "--labels", str(tmp_path / "labels.csv"), "--timepoint", "visit",
                   "--metrics", "til_fraction"])
    assert isinstance(res.exception, ConfigError) and "--order" in str(res.exception)
    res = _invoke(["evolution", str(run), "--labels", str(tmp_path / "labels.csv"), "--timepoint", "visit",
                   "--order", "V_a,V_b", "--metrics", "til_fraction", "--phenotypes", "tme:immune_phenotype"])
    assert res.exit_code == 0, res.output + repr(res.exception)


def test_strong_effects_are_significant_end_to_end(tmp_path: Path) -> None:
    """On a cohort with a strong, known interaction and on-treatment TIL change
    (wsi_pipeline.analysis.simulate), both commands find them."""
    run, labels = tmp_path / "RUN", tmp_path / "labels.csv"
    write_cohort_tables(simulate_cohort_tables(n_patients=120, seed=5, b_int=2.5), run, labels)
    out = tmp_path / "p.json"
    res = _invoke(["predictive", str(run), "--labels", str(labels), "--treatment", "arm", "--outcome", "response",
                   "--biomarker", "tme:til_fraction", "--select", "timepoint=baseline", "--json", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    doc = json.loads(out.read_text())
    assert doc["interaction_p"] < 0.01 and doc["interaction_ci_low"] > 1
    res = _invoke(["evolution", str(run), "--labels", str(labels), "--timepoint", "timepoint", "--response",
                   "response", "--metrics", "tme:til_fraction", "--n-boot", "300"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    til = pd.read_csv(RunLayout(run).evolution_tests_csv).iloc[0]
    assert til["p"] < 0.01 and til["cliffs_delta_ci_low"] > 0
