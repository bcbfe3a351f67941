"""``wsi eval-encoder``: how well an encoder's features separate tissue classes on a labelled tile folder.

Protocol (documented in the report it returns):

* split: :func:`wsi_pipeline.tiles.split.source_split` — by source image parsed from file names (classes
  with fewer than ``min_sources`` sources, or names without a source, by tile), seeded; ``--inner-split-seed``
  evaluates on a second split of the training side instead (model selection that leaves the held-out
  sources for the final figure);
* scale: :mod:`wsi_pipeline.tiles.transform` — a tile at folder MPP ``m`` is resized by ``m / e`` to the
  encoder's MPP ``e`` and fed **at that size** to encoders that accept any size (CNNs with global pooling,
  ViTs built with ``dynamic_img_size``); encoders with a fixed input are fed a centre crop (tile larger
  than ``input_size``) or a reflect-padded tile (smaller) of ``input_size`` px (a tile within 5 % of it is
  resized to it), so the physical scale is the encoder's — the rule ``wsi tissue-train`` and ``wsi tme`` use;
* k-NN: k = 20 nearest training tiles by cosine similarity, **weighted** vote with weights
  exp(cos / 0.07) (the DINO protocol); linear probe: multinomial logistic regression (L2, C = 1) on
  features standardised with the training mean/std;
* the same architecture at random initialisation (seeded; with the encoder's own per-tile stain
  standardisation, if it has one) and a colour-histogram baseline
  (per-channel RGB + HSV histograms, 16 bins each) go through the same k-NN / linear protocol;
* metric: balanced accuracy (mean per-class recall) on the held-out tiles.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.ssl.config import EvalConfig
from wsi_pipeline.tiles.embed import embed_tiles
from wsi_pipeline.tiles.folders import LabelledTiles, load_labelled_folder, read_rgb
from wsi_pipeline.tiles.split import source_split
from wsi_pipeline.tiles.transform import FIT_NATIVE, choose_fit, encoder_inputs

if TYPE_CHECKING:
    from wsi_pipeline.encoders.base import Encoder

log = logging.getLogger(__name__)

KNN_TEMPERATURE = 0.07
HIST_BINS = 16
BOOTSTRAP_ROUNDS = 1000  # source-bootstrap rounds for the 95 % intervals


# ---------------------------------------------------------------- probes
def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 20,
                n_classes: int | None = None, temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """Weighted k-NN on cosine similarity (vote weight exp(cos / T)); returns predicted labels."""
    n_classes = int(n_classes or train_y.max() + 1)
    a = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
    b = test_x / np.maximum(np.linalg.norm(test_x, axis=1, keepdims=True), 1e-12)
    k = min(k, len(a))
    preds = np.empty(len(b), np.int64)
    for s in range(0, len(b), 1024):
        sim = b[s : s + 1024] @ a.T
        nn_idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        nn_sim = np.take_along_axis(sim, nn_idx, axis=1)
        w = np.exp(nn_sim / temperature)
        votes = np.zeros((len(nn_idx), n_classes))
        np.add.at(votes, (np.arange(len(nn_idx))[:, None], train_y[nn_idx]), w)
        preds[s : s + 1024] = votes.argmax(1)
    return preds


def linear_probe_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0,
                         c: float = 1.0) -> np.ndarray:
    """Logistic regression (L2, multinomial) on standardised features; returns predicted labels."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(train_x), train_y)
    return clf.predict(scaler.transform(test_x))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None) -> float:
    """Mean recall over the classes present in ``y_true`` (integer labels; fast enough for the bootstrap)."""
    n_classes = int(n_classes or max(y_true.max(), y_pred.max()) + 1)
    hits = np.bincount(y_true[y_pred == y_true], minlength=n_classes)
    counts = np.bincount(y_true, minlength=n_classes)
    present = counts > 0
    return float(np.mean(hits[present] / counts[present]))


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    return {c: float(np.mean(y_pred[y_true == i] == i)) if np.any(y_true == i) else float("nan")
            for i, c in enumerate(class_names)}


def source_bootstrap_ci(
    y_true: np.ndarray, sources: np.ndarray, preds: np.ndarray, baseline: np.ndarray | None = None,
    n_boot: int = BOOTSTRAP_ROUNDS, seed: int = 0,
) -> dict[str, list[float]]:
    """95 % intervals of the balanced accuracy of ``preds`` (and of its gain over ``baseline``), resampling
    the *test source images* with replacement within each class (a source counts for its majority class), so
    the interval reflects how few independent sources the figure rests on, not the number of tiles."""
    n_classes = int(y_true.max()) + 1
    src_ids, src_of_tile = np.unique(sources, return_inverse=True)
    majority = np.array([np.bincount(y_true[src_of_tile == i], minlength=n_classes).argmax()
                         for i in range(len(src_ids))])
    tiles_of = [np.flatnonzero(src_of_tile == i) for i in range(len(src_ids))]
    by_class = [np.flatnonzero(majority == c) for c in range(n_classes) if np.any(majority == c)]
    rng = np.random.default_rng(seed)
    acc, gain = [], []
    for _ in range(n_boot):
        picked = np.concatenate([rng.choice(srcs, len(srcs)) for srcs in by_class])
        idx = np.concatenate([tiles_of[i] for i in picked])
        a = balanced_accuracy(y_true[idx], preds[idx], n_classes)
        acc.append(a)
        if baseline is not None:
            gain.append(a - balanced_accuracy(y_true[idx], baseline[idx], n_classes))
    out = {"balanced_accuracy": [float(v) for v in np.percentile(acc, [2.5, 97.5])]}
    if baseline is not None:
        out["gain"] = [float(v) for v in np.percentile(gain, [2.5, 97.5])]
    return out


def probe_predictions(feats: np.ndarray, labels: np.ndarray, is_test: np.ndarray, n_classes: int, k: int,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(k-NN, linear-probe) predictions for the test tiles."""
    tr, te = ~is_test, is_test
    return (knn_predict(feats[tr], labels[tr], feats[te], k, n_classes),
            linear_probe_predict(feats[tr], labels[tr], feats[te], seed))


def prediction_scores(y_true: np.ndarray, knn: np.ndarray, lin: np.ndarray,
                      class_names: Sequence[str]) -> dict[str, Any]:
    """Balanced accuracies of the k-NN and linear-probe predictions, and the k-NN recall per class."""
    return {
        "knn_balanced_accuracy": balanced_accuracy(y_true, knn),
        "linear_balanced_accuracy": balanced_accuracy(y_true, lin),
        "knn_per_class_recall": per_class_recall(y_true, knn, class_names),
    }


def probe_scores(feats: np.ndarray, labels: np.ndarray, is_test: np.ndarray, class_names: Sequence[str], k: int,
                 seed: int) -> dict[str, Any]:
    knn, lin = probe_predictions(feats, labels, is_test, len(class_names), k, seed)
    return prediction_scores(labels[is_test], knn, lin, class_names)


def colour_histograms(images: Sequence[np.ndarray], bins: int = HIST_BINS) -> np.ndarray:
    """Per-channel RGB and HSV histograms (``bins`` each, normalised) → (N, 6·bins)."""
    from skimage.color import rgb2hsv

    out = np.empty((len(images), 6 * bins), np.float32)
    for i, im in enumerate(images):
        hsv = (rgb2hsv(im) * 255.0).astype(np.uint8)
        chans = [im[..., c] for c in range(3)] + [hsv[..., c] for c in range(3)]
        h = [np.bincount((ch.ravel().astype(np.int64) * bins) >> 8, minlength=bins) for ch in chans]
        v = np.concatenate(h).astype(np.float32)
        out[i] = v / max(ch.size for ch in chans)
    return out


# ---------------------------------------------------------------- orchestration
def random_init_like(name: str, encoder: Encoder, seed: int = 0) -> Encoder:
    """The same architecture as ``encoder`` at (seeded) random initialisation."""
    import torch

    from wsi_pipeline.encoders.base import Encoder
    from wsi_pipeline.encoders.project import build_backbone
    from wsi_pipeline.encoders.registry import TIMM_PREFIX, get_entry

    torch.manual_seed(seed)
    meta = replace(encoder.meta, weights_source="random-init", name=f"{encoder.meta.name} (random init)")
    if "timm_kwargs" in encoder.meta.extra or name.startswith(TIMM_PREFIX):
        trunk = build_backbone(encoder.meta.arch, encoder.meta.extra.get("timm_kwargs", {}))
    else:
        trunk = get_entry(name).build()
    return Encoder(trunk, meta)


def _load_images(tiles: LabelledTiles) -> list[np.ndarray]:
    return [read_rgb(p) for p in tiles.paths]


def _subsample(tiles: LabelledTiles, max_per_class: int, seed: int) -> LabelledTiles:
    if max_per_class <= 0:
        return tiles
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(tiles), bool)
    for c in range(len(tiles.class_names)):
        idx = np.flatnonzero(tiles.labels == c)
        keep[rng.permutation(idx)[:max_per_class]] = True
    return tiles.subset(keep)


def evaluation_split(tiles: LabelledTiles, cfg: EvalConfig) -> tuple[LabelledTiles, np.ndarray, dict[str, Any]]:
    """(tiles evaluated, is_test mask over them, the split's record for the report).

    The split is :func:`source_split` with ``cfg.seed``. With ``cfg.inner_split_seed`` set, the held-out side
    is dropped and the *training* side is split again with that seed: an inner validation split to choose
    between checkpoints or recipes without ever looking at the held-out sources (which stay the final test).
    """
    is_test, split = source_split(tiles, cfg.test_fraction, cfg.seed, cfg.min_sources)
    record: dict[str, Any] = {"seed": cfg.seed, "test_fraction": cfg.test_fraction, "min_sources": cfg.min_sources}
    if cfg.inner_split_seed is not None:
        record.update(inner_split_seed=cfg.inner_split_seed, held_out_tiles_unused=int(is_test.sum()))
        tiles = tiles.subset(~is_test)
        is_test, split = source_split(tiles, cfg.test_fraction, cfg.inner_split_seed, cfg.min_sources)
    record.update(mode_per_class=split.mode, sources_per_class=split.n_sources, n_test_sources=len(split.test_sources))
    return tiles, is_test, record


def run_eval_encoder(cfg: EvalConfig) -> dict[str, Any]:
    """Run the protocol of this module; returns the report (also written to ``cfg.json_path`` if set)."""
    from wsi_pipeline.encoders.registry import create_encoder
    from wsi_pipeline.formats.atomic import write_text_atomic

    t0 = time.time()
    if cfg.k < 1:
        raise ConfigError(f"-k must be ≥ 1, got {cfg.k}")
    tiles = _subsample(load_labelled_folder(cfg.data), cfg.max_per_class, cfg.seed)
    tiles, is_test, split_record = evaluation_split(tiles, cfg)
    if is_test.all() or not is_test.any():
        which, options = (("split", "--seed") if cfg.inner_split_seed is None else
                          ("inner split of the training side", "--inner-split-seed or --test-fraction"))
        raise ConfigError(f"{cfg.data}: the {which} left no training or no test tiles; add tiles or change {options}")
    missing = [c for i, c in enumerate(tiles.class_names) if not np.any(tiles.labels[~is_test] == i)]
    if missing:
        raise ConfigError(f"{cfg.data}: classes {missing} have no training tiles after the split; add tiles")
    encoder = create_encoder(cfg.encoder, cfg.weights, device="cpu")
    name = cfg.encoder or encoder.meta.name
    images = _load_images(tiles)
    fit = choose_fit(encoder)
    tiles_in = encoder_inputs(images, cfg.data_mpp, encoder, fit)
    log.info("eval-encoder: %d tiles (%d train / %d test), %s at %.3g µm/px, tiles %s px", len(tiles),
             (~is_test).sum(), is_test.sum(), encoder.meta.name, encoder.meta.mpp,
             sorted({t.shape[0] for t in tiles_in})[:3])
    labels = tiles.labels
    feats = embed_tiles(encoder, tiles_in, cfg.batch_size, cfg.precision, cfg.device)
    report: dict[str, Any] = {
        "encoder": encoder.meta.name,
        "arch": encoder.meta.arch,
        "encoder_mpp": encoder.meta.mpp,
        "data": str(cfg.data),
        "data_mpp": cfg.data_mpp,
        "tile_px_fed": sorted({int(t.shape[0]) for t in tiles_in}),
        "fed_at": ("rescaled tile size" if fit == FIT_NATIVE
                   else f"centre crop/reflect-pad to {encoder.meta.input_size}"),
        "stain_norm": encoder.meta.extra.get("stain_norm"),  # part of the encoder: the random-init baseline has it too
        "classes": list(tiles.class_names),
        "n_train": int((~is_test).sum()),
        "n_test": int(is_test.sum()),
        "split": split_record,
        "knn": {"k": cfg.k, "similarity": "cosine", "vote": f"weighted exp(cos/{KNN_TEMPERATURE})"},
        "linear": "logistic regression (L2, C=1) on standardised features",
    }
    n_classes, y_te, src_te = len(tiles.class_names), labels[is_test], np.asarray(tiles.sources)[is_test]
    knn, lin = probe_predictions(feats, labels, is_test, n_classes, cfg.k, cfg.seed)
    report.update(prediction_scores(y_te, knn, lin, tiles.class_names))
    rknn = rlin = None
    if cfg.random_init:
        rnd = random_init_like(name, encoder, cfg.seed)
        rfeats = embed_tiles(rnd, tiles_in, cfg.batch_size, cfg.precision, cfg.device)
        rknn, rlin = probe_predictions(rfeats, labels, is_test, n_classes, cfg.k, cfg.seed)
        r = prediction_scores(y_te, rknn, rlin, tiles.class_names)
        report["random_init_knn_balanced_accuracy"] = r["knn_balanced_accuracy"]
        report["random_init_linear_balanced_accuracy"] = r["linear_balanced_accuracy"]
    knn_ci = source_bootstrap_ci(y_te, src_te, knn, rknn, seed=cfg.seed)
    lin_ci = source_bootstrap_ci(y_te, src_te, lin, rlin, seed=cfg.seed)
    report["ci95_by_source_bootstrap"] = {
        "rounds": BOOTSTRAP_ROUNDS, "knn_balanced_accuracy": knn_ci["balanced_accuracy"],
        "linear_balanced_accuracy": lin_ci["balanced_accuracy"],
        **({"knn_gain_over_random_init": knn_ci["gain"], "linear_gain_over_random_init": lin_ci["gain"]}
           if cfg.random_init else {}),
    }
    if cfg.colour_baseline:
        c = probe_scores(colour_histograms(images), labels, is_test, tiles.class_names, cfg.k, cfg.seed)
        report["colour_histogram_knn_balanced_accuracy"] = c["knn_balanced_accuracy"]
        report["colour_histogram_linear_balanced_accuracy"] = c["linear_balanced_accuracy"]
    report["seconds"] = round(time.time() - t0, 1)
    if cfg.json_path:
        write_text_atomic(cfg.json_path, json.dumps(report, indent=2) + "\n")
        log.info("wrote %s", cfg.json_path)
    return report


def table_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(features, k-NN, linear) rows of the report, for printing."""
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "—"

    rows = [(report["encoder"], fmt(report.get("knn_balanced_accuracy")), fmt(report.get("linear_balanced_accuracy")))]
    if "random_init_knn_balanced_accuracy" in report:
        rows.append((f"{report['arch']} random init", fmt(report["random_init_knn_balanced_accuracy"]),
                     fmt(report["random_init_linear_balanced_accuracy"])))
    if "colour_histogram_knn_balanced_accuracy" in report:
        rows.append(("colour histogram", fmt(report["colour_histogram_knn_balanced_accuracy"]),
                     fmt(report["colour_histogram_linear_balanced_accuracy"])))
    return rows


def interval_lines(report: dict[str, Any]) -> list[str]:
    """The report's source-bootstrap 95 % intervals as sentences ([] when it has none)."""
    ci = report.get("ci95_by_source_bootstrap")
    if not ci:
        return []

    def span(key: str) -> str:
        lo, hi = ci[key]
        return f"{lo:+.3f}…{hi:+.3f}" if "gain" in key else f"{lo:.3f}–{hi:.3f}"

    lines = [f"95 % interval (bootstrap over test source images): k-NN {span('knn_balanced_accuracy')}, "
             f"linear {span('linear_balanced_accuracy')}"]
    if "knn_gain_over_random_init" in ci:
        lines.append(f"gain over random init: k-NN {span('knn_gain_over_random_init')}, "
                     f"linear {span('linear_gain_over_random_init')}")
    return lines


def format_table(report: dict[str, Any]) -> str:
    """A plain-text (Markdown) table of the balanced accuracies (and their source-bootstrap 95 % intervals)."""
    lines = [
        f"held-out balanced accuracy — {report['n_train']} train / {report['n_test']} test tiles, "
        f"{len(report['classes'])} classes, k-NN k={report['knn']['k']} cosine weighted",
        "",
        "| features | k-NN | linear |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in table_rows(report)]
    lines += ["", *interval_lines(report)] if "ci95_by_source_bootstrap" in report else []
    return "\n".join(lines)


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    from wsi_pipeline.formats.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
