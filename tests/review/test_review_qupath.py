"""QuPath export of per-tile scores (wsi_pipeline.review.qupath) on a scored RUN folder: the GeoJSON, and the
export as a per-slide stage on the executor (resume key, status rows, failures, the CLI's failure lines)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from geojson_checks import assert_qupath_structure

from wsi_pipeline.review.qupath import run_export_qupath
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.runfolder.status import read_status


def test_export_of_a_scored_run(review_run, tmp_path: Path) -> None:
    root = tmp_path / "run"
    shutil.copytree(review_run.root, root)
    summary = run_export_qupath(root, model=review_run.model)
    assert summary.ok and summary.stage == "export-qupath" and summary.component == review_run.model
    layout = RunLayout(root)
    path = layout.qupath_geojson(review_run.slide_id)
    assert summary.done == [review_run.slide_id]
    assert summary.values() == {review_run.slide_id: path}
    fc = json.loads(path.read_text())
    assert_qupath_structure(fc)
    assert len(fc["features"]) == len(review_run.l0_xy)
    hot = fc["features"][review_run.hot]
    x, y = (int(v) for v in review_run.l0_xy[review_run.hot])
    s = review_run.tile_size_l0
    assert hot["geometry"]["coordinates"][0][0] == [x, y]
    assert hot["geometry"]["coordinates"][0][2] == [x + s, y + s]
    meas = hot["properties"]["measurements"]
    assert meas["response score"] == pytest.approx(0.97, abs=1e-6)
    assert {"immune_phenotype: inflamed", "immune_phenotype: excluded", "immune_phenotype: desert",
            "til_fraction score"} <= set(meas)
    # classification = the top immune-phenotype class of the tile
    probs = [meas[f"immune_phenotype: {c}"] for c in ("inflamed", "excluded", "desert")]
    assert hot["properties"]["classification"]["name"] == ("inflamed", "excluded", "desert")[int(np.argmax(probs))]


def _scored_copy(review_run, tmp_path: Path) -> tuple[Path, RunLayout]:
    root = tmp_path / "run"
    shutil.copytree(review_run.root, root)
    layout = RunLayout(root)
    for p in (layout.qupath_geojson(review_run.slide_id), layout.qupath_record_json(review_run.slide_id)):
        p.unlink(missing_ok=True)
    return root, layout


def test_export_resumes_on_its_key(review_run, tmp_path: Path) -> None:
    root, layout = _scored_copy(review_run, tmp_path)
    sid = review_run.slide_id
    first = run_export_qupath(root, model=review_run.model)
    assert first.done == [sid]
    record = json.loads(layout.qupath_record_json(sid).read_text())
    assert record["key"] and record["n_tiles"] == len(review_run.l0_xy)
    rows = [r for r in read_status(layout.slides_csv) if r.stage == "export-qupath"]
    assert [(r.slide_id, r.component, r.status) for r in rows] == [(sid, review_run.model, "done")]

    again = run_export_qupath(root, model=review_run.model)  # same inputs: up to date
    assert again.skipped == [sid] and not again.done
    assert again.values() == {sid: layout.qupath_geojson(sid)}

    fewer = run_export_qupath(root, model=review_run.model, targets=["response"])  # other targets: new key
    assert fewer.done == [sid]
    meas = json.loads(layout.qupath_geojson(sid).read_text())["features"][0]["properties"]["measurements"]
    assert set(meas) == {"response score"}

    geo = layout.qupath_geojson(sid)  # the GeoJSON rewritten by something else (e.g. wsi heatmap): redone
    geo.write_text(geo.read_text() + "\n")
    os.utime(geo, ns=(geo.stat().st_atime_ns, geo.stat().st_mtime_ns + 10**9))
    assert run_export_qupath(root, model=review_run.model, targets=["response"]).done == [sid]
    assert run_export_qupath(root, model=review_run.model, targets=["response"], force=True).done == [sid]


def test_a_slide_without_scores_fails_alone(review_run, tmp_path: Path) -> None:
    root, layout = _scored_copy(review_run, tmp_path)
    summary = run_export_qupath(root, model=review_run.model, slide_ids=[review_run.slide_id, "ghost"])
    assert summary.done == [review_run.slide_id]
    assert [(o.slide_id, o.error_type) for o in summary.failed] == [("ghost", "TilesNotFoundError")]
    assert "wsi tile" in summary.failed[0].error
    failed = [r for r in read_status(layout.slides_csv) if r.stage == "export-qupath" and r.status == "failed"]
    assert [r.slide_id for r in failed] == ["ghost"]


def test_cli_prints_each_failure_and_exits_1(review_run, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsi_pipeline.cli import build_app

    root, layout = _scored_copy(review_run, tmp_path)
    r = CliRunner().invoke(build_app(), ["export-qupath", str(root), "--slide", f"{review_run.slide_id},ghost"])
    assert r.exit_code == 1
    assert "1 written, 0 up to date, 1 failed" in r.output
    assert "✗ ghost (export-qupath) TilesNotFoundError" in r.output
    assert "1 slide(s) failed" in r.output and "slides.csv" in r.output
    assert layout.qupath_geojson(review_run.slide_id).is_file()
