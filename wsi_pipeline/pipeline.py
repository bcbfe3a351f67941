"""`wsi run`: tile → extract → predict → TME → heatmaps → report over a folder of slides.

Each stage runs on the stage executor (:mod:`wsi_pipeline.runfolder.executor`), which skips what is already
done under the same inputs and records per-slide failures in RUN/slides.csv; this module only chains the
stages, decides which optional ones apply, and summarises.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.config import TilingConfig, from_dict, load_yaml
from wsi_pipeline.errors import ConfigError, WSIPipelineError
from wsi_pipeline.runfolder.executor import Progress, StageSummary, iter_failures
from wsi_pipeline.runfolder.layout import RunLayout

log = logging.getLogger(__name__)

DEFAULT_MODEL = "wsip-demo-mil"  # shipped under models/: the MIL model `wsi run` uses by default
STAGES = ("tile", "extract", "predict", "tme", "heatmap", "report")


@dataclass
class RunConfig:
    slides: str = ""
    out: str = ""
    model: str = DEFAULT_MODEL  # MIL model dir, or a name under models/
    encoder: str | None = None  # default: the encoder the model was trained on
    labels: str | None = None
    workers: int | None = None  # parallel slides for tiling and heatmaps (default: the cores)
    tme: bool = True  # TME read-out when a tissue classifier is available
    heatmaps: bool = True
    report: bool = True
    recursive: bool = False
    force: bool = False  # redo tiling and everything that depends on it
    align_features: bool = False  # predict with the cohort's own feature statistics (`wsi predict --align-features`)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    extract: dict[str, Any] = field(default_factory=dict)  # ExtractConfig fields
    heatmap: dict[str, Any] = field(default_factory=dict)  # HeatmapConfig fields
    tme_options: dict[str, Any] = field(default_factory=dict)  # TMEConfig fields


@dataclass
class RunSummary:
    stages: list[StageSummary] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> dict[str, list[tuple[str, str]]]:
        """slide_id → [(stage, error)]."""
        out: dict[str, list[tuple[str, str]]] = {}
        for stage, o in iter_failures(self.stages):
            out.setdefault(o.slide_id, []).append((stage, o.error))
        return out

    @property
    def ok(self) -> bool:
        return not self.failed

    def table(self) -> dict[str, dict[str, Any]]:
        """stage → done / skipped / failed / seconds (cohort stages count 1 for their one output)."""
        return {s.stage: {"done": len(s.done) or int(s.figures.get("done", 0)),
                          "skipped": len(s.skipped) or int(s.figures.get("skipped", 0)),
                          "failed": len(s.failed), "seconds": round(s.seconds, 2)} for s in self.stages}


def config_from_yaml(path: str | Path, base: RunConfig) -> RunConfig:
    """Overlay a YAML config ({tiling: {...}, extract: {...}, heatmap: {...}, tme: {...}, model: ...})."""
    data = load_yaml(path)
    cfg = base
    for key, value in data.items():
        if key == "tiling":
            cfg.tiling = from_dict(TilingConfig, {**cfg.tiling.params(), **value})
        elif key == "tme":
            cfg.tme_options = dict(value or {})
        elif key in ("extract", "heatmap"):
            setattr(cfg, key, dict(value or {}))
        elif key in {f for f in RunConfig.__dataclass_fields__}:
            setattr(cfg, key, value)
        else:
            raise ConfigError(f"{path}: unknown section {key!r}; known: tiling, extract, heatmap, tme, model, "
                              "encoder, labels, workers, heatmaps, report, align_features")
    return cfg


def model_encoder(model_dir: Path) -> tuple[str, float | None]:
    """(encoder name, tile µm/px) the model was trained on, read from its card without importing torch."""
    from wsi_pipeline.formats.cards import read_model_json

    enc = read_model_json(model_dir)["encoder"]
    return str(enc["name"]), enc.get("target_mpp")


def run_pipeline(cfg: RunConfig, progress: Progress | None = None) -> RunSummary:
    """Run every stage over ``cfg.slides`` into ``cfg.out``; per-slide failures never stop the run."""
    from wsi_pipeline.runfolder.resolved import save_resolved
    from wsi_pipeline.slide.open import find_slides

    t0 = time.perf_counter()
    cfg.tiling.validate()
    paths = find_slides([cfg.slides], recursive=cfg.recursive)
    if not paths:
        from wsi_pipeline.slide.open import no_slides_message

        raise ConfigError(no_slides_message([cfg.slides], cfg.recursive))
    if cfg.labels:
        from wsi_pipeline.formats.tables import read_labels_csv

        read_labels_csv(cfg.labels)  # a bad labels file fails now, before hours of work, not at the predict stage
    from wsi_pipeline.mil.config import resolve_model_dir

    model_dir = resolve_model_dir(cfg.model)
    model_enc, model_mpp = model_encoder(model_dir)
    encoder = cfg.encoder or model_enc
    if cfg.encoder:
        from wsi_pipeline.encoders.registry import get_encoder_meta

        get_encoder_meta(cfg.encoder)  # an unknown --encoder fails now, not after tiling
    if model_mpp and abs(float(model_mpp) - cfg.tiling.target_mpp) > 0.05 * float(model_mpp):
        raise ConfigError(f"model {model_dir.name} was trained on tiles at {model_mpp} µm/px; "
                          f"--target-mpp {cfg.tiling.target_mpp} would feed it another scale: pass --target-mpp "
                          f"{model_mpp} (or leave it out), or --model a model trained at {cfg.tiling.target_mpp} µm/px")
    resolved = {"run": cfg, "model_dir": str(model_dir), "encoder": encoder}
    save_resolved(cfg.out, "run", resolved)
    summary = RunSummary()
    for stage in _stages(cfg, paths, encoder, model_dir, progress):
        result = stage()
        if result is None:
            continue
        summary.stages.append(result)
        if result.stage == "tile" and not RunLayout(cfg.out).slide_ids_with_tiles():
            result.note = "no slide could be tiled: later stages skipped"
            break
    summary.seconds = time.perf_counter() - t0
    save_resolved(cfg.out, "run", {**resolved, "summary": summary.table()})
    return summary


def _stages(cfg: RunConfig, paths: list[Path], encoder: str, model_dir: Path, progress: Progress | None
            ) -> list[Any]:
    steps = [lambda: _tile(cfg, paths, progress), lambda: _extract(cfg, encoder, progress),
             lambda: _predict(cfg, encoder, model_dir, progress)]
    if cfg.tme:
        steps.append(lambda: _tme(cfg, progress))
    if cfg.heatmaps:
        steps.append(lambda: _heatmaps(cfg, model_dir, progress))
    if cfg.report:
        steps.append(lambda: _report(cfg, model_dir, progress))
    return steps


def _tile(cfg: RunConfig, paths: list[Path], progress: Progress | None) -> StageSummary:
    from wsi_pipeline.runfolder.batch import default_workers
    from wsi_pipeline.tiling.stage import run_tile

    workers = default_workers() if cfg.workers is None else cfg.workers
    return run_tile(paths, cfg.out, cfg.tiling, workers=workers, force=cfg.force, progress=progress)


def _extract(cfg: RunConfig, encoder: str, progress: Progress | None) -> StageSummary:
    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.extract import run_extract

    ecfg = from_dict(ExtractConfig, {**cfg.extract, "encoder": encoder, "force": cfg.force})
    return run_extract(cfg.out, ecfg, progress=progress)


def _predict(cfg: RunConfig, encoder: str, model_dir: Path, progress: Progress | None) -> StageSummary | None:
    from wsi_pipeline.mil.config import PredictConfig
    from wsi_pipeline.mil.predict import run_predict

    layout = RunLayout(cfg.out)
    if not any(layout.features_dir(encoder).glob("*.h5")):
        return StageSummary("predict", note="no features: nothing to predict")
    pcfg = PredictConfig(run=str(cfg.out), model=str(model_dir), encoder=encoder, labels=cfg.labels, force=cfg.force,
                         align_features=cfg.align_features)
    return run_predict(pcfg, progress=progress)


def _tme(cfg: RunConfig, progress: Progress | None) -> StageSummary:
    from wsi_pipeline.tme.config import tme_config_from_dict
    from wsi_pipeline.tme.run import run_tme

    tcfg = tme_config_from_dict({**cfg.tme_options, "overwrite": cfg.force or cfg.tme_options.get("overwrite", False)})
    try:
        return run_tme(cfg.out, tcfg, progress=progress)
    except WSIPipelineError as e:  # no classifier shipped/installed: the TME read-out is optional
        log.warning("TME read-out skipped: %s", e)
        return StageSummary("tme", note=f"skipped: {e}")


def _heatmaps(cfg: RunConfig, model_dir: Path, progress: Progress | None) -> StageSummary:
    from wsi_pipeline.review.config import HeatmapConfig
    from wsi_pipeline.review.heatmap import run_heatmaps

    layout = RunLayout(cfg.out)
    if not layout.scores_dir(model_dir.name).exists():
        return StageSummary("heatmap", note="no per-tile scores")
    hcfg = from_dict(HeatmapConfig, {"workers": cfg.workers, **cfg.heatmap, "model": str(model_dir),
                                     "force": cfg.force or cfg.heatmap.get("force", False)})
    return run_heatmaps(cfg.out, hcfg, progress=progress)


def _report(cfg: RunConfig, model_dir: Path, progress: Progress | None) -> StageSummary:
    from wsi_pipeline.report.build import run_report
    from wsi_pipeline.report.config import ReportConfig

    return run_report(ReportConfig(run=str(cfg.out), labels=cfg.labels, model=str(model_dir)), force=cfg.force,
                      progress=progress)
