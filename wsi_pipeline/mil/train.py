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
4. The final model is the ensemble of the fold models (predictions averaged), calibrated: per
   classification target a post-hoc calibrator fitted on the OOF predictions (``--calibration``; the
   reported "after" OOF figures are cross-fitted, see :mod:`wsi_pipeline.mil.oof`), and the ``t_pred`` and
   subgroup cut-offs chosen on the calibrated OOF predictions; all recorded in the model card.

Head: ``--head auto`` (the default) chooses among ``head_candidates`` by an inner cross-validation inside
each outer fold's training patients (:mod:`wsi_pipeline.mil.selection`); an explicit ``--head`` wins.

Models trained in one run ("variants"): the chosen head (with the spatial context features), the
mean-pool baseline on the raw embeddings (``baseline``), and with ``covariates``: the covariates-only
linear model, the image-only head and the image + covariates head (the main model).

Distributed: under ``torchrun`` (WORLD_SIZE > 1), ``--distribute folds`` (default) deals the (variant, fold)
trainings across ranks (gloo process group; each fold is seeded on its own, so results equal a
single-process run); ``--distribute bags`` has every rank train every model on its share of each step's
slides, with the gradients averaged across ranks (:mod:`wsi_pipeline.mil.distributed`). Rank 0 gathers the
OOF predictions and writes the outputs. Bags stream from their feature files through a cache bounded by
``cache_mb`` (:class:`wsi_pipeline.mil.data.BagStore`), so memory does not grow with the cohort.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import ConfigError, LabelsError
from wsi_pipeline.mil.config import TrainConfig
from wsi_pipeline.mil.covariates import CovariateEncoder, fit_covariates
from wsi_pipeline.mil.cv import Cohort, FoldResult, Variant
from wsi_pipeline.mil.data import Bag, BagStore, subsample
from wsi_pipeline.mil.distributed import Ranks
from wsi_pipeline.mil.model_io import FoldCard, ModelCard, ModelDir, VariantCard, save_weights
from wsi_pipeline.mil.selection import AUTO, HeadSelection, choose_head, criterion_scores, fixed_head
from wsi_pipeline.mil.targets import (
    REGRESSION,
    Labels,
    encode_labels,
    read_labels_table,
    stratify_target,
    targets_from_config,
    unmatched_slides_error,
)

log = logging.getLogger(__name__)

BASELINE_HEAD = "meanpool"
COVARIATES_VARIANT = "covariates"


@dataclass
class FoldTask:
    """One training: ``variant`` on the training patients of outer fold ``fold``; with ``inner`` ≥ 0, the
    inner fold ``inner`` of the head selection inside that fold's training patients (not saved)."""

    variant: Variant
    fold: int
    inner: int = -1


@dataclass
class TrainResult:
    model_dir: Path
    card: ModelCard
    metrics: dict[str, Any]
    seconds: float


def plan_variants(cfg: TrainConfig, embed_dim: int, head: str | None = None) -> list[Variant]:
    """The models trained by one ``wsi train`` call with main head ``head`` (default ``cfg.head``); the first
    is the main model."""
    head = head or cfg.head
    kw: dict[str, Any] = {"hidden": cfg.hidden, "dropout": cfg.dropout, "norm_dim": embed_dim}
    if cfg.instance_encoder != "mlp" and cfg.context_rings > 0:
        kw.update(encoder=cfg.instance_encoder, context_dim=embed_dim * cfg.context_rings)
    kw.update(cfg.head_kwargs)
    base_kw = {"hidden": cfg.hidden, "dropout": cfg.dropout, "norm_dim": embed_dim}
    out: list[Variant] = []
    if cfg.covariates:
        out.append(Variant(f"{head}+cov", head, kw, True, True, cfg.context_rings))
        out.append(Variant(head, head, kw, True, False, cfg.context_rings))
        out.append(Variant(COVARIATES_VARIANT, COVARIATES_VARIANT, {}, False, True, 0))
    else:
        out.append(Variant(head, head, kw, True, False, cfg.context_rings))
    if cfg.baseline and not (head == BASELINE_HEAD and cfg.context_rings == 0):
        out.append(Variant(f"{BASELINE_HEAD}-baseline", BASELINE_HEAD, base_kw, True, False, 0))
    return out


def seed_of(*parts: object) -> int:
    """A stable 31-bit seed from the parts (the same on every machine and Python version)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------- cohort
def build_cohort(cfg: TrainConfig) -> Cohort:
    from wsi_pipeline.evaluate.splits import group_folds, patient_folds, patient_strata

    specs = targets_from_config(cfg.targets)
    table = read_labels_table(cfg.labels)  # read once: the targets and the --group-by column
    labels_all = encode_labels(table, specs, fit_classes=True)
    store = BagStore(cfg.run, cfg.encoder, cfg.context_rings, cfg.cache_mb)
    have = set(store.slide_ids())
    usable = [s for s in labels_all.slide_ids if s in have]
    missing = [s for s in labels_all.slide_ids if s not in have]
    if missing:
        log.warning("%d labelled slide(s) have no features in %s and are left out (e.g. %s)",
                    len(missing), store.layout.features_dir(store.encoder), missing[:3])
    if not usable:
        raise unmatched_slides_error(cfg.labels, missing, sorted(have),
                                     f"a feature file in {store.layout.features_dir(store.encoder)}")
    labels = labels_all.subset(usable)
    for s in specs:  # every target needs some labels among the usable slides
        if np.all(np.isnan(labels.values[s.name])):
            raise LabelsError(f"{cfg.labels}: target {s.name!r} has no label on any slide with features")
    strat = stratify_target(specs)
    strata = patient_strata(labels.patient_ids, labels.values[strat.name] if strat else None)
    groups = patient_groups(table, cfg.group_by, labels) if cfg.group_by else {}
    folds = group_folds(groups, cfg.folds, cfg.seed, cfg.group_by) if groups else patient_folds(strata, cfg.folds, cfg.seed)
    if groups:
        _log_groups(cfg, groups, folds)
    return Cohort(labels, store, specs, dict(zip(labels.slide_ids, labels.patient_ids, strict=True)), folds, strata,
                  groups=groups)


def _log_groups(cfg: TrainConfig, groups: dict[str, str], folds: dict[str, int]) -> None:
    per_fold: dict[int, set[str]] = {}
    for p, f in folds.items():
        per_fold.setdefault(f, set()).add(groups[p])
    n = len(set(groups.values()))
    log.info("folds grouped by %r: %d groups in %d folds (%s)", cfg.group_by, n, cfg.folds,
             "; ".join(f"fold {f + 1}: {', '.join(sorted(g))}" for f, g in sorted(per_fold.items())))
    fewest = n - max(len(g) for g in per_fold.values())
    if cfg.head == AUTO and fewest < cfg.selection_folds:
        log.warning("--group-by %s: an outer fold keeps only %d group(s) for the %d-fold head selection; its inner "
                    "folds are split by patient instead (more groups, or fewer selection folds, keep them grouped)",
                    cfg.group_by, fewest, cfg.selection_folds)


def patient_groups(table: Any, column: str, labels: Labels) -> dict[str, str]:
    """patient → value of the labels table's ``column`` (``--group-by``; ``table``: :func:`read_labels_table`)
    for the patients of ``labels``; every slide of a patient must name one group."""
    path = table.attrs["path"]
    if column not in table.columns:
        raise LabelsError(f"{path}: --group-by {column!r}: no such column (columns: {', '.join(table.columns)}); "
                          f"name the column that holds each patient's site, or leave out --group-by")
    out: dict[str, str] = {}
    for sid, pid in zip(labels.slide_ids, labels.patient_ids, strict=True):
        g = str(table.at[sid, column]).strip()
        if not g or g.lower() == "nan":
            raise LabelsError(f"{path}: slide {sid!r} has no {column!r} value; fill it in (every slide of a grouped "
                              f"cohort needs its group), or leave out --group-by")
        if out.setdefault(pid, g) != g:
            raise LabelsError(f"{path}: patient {pid!r} has slides in {column!r} groups {out[pid]!r} and {g!r}; a "
                              f"patient must belong to one group; correct the CSV")
    return out


def _patients(cohort: Cohort, cfg: TrainConfig, task: FoldTask) -> tuple[set[str], dict[str, Any]]:
    """(held-out patients, training pool with strata) of a task: the outer fold, or an inner fold of the
    head selection drawn inside the outer fold's training patients only."""
    from wsi_pipeline.evaluate.splits import group_folds, patient_folds

    pool = {p: s for p, s in cohort.strata.items() if cohort.folds[p] != task.fold}
    if task.inner < 0:
        return {p for p, f in cohort.folds.items() if f == task.fold}, pool
    seed = seed_of(cfg.seed, "select", task.fold)
    pool_groups = {p: cohort.groups[p] for p in pool if p in cohort.groups}
    if len(set(pool_groups.values())) >= cfg.selection_folds:
        inner = group_folds(pool_groups, cfg.selection_folds, seed, cfg.group_by or "group")
    else:  # too few groups left in this outer fold's training patients (build_cohort warned)
        inner = patient_folds(pool, cfg.selection_folds, seed)
    test = {p for p, f in inner.items() if f == task.inner}
    return test, {p: s for p, s in pool.items() if p not in test}


# ---------------------------------------------------------------- one fold
def batch_targets(cohort: Cohort, slides: Sequence[str], scalers: dict[str, list[float]]) -> tuple[dict, dict]:
    """The labels of ``slides`` as tensors per target (regression standardised with ``scalers``) and the
    survival event indicators."""
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
            v = v[~np.isnan(v)].astype(np.float64)
            out[s.name] = scaler_from_sums(len(v), float(v.sum()), float((v * v).sum()))
    return out


def scaler_from_sums(n: int, total: float, total_sq: float) -> list[float]:
    """[mean, std] of a regression target from its count, sum and sum of squares (summed over sites when
    federated); std 1 when it cannot be estimated."""
    if n <= 0:
        return [0.0, 1.0]
    m = total / n
    sd = float(np.sqrt(max(total_sq / n - m * m, 0.0))) if n > 1 else 1.0
    return [float(m), sd if sd > 1e-12 else 1.0]


class _FoldRunner:
    """Trains one variant on one fold and predicts its held-out patients."""

    def __init__(self, cfg: TrainConfig, cohort: Cohort, task: FoldTask, model_dir: ModelDir,
                 ranks: Ranks | None = None) -> None:
        import torch

        from wsi_pipeline.evaluate.splits import inner_split
        from wsi_pipeline.mil.ensemble import build_model, pick_device

        self.cfg, self.cohort, self.v, self.fold, self.dir = cfg, cohort, task.variant, task.fold, model_dir
        self.inner = task.inner
        self.ranks = ranks or Ranks()
        self.epochs = cfg.epochs if task.inner < 0 else min(cfg.epochs, cfg.selection_epochs)
        # seeds of the outer trainings are those of a run without selection (same models)
        self.key: tuple[object, ...] = (self.fold,) if task.inner < 0 else (self.fold, "select", task.inner)
        self.device = pick_device(cfg.device)
        test_p, pool = _patients(cohort, cfg, task)
        tr_p, va_p = inner_split(pool, cfg.val_fraction, seed=seed_of(cfg.seed, "inner", *self.key))
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
        seed = seed_of(cfg.seed, self.v.name, *self.key)
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)  # bag order and tile subsamples
        self.order_rng = self.rng
        if self.ranks.shards_bags:  # one bag order on every rank; each rank subsamples its own bags
            self.order_rng = np.random.default_rng(seed)
            self.rng = np.random.default_rng(seed_of(cfg.seed, self.v.name, *self.key, "rank", self.ranks.rank))
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

    def _sharded_logits(self, slides: Sequence[str], rng: np.random.Generator) -> dict:
        """Logits of ``slides`` (no gradient), each rank forwarding its share, gathered in ``slides``' order."""
        import torch

        if not self.ranks.shards_bags:
            return self._logits(slides, train=False, rng=rng)
        local = self.ranks.shard(slides)
        mine = self._logits(local, train=False, rng=rng) if local else {}
        per_slide = {s: {t: v[i] for t, v in mine.items()} for i, s in enumerate(local)}
        every = self.ranks.gather_dict(per_slide)
        return {t.name: torch.stack([every[s][t.name] for s in slides]) for t in self.cohort.specs}

    def _step(self, opt: Any, batch: Sequence[str]) -> float | None:
        """One optimiser step on ``batch`` (this rank's share of it when bags are sharded); the step's mean loss,
        None when no bag of the batch has a label."""
        import torch

        from wsi_pipeline.mil.losses import multitask_loss

        local = self.ranks.shard(batch)
        opt.zero_grad()
        loss_value, weight = 0.0, 0.0
        if local:
            logits = self._logits(local, train=True)
            ys, evs = batch_targets(self.cohort, local, self.scalers)
            loss, _ = multitask_loss(self.cohort.specs, logits, ys, evs)
            if loss.requires_grad:
                loss.backward()
                loss_value, weight = float(loss.detach()), float(len(local))
        params = [p for p in self.model.parameters() if p.requires_grad]
        total = self.ranks.average_gradients(params, weight)
        if total <= 0:
            return None
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        loss_sum, _ = self.ranks.sum(loss_value * weight, weight)
        return loss_sum / total

    def _val_losses(self) -> dict[str, float]:
        """Per-target validation losses (every tile up to ``max_tiles``, a fixed subsample per bag)."""
        import torch

        from wsi_pipeline.mil.losses import multitask_loss

        if not self.val_slides:
            return {}
        self.model.eval()
        with torch.no_grad():
            rank_key = (self.ranks.rank,) if self.ranks.shards_bags else ()
            rng = np.random.default_rng(seed_of(self.cfg.seed, "val", *self.key, *rank_key))
            logits = self._sharded_logits(self.val_slides, rng)
            ys, evs = batch_targets(self.cohort, self.val_slides, self.scalers)
            _, parts = multitask_loss(self.cohort.specs, logits, ys, evs)
        return parts

    def fit(self) -> tuple[int, float, list[dict[str, float]]]:
        """Train with early stopping. The criterion is the mean over targets of the validation loss relative
        to its value before training, so targets with large losses (Cox) do not drown the others."""
        import torch


        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.cfg.weight_decay)
        ref = self._val_losses()
        best = (float("inf"), 0, copy.deepcopy(self.model.state_dict()))
        history: list[dict[str, float]] = []
        bad = 0
        order = list(self.train_slides)
        for epoch in range(1, self.epochs + 1):
            self.model.train()
            self.order_rng.shuffle(order)
            tot, nb = 0.0, 0
            for b in range(0, len(order), self.cfg.batch_bags):
                loss = self._step(opt, order[b : b + self.cfg.batch_bags])
                if loss is not None:
                    tot += loss
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
            for s in self.ranks.shard(self.test_slides):
                bag = self.cohort.store.get(s) if self.v.image else None  # every tile
                o = forward_bag(self.model, bag, self.in_dim, self.cov.get(s), self.device)
                out[s] = output_to_prediction(o, self.cohort.specs, self.scalers, tiles=False).values
        return self.ranks.gather_dict(out)

    def run(self) -> FoldResult:
        t0 = time.perf_counter()
        best_epoch, best_val, history = self.fit()
        oof = self.predict_test()
        rel = ""
        if self.inner < 0:  # head-selection trainings only score their predictions
            rel = self.dir.weights_rel(self.v.name, self.fold)
            if not self.ranks.shards_bags or self.ranks.rank == 0:  # sharded bags: one model, every rank
                save_weights(self.dir.root / rel, self.model)
        card = FoldCard(self.fold, rel, self.scalers, self.cov_enc.to_dict() if self.cov_enc else None,
                        best_epoch, best_val, len(self.train_slides), len(self.val_slides), self.lr)
        log.info("%s fold %s: best epoch %d (val loss %.4f), %d/%d/%d slides, %.1fs", self.v.name,
                 self.fold if self.inner < 0 else f"{self.fold}/inner {self.inner}", best_epoch, best_val, len(self.train_slides), len(self.val_slides), len(self.test_slides),
                 time.perf_counter() - t0)
        return FoldResult(self.v.name, self.fold, card, oof, history, self.inner)


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
def _run_tasks(tasks: Sequence[FoldTask], cfg: TrainConfig, cohort: Cohort, mdir: ModelDir, ranks: Ranks,
               progress: Callable[[str], None] | None) -> list[FoldResult]:
    """Run this rank's share of ``tasks`` (all of them, on a share of the bags, with ``--distribute bags``);
    every rank gets every result back."""
    results = []
    for i, t in enumerate(tasks):
        if not ranks.runs_task(i):
            continue
        if progress:
            where = f"fold {t.fold + 1}/{cfg.folds}" + (
                f", head selection inner fold {t.inner + 1}/{cfg.selection_folds}" if t.inner >= 0 else "")
            progress(f"{t.variant.name} {where}")
        results.append(_FoldRunner(cfg, cohort, t, mdir, ranks).run())
    return results if ranks.shards_bags else _gather(results, ranks.world)


def select_head(cfg: TrainConfig, cohort: Cohort, embed_dim: int, mdir: ModelDir, ranks: Ranks | None = None,
                progress: Callable[[str], None] | None = None) -> HeadSelection:
    """``--head auto``: score every candidate by inner CV within each outer fold's training patients
    (:mod:`wsi_pipeline.mil.selection`) and choose one."""
    t0 = time.perf_counter()
    cands = list(cfg.head_candidates)
    variants = {c: plan_variants(cfg, embed_dim, c)[0] for c in cands}
    tasks = [FoldTask(variants[c], k, j) for c in cands for k in range(cfg.folds) for j in range(cfg.selection_folds)]
    results = _run_tasks(tasks, cfg, cohort, mdir, ranks or Ranks(), progress)
    per_fold: dict[str, list[dict[str, float]]] = {}
    for c in cands:
        per_fold[c] = []
        for k in range(cfg.folds):
            preds: dict[str, dict[str, np.ndarray]] = {}
            for r in results:
                if r.variant == variants[c].name and r.fold == k:
                    preds.update(r.oof)
            per_fold[c].append(criterion_scores(cohort, preds))
    sel = choose_head(cands, per_fold, cfg.selection_margin, cfg.selection_folds,
                      min(cfg.epochs, cfg.selection_epochs))
    sel.seconds = round(time.perf_counter() - t0, 1)
    log.info("--head auto: %s (%.0f s)", sel.reason, sel.seconds)
    return sel


def check_heads(cfg: TrainConfig) -> None:
    from wsi_pipeline.mil.heads import list_heads

    heads = list_heads()
    if cfg.head != AUTO and cfg.head not in heads:
        raise ConfigError(f"--head {cfg.head!r}: unknown; available: {', '.join(heads)} or {AUTO}")
    bad = [h for h in cfg.head_candidates if h not in heads]
    if cfg.head == AUTO and (bad or not cfg.head_candidates):
        raise ConfigError(f"--head-candidates {','.join(cfg.head_candidates)}: unknown {bad or 'empty'}; "
                          f"available: {', '.join(heads)}")


def run_train(cfg: TrainConfig, progress: Callable[[str], None] | None = None) -> TrainResult | None:
    """Run the whole protocol; returns the result on rank 0 (None on other ranks)."""
    import torch

    cfg.validate()
    check_heads(cfg)
    t0 = time.perf_counter()
    rank, world, own_group = _dist_info()
    ranks = Ranks(rank, world, cfg.distribute)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        cohort = build_cohort(cfg)
        info = cohort.store.info(cohort.labels.slide_ids)
        cohort.embed_dim = info.embed_dim
        mdir = ModelDir(cfg.model_out)
        mdir.root.mkdir(parents=True, exist_ok=True)
        selection = select_head(cfg, cohort, info.embed_dim, mdir, ranks, progress) if cfg.head == AUTO \
            else fixed_head(cfg.head)
        variants = plan_variants(cfg, info.embed_dim, selection.chosen)
        tasks = [FoldTask(v, k) for v in variants for k in range(cfg.folds)]
        results = _run_tasks(tasks, cfg, cohort, mdir, ranks, progress)
        out = None
        if rank == 0:
            from wsi_pipeline.mil.report import write_training_outputs

            card, metrics = write_training_outputs(cfg, cohort, info, variants, results, mdir, selection)
            out = TrainResult(mdir.root, card, metrics, time.perf_counter() - t0)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # the other ranks return once rank 0 has written the outputs
        return out
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()

