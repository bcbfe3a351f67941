"""The shipped demo MIL model (`models/wsip-demo-mil`) on `data_samples/` (held-out kather16 mosaics): its immune
phenotype agrees with the generator's truth, and its card says how the head was chosen and how it compares with
its own mean-pool baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from wsi_pipeline.cli import build_app

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "wsip-demo-mil"
SAMPLES = REPO / "data_samples"


def _invoke(args: list[str]) -> None:
    res = CliRunner().invoke(build_app(), args, catch_exceptions=False)
    assert res.exit_code == 0, res.output


def test_card_records_the_chosen_head_and_its_baseline() -> None:
    card = json.loads((MODEL / "model.json").read_text())
    metrics = json.loads((MODEL / "metrics.json").read_text())
    sel = card["head_selection"]
    assert sel["requested"] == "auto" and sel["chosen"] == card["variants"][card["main_variant"]]["head"]
    assert set(sel["candidates"]) >= {"meanpool", "abmil"} and sel["reason"]
    assert sel["reason"] in (MODEL / "README.md").read_text()
    check = metrics["baseline_check"]
    readme = (MODEL / "README.md").read_text()
    if check and check["loses_to_baseline"]:  # never ship a head that loses to its baseline without saying so
        assert "below its own mean-pool baseline" in readme
    # the demo model was trained on the training side of the kather16 split only (data_samples: held-out side)
    assert "training** source images" in readme


@pytest.mark.slow
def test_demo_mil_phenotype_matches_the_truth_on_data_samples(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _invoke(["tile", str(SAMPLES), "--out", str(run), "--workers", "2"])
    _invoke(["extract", str(run), "--device", "cpu"])
    _invoke(["predict", str(run), "--model", str(MODEL), "--device", "cpu", "--no-scores"])
    truth = pd.read_csv(SAMPLES / "labels.csv").set_index("slide_id")
    pred = pd.read_csv(run / "predictions.csv").set_index("slide_id")
    assert sorted(pred.index) == sorted(truth.index)
    agree = pred["immune_phenotype_pred"] == truth.loc[pred.index, "immune_phenotype"]
    table = pd.DataFrame({"truth": truth.immune_phenotype, "mil": pred.immune_phenotype_pred})
    assert agree.sum() >= 6, table
    assert pred["response_prob"].between(0, 1).all()
    spearman = pred["til_fraction_pred"].corr(truth.loc[pred.index, "til_fraction"], method="spearman")
    assert spearman > 0.5, spearman
