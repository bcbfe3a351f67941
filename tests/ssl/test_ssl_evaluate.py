"""eval-encoder's statistics: the weighted k-NN and the 95 % intervals by bootstrap over source images."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.ssl.evaluate import balanced_accuracy, knn_predict, source_bootstrap_ci


def _sources(n_classes: int = 4, per_class: int = 6, tiles: int = 10) -> tuple[np.ndarray, np.ndarray]:
    y = np.repeat(np.arange(n_classes), per_class * tiles)
    src = np.array([f"c{c}-s{i // tiles}" for c in range(n_classes) for i in range(per_class * tiles)])
    return y, src


def test_perfect_predictions_have_a_degenerate_interval() -> None:
    y, src = _sources()
    ci = source_bootstrap_ci(y, src, y.copy(), n_boot=200)
    assert ci["balanced_accuracy"] == [1.0, 1.0] and "gain" not in ci


def test_interval_widens_when_errors_cluster_in_few_sources() -> None:
    """The same tile-level error rate is far less certain when whole sources are wrong than when errors
    are spread over every source: that is why we resample sources, not tiles."""
    y, src = _sources()
    rng = np.random.default_rng(0)
    spread = y.copy()
    flip = rng.random(len(y)) < 0.2
    spread[flip] = (y[flip] + 1) % 4
    clustered = y.copy()
    for c in range(4):  # one whole source of each class wrong, plus a bit: ~20 % of tiles
        bad = (src == f"c{c}-s0") | ((src == f"c{c}-s1") & (np.arange(len(y)) % 10 < 2))
        clustered[bad] = (c + 1) % 4
    a = source_bootstrap_ci(y, src, spread, n_boot=400)["balanced_accuracy"]
    b = source_bootstrap_ci(y, src, clustered, n_boot=400)["balanced_accuracy"]
    assert a[0] <= balanced_accuracy(y, spread) <= a[1] and b[0] <= balanced_accuracy(y, clustered) <= b[1]
    assert (b[1] - b[0]) > 2 * (a[1] - a[0])


def test_gain_interval_is_paired() -> None:
    """A model that fixes exactly the baseline's errors in one source gains a positive amount in every
    resample that contains that source and never loses."""
    y, src = _sources()
    base = y.copy()
    base[(src == "c0-s0") | (src == "c2-s3")] = 1
    better = y.copy()
    better[src == "c2-s3"] = 1
    ci = source_bootstrap_ci(y, src, better, base, n_boot=300)
    assert ci["gain"][0] >= 0.0 and ci["gain"][1] > 0.0


def test_weighted_knn_recovers_separated_clusters() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16)) * 5
    y = np.repeat(np.arange(3), 30)
    x = centres[y] + rng.normal(size=(90, 16))
    pred = knn_predict(x[::2], y[::2], x[1::2], k=5, n_classes=3)
    assert balanced_accuracy(y[1::2], pred) == 1.0


def test_inner_split_never_uses_the_held_out_sources(kather_dir) -> None:
    """--inner-split-seed: a validation split drawn from the training side only, for choosing between runs."""
    from wsi_pipeline.ssl.config import EvalConfig
    from wsi_pipeline.ssl.evaluate import evaluation_split
    from wsi_pipeline.tiles.folders import load_labelled_folder
    from wsi_pipeline.tiles.split import source_split

    tiles = load_labelled_folder(kather_dir)
    outer_test, _ = source_split(tiles, 0.3, 0, 8)
    held_out = {tiles.paths[i] for i in np.flatnonzero(outer_test)}

    same, is_test, rec = evaluation_split(tiles, EvalConfig(encoder=None, data=str(kather_dir), seed=0))
    assert len(same) == len(tiles) and np.array_equal(is_test, outer_test) and "inner_split_seed" not in rec

    inner, is_val, rec = evaluation_split(tiles, EvalConfig(encoder=None, data=str(kather_dir), seed=0,
                                                            inner_split_seed=1))
    assert len(inner) == int((~outer_test).sum()) and not held_out & set(inner.paths)
    assert rec["inner_split_seed"] == 1 and rec["held_out_tiles_unused"] == len(held_out)
    assert 0.2 < is_val.mean() < 0.45  # ≈ 30 % of the training side, whole sources at a time
    src = np.asarray(inner.sources)
    for c, mode in zip(inner.class_names, rec["mode_per_class"].values(), strict=True):
        in_c = inner.labels == inner.class_names.index(c)
        if mode == "source":  # no source straddles the inner split
            assert not set(src[in_c & is_val]) & set(src[in_c & ~is_val]), c
    assert list(rec["mode_per_class"]) == inner.class_names


def test_balanced_accuracy_matches_scikit_learn() -> None:
    """One implementation serves the report and the 1000-round bootstrap; it must equal scikit-learn's,
    also when a predicted class is absent from the truth."""
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, 7, 300))
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    assert balanced_accuracy(y, pred, 7) == pytest.approx(balanced_accuracy_score(y, pred))
