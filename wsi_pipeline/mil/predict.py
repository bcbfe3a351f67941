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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import ConfigError, LabelsError, ScaleMismatchError
from wsi_pipeline.formats.h5 import A_CLASS_NAMES, A_ENCODER, A_MODEL, A_TARGET_MPP, A_TARGETS, ScoreSet
from wsi_pipeline.mil.config import EvaluateConfig, PredictConfig
from wsi_pipeline.mil.data import BagStore, EncoderInfo
from wsi_pipeline.mil.ensemble import Ensemble
from wsi_pipeline.mil.tables import patient_frame, slide_frame
from wsi_pipeline.mil.targets import PATIENT_ID, read_labels_table
from wsi_pipeline.runfolder.executor import Progress, SlideOutcome, StageSummary, run_cohort

log = logging.getLogger(__name__)

STAGE = "predict"

A_TARGET_KINDS = "target_kinds"
MPP_TOLERANCE = 0.02  # relative
MIN_ALIGN_SLIDES = 10  # --align-features: fewer slides describe themselves, not a site


@dataclass
class PredictResult:
    predictions_csv: Path
    patient_predictions_csv: Path
    scores_dir: Path | None
    n_slides: int
    seconds: float
    slides: list[tuple[str, int, float]] = field(default_factory=list)  # (slide_id, tiles, seconds)


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


def scores_key(model_digest: str, ens: Ensemble, features_h5: Path, covariates: Any, aligned: str = "") -> str:
    """What one slide's per-tile scores depend on: the model (its files), the variant, the slide's features
    (their own resume key), for a model with covariates the slide's covariate row, and with
    ``--align-features`` the cohort's feature statistics (``aligned``: their digest)."""
    from wsi_pipeline.formats.h5 import A_PARAMS_HASH, read_h5_attrs
    from wsi_pipeline.formats.hashing import params_hash

    rows = None if covariates is None else covariates.to_dict("records")
    key = {"model": model_digest, "variant": ens.variant.name, "covariates": rows,
           "features": read_h5_attrs(features_h5).get(A_PARAMS_HASH, "")}
    return params_hash({**key, "aligned": aligned} if aligned else key)


def align_to_cohort(ens: Ensemble, store: BagStore, slide_ids: list[str]) -> str:
    """``--align-features``: standardise the model's inputs with the per-dimension mean and std of every tile
    of this RUN (instead of its training folds' statistics), so a cohort whose features are shifted as a
    whole — another site, scanner or stain — meets the heads where they were trained. It assumes the RUN is a
    cohort with a case mix like the training cohort's; on a few slides the statistics describe those slides,
    not the site, hence the minimum. Returns a digest of the statistics (part of the per-tile scores' key)."""
    from wsi_pipeline.formats.hashing import params_hash
    from wsi_pipeline.mil.cv import feature_sums, stats_from_sums

    if len(slide_ids) < MIN_ALIGN_SLIDES:
        raise ConfigError(
            f"{store.layout.features_dir(store.encoder)}: --align-features estimates the cohort's feature "
            f"statistics and needs at least {MIN_ALIGN_SLIDES} slides; this RUN has {len(slide_ids)}. Predict "
            "the whole cohort in one RUN, or leave out --align-features")
    tiles_only = BagStore(store.layout.root, store.encoder, context_rings=0, cache_mb=0)  # no rings to discard
    mean, std = stats_from_sums(*feature_sums(tiles_only, slide_ids, ens.card.encoder_info.embed_dim))
    n = ens.align_features(mean, std)
    log.info("features aligned to this cohort's statistics (%d slides) in %d fold models", len(slide_ids), n)
    return params_hash({"mean": mean.tolist(), "std": std.tolist()})


def predict_run(cfg: PredictConfig, progress: Callable[[str], None] | None = None) -> PredictResult:
    import numpy as np

    from wsi_pipeline.formats.h5 import A_PARAMS_HASH, read_h5_attrs, write_scores_h5
    from wsi_pipeline.formats.tables import write_patient_predictions_csv, write_predictions_csv
    from wsi_pipeline.runfolder.digest import folder_digest
    from wsi_pipeline.runfolder.resolved import save_resolved

    t0 = time.perf_counter()
    ens = Ensemble(cfg.model, cfg.variant, cfg.device, calibrated=cfg.calibrated)
    trained = ens.card.encoder_info
    store = BagStore(cfg.run, cfg.encoder or _default_encoder(cfg.run, trained.name), ens.variant.context_rings,
                     cache_mb=0)
    slide_ids = store.slide_ids()
    if not slide_ids:
        raise ConfigError(f"{store.layout.features_dir(store.encoder)}: no feature files; run `wsi extract`")
    info = store.info(slide_ids)
    check_encoder(trained, info, store.layout.features_dir(store.encoder))
    aligned = align_to_cohort(ens, store, slide_ids) if cfg.align_features else ""
    df = read_labels_table(cfg.labels) if cfg.labels else None
    if ens.needs_covariates and df is None:
        raise LabelsError(f"model {ens.name!r} uses covariates {ens.card.covariate_columns}: pass --labels CSV")
    patient_of = {s: s for s in slide_ids}
    if df is not None:
        patient_of.update({s: str(p) for s, p in zip(df.index, df[PATIENT_ID], strict=True) if s in patient_of})
    layout = store.layout
    attrs = score_attrs(ens, info)
    model_digest = folder_digest(cfg.model)
    preds = []
    done: list[tuple[str, int, float]] = []
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
        out = layout.scores_h5(ens.name, sid)
        key = scores_key(model_digest, ens, store.layout.features_h5(store.encoder, sid), rows, aligned)
        if cfg.write_scores and read_h5_attrs(out).get(A_PARAMS_HASH) != key:  # unchanged scores keep their file
            scores = {k: v.astype(np.float32) for k, v in sp.tile_scores.items()}
            write_scores_h5(out, ScoreSet(bag.l0_xy, scores, {k: v.astype(np.float32) for k, v in sp.attention.items()},
                                          {**attrs, "slide_id": sid, A_PARAMS_HASH: key}))
        done.append((sid, len(bag.l0_xy), time.perf_counter() - t1))
    slides = slide_frame(slide_ids, [patient_of[s] for s in slide_ids], preds, ens.specs, ens.thresholds)
    write_predictions_csv(layout.predictions_csv, slides)
    patients = patient_frame(slides, ens.specs, thresholds=ens.thresholds)
    write_patient_predictions_csv(layout.patient_predictions_csv, patients)
    save_resolved(cfg.run, "predict", {"predict": cfg, "model": {"name": ens.name, "variant": ens.variant.name,
                                                            "calibrated": bool(ens.calibrators),
                                                            "features_aligned": aligned}})
    return PredictResult(layout.predictions_csv, layout.patient_predictions_csv,
                         layout.scores_dir(ens.name) if cfg.write_scores else None, len(slide_ids),
                         time.perf_counter() - t0, done)


class PredictStage:
    """``wsi predict`` as a cohort stage (:mod:`wsi_pipeline.runfolder.executor`): one set of tables for all
    slides, redone when the model, the features, the labels (patient grouping, covariates) or the options
    change."""

    name = STAGE

    def __init__(self, cfg: PredictConfig, progress: Callable[[str], None] | None = None) -> None:
        from wsi_pipeline.formats.cards import read_model_json
        from wsi_pipeline.mil.data import resolve_encoder
        from wsi_pipeline.runfolder.layout import RunLayout

        self.cfg, self.progress = cfg, progress
        self.layout = RunLayout(cfg.run)
        trained = str(read_model_json(cfg.model)["encoder"]["name"])
        self.encoder = resolve_encoder(self.layout, cfg.encoder or _default_encoder(cfg.run, trained))
        self.component = Path(cfg.model).resolve().name
        self.result: PredictResult | None = None

    def key(self) -> str:
        from wsi_pipeline.formats.hashing import params_hash
        from wsi_pipeline.runfolder.digest import content_digest, folder_digest, stamps

        cfg = self.cfg
        return params_hash({"model": folder_digest(cfg.model), "variant": cfg.variant, "encoder": self.encoder,
                            "features": stamps(sorted(self.layout.features_dir(self.encoder).glob("*.h5"))),
                            "labels": content_digest(cfg.labels), "write_scores": cfg.write_scores,
                            "calibrated": cfg.calibrated, **({"align_features": True} if cfg.align_features else {})})

    def outputs_exist(self) -> bool:
        return self.layout.predictions_csv.exists() and self.layout.patient_predictions_csv.exists()

    def process(self, key: str) -> list[SlideOutcome]:
        self.result = predict_run(replace(self.cfg, encoder=self.encoder), self.progress)
        return [SlideOutcome(sid, n_tiles=n, seconds=sec) for sid, n, sec in self.result.slides]


def run_predict(cfg: PredictConfig, progress: Progress | None = None,
                status: Callable[[str], None] | None = None) -> StageSummary:
    """Predict every slide of the RUN unless the tables are up to date with the same inputs (``cfg.force``
    redoes them). ``figures``: predictions_csv, patient_predictions_csv, scores_dir."""
    from dataclasses import replace

    from wsi_pipeline.mil.config import resolve_model_dir

    cfg = replace(cfg, model=str(resolve_model_dir(cfg.model)))
    stage = PredictStage(cfg, status)
    summary = run_cohort(stage, stage.layout, force=cfg.force, progress=progress)
    summary.figures.update(predictions_csv=str(stage.layout.predictions_csv),
                           patient_predictions_csv=str(stage.layout.patient_predictions_csv),
                           scores_dir=str(stage.layout.scores_dir(stage.component)) if cfg.write_scores else "")
    return summary


def _default_encoder(run: str | Path, trained_name: str) -> str | None:
    """The features folder named after the model's encoder when it exists, else auto-detection."""
    from wsi_pipeline.runfolder.layout import RunLayout

    layout = RunLayout(run)
    return trained_name if layout.features_dir(trained_name).is_dir() else None



def run_evaluate(cfg: EvaluateConfig) -> tuple[Path, dict[str, Any]]:
    """Held-out metrics of ``RUN/predictions.csv`` (written by ``wsi predict`` with this model) against a
    labels CSV: ``RUN/evaluation/<model>/metrics.json`` and ``metrics.md``; returns (folder, metrics)."""
    import json

    import yaml

    from wsi_pipeline.formats.atomic import write_text_atomic
    from wsi_pipeline.formats.tables import read_predictions_csv
    from wsi_pipeline.mil.config import resolve_model_dir
    from wsi_pipeline.mil.model_io import ModelDir
    from wsi_pipeline.mil.report import evaluate_heldout, metrics_markdown
    from wsi_pipeline.runfolder.layout import RunLayout

    layout = RunLayout(cfg.run)
    mdir = ModelDir(resolve_model_dir(cfg.model))
    card = mdir.read_card()
    name = mdir.root.resolve().name
    pred_cfg = layout.command_config_yaml("predict")
    used_model = (yaml.safe_load(pred_cfg.read_text()) or {}).get("model", {}) if pred_cfg.exists() else {}
    used = used_model.get("name")
    if not layout.predictions_csv.exists() or used != name:
        raise ConfigError(
            f"{layout.predictions_csv}: no predictions of model {name!r} (last `wsi predict` used {used!r}); "
            f"run `wsi predict {cfg.run} --model {cfg.model}` first"
        )
    slides = read_predictions_csv(layout.predictions_csv)
    variant = card.variants.get(used_model.get("variant") or card.main_variant)
    thresholds = dict(variant.thresholds) if variant is not None and used_model.get("calibrated", True) else {}
    metrics = evaluate_heldout({name: slides}, read_labels_table(cfg.labels), card.target_specs, cfg.n_bootstrap,
                               cfg.seed, thresholds={name: thresholds})
    out = layout.evaluation_dir(name)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    write_text_atomic(out / "metrics.md", metrics_markdown(f"Held-out metrics — {name}", metrics, card.target_specs))
    return out, metrics
