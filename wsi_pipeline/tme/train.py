"""``wsi tissue-train``: fit the tile tissue classifier on frozen encoder features of a labelled folder.

Steps: list ``DATA/<class>/*`` tiles → split by source image (:func:`wsi_pipeline.tiles.split.source_split`, the
same split as ``wsi eval-encoder``) → embed every tile at the encoder's µm/px (resized by
``data_mpp / encoder_mpp`` only, :mod:`wsi_pipeline.tiles.transform`) → optionally (``context_mosaics`` > 0)
context windows of random mosaics of the training tiles, computed as ``wsi tme`` computes its dense map, with
their class-area fractions as soft labels (:mod:`wsi_pipeline.tme.context`) → fit a linear/MLP head on the
training side → held-out balanced accuracy, confusion matrix, a colour-histogram baseline and (with context
windows) the window area-fraction error on mosaics of the test tiles → save.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.tme.classifier import TissueClassifier, classification_report, fit_head
from wsi_pipeline.tme.config import TissueTrainConfig

log = logging.getLogger(__name__)


def colour_features(images: list[np.ndarray], bins: int = 8) -> np.ndarray:
    """Per-tile colour descriptor: RGB mean/std + joint-free per-channel HSV histograms (3×bins)."""
    from skimage.color import rgb2hsv

    out = []
    for img in images:
        x = img.reshape(-1, 3).astype(np.float32) / 255.0
        hsv = rgb2hsv(img).reshape(-1, 3)
        hists = [np.histogram(hsv[:, c], bins=bins, range=(0, 1))[0] / len(hsv) for c in range(3)]
        out.append(np.concatenate([x.mean(0), x.std(0), *hists]))
    return np.asarray(out, np.float32)


def colour_baseline(
    paths: list[Any], labels: np.ndarray, is_test: np.ndarray, class_names: list[str], seed: int = 0
) -> dict[str, Any]:
    """Balanced accuracy of a logistic regression on colour alone (same split): the known kather16 bias."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from wsi_pipeline.tiles.folders import read_rgb

    feats = colour_features([read_rgb(p) for p in paths])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced",
                                                               random_state=seed))
    model.fit(feats[~is_test], labels[~is_test])
    rep = classification_report(labels[is_test], model.predict(feats[is_test]), class_names)
    return {"balanced_accuracy": rep["balanced_accuracy"], "accuracy": rep["accuracy"]}


def _subsample(labels: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.extend(sorted(rng.choice(idx, min(max_per_class, len(idx)), replace=False).tolist()))
    return np.asarray(sorted(keep), np.int64)


def _cache_path(cfg: TissueTrainConfig, encoder: Any, fit: str, paths: list[Any], extra: dict[str, Any] | None = None
                ) -> Any:
    """Where embedded training tiles are cached: one file per (encoder weights, precision, scale, fit,
    file list, ``extra``: e.g. the magnifications); None when no cache folder is configured or the encoder is
    a random init."""
    if not cfg.feature_cache or not encoder.weights_sha256:
        return None
    from pathlib import Path

    from wsi_pipeline.formats.hashing import params_hash

    key = params_hash({"weights": encoder.weights_sha256, "name": encoder.meta.name, "mpp": encoder.meta.mpp,
                       "forward": encoder.forward_spec,
                       "data_mpp": cfg.mpp, "fit": fit, "precision": cfg.precision,
                       "files": [str(p) for p in paths], **(extra or {})})
    return Path(cfg.feature_cache) / f"tiles-{key}.npz"


def _embed_with_cache(
    cfg: TissueTrainConfig, encoder: Any, fit: str, paths: list[Any], device: str,
    tick: Callable[[int], None] | None = None, magnify: np.ndarray | None = None,
) -> np.ndarray:
    """Features of ``paths`` (each magnified by ``magnify`` when given), from the feature cache when there."""
    from wsi_pipeline.tiles.embed import embed_image_files

    extra = None if magnify is None else {"magnify": np.round(magnify, 6).tolist()}
    cache = _cache_path(cfg, encoder, fit, paths, extra)
    if cache is not None and cache.exists():
        log.info("features from the cache %s", cache)
        return np.load(cache)["features"]
    src_mpp = cfg.mpp if magnify is None else cfg.mpp * np.asarray(magnify, np.float64)  # magnified: larger pixels
    feats = embed_image_files(encoder, paths, src_mpp, fit, cfg.batch_size, cfg.precision, device, tick)
    if cache is not None:
        from wsi_pipeline.formats.atomic import atomic_path

        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.savez(f, features=feats)
    return feats


def _split_summary(cfg: TissueTrainConfig, tiles: Any, split: Any, fit_idx: np.ndarray) -> dict[str, Any]:
    """The split, plus what the head saw (so an evaluation can prove that its tiles are held out)."""
    mode = [split.mode[tiles.class_names[c]] for c in tiles.labels]
    return {
        "test_fraction": cfg.test_fraction, "seed": cfg.seed, "min_sources": cfg.min_sources,
        "mode": split.mode, "n_sources": split.n_sources, "test_sources": split.test_sources,
        "train_sources": sorted({str(tiles.sources[i]) for i in fit_idx if mode[i] == "source"}),
        "train_files_split_by_tile": sorted(tiles.paths[i].name for i in fit_idx if mode[i] == "tile"),
    }


def _context(cfg: TissueTrainConfig, encoder: Any, tiles: Any, mask: np.ndarray, n_mosaics: int, seed: int,
             fit: str, scale_jitter: float = 0.0) -> tuple[Any, dict[str, Any]]:
    """Context windows of ``n_mosaics`` random mosaics of the tiles in ``mask`` (see :mod:`.context`; each
    mosaic magnified by a factor in [1 − ``scale_jitter``, 1 + ``scale_jitter``]) and the dense geometry they
    were computed with (recorded in the classifier: `wsi tme` computes its map the same way)."""
    from wsi_pipeline.tme.classifier import TissueClassifier
    from wsi_pipeline.tme.context import ContextSpec, context_windows
    from wsi_pipeline.tme.dense import dense_geometry, resolve_method

    probe = TissueClassifier([], encoder.meta.name, encoder.embed_dim, encoder.meta.mpp,
                             tile_um=_tile_um(tiles, cfg.mpp))
    method = resolve_method("auto", encoder)
    geo = dense_geometry(probe, encoder, method)
    pools = [[tiles.paths[i] for i in np.flatnonzero(mask & (tiles.labels == c))] for c in range(len(tiles.class_names))]
    spec = ContextSpec(n_mosaics=n_mosaics, grid=tuple(cfg.context_grid), windows=cfg.context_windows, seed=seed,
                       scale_jitter=scale_jitter)
    windows = context_windows(encoder, geo, method, pools, cfg.mpp, spec, cfg.precision, fit)
    info = {"method": method, "cell_px": geo.cell_px, "window_cells": geo.window_cells, "window_px": geo.window_px,
            "n_mosaics": n_mosaics, "grid": list(spec.grid), "windows_per_mosaic": spec.windows, "seed": seed,
            "scale_jitter": spec.scale_jitter}
    return windows, info


def _tile_um(tiles: Any, mpp: float) -> float:
    from wsi_pipeline.tiles.folders import read_rgb

    return float(read_rgb(tiles.paths[0]).shape[1] * mpp)


def context_report(clf: TissueClassifier, windows: Any, n_mosaics: int) -> dict[str, Any]:
    """Area-fraction error of the head on context windows: per window and per mosaic (the mean of its windows
    against the mean of their fractions: what a slide's composition sees)."""
    p = clf.predict_proba(windows.features)
    err = np.abs(p - windows.fractions)
    per = len(p) // max(1, n_mosaics)
    comp = np.abs(p[: per * n_mosaics].reshape(n_mosaics, per, -1).mean(1)
                  - windows.fractions[: per * n_mosaics].reshape(n_mosaics, per, -1).mean(1))
    return {"n_windows": len(p), "n_mosaics": n_mosaics, "window_mae": float(err.mean()),
            "composition_mae": float(comp.mean()),
            "composition_mae_per_class": {c: float(v) for c, v in zip(clf.class_names, comp.mean(0), strict=True)}}


def area_confusion_cv(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_cls: int, hp: dict[str, Any],
                      context: Any = None, context_weight: float = 1.0, folds: int = 4,
                      scored: np.ndarray | None = None) -> np.ndarray:
    """The head's soft confusion matrix by grouped cross-validation on the training tiles: for each fold of
    groups (source images), a head refit on the other folds (plus every context window, when given)
    predicts the fold's tiles; row ``i`` is the mean predicted probability vector of the tiles of class ``i``
    (:meth:`~wsi_pipeline.tme.classifier.TissueClassifier.correct_areas` inverts it). ``scored`` (bool per
    row): only those rows enter the matrix (the tiles at their own scale, not their magnified copies, which
    are fitted on but are not what a slide at its true µm/px shows)."""
    from sklearn.model_selection import GroupKFold

    from wsi_pipeline.tme.classifier import TissueClassifier

    oof = np.zeros((len(x), n_cls), np.float32)
    n_folds = min(folds, len(np.unique(groups)))
    for tr, te in GroupKFold(n_folds).split(x, y, groups):
        xs, ts, sw = x[tr], np.eye(n_cls, dtype=np.float32)[y[tr]], None
        if context is not None and len(context.features):
            xs = np.concatenate([xs, context.features])
            ts = np.concatenate([ts, context.fractions])
            sw = np.concatenate([np.full(len(tr), 1.0 / len(tr)), np.full(len(context.features),
                                                                         context_weight / len(context.features))])
        state = fit_head(xs, ts, n_cls, sample_weight=sw, **hp)
        head = TissueClassifier([str(i) for i in range(n_cls)], "", x.shape[1], 1.0, head=hp["head"],
                                hidden=hp["hidden"], state=state)
        oof[te] = head.predict_proba(x[te])
    keep = np.ones(len(x), bool) if scored is None else np.asarray(scored, bool)
    return np.stack([oof[keep & (y == c)].mean(axis=0) if np.any(keep & (y == c)) else np.eye(n_cls)[c]
                     for c in range(n_cls)])


def _training_tiles(cfg: TissueTrainConfig, encoder: Any, fit: str, tiles: Any, feats: np.ndarray,
                    train: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    """(tile index per row, features) of the training tiles, plus ``scale_copies`` magnified copies of each
    with ``scale_jitter`` (seeded factors in [1 − j, 1 + j])."""
    from wsi_pipeline.tiles.split import seeded_rng

    idx = np.flatnonzero(train)
    rows, x = [idx], [feats[idx]]
    if cfg.scale_jitter and cfg.scale_copies:
        rng = seeded_rng(cfg.seed, "scale-jitter")
        paths = [tiles.paths[i] for i in idx]
        for _ in range(cfg.scale_copies):
            magnify = rng.uniform(1 - cfg.scale_jitter, 1 + cfg.scale_jitter, len(idx))
            rows.append(idx)
            x.append(_embed_with_cache(cfg, encoder, fit, paths, device, magnify=magnify))
        log.info("%d magnified copies of the %d training tiles (factors %.2f–%.2f)", cfg.scale_copies, len(idx),
                 1 - cfg.scale_jitter, 1 + cfg.scale_jitter)
    return np.concatenate(rows), np.concatenate(x)


def _held_out_magnified(cfg: TissueTrainConfig, encoder: Any, fit: str, tiles: Any, is_test: np.ndarray,
                        clf: TissueClassifier, device: str, factors: tuple[float, ...] = (0.93, 1.07)
                        ) -> dict[str, Any]:
    """Held-out balanced accuracy and per-class recall with every test tile magnified by each factor (a
    scanner's µm/px off by a few per cent, or a cell size that is not the training one)."""
    idx = np.flatnonzero(is_test)
    paths = [tiles.paths[i] for i in idx]
    out = {}
    for f in factors:
        x = _embed_with_cache(cfg, encoder, fit, paths, device, magnify=np.full(len(idx), f))
        rep = classification_report(tiles.labels[idx], clf.predict(x), clf.class_names)
        out[f"{f:g}"] = {"balanced_accuracy": rep["balanced_accuracy"], "per_class_recall": rep["per_class_recall"]}
    return out


@dataclass
class _Prepared:
    """What every fit of the recipe shares: the tiles, their split and features, the encoder."""

    tiles: Any
    is_test: np.ndarray
    split: Any
    encoder: Any
    fit: str
    feats: np.ndarray
    device: str
    hp: dict[str, Any]
    tile_px: int  # width of the tiles (px at cfg.mpp)

    @property
    def n_cls(self) -> int:
        return len(self.tiles.class_names)

    def groups(self) -> np.ndarray:
        """Per tile: its source image, or its file for the classes split by tile (what the folds group by)."""
        t = self.tiles
        mode = [self.split.mode[t.class_names[c]] for c in t.labels]
        return np.array([str(s) if m == "source" else str(p) for s, m, p in zip(t.sources, mode, t.paths, strict=True)])


def _prepare(cfg: TissueTrainConfig, progress: Callable[[int, int], None] | None = None) -> _Prepared:
    from wsi_pipeline.encoders.base import resolve_device
    from wsi_pipeline.encoders.registry import create_encoder
    from wsi_pipeline.tiles.folders import load_labelled_folder, read_rgb
    from wsi_pipeline.tiles.split import source_split
    from wsi_pipeline.tiles.transform import choose_fit

    cfg.validate()
    tiles = load_labelled_folder(cfg.data)
    if cfg.max_per_class:
        keep = _subsample(tiles.labels, cfg.max_per_class, cfg.seed)
        tiles = tiles.subset(np.isin(np.arange(len(tiles)), keep))
    is_test, split = source_split(tiles, cfg.test_fraction, cfg.seed, cfg.min_sources)
    log.info("%d tiles, %d classes; %d train / %d test (split by source image; by tile: %s)", len(tiles),
             len(tiles.class_names), int((~is_test).sum()), int(is_test.sum()),
             [c for c, m in split.mode.items() if m == "tile"] or "none")
    device = str(resolve_device(cfg.device))
    encoder = create_encoder(cfg.encoder or None, cfg.weights, device=device)
    fit = choose_fit(encoder)
    done = [0]

    def _tick(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], len(tiles))

    feats = _embed_with_cache(cfg, encoder, fit, tiles.paths, device, _tick)
    hp = {"head": cfg.head, "hidden": cfg.hidden, "epochs": cfg.epochs, "lr": cfg.lr,
          "weight_decay": cfg.weight_decay, "seed": cfg.seed}
    return _Prepared(tiles, is_test, split, encoder, fit, feats, device, hp, int(read_rgb(tiles.paths[0]).shape[1]))


def _fit_on(cfg: TissueTrainConfig, pre: _Prepared, rows: np.ndarray, x_tiles: np.ndarray, mask: np.ndarray,
            context_seed: int) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(head state, context windows, their description) of the recipe fitted on the tiles in ``mask`` (their
    rows of ``x_tiles``, magnified copies included) and on context windows of mosaics of those tiles."""
    keep = mask[rows]
    x_fit, t_fit, w_fit = x_tiles[keep], np.eye(pre.n_cls, dtype=np.float32)[pre.tiles.labels[rows[keep]]], None
    ctx, context = None, {}
    if cfg.context_mosaics:
        ctx, context = _context(cfg, pre.encoder, pre.tiles, mask, cfg.context_mosaics, context_seed, pre.fit,
                                cfg.context_scale_jitter)
        n1, n2 = len(x_fit), len(ctx.features)
        x_fit = np.concatenate([x_fit, ctx.features])
        t_fit = np.concatenate([t_fit, ctx.fractions])
        w_fit = np.concatenate([np.full(n1, 1.0 / n1), np.full(n2, cfg.context_weight / max(1, n2))])
        log.info("%d context windows of %d training mosaics (%s)", n2, cfg.context_mosaics, context["method"])
    return fit_head(x_fit, t_fit, pre.n_cls, sample_weight=w_fit, **pre.hp), ctx, context


def _classifier(cfg: TissueTrainConfig, pre: _Prepared, state: dict[str, Any]) -> TissueClassifier:
    meta = pre.encoder.meta
    return TissueClassifier(
        class_names=list(pre.tiles.class_names), encoder=meta.name, embed_dim=int(meta.embed_dim),
        mpp=float(meta.mpp), head=cfg.head, hidden=cfg.hidden,
        tile_um=float(pre.tile_px * cfg.mpp), input_size=int(meta.input_size),
        fit=pre.fit, encoder_weights_sha256=pre.encoder.weights_sha256, state=state,
    )


def run_tissue_train(
    cfg: TissueTrainConfig, progress: Callable[[int, int], None] | None = None
) -> TissueClassifier:
    """Train, evaluate on held-out source images and save a tissue classifier (see module docstring)."""
    from wsi_pipeline.tiles.transform import scaled_size

    t0 = time.perf_counter()
    pre = _prepare(cfg, progress)
    tiles, is_test, split, encoder, fit, feats, device = (pre.tiles, pre.is_test, pre.split, pre.encoder, pre.fit,
                                                          pre.feats, pre.device)
    y, n_cls, meta = tiles.labels, pre.n_cls, encoder.meta
    rows, x_tiles = _training_tiles(cfg, encoder, fit, tiles, feats, ~is_test, device)
    state, ctx_train, context = _fit_on(cfg, pre, rows, x_tiles, ~is_test, cfg.seed)
    clf = _classifier(cfg, pre, state)
    test_rep = classification_report(y[is_test], clf.predict(feats[is_test]), clf.class_names)
    scaled = _held_out_magnified(cfg, encoder, fit, tiles, is_test, clf, device)
    train_rep = classification_report(y[~is_test], clf.predict(feats[~is_test]), clf.class_names)
    baseline = colour_baseline(tiles.paths, y, is_test, clf.class_names, cfg.seed)
    clf.metrics = {
        "held_out": test_rep,
        "train_balanced_accuracy": train_rep["balanced_accuracy"],
        "colour_baseline_held_out": baseline,
        "held_out_magnified": scaled,
    }
    if cfg.area_correction:
        groups = pre.groups()
        nominal = np.arange(len(rows)) < int((~is_test).sum())  # the tiles themselves, not magnified copies
        matrix = area_confusion_cv(x_tiles, y[rows], groups[rows], n_cls, pre.hp, ctx_train, cfg.context_weight,
                                   scored=nominal)
        clf.area_correction = {"method": "soft-confusion", "matrix": np.round(matrix, 5).tolist(),
                               "estimated_on": "4-fold cross-validation over the training source images (tiles); "
                                               "each fold's head refit with every context window"}
    if cfg.context_mosaics:
        n_eval = max(2, cfg.context_mosaics // 4)
        ctx_test, _ = _context(cfg, encoder, tiles, is_test, n_eval, cfg.seed + 1, fit)
        clf.metrics["held_out_context"] = context_report(clf, ctx_test, n_eval)
    fit_idx = np.flatnonzero(~is_test)
    if cfg.final_fit_all:
        clf.state = fit_head(feats, y, n_cls, **pre.hp)
        fit_idx = np.arange(len(tiles))
    clf.training = {
        "data": str(cfg.data),
        "data_mpp": cfg.mpp,
        "tile_px": pre.tile_px,
        "scaled_tile_px": scaled_size(pre.tile_px, cfg.mpp, meta.mpp),
        "n_tiles": len(tiles),
        "n_train": int((~is_test).sum()),
        "n_test": int(is_test.sum()),
        "split": _split_summary(cfg, tiles, split, fit_idx),
        "fit_on": "train+test" if cfg.final_fit_all else "train",
        "context": context,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("out",)},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    clf.save(cfg.out)
    log.info("held-out balanced accuracy %.3f (colour baseline %.3f); saved %s",
             test_rep["balanced_accuracy"], baseline["balanced_accuracy"], cfg.out)
    return clf


def source_fold_classifiers(cfg: TissueTrainConfig, folds: int = 4) -> list[TissueClassifier]:
    """Cross-fitting: the recipe of :func:`run_tissue_train` refit ``folds`` times on the training side, each
    time without one fold of its source images (grouped as the area correction groups them; the classes split
    by tile, by file), saved to ``cfg.out/fold-<k>``. Each records the training tiles it never saw
    (``training["cross_fit"]``: ``held_out_sources``, ``held_out_files``), so that what is fitted on its reading
    of them (the map refinement, ``scripts/train_map_refiner.py --cross-fit``) learns how a classifier reads
    source images it was not trained on, which is how the shipped classifier meets every user's slide."""
    from pathlib import Path

    from sklearn.model_selection import GroupKFold

    if folds < 2:
        raise ConfigError(f"cross-fitting needs at least 2 folds (got {folds})")
    pre = _prepare(cfg)
    train = ~pre.is_test
    rows, x_tiles = _training_tiles(cfg, pre.encoder, pre.fit, pre.tiles, pre.feats, train, pre.device)
    groups = pre.groups()
    idx = np.flatnonzero(train)
    out = []
    for k, (_, held) in enumerate(GroupKFold(folds).split(idx, groups=groups[idx])):
        t0 = time.perf_counter()
        held_mask = np.zeros(len(pre.tiles), bool)
        held_mask[idx[held]] = True
        state, _, context = _fit_on(cfg, pre, rows, x_tiles, train & ~held_mask, cfg.seed + 1000 + k)
        clf = _classifier(cfg, pre, state)
        fit_idx = np.flatnonzero(train & ~held_mask)
        summary = _split_summary(cfg, pre.tiles, pre.split, fit_idx)
        held_summary = _split_summary(cfg, pre.tiles, pre.split, idx[held])
        clf.training = {
            "data": str(cfg.data), "data_mpp": cfg.mpp, "split": summary, "fit_on": f"train, fold {k} left out",
            "context": context, "config": {k2: v for k2, v in asdict(cfg).items() if k2 not in ("out",)},
            "cross_fit": {"fold": k, "folds": folds, "held_out_sources": held_summary["train_sources"],
                          "held_out_files": held_summary["train_files_split_by_tile"]},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        clf.save(Path(cfg.out) / f"fold-{k}")
        log.info("fold %d/%d: %d tiles left out, fitted in %.0f s", k + 1, folds, len(held), time.perf_counter() - t0)
        out.append(clf)
    return out
