"""``wsi train``: patient-level stratified k-fold cross-validation of multi-task MIL models.

Protocol (what the metrics mean):

1. Slides with features and a row in the labels CSV are used; patients are assigned to ``folds`` folds,
   stratified on the first binary/multiclass target (:func:`wsi_pipeline.evaluate.splits.patient_folds`).
   No patient is in two folds.
2. For each fold k: the other folds are the training patients. A stratified inner split of them
   (``val_fraction``) is held out for early stopping (validation loss, ``patience`` epochs); everything
   fitted from data (covariate standardisation/one-hot, regression target scaling) is fitted on the
   training folds only. The best-validation model predicts the held-out fold (all tiles of every bag):
   these are the out-of-fold (OOF) predictions.
3. Patient-level OOF prediction = mean of the patient's slide predictions. Metrics are computed on the
   pooled OOF patient predictions, with percentile CIs from ``n_bootstrap`` patient-level resamples
   (the same resamples for every model, so differences are paired).
4. The final model is the ensemble of the fold models (predictions averaged).

Models trained in one run ("variants"): the chosen head (with the spatial context features), the
mean-pool baseline on the raw embeddings (``baseline``), and with ``covariates``: the covariates-only
linear model, the image-only head and the image + covariates head (the main model).

Distributed: under ``torchrun`` (WORLD_SIZE > 1) the (variant, fold) trainings are dealt across ranks
(gloo process group; each fold is seeded on its own, so results equal a single-process run) and rank 0
gathers the OOF predictions and writes the outputs.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.config import to_dict
from wsi_pipeline.errors import ConfigError, LabelsError
from wsi_pipeline.mil.config import TrainConfig
from wsi_pipeline.mil.covariates import CovariateEncoder, fit_covariates
from wsi_pipeline.mil.data import Bag, BagStore, subsample
from wsi_pipeline.mil.model_io import FoldCard, ModelCard, ModelDir, VariantCard, save_weights
from wsi_pipeline.mil.targets import (
    REGRESSION,
    Labels,
    TargetSpec,
    load_labels,
    stratify_target,
    targets_from_config,
)

log = logging.getLogger(__name__)

BASELINE_HEAD = "meanpool"
COVARIATES_VARIANT = "covariates"


@dataclass
class Variant:
    name: str
    head: str
    head_kwargs: dict[str, Any]
    image: bool = True
    covariates: bool = False
    context_rings: int = 0


@dataclass
class FoldTask:
    variant: Variant
    fold: int


@dataclass
class FoldResult:
    variant: str
    fold: int
    card: FoldCard
    oof: dict[str, dict[str, np.ndarray]]  # slide_id → target → prediction
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainResult:
    model_dir: Path
    card: ModelCard
    metrics: dict[str, Any]
    seconds: float


def plan_variants(cfg: TrainConfig, embed_dim: int) -> list[Variant]:
    """The models trained by one ``wsi train`` call; the first is the main model."""
    kw: dict[str, Any] = {"hidden": cfg.hidden, "dropout": cfg.dropout, "norm_dim": embed_dim}
    if cfg.instance_encoder != "mlp" and cfg.context_rings > 0:
        kw.update(encoder=cfg.instance_encoder, context_dim=embed_dim * cfg.context_rings)
    kw.update(cfg.head_kwargs)
    base_kw = {"hidden": cfg.hidden, "dropout": cfg.dropout, "norm_dim": embed_dim}
    out: list[Variant] = []
    if cfg.covariates:
        out.append(Variant(f"{cfg.head}+cov", cfg.head, kw, True, True, cfg.context_rings))
        out.append(Variant(cfg.head, cfg.head, kw, True, False, cfg.context_rings))
        out.append(Variant(COVARIATES_VARIANT, COVARIATES_VARIANT, {}, False, True, 0))
    else:
        out.append(Variant(cfg.head, cfg.head, kw, True, False, cfg.context_rings))
    if cfg.baseline and not (cfg.head == BASELINE_HEAD and cfg.context_rings == 0):
        out.append(Variant(f"{BASELINE_HEAD}-baseline", BASELINE_HEAD, base_kw, True, False, 0))
    return out


def _seed_of(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------- cohort
@dataclass
class Cohort:
    """The training cohort: slides with both features and labels."""

    labels: Labels
    store: BagStore
    specs: list[TargetSpec]
    patient_of: dict[str, str]
    folds: dict[str, int]  # patient → fold
    strata: dict[str, Any]
    embed_dim: int = 0
    _stats: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def slides_of(self, patients: set[str]) -> list[str]:
        return [s for s in self.labels.slide_ids if self.patient_of[s] in patients]

    def feature_stats(self, slides: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and std of the raw embeddings of every tile of ``slides`` (a fold's training
        slides; cached, as every variant of a fold asks for the same ones). Dimensions (nearly) constant on
        these tiles get std 1, not ~0, so a test tile that differs there is not blown up."""
        key = tuple(sorted(slides))
        if key not in self._stats:
            d = self.embed_dim
            s1, s2, n = np.zeros(d), np.zeros(d), 0
            for sid in slides:
                f = self.store.get(sid).features[:, :d].astype(np.float64)
                s1 += f.sum(0)
                s2 += (f * f).sum(0)
                n += len(f)
            mean = s1 / max(n, 1)
            std = np.sqrt(np.maximum(s2 / max(n, 1) - mean**2, 0.0))
            floor = 1e-3 * float(np.median(std[std > 0])) if np.any(std > 0) else 0.0
            std = np.where(std > max(floor, 1e-8), std, 1.0)
            self._stats[key] = (mean.astype(np.float32), std.astype(np.float32))
        return self._stats[key]


def build_cohort(cfg: TrainConfig) -> Cohort:
    from wsi_pipeline.evaluate.splits import patient_folds, patient_strata

    specs = targets_from_config(cfg.targets)
    labels_all = load_labels(cfg.labels, specs, fit_classes=True)
    store = BagStore(cfg.run, cfg.encoder, cfg.context_rings, cfg.cache_mb)
    have = set(store.slide_ids())
    usable = [s for s in labels_all.slide_ids if s in have]
    missing = [s for s in labels_all.slide_ids if s not in have]
    if missing:
        log.warning("%d labelled slide(s) have no features in %s and are left out (e.g. %s)",
                    len(missing), store.layout.features_dir(store.encoder), missing[:3])
    if not usable:
        raise LabelsError(
            f"{cfg.labels}: no slide_id matches a feature file in {store.layout.features_dir(store.encoder)}"
        )
    labels = labels_all.subset(usable)
    for s in specs:  # every target needs some labels among the usable slides
        if np.all(np.isnan(labels.values[s.name])):
            raise LabelsError(f"{cfg.labels}: target {s.name!r} has no label on any slide with features")
    strat = stratify_target(specs)
    strata = patient_strata(labels.patient_ids, labels.values[strat.name] if strat else None)
    folds = patient_folds(strata, cfg.folds, cfg.seed)
    return Cohort(labels, store, specs, dict(zip(labels.slide_ids, labels.patient_ids, strict=True)), folds, strata)


# ---------------------------------------------------------------- one fold
def _batch_targets(cohort: Cohort, slides: Sequence[str], scalers: dict[str, list[float]]) -> tuple[dict, dict]:
    import torch

    idx = {s: i for i, s in enumerate(cohort.labels.slide_ids)}
    sel = np.array([idx[s] for s in slides])
    ys, evs = {}, {}
    for s in cohort.specs:
        v = cohort.labels.values[s.name][sel].astype(np.float32)
        if s.kind == REGRESSION:
            m, sd = scalers[s.name]
            v = (v - m) / sd
        ys[s.name] = torch.from_numpy(v)
        if s.name in cohort.labels.events:
            evs[s.name] = torch.from_numpy(cohort.labels.events[s.name][sel].astype(np.float32))
    return ys, evs


def _fit_scalers(cohort: Cohort, slides: Sequence[str]) -> dict[str, list[float]]:
    idx = {s: i for i, s in enumerate(cohort.labels.slide_ids)}
    sel = np.array([idx[s] for s in slides])
    out = {}
    for s in cohort.specs:
        if s.kind == REGRESSION:
            v = cohort.labels.values[s.name][sel]
            v = v[~np.isnan(v)]
            m = float(v.mean()) if len(v) else 0.0
            sd = float(v.std()) if len(v) > 1 else 1.0
            out[s.name] = [m, sd if sd > 1e-12 else 1.0]
    return out


class _FoldRunner:
    """Trains one variant on one fold and predicts its held-out patients."""

    def __init__(self, cfg: TrainConfig, cohort: Cohort, task: FoldTask, model_dir: ModelDir) -> None:
        import torch

        from wsi_pipeline.evaluate.splits import inner_split
        from wsi_pipeline.mil.ensemble import build_model, pick_device

        self.cfg, self.cohort, self.v, self.fold, self.dir = cfg, cohort, task.variant, task.fold, model_dir
        self.device = pick_device(cfg.device)
        test_p = {p for p, f in cohort.folds.items() if f == self.fold}
        pool = {p: s for p, s in cohort.strata.items() if p not in test_p}
        tr_p, va_p = inner_split(pool, cfg.val_fraction, seed=_seed_of(cfg.seed, "inner", self.fold))
        self.train_slides = cohort.slides_of(set(tr_p))
        self.val_slides = cohort.slides_of(set(va_p))
        self.test_slides = cohort.slides_of(test_p)
        pool_slides = cohort.slides_of(set(pool))
        self.scalers = _fit_scalers(cohort, pool_slides)
        self.cov_enc: CovariateEncoder | None = None
        self.cov: dict[str, np.ndarray] = {}
        if self.v.covariates:
            df = cohort.labels.extra
            self.cov_enc = fit_covariates(df.loc[pool_slides], cfg.covariates)
            mat = self.cov_enc.transform(df)
            self.cov = {s: mat[i] for i, s in enumerate(cohort.labels.slide_ids)}
        self.in_dim = cohort.embed_dim * (1 + self.v.context_rings) if self.v.image else 0
        seed = _seed_of(cfg.seed, self.v.name, self.fold)
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        vc = VariantCard(self.v.name, self.v.head, self.v.head_kwargs, self.in_dim, self.v.image,
                         self.v.covariates, self.v.context_rings)
        self.vc = vc
        self.model = build_model(vc, cohort.specs, self.cov_enc.dim if self.cov_enc else 0).to(self.device)
        self.lr = float(cfg.lr) if cfg.lr else float(getattr(self.model, "default_lr", 1e-3))
        if self.v.image and hasattr(self.model, "set_feature_stats"):  # statistics of the training folds only
            mean, std = cohort.feature_stats(pool_slides)
            self.model.set_feature_stats(torch.from_numpy(mean), torch.from_numpy(std))

    def _bag(self, slide: str, train: bool, rng: np.random.Generator | None = None) -> Bag | None:
        if not self.v.image:
            return None
        bag = self.cohort.store.get(slide)
        if train or rng is not None:
            bag = subsample(bag, self.cfg.max_tiles, rng if rng is not None else self.rng)
        return bag

    def _logits(self, slides: Sequence[str], train: bool, rng: np.random.Generator | None = None) -> dict:
        import torch

        from wsi_pipeline.mil.ensemble import forward_bag

        outs = [forward_bag(self.model, self._bag(s, train, rng), self.in_dim, self.cov.get(s), self.device)
                for s in slides]
        return {t.name: torch.stack([o.logits[t.name] for o in outs]).cpu() for t in self.cohort.specs}

    def _val_losses(self) -> dict[str, float]:
        """Per-target validation losses (every tile up to ``max_tiles``, a fixed subsample per bag)."""
        import torch

        from wsi_pipeline.mil.losses import multitask_loss

        if not self.val_slides:
            return {}
        self.model.eval()
        with torch.no_grad():
            rng = np.random.default_rng(_seed_of(self.cfg.seed, "val", self.fold))
            logits = self._logits(self.val_slides, train=False, rng=rng)
            ys, evs = _batch_targets(self.cohort, self.val_slides, self.scalers)
            _, parts = multitask_loss(self.cohort.specs, logits, ys, evs)
        return parts

    def fit(self) -> tuple[int, float, list[dict[str, float]]]:
        """Train with early stopping. The criterion is the mean over targets of the validation loss relative
        to its value before training, so targets with large losses (Cox) do not drown the others."""
        import torch

        from wsi_pipeline.mil.losses import multitask_loss

        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.cfg.weight_decay)
        ref = self._val_losses()
        best = (float("inf"), 0, copy.deepcopy(self.model.state_dict()))
        history: list[dict[str, float]] = []
        bad = 0
        order = list(self.train_slides)
        for epoch in range(1, self.cfg.epochs + 1):
            self.model.train()
            self.rng.shuffle(order)
            tot, nb = 0.0, 0
            for b in range(0, len(order), self.cfg.batch_bags):
                batch = order[b : b + self.cfg.batch_bags]
                logits = self._logits(batch, train=True)
                ys, evs = _batch_targets(self.cohort, batch, self.scalers)
                loss, _ = multitask_loss(self.cohort.specs, logits, ys, evs)
                if not loss.requires_grad:
                    continue
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
                opt.step()
                tot += float(loss.detach())
                nb += 1
            parts = self._val_losses()
            rel = [parts[t] / max(ref[t], 1e-6) for t in parts if t in ref]
            score = float(np.mean(rel)) if rel else tot / max(nb, 1)
            history.append({"epoch": epoch, "train_loss": tot / max(nb, 1), "val_score": score,
                            **{f"val_{t}": v for t, v in parts.items()}})
            if score < best[0] - 1e-4:
                best = (score, epoch, copy.deepcopy(self.model.state_dict()))
                bad = 0
            else:
                bad += 1
                if bad >= self.cfg.patience:
                    break
        self.model.load_state_dict(best[2])
        return best[1], best[0], history

    def predict_test(self) -> dict[str, dict[str, np.ndarray]]:
        import torch

        from wsi_pipeline.mil.ensemble import forward_bag, output_to_prediction

        self.model.eval()
        out = {}
        with torch.no_grad():
            for s in self.test_slides:
                bag = self.cohort.store.get(s) if self.v.image else None  # every tile
                o = forward_bag(self.model, bag, self.in_dim, self.cov.get(s), self.device)
                out[s] = output_to_prediction(o, self.cohort.specs, self.scalers, tiles=False).values
        return out

    def run(self) -> FoldResult:
        t0 = time.perf_counter()
        best_epoch, best_val, history = self.fit()
        oof = self.predict_test()
        rel = self.dir.weights_rel(self.v.name, self.fold)
        save_weights(self.dir.root / rel, self.model)
        card = FoldCard(self.fold, rel, self.scalers, self.cov_enc.to_dict() if self.cov_enc else None,
                        best_epoch, best_val, len(self.train_slides), len(self.val_slides), self.lr)
        log.info("%s fold %d: best epoch %d (val loss %.4f), %d/%d/%d slides, %.1fs", self.v.name, self.fold,
                 best_epoch, best_val, len(self.train_slides), len(self.val_slides), len(self.test_slides),
                 time.perf_counter() - t0)
        return FoldResult(self.v.name, self.fold, card, oof, history)


# ---------------------------------------------------------------- distributed
def _dist_info() -> tuple[int, int, bool]:
    """(rank, world, initialised_here): join the torchrun process group when WORLD_SIZE > 1."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _gather(results: list[FoldResult], world: int) -> list[FoldResult]:
    if world <= 1:
        return results
    import torch.distributed as dist

    buckets: list[list[FoldResult] | None] = [None] * world
    dist.all_gather_object(buckets, results)
    return [r for b in buckets if b for r in b]


# ---------------------------------------------------------------- orchestration
def train_cv(cfg: TrainConfig, progress: Callable[[str], None] | None = None) -> TrainResult | None:
    """Run the whole protocol; returns the result on rank 0 (None on other ranks)."""
    import torch

    from wsi_pipeline.mil.heads import list_heads

    cfg.validate()
    if cfg.head not in list_heads():
        raise ConfigError(f"--head {cfg.head!r}: unknown; available: {', '.join(list_heads())}")
    t0 = time.perf_counter()
    rank, world, own_group = _dist_info()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        cohort = build_cohort(cfg)
        info = cohort.store.info(cohort.labels.slide_ids)
        cohort.embed_dim = info.embed_dim
        mdir = ModelDir(cfg.model_out)
        mdir.root.mkdir(parents=True, exist_ok=True)
        variants = plan_variants(cfg, info.embed_dim)
        tasks = [FoldTask(v, k) for v in variants for k in range(cfg.folds)]
        mine = [t for i, t in enumerate(tasks) if i % world == rank]
        results = []
        for t in mine:
            if progress:
                progress(f"{t.variant.name} fold {t.fold + 1}/{cfg.folds}")
            results.append(_FoldRunner(cfg, cohort, t, mdir).run())
        results = _gather(results, world)
        out = None
        if rank == 0:
            from wsi_pipeline.mil.report import write_training_outputs

            card, metrics = write_training_outputs(cfg, cohort, info, variants, results, mdir)
            out = TrainResult(mdir.root, card, metrics, time.perf_counter() - t0)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # the other ranks return once rank 0 has written the outputs
        return out
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def resolved_config(cfg: TrainConfig) -> dict[str, Any]:
    d = to_dict(cfg)
    if not isinstance(cfg.targets, str):
        d["targets"] = [t.to_dict() for t in targets_from_config(cfg.targets)]
    return d
