"""The pipeline in Python: one typed function per ``wsi`` command, named like the command.

    from wsi_pipeline import api as wsi

    run = "runs/cohort"
    wsi.tile(["slides/"], run, target_mpp=0.5)
    wsi.extract(run, encoder="timm:resnet18")
    wsi.train(run, labels="labels.csv", targets="response:binary", out="models/response")
    wsi.predict(run, model="models/response")
    wsi.heatmaps(run, model="models/response")
    wsi.report(run)

Each function builds the stage's config dataclass from its keyword arguments (the fields of that dataclass,
which are the YAML keys and, with dashes, the options of the command; an unknown one is a
:class:`~wsi_pipeline.errors.ConfigError`), writes the resolved config where the command does, and calls the
stage's ``run_<command>`` function. Per-slide stages return a
:class:`~wsi_pipeline.runfolder.executor.StageSummary` (``ok``, ``done``, ``skipped``, ``failed``) and, like
the commands, go on past a failing slide. ``progress`` takes :class:`~wsi_pipeline.runfolder.executor.StageEvent`
callbacks. The stage modules are imported when a function is called, not when this module is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsi_pipeline.analysis.evolution import EvolutionResult
    from wsi_pipeline.analysis.predictive import PredictiveResult
    from wsi_pipeline.mil.subgroups import SubgroupsResult
    from wsi_pipeline.mil.train import TrainResult
    from wsi_pipeline.pipeline import RunSummary
    from wsi_pipeline.runfolder.executor import Progress, StageSummary
    from wsi_pipeline.ssl.trainer import SSLResult
    from wsi_pipeline.tme.classifier import TissueClassifier

PathLike = str | Path

__all__ = [
    "eval_encoder", "evaluate", "evolution", "export_qupath", "extract", "federated", "heatmaps", "predict",
    "predictive",
    "report", "run", "ssl_train", "subgroups", "tile", "tissue_train", "tme", "train",
]


def _config(cls: type, options: dict[str, Any]) -> Any:
    from wsi_pipeline.config import from_dict

    return from_dict(cls, {k: str(v) if isinstance(v, Path) else v for k, v in options.items()})


# ---------------------------------------------------------------- per-slide and streaming stages
def tile(slides: PathLike | Sequence[PathLike], run: PathLike, *, recursive: bool = False, workers: int = 0,
         force: bool = False, progress: Progress | None = None, **tiling: Any) -> StageSummary:
    """``wsi tile``: tissue and tiles of every slide (files or folders) at ``target_mpp`` (``**tiling``:
    :class:`~wsi_pipeline.config.TilingConfig` fields). ``workers``: parallel slide processes (0: here)."""
    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.errors import ConfigError
    from wsi_pipeline.runfolder.resolved import save_resolved
    from wsi_pipeline.slide.open import find_slides, no_slides_message
    from wsi_pipeline.tiling.stage import run_tile

    inputs = [slides] if isinstance(slides, (str, Path)) else list(slides)
    cfg = _config(TilingConfig, tiling).validate()
    paths = find_slides(inputs, recursive=recursive)
    if not paths:
        raise ConfigError(no_slides_message(inputs, recursive))
    save_resolved(run, "tile", {"inputs": [str(p) for p in inputs], "tiling": cfg, "workers": workers})
    return run_tile(paths, run, cfg, workers=workers, force=force, progress=progress)


def extract(run: PathLike, encoder: str | None = None, *, progress: Progress | None = None,
            **options: Any) -> StageSummary:
    """``wsi extract``: encoder features of every tile (``**options``: ExtractConfig fields)."""
    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.extract import run_extract
    from wsi_pipeline.runfolder.resolved import save_resolved

    cfg = _config(ExtractConfig, {"encoder": encoder, **options}).validate()
    save_resolved(run, "extract", {"extract": cfg})
    return run_extract(run, cfg, progress=progress)


def tme(run: PathLike, classifier: PathLike = "", *, slide_ids: list[str] | None = None,
        progress: Progress | None = None, **options: Any) -> StageSummary:
    """``wsi tme``: tissue classes per tile, class maps and ``RUN/tme.csv`` (``**options``: TMEConfig fields,
    ``spatial``/``rules``/``roles`` as mappings); the default classifier is the shipped one."""
    from wsi_pipeline.tme.config import tme_config_from_dict
    from wsi_pipeline.tme.run import run_tme

    cfg = tme_config_from_dict({"classifier": str(classifier), **options})
    return run_tme(run, cfg, slide_ids, progress=progress)


def heatmaps(run: PathLike, model: PathLike = "", *, slide_ids: list[str] | None = None,
             progress: Progress | None = None, **options: Any) -> StageSummary:
    """``wsi heatmap``: per-slide heatmaps of a model's tile scores (``**options``: HeatmapConfig fields)."""
    from wsi_pipeline.review.config import HeatmapConfig
    from wsi_pipeline.review.heatmap import run_heatmaps
    from wsi_pipeline.runfolder.resolved import save_resolved

    cfg = _config(HeatmapConfig, {"model": str(model), **options}).validate()
    save_resolved(run, "heatmap", {"heatmap": cfg})
    return run_heatmaps(run, cfg, slide_ids, progress=progress)


def export_qupath(run: PathLike, model: PathLike | None = None, *, targets: list[str] | None = None,
                  slide_ids: list[str] | None = None, attention: bool = False, force: bool = False,
                  progress: Progress | None = None) -> StageSummary:
    """``wsi export-qupath``: one QuPath GeoJSON per scored slide."""
    from wsi_pipeline.review.qupath import run_export_qupath

    return run_export_qupath(run, str(model) if model else None, targets, slide_ids, attention=attention,
                             force=force, progress=progress)


# ---------------------------------------------------------------- cohort stages and models
def train(run: PathLike, labels: PathLike, targets: str | list[Any], out: PathLike, *,
          progress: Callable[[str], None] | None = None, **options: Any) -> TrainResult | None:
    """``wsi train``: cross-validated MIL model into ``out`` (``**options``: TrainConfig fields)."""
    from wsi_pipeline.mil.config import TrainConfig
    from wsi_pipeline.mil.train import run_train

    cfg = _config(TrainConfig, {"run": run, "labels": labels, "targets": targets, "model_out": out, **options})
    return run_train(cfg.validate(), progress=progress)


def federated(sites: dict[str, tuple[PathLike, PathLike]], targets: str | list[Any], out: PathLike,
              **options: Any) -> dict[str, Any]:
    """``wsi federated simulate``: federated training over ``sites`` (name → (RUN, labels CSV)) on this machine,
    one Flower SuperNode process per site; the model folder in ``out`` (``**options``: FederatedConfig fields;
    ``min_sites`` defaults to all sites). Returns ``federated.json``. Needs the extra ``[federated]``."""
    from wsi_pipeline.federated.config import FederatedConfig, SiteConfig
    from wsi_pipeline.federated.launch import run_simulate

    cfg = _config(FederatedConfig, {"targets": targets, "model_out": out, "min_sites": len(sites), **options})
    return run_simulate(cfg, [SiteConfig(run=str(r), labels=str(lab), name=n) for n, (r, lab) in sites.items()])


def predict(run: PathLike, model: PathLike, *, progress: Progress | None = None, **options: Any) -> StageSummary:
    """``wsi predict``: ``predictions.csv``, ``patient_predictions.csv`` and per-tile scores of a model."""
    from wsi_pipeline.mil.config import PredictConfig
    from wsi_pipeline.mil.predict import run_predict

    return run_predict(_config(PredictConfig, {"run": run, "model": model, **options}), progress=progress)


def evaluate(run: PathLike, model: PathLike, labels: PathLike, **options: Any) -> tuple[Path, dict[str, Any]]:
    """``wsi evaluate``: held-out metrics of a model's predictions on a labelled RUN."""
    from wsi_pipeline.mil.config import EvaluateConfig
    from wsi_pipeline.mil.predict import run_evaluate

    return run_evaluate(_config(EvaluateConfig, {"run": run, "model": model, "labels": labels, **options}))


def subgroups(run: PathLike, model: PathLike, labels: PathLike, **options: Any) -> SubgroupsResult:
    """``wsi subgroups``: responder rates by predicted subgroup."""
    from wsi_pipeline.mil.config import SubgroupsConfig
    from wsi_pipeline.mil.subgroups import run_subgroups

    return run_subgroups(_config(SubgroupsConfig, {"run": run, "model": model, "labels": labels, **options}))


def report(run: PathLike, *, force: bool = False, progress: Progress | None = None, **options: Any) -> StageSummary:
    """``wsi report``: the self-contained HTML cohort report (``**options``: ReportConfig fields)."""
    from wsi_pipeline.report.build import run_report
    from wsi_pipeline.report.config import ReportConfig

    return run_report(_config(ReportConfig, {"run": run, **options}), force=force, progress=progress)


def predictive(run: PathLike, labels: PathLike, treatment: str, outcome: str, **options: Any) -> PredictiveResult:
    """``wsi predictive``: treatment × biomarker interaction."""
    from wsi_pipeline.analysis.config import PredictiveConfig
    from wsi_pipeline.analysis.predictive import run_predictive

    return run_predictive(_config(PredictiveConfig, {"run": run, "labels": labels, "treatment": treatment,
                                                     "outcome": outcome, **options}))


def evolution(run: PathLike, labels: PathLike, timepoint: str, **options: Any) -> EvolutionResult:
    """``wsi evolution``: per-patient trajectories of the read-out over timepoints."""
    from wsi_pipeline.analysis.config import EvolutionConfig
    from wsi_pipeline.analysis.evolution import run_evolution

    return run_evolution(_config(EvolutionConfig, {"run": run, "labels": labels, "timepoint": timepoint,
                                                   **options}))


def ssl_train(data: PathLike, out: PathLike, **options: Any) -> SSLResult:
    """``wsi ssl-train``: DINO pretraining of a tile encoder (``**options``: SSLConfig fields, ``augment`` a
    mapping of AugmentConfig fields)."""
    from wsi_pipeline.ssl.config import ssl_config_from_dict
    from wsi_pipeline.ssl.trainer import run_ssl_train

    return run_ssl_train(ssl_config_from_dict({"data": str(data), "out": str(out), **options}, "ssl_train()"))


def eval_encoder(encoder: str | None, data: PathLike, **options: Any) -> dict[str, Any]:
    """``wsi eval-encoder``: k-NN and linear probe on a labelled tile folder."""
    from wsi_pipeline.ssl.config import EvalConfig
    from wsi_pipeline.ssl.evaluate import run_eval_encoder

    return run_eval_encoder(_config(EvalConfig, {"encoder": encoder, "data": data, **options}))


def tissue_train(encoder: str, data: PathLike, out: PathLike, **options: Any) -> TissueClassifier:
    """``wsi tissue-train``: the tile tissue classifier of the TME read-out."""
    from wsi_pipeline.tme.config import TissueTrainConfig
    from wsi_pipeline.tme.train import run_tissue_train

    return run_tissue_train(_config(TissueTrainConfig, {"encoder": encoder, "data": data, "out": out, **options}))


# ---------------------------------------------------------------- everything
def run(slides: PathLike, out: PathLike, *, progress: Progress | None = None, **options: Any) -> RunSummary:
    """``wsi run``: every stage over a folder of slides with a trained model (``**options``: RunConfig
    fields; ``tiling`` a TilingConfig, ``extract``/``heatmap``/``tme_options`` mappings)."""
    from wsi_pipeline.pipeline import RunConfig, run_pipeline

    return run_pipeline(_config(RunConfig, {"slides": slides, "out": out, **options}), progress=progress)
