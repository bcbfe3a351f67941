"""Tissue classifier: train → save → load → predict round trip, scale checks, loading errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.errors import FormatError, ScaleMismatchError, WeightsError
from wsi_pipeline.tme.classifier import (
    TissueClassifier,
    classification_report,
    fit_head,
    format_confusion,
    load_classifier,
)

NAMES = ["01_TUMOR", "02_STROMA", "04_LYMPHO"]


def _blobs(n: int = 60, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (3, d))
    y = np.arange(n) % 3
    return (centres[y] + rng.normal(0, 1, (n, d))).astype(np.float32), y


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_round_trip_train_save_load_predict(tmp_path: Path, head: str) -> None:
    x, y = _blobs()
    state = fit_head(x, y, 3, head=head, hidden=32, epochs=150, seed=1)
    clf = TissueClassifier(NAMES, "timm:resnet18", 16, mpp=0.5, head=head, hidden=32, tile_um=74.25, fit="pad",
                           state=state)
    p = clf.predict_proba(x)
    assert p.shape == (60, 3) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert (p.argmax(1) == y).mean() > 0.95
    clf.save(tmp_path / "clf")
    back = load_classifier(tmp_path / "clf")
    assert back.class_names == NAMES and back.encoder == "timm:resnet18" and back.embed_dim == 16
    assert back.mpp == 0.5 and back.head == head and back.fit == "pad" and back.tile_um == 74.25
    np.testing.assert_array_equal(back.predict_proba(x), p)
    # also by its classifier.json path
    np.testing.assert_array_equal(load_classifier(tmp_path / "clf" / "classifier.json").predict(x), p.argmax(1))


def test_fit_is_deterministic() -> None:
    x, y = _blobs(seed=3)
    a, b = fit_head(x, y, 3, epochs=20, seed=5), fit_head(x, y, 3, epochs=20, seed=5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_scale_mismatch_is_caught() -> None:
    x, y = _blobs()
    clf = TissueClassifier(NAMES, "enc", 16, mpp=0.5, state=fit_head(x, y, 3, epochs=5))
    clf.check_scale(0.5)
    clf.check_scale(0.51, tolerance=0.05)
    # kather 150 px @0.495 resized to 224 px is 0.33 µm/px: refused, the message names both scales
    with pytest.raises(ScaleMismatchError, match=r"0\.33.*0\.5"):
        clf.check_scale(0.495 * 150 / 224)
    with pytest.raises(ScaleMismatchError):
        clf.check_scale(0.25)
    with pytest.raises(ScaleMismatchError):
        clf.check_scale(float("nan"))


def test_wrong_feature_width_is_refused() -> None:
    x, y = _blobs()
    clf = TissueClassifier(NAMES, "enc", 16, mpp=0.5, state=fit_head(x, y, 3, epochs=5))
    with pytest.raises(ValueError, match="expects"):
        clf.predict_proba(np.zeros((2, 8), np.float32))


def test_loading_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no tissue classifier"):
        load_classifier(tmp_path / "nothing")
    x, y = _blobs()
    TissueClassifier(NAMES, "enc", 16, mpp=0.5, state=fit_head(x, y, 3, epochs=5)).save(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "classifier.json").read_text())
    del meta["mpp"]  # a classifier without its scale is refused
    (tmp_path / "c" / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="mpp"):
        load_classifier(tmp_path / "c")
    (tmp_path / "c" / "classifier.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"classifier\.json"):
        load_classifier(tmp_path / "c")


def test_report_and_confusion_table() -> None:
    rep = classification_report(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), NAMES)
    assert rep["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 2 / 3) / 3)
    assert rep["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    table = format_confusion(rep)
    assert "04_LYMPHO" in table and len(table.splitlines()) == 4
