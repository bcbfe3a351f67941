"""A bounded regression target (a fraction) predicts inside its bounds at slide and tile level (issue 16): through
`wsi predict` / `wsi heatmap` with the shipped demo model, whose version-1 card predates bounds (they are detected
from the training labels its directory keeps), and with a model trained now (bounds stored in the card)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from wsi_pipeline.cli import build_app
from wsi_pipeline.formats.api import read_scores_h5
from wsi_pipeline.mil.simulate import SimSpec, simulate_feature_cohort

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "wsip-demo-mil"
# the two samples with the most negative per-tile til_fraction before clamping (31 of 74 tiles; min -0.08)
SAMPLES = ("P003_1", "P005_on")


def _wsi(*args: object) -> str:
    res = CliRunner().invoke(build_app(), [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def _til_tile_scores(run: Path, model: str) -> np.ndarray:
    files = sorted((run / "scores" / model).glob("*.h5"))
    assert files
    return np.concatenate([read_scores_h5(f).scores["til_fraction"] for f in files])


def test_shipped_model_keeps_til_fraction_in_0_1_at_slide_and_tile_level(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for sid in SAMPLES:
        shutil.copy(REPO / "data_samples" / f"{sid}.svs", slides / f"{sid}.svs")
    run = tmp_path / "RUN"
    _wsi("tile", slides, "--out", run)
    _wsi("extract", run, "--device", "cpu", "--num-workers", "0")
    _wsi("predict", run, "--model", DEMO_MODEL.name)  # a shipped model by its name, as `wsi run --model` takes it

    tiles = _til_tile_scores(run, DEMO_MODEL.name)  # unclamped: 55 of 149 tiles below zero
    assert tiles.min() >= 0.0 and tiles.max() <= 1.0
    slide = pd.read_csv(run / "predictions.csv")["til_fraction_pred"]
    assert slide.between(0.0, 1.0).all()

    _wsi("heatmap", run, "--model", DEMO_MODEL)
    for sid in SAMPLES:
        index = json.loads((run / "heatmaps" / sid / "index.json").read_text())
        (til,) = [c for c in index["channels"] if c["target"] == "til_fraction"]
        assert til["vmin"] >= 0.0  # unclamped: -0.041 on P003_1

    from fastapi.testclient import TestClient

    from wsi_pipeline.review.server import create_app

    with TestClient(create_app(run), base_url="http://127.0.0.1") as client:  # the viewer's legend
        slide = client.get(f"/api/slides/{SAMPLES[0]}").json()
    (til,) = [c for c in slide["channels"] if c["key"] == "til_fraction"]
    labels = [label for _, label in til["legend"]["percentile"]["ticks"]]
    assert labels[0].startswith("0% (") and not any("-" in s or "−" in s for s in labels), labels


def test_a_new_model_stores_detected_fraction_bounds(tmp_path: Path) -> None:
    spec = SimSpec(n_patients=16, embed_dim=8, grid=6, amplitude=4.0, signal_fraction=0.1, seed=3)
    labels = simulate_feature_cohort(tmp_path / "run", tmp_path / "labels.csv", spec)
    model = tmp_path / "m"
    _wsi("train", tmp_path / "run", "--labels", labels, "--targets", "til_fraction:regression,other:regression(os_months)",
         "--model-out", model, "--folds", "2", "--epochs", "3", "--threads", "1", "--n-bootstrap", "20",
         "--seed", "1")
    card = json.loads((model / "model.json").read_text())
    assert card["version"] == 3  # format 3 (stacked calibrators); bounds since 2
    assert {t["name"]: t["bounds"] for t in card["targets"]} == {"til_fraction": [0.0, 1.0], "other": [None, None]}
    _wsi("predict", tmp_path / "run", "--model", model)
    tiles = _til_tile_scores(tmp_path / "run", model.name)
    assert tiles.min() >= 0.0 and tiles.max() <= 1.0
