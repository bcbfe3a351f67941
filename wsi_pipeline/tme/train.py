"""``wsi tissue-train``: fit the tile tissue classifier on frozen encoder features of a labelled folder.

Steps: list ``DATA/<class>/*`` tiles → split by source image (:func:`wsi_pipeline.tiles.split.source_split`, the
same split as ``wsi eval-encoder``) → embed every tile at the encoder's µm/px (resized by
``data_mpp / encoder_mpp`` only, :mod:`wsi_pipeline.tiles.transform`) → fit a linear/MLP head on the training side
→ held-out balanced accuracy, confusion matrix and a colour-histogram baseline on the test side → save.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

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


def _cache_path(cfg: TissueTrainConfig, encoder: Any, fit: str, paths: list[Any]) -> Any:
    """Where embedded training tiles are cached: one file per (encoder weights, precision, scale, fit,
    file list); None when no cache folder is configured or the encoder is a random init."""
    if not cfg.feature_cache or not encoder.weights_sha256:
        return None
    from pathlib import Path

    from wsi_pipeline.formats import params_hash

    key = params_hash({"weights": encoder.weights_sha256, "name": encoder.meta.name, "mpp": encoder.meta.mpp,
                       "forward": encoder.forward_spec,
                       "data_mpp": cfg.mpp, "fit": fit, "precision": cfg.precision,
                       "files": [str(p) for p in paths]})
    return Path(cfg.feature_cache) / f"tiles-{key}.npz"


def _embed_with_cache(
    cfg: TissueTrainConfig, encoder: Any, fit: str, paths: list[Any], device: str, tick: Callable[[int], None]
) -> np.ndarray:
    from wsi_pipeline.tiles.embed import embed_image_files

    cache = _cache_path(cfg, encoder, fit, paths)
    if cache is not None and cache.exists():
        log.info("features from the cache %s", cache)
        return np.load(cache)["features"]
    feats = embed_image_files(encoder, paths, cfg.mpp, fit, cfg.batch_size, cfg.precision, device, tick)
    if cache is not None:
        from wsi_pipeline.formats import atomic_path

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


def train_tissue_classifier(
    cfg: TissueTrainConfig, progress: Callable[[int, int], None] | None = None
) -> TissueClassifier:
    """Train, evaluate on held-out source images and save a tissue classifier (see module docstring)."""
    import torch

    from wsi_pipeline.encoders import create_encoder
    from wsi_pipeline.encoders.base import resolve_device
    from wsi_pipeline.tiles.folders import load_labelled_folder, read_rgb
    from wsi_pipeline.tiles.split import source_split
    from wsi_pipeline.tiles.transform import choose_fit, scaled_size

    cfg.validate()
    t0 = time.perf_counter()
    tiles = load_labelled_folder(cfg.data)
    if cfg.max_per_class:
        keep = _subsample(tiles.labels, cfg.max_per_class, cfg.seed)
        tiles = tiles.subset(np.isin(np.arange(len(tiles)), keep))
    is_test, split = source_split(tiles, cfg.test_fraction, cfg.seed, cfg.min_sources)
    log.info("%d tiles, %d classes; %d train / %d test (split by source image; by tile: %s)", len(tiles),
             len(tiles.class_names), int((~is_test).sum()), int(is_test.sum()),
             [c for c, m in split.mode.items() if m == "tile"] or "none")
    device = str(resolve_device(cfg.device))
    torch.manual_seed(0)  # a random-init encoder (plumbing) is then the same one `wsi tme` rebuilds
    encoder = create_encoder(cfg.encoder or None, cfg.weights, device=device)
    meta = encoder.meta
    fit = choose_fit(encoder)
    done = [0]

    def _tick(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], len(tiles))

    feats = _embed_with_cache(cfg, encoder, fit, tiles.paths, device, _tick)
    y = tiles.labels
    n_cls = len(tiles.class_names)
    hp = {"head": cfg.head, "hidden": cfg.hidden, "epochs": cfg.epochs, "lr": cfg.lr,
          "weight_decay": cfg.weight_decay, "seed": cfg.seed}
    state = fit_head(feats[~is_test], y[~is_test], n_cls, **hp)
    first = read_rgb(tiles.paths[0])
    tile_um = first.shape[1] * cfg.mpp
    clf = TissueClassifier(
        class_names=list(tiles.class_names), encoder=meta.name, embed_dim=int(meta.embed_dim),
        mpp=float(meta.mpp), head=cfg.head, hidden=cfg.hidden, tile_um=float(tile_um),
        input_size=int(meta.input_size), fit=fit, encoder_weights_sha256=encoder.weights_sha256, state=state,
    )
    test_rep = classification_report(y[is_test], clf.predict(feats[is_test]), clf.class_names)
    train_rep = classification_report(y[~is_test], clf.predict(feats[~is_test]), clf.class_names)
    baseline = colour_baseline(tiles.paths, y, is_test, clf.class_names, cfg.seed)
    clf.metrics = {
        "held_out": test_rep,
        "train_balanced_accuracy": train_rep["balanced_accuracy"],
        "colour_baseline_held_out": baseline,
    }
    fit_idx = np.flatnonzero(~is_test)
    if cfg.final_fit_all:
        clf.state = fit_head(feats, y, n_cls, **hp)
        fit_idx = np.arange(len(tiles))
    clf.training = {
        "data": str(cfg.data),
        "data_mpp": cfg.mpp,
        "tile_px": int(first.shape[1]),
        "scaled_tile_px": scaled_size(int(first.shape[1]), cfg.mpp, meta.mpp),
        "n_tiles": len(tiles),
        "n_train": int((~is_test).sum()),
        "n_test": int(is_test.sum()),
        "split": _split_summary(cfg, tiles, split, fit_idx),
        "fit_on": "train+test" if cfg.final_fit_all else "train",
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("out",)},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    clf.save(cfg.out)
    log.info("held-out balanced accuracy %.3f (colour baseline %.3f); saved %s",
             test_rep["balanced_accuracy"], baseline["balanced_accuracy"], cfg.out)
    return clf
