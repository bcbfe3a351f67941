"""`wsi run`: tile → extract → predict → TME → heatmaps → report over a folder of slides.

Each stage is a library function that skips what is already done and records per-slide failures in
RUN/slides.csv; this module only chains them, decides which optional stages apply, and summarises.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.config import TilingConfig, from_dict, load_yaml
from wsi_pipeline.errors import ConfigError, WSIPipelineError
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
    workers: int | None = None  # parallel slides for tiling (default: the cores)
    tme: bool = True  # TME read-out when a tissue classifier is available
    heatmaps: bool = True
    report: bool = True
    recursive: bool = False
    tiling: TilingConfig = field(default_factory=TilingConfig)
    extract: dict[str, Any] = field(default_factory=dict)  # ExtractConfig fields
    heatmap: dict[str, Any] = field(default_factory=dict)  # HeatmapConfig fields
    tme_options: dict[str, Any] = field(default_factory=dict)  # TMEConfig fields


@dataclass
class StageResult:
    name: str
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""


@dataclass
class RunSummary:
    stages: list[StageResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> dict[str, list[tuple[str, str]]]:
        """slide_id → [(stage, error)]."""
        out: dict[str, list[tuple[str, str]]] = {}
        for st in self.stages:
            for sid, err in st.failed:
                out.setdefault(sid, []).append((st.name, err))
        return out

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def work_done(self) -> int:
        return sum(st.done for st in self.stages)


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
                              "encoder, labels, workers, heatmaps, report")
    return cfg


def resolve_model_dir(model: str) -> Path:
    """A model folder, or a name under models/ (WSI_MODELS_DIR)."""
    from wsi_pipeline.encoders.project import models_dir

    p = Path(model)
    if (p / "model.json").exists():
        return p
    shipped = models_dir() / model
    if (shipped / "model.json").exists():
        return shipped
    raise ConfigError(f"{model}: not a MIL model folder (no model.json) and no such model under {models_dir()}; "
                      "train one with `wsi train` or pass --model DIR")


def model_encoder(model_dir: Path) -> tuple[str, float | None]:
    """(encoder name, tile µm/px) the model was trained on, read from its card without importing torch."""
    card = json.loads((model_dir / "model.json").read_text())
    enc = card["encoder"]
    return str(enc["name"]), enc.get("target_mpp")


def _newest_mtime(paths: list[Path]) -> float:
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


def predictions_fresh(layout: RunLayout, encoder: str, model_dir: Path, labels: str | None) -> bool:
    """predictions.csv exists and is newer than every feature file, the model and the labels."""
    out = layout.predictions_csv
    if not out.exists() or not layout.patient_predictions_csv.exists():
        return False
    inputs = sorted(layout.features_dir(encoder).glob("*.h5")) + sorted(model_dir.rglob("*"))
    if labels:
        inputs.append(Path(labels))
    import pandas as pd

    have = set(pd.read_csv(out, usecols=["slide_id"])["slide_id"].astype(str))
    want = {p.stem for p in layout.features_dir(encoder).glob("*.h5")}
    return have == want and out.stat().st_mtime >= _newest_mtime(inputs)


def report_fresh(layout: RunLayout, labels: str | None) -> bool:
    out = layout.report_html
    if not out.exists():
        return False
    inputs = [layout.predictions_csv, layout.tme_csv, layout.slides_csv]
    inputs += sorted(layout.root.glob("heatmaps/*/index.json"))
    if labels:
        inputs.append(Path(labels))
    return out.stat().st_mtime >= _newest_mtime(inputs)


ProgressHook = Callable[[str, str, int | None], None]  # (stage, event, total) events: start, advance, end


def run_pipeline(cfg: RunConfig, progress: ProgressHook | None = None) -> RunSummary:
    """Run every stage over ``cfg.slides`` into ``cfg.out``; per-slide failures never stop the run."""
    from wsi_pipeline.runfolder.resolved import save_resolved
    from wsi_pipeline.slide import find_slides

    t0 = time.perf_counter()
    hook = progress or (lambda *_: None)
    cfg.tiling.validate()
    layout = RunLayout(cfg.out)
    paths = find_slides([cfg.slides], recursive=cfg.recursive)
    if not paths:
        raise ConfigError(f"{cfg.slides}: no slide files found (see `wsi info` for supported formats)")
    model_dir = resolve_model_dir(cfg.model)
    model_enc, model_mpp = model_encoder(model_dir)
    encoder = cfg.encoder or model_enc
    if model_mpp and abs(float(model_mpp) - cfg.tiling.target_mpp) > 0.05 * float(model_mpp):
        raise ConfigError(f"model {model_dir.name} was trained on tiles at {model_mpp} µm/px; "
                          f"--target-mpp {cfg.tiling.target_mpp} would feed it another scale")
    save_resolved(cfg.out, "run", {"run": cfg, "model_dir": str(model_dir), "encoder": encoder})
    summary = RunSummary()
    summary.stages.append(_stage_tile(cfg, layout, paths, hook))
    summary.stages.append(_stage_extract(cfg, encoder, hook))
    summary.stages.append(_stage_predict(cfg, layout, encoder, model_dir, hook))
    if cfg.tme:
        summary.stages.append(_stage_tme(cfg, hook))
    if cfg.heatmaps:
        summary.stages.append(_stage_heatmaps(cfg, model_dir, hook))
    if cfg.report:
        summary.stages.append(_stage_report(cfg, layout, model_dir, hook))
    summary.seconds = time.perf_counter() - t0
    save_resolved(cfg.out, "run", {"run": cfg, "model_dir": str(model_dir), "encoder": encoder,
                                   "summary": {s.name: {"done": s.done, "skipped": s.skipped,
                                                        "failed": len(s.failed), "seconds": round(s.seconds, 2)}
                                               for s in summary.stages}})
    return summary


def _stage_tile(cfg: RunConfig, layout: RunLayout, paths: list[Path], hook: ProgressHook) -> StageResult:
    from wsi_pipeline.runfolder.batch import default_workers
    from wsi_pipeline.tiling.runner import tile_slides

    t = time.perf_counter()
    hook("tile", "start", len(paths))
    s = tile_slides(paths, layout, cfg.tiling, workers=default_workers() if cfg.workers is None else cfg.workers,
                    on_result=lambda *_: hook("tile", "advance", None))
    hook("tile", "end", None)
    return StageResult("tile", len(s.done), len(s.skipped), list(s.failed), time.perf_counter() - t)


def _stage_extract(cfg: RunConfig, encoder: str, hook: ProgressHook) -> StageResult:
    from wsi_pipeline.features import ExtractConfig, extract_run

    t = time.perf_counter()
    ecfg = from_dict(ExtractConfig, {**cfg.extract, "encoder": encoder})
    s = extract_run(cfg.out, ecfg, on_start=lambda n, _tiles: hook("extract", "start", n),
                    on_slide=lambda *_: hook("extract", "advance", None))
    hook("extract", "end", None)
    return StageResult("extract", len(s.done), len(s.skipped), list(s.failed), time.perf_counter() - t)


def _stage_predict(cfg: RunConfig, layout: RunLayout, encoder: str, model_dir: Path,
                   hook: ProgressHook) -> StageResult:
    t = time.perf_counter()
    if not layout.features_dir(encoder).exists() or not any(layout.features_dir(encoder).glob("*.h5")):
        return StageResult("predict", note="no features: nothing to predict")
    if predictions_fresh(layout, encoder, model_dir, cfg.labels):
        n = len(list(layout.features_dir(encoder).glob("*.h5")))
        hook("predict", "start", 1)
        hook("predict", "end", None)
        return StageResult("predict", skipped=n, seconds=time.perf_counter() - t)
    from wsi_pipeline.mil.config import PredictConfig
    from wsi_pipeline.mil.predict import predict_run

    hook("predict", "start", 1)
    res = predict_run(PredictConfig(run=str(cfg.out), model=str(model_dir), encoder=encoder, labels=cfg.labels))
    hook("predict", "end", None)
    return StageResult("predict", done=res.n_slides, seconds=time.perf_counter() - t)


def _stage_tme(cfg: RunConfig, hook: ProgressHook) -> StageResult:
    from wsi_pipeline.tme.config import tme_config_from_dict
    from wsi_pipeline.tme.run import run_tme

    t = time.perf_counter()
    tcfg = tme_config_from_dict(dict(cfg.tme_options))
    layout = RunLayout(cfg.out)
    ids = layout.slide_ids_with_tiles()
    before = {sid: _mtime(layout.tme_h5(sid)) for sid in ids}
    hook("tme", "start", len(ids))
    try:
        s = run_tme(cfg.out, tcfg, on_result=lambda *_: hook("tme", "advance", None))
    except WSIPipelineError as e:  # no classifier shipped/installed: the TME read-out is optional
        hook("tme", "end", None)
        log.warning("TME read-out skipped: %s", e)
        return StageResult("tme", note=f"skipped: {e}", seconds=time.perf_counter() - t)
    hook("tme", "end", None)
    redone = sum(1 for row in s.rows if _mtime(layout.tme_h5(row["slide_id"])) != before.get(row["slide_id"]))
    return StageResult("tme", done=redone, skipped=len(s.rows) - redone, failed=list(s.failed),
                       seconds=time.perf_counter() - t)


def _mtime(p: Path) -> int | None:
    return p.stat().st_mtime_ns if p.exists() else None


def _stage_heatmaps(cfg: RunConfig, model_dir: Path, hook: ProgressHook) -> StageResult:
    from wsi_pipeline.review.config import HeatmapConfig
    from wsi_pipeline.review.heatmap import run_heatmaps

    t = time.perf_counter()
    layout = RunLayout(cfg.out)
    if not layout.scores_dir(model_dir.name).exists():
        return StageResult("heatmap", note="no per-tile scores")
    n = len(list(layout.scores_dir(model_dir.name).glob("*.h5")))
    hook("heatmap", "start", n)
    hcfg = from_dict(HeatmapConfig, {**cfg.heatmap, "model": str(model_dir)})
    s = run_heatmaps(cfg.out, hcfg, on_slide=lambda *_: hook("heatmap", "advance", None))
    hook("heatmap", "end", None)
    return StageResult("heatmap", len(s.done), len(s.skipped), list(s.failed), time.perf_counter() - t)


def _stage_report(cfg: RunConfig, layout: RunLayout, model_dir: Path, hook: ProgressHook) -> StageResult:
    t = time.perf_counter()
    hook("report", "start", 1)
    if report_fresh(layout, cfg.labels):
        hook("report", "end", None)
        return StageResult("report", skipped=1, seconds=time.perf_counter() - t)
    from wsi_pipeline.report.build import build_report
    from wsi_pipeline.report.config import ReportConfig

    build_report(ReportConfig(run=str(cfg.out), labels=cfg.labels, model=str(model_dir)))
    hook("report", "end", None)
    return StageResult("report", done=1, seconds=time.perf_counter() - t)
