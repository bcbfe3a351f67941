"""Every path inside a RUN folder, built in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from wsi_pipeline.formats import api as F
from wsi_pipeline.formats.journal import journal_dir

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(name: str) -> str:
    """A registry/model name as a folder name: 'timm:vit_small_patch16_224' -> 'timm-vit_small_patch16_224'."""
    return _UNSAFE.sub("-", name).strip("-") or "unnamed"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # ---- run-level files
    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    def command_config_yaml(self, command: str) -> Path:
        return self.root / "configs" / f"{command}.yaml"

    @property
    def slides_csv(self) -> Path:
        return self.root / F.SLIDES_CSV

    @property
    def predictions_csv(self) -> Path:
        return self.root / F.PREDICTIONS_CSV

    @property
    def patient_predictions_csv(self) -> Path:
        return self.root / F.PATIENT_PREDICTIONS_CSV

    @property
    def tme_csv(self) -> Path:
        return self.root / F.TME_CSV

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    def stage_record_json(self, stage: str, component: str = "") -> Path:
        """The record of a cohort stage's last run (its resume key): ``stages/<stage>[--<component>].json``."""
        name = f"{stage}--{safe_name(component)}" if component else stage
        return self.root / "stages" / f"{name}.json"

    @property
    def status_dir(self) -> Path:
        """The status journals, one per writing process (``status/slides.<writer>.jsonl``), folded into
        ``slides.csv`` by :func:`wsi_pipeline.runfolder.status.compact_status`."""
        return journal_dir(self.slides_csv)

    # ---- folders
    @property
    def tiles_dir(self) -> Path:
        return self.root / "tiles"

    def features_dir(self, encoder: str) -> Path:
        return self.root / "features" / safe_name(encoder)

    def scores_dir(self, model: str) -> Path:
        return self.root / "scores" / safe_name(model)

    @property
    def tme_dir(self) -> Path:
        return self.root / "tme"

    def heatmap_dir(self, slide_id: str) -> Path:
        return self.root / "heatmaps" / slide_id

    # ---- per-slide files
    def tiles_h5(self, slide_id: str) -> Path:
        return self.tiles_dir / f"{slide_id}.h5"

    def mask_png(self, slide_id: str) -> Path:
        return self.root / "masks" / f"{slide_id}.png"

    def thumbnail_png(self, slide_id: str) -> Path:
        return self.root / "thumbnails" / f"{slide_id}.png"

    def grid_png(self, slide_id: str) -> Path:
        return self.root / "thumbnails" / f"{slide_id}_grid.png"

    def tissue_geojson(self, slide_id: str) -> Path:
        return self.root / "tissue" / f"{slide_id}.geojson"

    def features_h5(self, encoder: str, slide_id: str) -> Path:
        return self.features_dir(encoder) / f"{slide_id}.h5"

    def scores_h5(self, model: str, slide_id: str) -> Path:
        return self.scores_dir(model) / f"{slide_id}.h5"

    def tme_h5(self, slide_id: str) -> Path:
        return self.tme_dir / f"{slide_id}.h5"

    def tme_record_json(self, slide_id: str) -> Path:
        """The TME stage's per-slide record (resume key + the slide's tme.csv row), written last."""
        return self.tme_dir / f"{slide_id}.json"

    def tme_map_png(self, slide_id: str) -> Path:
        return self.tme_dir / f"{slide_id}_classmap.png"

    def tme_geojson(self, slide_id: str) -> Path:
        return self.tme_dir / f"{slide_id}.geojson"

    @property
    def tme_labels_csv(self) -> Path:
        """Labels joined with the TME read-out (``wsi tme --labels``), for ``wsi train``."""
        return self.root / "labels_with_tme.csv"

    # ---- analyses (wsi predictive, wsi evolution)
    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    @property
    def predictive_dir(self) -> Path:
        return self.analysis_dir / "predictive"

    @property
    def predictive_json(self) -> Path:
        return self.predictive_dir / "predictive.json"

    @property
    def predictive_md(self) -> Path:
        return self.predictive_dir / "predictive.md"

    @property
    def predictive_coefficients_csv(self) -> Path:
        return self.predictive_dir / "coefficients.csv"

    @property
    def predictive_subgroups_csv(self) -> Path:
        return self.predictive_dir / "subgroups.csv"

    @property
    def predictive_patients_csv(self) -> Path:
        return self.predictive_dir / "patients.csv"

    @property
    def predictive_forest_png(self) -> Path:
        return self.predictive_dir / "forest.png"

    @property
    def predictive_effects_png(self) -> Path:
        return self.predictive_dir / "subgroup_effects.png"

    @property
    def evolution_dir(self) -> Path:
        return self.analysis_dir / "evolution"

    @property
    def evolution_json(self) -> Path:
        return self.evolution_dir / "evolution.json"

    @property
    def evolution_md(self) -> Path:
        return self.evolution_dir / "evolution.md"

    @property
    def evolution_trajectories_csv(self) -> Path:
        return self.evolution_dir / "trajectories.csv"

    @property
    def evolution_changes_csv(self) -> Path:
        return self.evolution_dir / "changes.csv"

    @property
    def evolution_tests_csv(self) -> Path:
        return self.evolution_dir / "change_tests.csv"

    @property
    def evolution_transitions_csv(self) -> Path:
        return self.evolution_dir / "transitions.csv"

    @property
    def evolution_transitions_png(self) -> Path:
        return self.evolution_dir / "transitions.png"

    def evolution_metric_png(self, metric: str) -> Path:
        return self.evolution_dir / f"trajectories_{safe_name(metric)}.png"

    # ---- review outputs (heatmaps/<slide_id>/...); ``channel`` is a file-safe channel key
    def heatmap_png(self, slide_id: str, channel: str) -> Path:
        return self.heatmap_dir(slide_id) / f"{safe_name(channel)}.png"

    def heatmap_overlay_png(self, slide_id: str, channel: str) -> Path:
        return self.heatmap_dir(slide_id) / f"{safe_name(channel)}_overlay.png"

    def gallery_png(self, slide_id: str, channel: str, which: str) -> Path:
        return self.heatmap_dir(slide_id) / f"{safe_name(channel)}_{which}.png"

    def heatmap_zarr(self, slide_id: str) -> Path:
        return self.heatmap_dir(slide_id) / "heatmap.zarr"

    def heatmap_index_json(self, slide_id: str) -> Path:
        return self.heatmap_dir(slide_id) / "index.json"

    def qupath_geojson(self, slide_id: str) -> Path:
        return self.heatmap_dir(slide_id) / f"{slide_id}_tiles.geojson"

    def qupath_record_json(self, slide_id: str) -> Path:
        """The ``wsi export-qupath`` record of a slide: the resume key its GeoJSON was written under."""
        return self.heatmap_dir(slide_id) / "qupath.json"

    # ---- responder subgroups (wsi subgroups) and held-out evaluation (wsi evaluate)
    def subgroups_dir(self, model: str) -> Path:
        return self.root / "subgroups" / safe_name(model)

    def evaluation_dir(self, model: str) -> Path:
        return self.root / "evaluation" / safe_name(model)

    def slide_ids_with_tiles(self) -> list[str]:
        return sorted(p.stem for p in self.tiles_dir.glob("*.h5")) if self.tiles_dir.exists() else []
