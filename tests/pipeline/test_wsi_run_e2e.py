"""`wsi run` end to end on generated slides with one corrupt file among them, using the shipped models."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from wsi_pipeline.runfolder.status import read_status

REPO = Path(__file__).resolve().parents[2]


def _run(slides: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsi_pipeline", "run", str(slides), "--out", str(out),
                           "--workers", "2"], capture_output=True, text=True, timeout=1200)


def _snapshot(run: Path) -> dict[str, int]:
    keep = ("tiles", "features", "scores", "tme", "heatmaps")
    files = [p for d in keep for p in (run / d).rglob("*") if p.is_file()]
    files += [run / "predictions.csv", run / "report.html", run / "tme.csv"]
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in files if p.exists()}


def test_wsi_run_end_to_end_with_a_corrupt_slide(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for sid in ("P002_1", "P003_1"):
        shutil.copy(REPO / "data_samples" / f"{sid}.svs", slides / f"{sid}.svs")
    good = (REPO / "data_samples" / "P004_1.svs").read_bytes()
    (slides / "broken.svs").write_bytes(good[:8] + bytes(200_000))  # TIFF header, then nothing readable
    run = tmp_path / "run"

    r = _run(slides, run)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "broken" in r.stderr
    status = {(s.slide_id, s.stage): s for s in read_status(run / "slides.csv")}
    assert status[("broken", "tile")].status == "failed"
    assert status[("broken", "tile")].error_type == "CorruptSlideError"
    assert status[("P002_1", "tile")].status == "done"
    preds = pd.read_csv(run / "predictions.csv")
    assert sorted(preds["slide_id"]) == ["P002_1", "P003_1"]
    assert {"response_prob", "response_pred", "immune_phenotype_pred", "til_fraction_pred"} <= set(preds.columns)
    assert preds["response_prob"].between(0, 1).all()
    assert (run / "patient_predictions.csv").exists()
    for sid in ("P002_1", "P003_1"):
        hm = run / "heatmaps" / sid
        assert (hm / "index.json").exists() and list(hm.glob("*.png"))
    html = (run / "report.html").read_text()
    assert "P002_1" in html and "broken" in html and "http://" not in html and "https://" not in html
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["command"] == "run" and cfg["run"]["tiling"]["target_mpp"] == 0.5

    before = _snapshot(run)
    r2 = _run(slides, run)
    assert r2.returncode == 1  # the corrupt slide is still reported
    after = _snapshot(run)
    assert before == after, "a second run must not redo any work"
    summary = yaml.safe_load((run / "config.yaml").read_text())["summary"]
    assert all(stage["done"] == 0 for stage in summary.values()), summary

    # --labels on the existing RUN: every stage that depends on the labels is redone, nothing else
    labels = tmp_path / "labels.csv"
    shutil.copy(REPO / "data_samples" / "labels.csv", labels)
    r3 = subprocess.run([sys.executable, "-m", "wsi_pipeline", "run", str(slides), "--out", str(run), "--workers", "2",
                         "--labels", str(labels)], capture_output=True, text=True, timeout=1200)
    assert r3.returncode == 1, r3.stderr[-3000:]
    summary = yaml.safe_load((run / "config.yaml").read_text())["summary"]
    assert {k for k, v in summary.items() if v["done"]} == {"predict", "report"}, summary
    truth = pd.read_csv(labels, dtype=str).set_index("slide_id")
    preds = pd.read_csv(run / "predictions.csv", dtype=str).set_index("slide_id")
    assert (preds["patient_id"] == truth.loc[preds.index, "patient_id"]).all()
    html = (run / "report.html").read_text()
    assert "No labels CSV given" not in html and "AUROC" in html
    assert _snapshot(run)["heatmaps/P002_1/index.json"] == after["heatmaps/P002_1/index.json"]  # scores unchanged

    # --force redoes tiling and everything that depends on it
    r4 = subprocess.run([sys.executable, "-m", "wsi_pipeline", "run", str(slides), "--out", str(run), "--workers", "2",
                         "--labels", str(labels), "--force", "--no-heatmaps"], capture_output=True, text=True,
                        timeout=1200)
    assert r4.returncode == 1, r4.stderr[-3000:]
    summary = yaml.safe_load((run / "config.yaml").read_text())["summary"]
    assert all(summary[s]["done"] >= 1 for s in ("tile", "extract", "predict", "tme", "report")), summary
    assert summary["tile"]["done"] == 2 and summary["tile"]["failed"] == 1
