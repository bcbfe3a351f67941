"""The end-to-end example of issue 9 at CI size: generated slides with two arms and two timepoints →
`wsi run` (shipped encoder, MIL model and tissue classifier) → `wsi predictive` → `wsi evolution` →
`wsi report`, driven by scripts/example_predictive_evolution.py; then `wsi train --covariates` on the
features that run produced."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from wsi_pipeline.cli import build_app
from wsi_pipeline.runfolder.layout import RunLayout

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "example_predictive_evolution.py"
N_PATIENTS = 12  # the first 12 patients of the example cohort: 16 slides, 4 patients with two timepoints
JSON_NAME = "predictive_example.json"
BIOMARKER = "til_fraction_pred"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, str]:
    out = tmp_path_factory.mktemp("example_e2e")
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--patients", str(N_PATIENTS), "--fast",
                          "--n-boot", "300", "--summary", str(out / "summary.md")],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    labels = pd.read_csv(out / "slides" / "labels.csv", dtype={"slide_id": str, "patient_id": str})
    return out / "RUN", labels, res.stdout


def _longitudinal(labels: pd.DataFrame) -> list[str]:
    n_tp = labels.groupby("patient_id")["timepoint"].nunique()
    return sorted(n_tp[n_tp >= 2].index)


def test_generated_cohort_and_pipeline_outputs(example: tuple[Path, pd.DataFrame, str]) -> None:
    run, labels, _ = example
    base = labels[labels["timepoint"] == "baseline"]
    assert labels["patient_id"].nunique() == N_PATIENTS and base["patient_id"].is_unique
    assert base["arm"].value_counts().to_dict() == {"control": N_PATIENTS // 2, "treatment": N_PATIENTS // 2}
    assert set(labels["timepoint"]) == {"baseline", "on_treatment"}
    assert len(_longitudinal(labels)) == 4 and len(labels) == N_PATIENTS + 4
    layout = RunLayout(run)
    preds = pd.read_csv(layout.predictions_csv, dtype={"slide_id": str})
    tme = pd.read_csv(layout.tme_csv, dtype={"slide_id": str})
    assert sorted(preds["slide_id"]) == sorted(labels["slide_id"]) == sorted(tme["slide_id"])
    assert preds[BIOMARKER].notna().all() and preds[BIOMARKER].nunique() == len(preds)


def test_predictive_json_and_outputs(example: tuple[Path, pd.DataFrame, str]) -> None:
    run, labels, stdout = example
    doc = json.loads((run / JSON_NAME).read_text())
    keys = ("interaction_estimate", "interaction_ci_low", "interaction_ci_high", "interaction_p")
    for k in keys:
        assert isinstance(doc[k], float) and math.isfinite(doc[k]), (k, doc[k])
    assert 0 < doc["interaction_ci_low"] < doc["interaction_estimate"] < doc["interaction_ci_high"]
    assert 0 < doc["interaction_p"] <= 1 and not doc["warnings"]
    assert doc["model"] == "logistic" and doc["interaction_term"] == "arm:biomarker"
    assert doc["biomarker"]["name"] == f"pred:{BIOMARKER}" and doc["biomarker"]["kind"] == "continuous"
    assert doc["treatment"] == {"column": "label:arm", "treated": "treatment", "control": "control"}
    base = labels[labels["timepoint"] == "baseline"]
    assert doc["n_patients"] == N_PATIENTS and doc["counts"]["n_slides"] == N_PATIENTS  # baseline slides only
    assert doc["n_events"] == int(base["response"].sum())
    assert sum(g["n"] for g in doc["subgroup_effects"]) == N_PATIENTS == doc["overall_effect"]["n"]

    # the same fit, by hand, from the pipeline's predictions.csv and the labels
    import statsmodels.formula.api as smf

    preds = pd.read_csv(RunLayout(run).predictions_csv, dtype={"slide_id": str})
    d = base.merge(preds[["slide_id", BIOMARKER]], on="slide_id")
    d = d.assign(arm=(d["arm"] == "treatment").astype(float),
                 b=(d[BIOMARKER] - d[BIOMARKER].mean()) / d[BIOMARKER].std(ddof=1))
    fit = smf.logit("response ~ arm * b", data=d).fit(disp=0)
    assert doc["interaction_estimate"] == pytest.approx(math.exp(fit.params["arm:b"]), rel=1e-5)
    assert doc["interaction_p"] == pytest.approx(fit.pvalues["arm:b"], rel=1e-4)

    layout = RunLayout(run)
    assert layout.predictive_forest_png.read_bytes()[:8] == PNG
    assert layout.predictive_effects_png.read_bytes()[:8] == PNG
    assert "arm:biomarker" in layout.predictive_md.read_text()
    assert len(pd.read_csv(layout.predictive_subgroups_csv)) == len(doc["subgroup_effects"]) + 1
    assert "interaction" in stdout and "Tumour evolution over timepoints" in stdout


def test_evolution_outputs(example: tuple[Path, pd.DataFrame, str]) -> None:
    run, labels, _ = example
    layout = RunLayout(run)
    longitudinal = _longitudinal(labels)
    base = labels[labels["timepoint"] == "baseline"].set_index("patient_id")
    n_resp = int(base.loc[longitudinal, "response"].sum())
    doc = json.loads(layout.evolution_json.read_text())
    assert doc["order"] == ["baseline", "on_treatment"]
    assert doc["n_patients"] == N_PATIENTS and doc["n_longitudinal"] == len(longitudinal) == 4
    assert BIOMARKER in doc["metrics"] and "immune_phenotype_pred" in doc["phenotypes"]

    # transition tables: every patient with both timepoints once per variable, split by response
    tr = pd.read_csv(layout.evolution_transitions_csv)
    assert set(tr["variable"]) >= {"immune_phenotype_pred"} and set(tr["interval"]) == {"baseline→on_treatment"}
    for _, d in tr.groupby("variable"):
        by_group = d.groupby("group")["n"].sum().to_dict()
        assert by_group == {"all patients": 4, "responders": n_resp, "non-responders": 4 - n_resp}

    # change scores equal on_treatment − baseline of the pipeline's predictions
    preds = pd.read_csv(layout.predictions_csv, dtype={"slide_id": str}).merge(labels, on="slide_id")
    wide = preds.pivot(index="patient_id_y", columns="timepoint", values=BIOMARKER).dropna()
    expected = (wide["on_treatment"] - wide["baseline"]).sort_index()
    ch = pd.read_csv(layout.evolution_changes_csv, dtype={"patient_id": str})
    got = ch[ch["metric"] == BIOMARKER].set_index("patient_id")["delta"].sort_index()
    assert list(got.index) == longitudinal
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-9)
    tests = pd.read_csv(layout.evolution_tests_csv).set_index("metric")
    row = tests.loc[BIOMARKER]
    assert (row["n_responders"], row["n_non_responders"]) == (n_resp, 4 - n_resp)
    assert 0 < row["p"] <= 1 and -1 <= row["cliffs_delta_ci_low"] <= row["cliffs_delta"] <= row["cliffs_delta_ci_high"] <= 1
    traj = pd.read_csv(layout.evolution_trajectories_csv)
    assert (traj["metric"] == BIOMARKER).sum() == len(labels)
    assert layout.evolution_transitions_png.read_bytes()[:8] == PNG
    assert layout.evolution_metric_png(BIOMARKER).read_bytes()[:8] == PNG
    assert "## Phenotype transitions" in layout.evolution_md.read_text()


def _section(html: str, sid: str) -> str:
    start = html.index(f"<section class='card' id='{sid}'>")
    return html[start:html.index("</section>", start)]


def test_report_has_the_analysis_sections(example: tuple[Path, pd.DataFrame, str]) -> None:
    run, _, _ = example
    html = RunLayout(run).report_html.read_text()
    pred = _section(html, "predictive")
    assert "Interaction OR" in pred and "til_fraction_pred" in pred and "data:image/png;base64," in pred
    evo = _section(html, "evolution")
    assert "baseline" in evo and "on_treatment" in evo and "data:image/png;base64," in evo
    assert "http://" not in html and "https://" not in html


def test_train_with_covariates_compares_image_and_covariates(example: tuple[Path, pd.DataFrame, str],
                                                             tmp_path: Path) -> None:
    """`wsi train --covariates age,stage` on the example's features: image-only, covariates-only and
    image + covariates models, out-of-fold metrics and paired bootstrap CIs of their differences."""
    from sklearn.metrics import roc_auc_score

    run, labels, _ = example
    labels_csv = run.parent / "slides" / "labels.csv"
    model = tmp_path / "cov"
    res = CliRunner().invoke(build_app(), [
        "train", str(run), "--labels", str(labels_csv), "--targets", "response:binary", "--covariates", "age,stage",
        "--model-out", str(model), "--folds", "2", "--epochs", "4", "--no-baseline", "--threads", "1",
        "--n-bootstrap", "200", "--seed", "0", "--head", "abmil"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    card = json.loads((model / "model.json").read_text())
    assert card["main_variant"] == "abmil+cov"
    assert {k: (v["image"], v["covariates"]) for k, v in card["variants"].items()} == {
        "abmil+cov": (True, True), "abmil": (True, False), "covariates": (False, True)}
    m = json.loads((model / "metrics.json").read_text())
    oof = pd.read_csv(model / "oof_predictions.csv", dtype={"patient_id": str})
    truth = labels.drop_duplicates("patient_id").set_index("patient_id")["response"]
    auroc = {}
    for name in ("abmil+cov", "abmil", "covariates"):
        o = oof[oof["model"] == name].set_index("patient_id").sort_index()
        assert len(o) == N_PATIENTS
        assert o["fold"].to_dict() == {p: card["patient_folds"][p] for p in o.index}  # each patient out of fold
        auroc[name] = roc_auc_score(truth.loc[o.index], o["response_prob"])
        assert m["models"][name]["response"]["auroc"]["estimate"] == pytest.approx(auroc[name])
    pairs = {(c["model_a"], c["model_b"]): c for c in m["comparisons"]}
    assert set(pairs) == {("abmil+cov", "abmil"), ("abmil+cov", "covariates"), ("abmil", "covariates")}
    for (a, b), c in pairs.items():
        assert c["metric"] == "auroc" and c["ci_low"] <= c["estimate"] <= c["ci_high"]
        assert c["estimate"] == pytest.approx(auroc[a] - auroc[b])
    assert "Paired comparisons" in (model / "metrics.md").read_text()
