"""eval-encoder's statistics: the weighted k-NN and the 95 % intervals by bootstrap over source images."""

from __future__ import annotations

import numpy as np

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
