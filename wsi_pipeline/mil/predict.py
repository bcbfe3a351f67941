"""``wsi predict``: apply a trained model directory (fold ensemble) to every slide of a RUN.

Writes ``RUN/predictions.csv`` (one row per slide), ``RUN/patient_predictions.csv`` (one row per patient;
mean of slide predictions) and ``RUN/scores/<model>/<slide_id>.h5`` with per-tile scores per target,
aligned with the tile coordinates (``formats.ScoreSet``):

- ``scores/<t>``: binary → per-tile P(positive) (N); multiclass → per-tile class probabilities (N×C, class
  names in the root attribute ``class_names_<t>``); regression → per-tile value (N); survival → per-tile
  risk (N). For attention heads these are the classifier applied to each tile's embedding.
- ``attention/<t>``: attention weights (N, sum 1) for ABMIL/TransMIL; absent for Chowder / mean-pool.
Root attributes: ``model``, ``targets``, ``target_kinds``, ``class_names_<t>``, ``encoder``, ``target_mpp``.

The model must be applied to features of the encoder and tile µm/px it was trained on; anything else is
an error naming both (:class:`~wsi_pipeline.errors.ScaleMismatchError` for another µm/px,
:class:`~wsi_pipeline.errors.ConfigError` for another encoder).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import ConfigError, LabelsError, ScaleMismatchError
from wsi_pipeline.formats import A_CLASS_NAMES, A_ENCODER, A_MODEL, A_TARGET_MPP, A_TARGETS, ScoreSet
from wsi_pipeline.mil.config import EvaluateConfig, PredictConfig
from wsi_pipeline.mil.data import BagStore, EncoderInfo
from wsi_pipeline.mil.ensemble import Ensemble
from wsi_pipeline.mil.tables import patient_frame, slide_frame
from wsi_pipeline.mil.targets import PATIENT_ID, read_labels_table

log = logging.getLogger(__name__)

A_TARGET_KINDS = "target_kinds"
MPP_TOLERANCE = 0.02  # relative


@dataclass
class PredictResult:
    predictions_csv: Path
    patient_predictions_csv: Path
    scores_dir: Path | None
    n_slides: int
    seconds: float


def check_encoder(trained: EncoderInfo, found: EncoderInfo, where: Path) -> None:
    """Refuse features from another encoder, embedding size or tile µm/px than the model was trained on."""
    problems = []
    if trained.name != found.name:
        problems.append(f"encoder {found.name!r} (model trained on {trained.name!r})")
    if trained.embed_dim != found.embed_dim:
        problems.append(f"embedding size {found.embed_dim} (model expects {trained.embed_dim})")
    if trained.target_mpp and found.target_mpp and \
            abs(found.target_mpp - trained.target_mpp) > MPP_TOLERANCE * trained.target_mpp:
        problems.append(f"tiles at {found.target_mpp:g} µm/px (model trained at {trained.target_mpp:g} µm/px)")
    if trained.weights_sha256 and found.weights_sha256 and trained.weights_sha256 != found.weights_sha256:
        problems.append(f"encoder weights {found.weights_sha256[:12]} (model trained on features of weights "
                        f"{trained.weights_sha256[:12]}: same name, other weights)")
    if problems:
        err = ScaleMismatchError if len(problems) == 1 and "µm/px" in problems[0] else ConfigError
        raise err(
            f"{where}: features do not match the model: {'; '.join(problems)}. Re-tile at "
            f"{trained.target_mpp} µm/px and extract with encoder {trained.name!r}, or pass --encoder"
        )


def score_attrs(ens: Ensemble, info: EncoderInfo) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        A_MODEL: ens.name, A_TARGETS: [s.name for s in ens.specs], A_TARGET_KINDS: [s.kind for s in ens.specs],
        A_ENCODER: info.name, A_TARGET_MPP: info.target_mpp if info.target_mpp is not None else "",
    }
    for s in ens.specs:
        if s.classes:
            attrs[f"{A_CLASS_NAMES}_{s.name}"] = list(s.classes)
    return attrs


def predict_run(cfg: PredictConfig, progress: Callable[[str], None] | None = None) -> PredictResult:
    import numpy as np

    from wsi_pipeline.formats import write_scores_h5, write_text_atomic
    from wsi_pipeline.runfolder.resolved import save_resolved
    from wsi_pipeline.runfolder.status import STATUS_DONE, SlideStatus, update_status

    t0 = time.perf_counter()
    ens = Ensemble(cfg.model, cfg.variant, cfg.device)
    trained = ens.card.encoder_info
    store = BagStore(cfg.run, cfg.encoder or _default_encoder(cfg.run, trained.name), ens.variant.context_rings,
                     cache_mb=0)
    slide_ids = store.slide_ids()
    if not slide_ids:
        raise ConfigError(f"{store.layout.features_dir(store.encoder)}: no feature files; run `wsi extract`")
    info = store.info(slide_ids)
    check_encoder(trained, info, store.layout.features_dir(store.encoder))
    df = read_labels_table(cfg.labels) if cfg.labels else None
    if ens.needs_covariates and df is None:
        raise LabelsError(f"model {ens.name!r} uses covariates {ens.card.covariate_columns}: pass --labels CSV")
    patient_of = {s: s for s in slide_ids}
    if df is not None:
        patient_of.update({s: str(p) for s, p in zip(df.index, df[PATIENT_ID], strict=True) if s in patient_of})
    layout = store.layout
    attrs = score_attrs(ens, info)
    preds = []
    for i, sid in enumerate(slide_ids):
        if progress:
            progress(f"{sid} ({i + 1}/{len(slide_ids)})")
        t1 = time.perf_counter()
        bag = store.get(sid)
        rows = None
        if ens.needs_covariates:
            if df is None or sid not in df.index:
                raise LabelsError(f"{cfg.labels}: no row for slide {sid!r}; the model needs its covariates")
            rows = df.loc[[sid]]
        sp = ens.predict(bag, rows, tiles=cfg.write_scores)
        preds.append(sp.values)
        if cfg.write_scores:
            scores = {k: v.astype(np.float32) for k, v in sp.tile_scores.items()}
            write_scores_h5(layout.scores_h5(ens.name, sid),
                            ScoreSet(bag.l0_xy, scores, {k: v.astype(np.float32) for k, v in sp.attention.items()},
                                     {**attrs, "slide_id": sid}))
        update_status(layout.slides_csv, SlideStatus(sid, "predict", n_tiles=len(bag.l0_xy), status=STATUS_DONE,
                                                     seconds=round(time.perf_counter() - t1, 3)))
    slides = slide_frame(slide_ids, [patient_of[s] for s in slide_ids], preds, ens.specs)
    write_text_atomic(layout.predictions_csv, slides.to_csv(index=False))
    write_text_atomic(layout.patient_predictions_csv, patient_frame(slides, ens.specs).to_csv(index=False))
    save_resolved(cfg.run, "predict", {"predict": cfg, "model": {"name": ens.name, "variant": ens.variant.name}})
    return PredictResult(layout.predictions_csv, layout.patient_predictions_csv,
                         layout.scores_dir(ens.name) if cfg.write_scores else None, len(slide_ids),
                         time.perf_counter() - t0)


def _default_encoder(run: str | Path, trained_name: str) -> str | None:
    """The features folder named after the model's encoder when it exists, else auto-detection."""
    from wsi_pipeline.runfolder.layout import RunLayout

    layout = RunLayout(run)
    return trained_name if layout.features_dir(trained_name).is_dir() else None



def evaluate_run(cfg: EvaluateConfig) -> tuple[Path, dict[str, Any]]:
    """Held-out metrics of ``RUN/predictions.csv`` (written by ``wsi predict`` with this model) against a
    labels CSV: ``RUN/evaluation/<model>/metrics.json`` and ``metrics.md``; returns (folder, metrics)."""
    import json

    import pandas as pd
    import yaml

    from wsi_pipeline.formats import write_text_atomic
    from wsi_pipeline.mil.model_io import ModelDir
    from wsi_pipeline.mil.report import evaluate_heldout, metrics_markdown
    from wsi_pipeline.runfolder.layout import RunLayout

    layout = RunLayout(cfg.run)
    mdir = ModelDir(cfg.model)
    card = mdir.read_card()
    name = mdir.root.resolve().name
    pred_cfg = layout.command_config_yaml("predict")
    used = (yaml.safe_load(pred_cfg.read_text()) or {}).get("model", {}).get("name") if pred_cfg.exists() else None
    if not layout.predictions_csv.exists() or used != name:
        raise ConfigError(
            f"{layout.predictions_csv}: no predictions of model {name!r} (last `wsi predict` used {used!r}); "
            f"run `wsi predict {cfg.run} --model {cfg.model}` first"
        )
    slides = pd.read_csv(layout.predictions_csv, dtype={"slide_id": str, PATIENT_ID: str})
    metrics = evaluate_heldout({name: slides}, read_labels_table(cfg.labels), card.target_specs, cfg.n_bootstrap,
                               cfg.seed)
    out = layout.evaluation_dir(name)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    write_text_atomic(out / "metrics.md", metrics_markdown(f"Held-out metrics — {name}", metrics, card.target_specs))
    return out, metrics
