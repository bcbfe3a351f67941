"""A small RUN folder for report tests, written with the layout / formats / status helpers: predictions,
patient predictions, TME table, thumbnails, heatmap folders, a failed slide, and the predictive and
evolution analyses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.analysis.config import EvolutionConfig, PredictiveConfig
from wsi_pipeline.analysis.evolution import run_evolution
from wsi_pipeline.analysis.predictive import run_predictive
from wsi_pipeline.analysis.simulate import simulate_cohort_tables, write_cohort_tables
from wsi_pipeline.formats.atomic import write_text_atomic
from wsi_pipeline.formats.tables import write_patient_predictions_csv
from wsi_pipeline.mil.tables import patient_frame
from wsi_pipeline.report.inputs import infer_targets
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.runfolder.status import STATUS_FAILED, SlideStatus, update_status

FAILED_SLIDE = "P999_corrupt"
FAILED_ERROR = "P999_corrupt.svs: truncated JPEG tile at level 0 — re-export the slide"


def _thumbnail(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    h, w = 150, 200
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
    inside = ((xx - cx) / (w * 0.32)) ** 2 + ((yy - cy) / (h * 0.3)) ** 2 <= 1
    img = np.full((h, w, 3), 244, np.uint8)
    tissue = np.clip(np.array([205, 125, 190]) + rng.normal(0, 14, (h, w, 1)), 0, 255).astype(np.uint8)
    img[inside] = tissue[inside]
    return Image.fromarray(img)


def make_fake_run(root: Path, n_patients: int = 40, analyses: bool = True) -> tuple[Path, Path]:
    run, labels_csv = root / "RUN", root / "labels.csv"
    tables = simulate_cohort_tables(n_patients=n_patients, seed=2, b_int=2.5)
    phen = tables.tme.set_index("slide_id")["immune_phenotype"]
    tables.labels["immune_phenotype"] = tables.labels["slide_id"].map(phen)  # truth for the multiclass target
    tables.labels["til_fraction"] = tables.labels["slide_id"].map(tables.tme.set_index("slide_id")["til_fraction"])
    write_cohort_tables(tables, run, labels_csv)
    layout = RunLayout(run)
    specs = infer_targets(tables.predictions, tables.labels)
    write_patient_predictions_csv(layout.patient_predictions_csv, patient_frame(tables.predictions, specs))
    for i, sid in enumerate(tables.predictions["slide_id"]):
        layout.thumbnail_png(sid).parent.mkdir(parents=True, exist_ok=True)
        _thumbnail(i).save(layout.thumbnail_png(sid))
        update_status(layout.slides_csv, SlideStatus(sid, "tile", path=f"/data/{sid}.svs", n_tiles=400 + i))
        if i < 6:  # a few slides with review outputs
            d = layout.heatmap_dir(sid)
            d.mkdir(parents=True, exist_ok=True)
            _thumbnail(100 + i).save(layout.heatmap_png(sid, "response"))
            write_text_atomic(layout.heatmap_index_json(sid), json.dumps(
                {"slide_id": sid, "channels": [{"key": "response", "label": "response",
                                                 "png": layout.heatmap_png(sid, "response").name}]}))
    update_status(layout.slides_csv, SlideStatus(FAILED_SLIDE, "tile", path=f"/data/{FAILED_SLIDE}.svs",
                                                 status=STATUS_FAILED, error=FAILED_ERROR,
                                                 error_type="CorruptSlideError"))
    if analyses:
        run_predictive(PredictiveConfig(run=str(run), labels=str(labels_csv), treatment="arm", outcome="response",
                                        biomarker="tme:til_fraction", select=["timepoint=baseline"]))
        run_evolution(EvolutionConfig(run=str(run), labels=str(labels_csv), timepoint="timepoint",
                                      response="response", n_boot=200))
    return run, labels_csv


@dataclass(frozen=True)
class FakeRun:
    run: Path
    labels: Path
    failed_slide: str = FAILED_SLIDE
    failed_error: str = FAILED_ERROR


@pytest.fixture(scope="session")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> FakeRun:
    return FakeRun(*make_fake_run(tmp_path_factory.mktemp("report")))
