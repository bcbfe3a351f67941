"""`data_samples/`: kather16 mosaics from held-out source images only, with the demo's structure, small,
and rebuilt exactly by `scripts/make_data_samples.py`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_pipeline.synth.cohort import LABEL_COLUMNS
from wsi_pipeline.synth.kather import CLASS_FOLDERS, split_kather_by_source
from wsi_pipeline.synth.layout import CLASS_NAMES

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "data_samples"
SLIDE_IDS = ["P001_1", "P002_1", "P003_1", "P004_1", "P005_1", "P005_on", "P006_1"]


@pytest.fixture(scope="module")
def labels() -> pd.DataFrame:
    return pd.read_csv(SAMPLES / "labels.csv")


def _tiles_used() -> set[str]:
    return {str(f) for sid in SLIDE_IDS for f in np.load(SAMPLES / "truth" / f"{sid}.npz")["tiles"].ravel()}


def test_every_tile_comes_from_the_held_out_side_of_the_shipped_models_split(kather_dir: Path) -> None:
    """No tile of a source image (or, for classes split by tile, no tile) that the shipped encoder, tissue
    classifier or demo MIL trained on: the test side of source_split(seed 0, fraction 0.3, min_sources 8)."""
    clf = json.loads((REPO / "models" / "wsip-tissue-kather16" / "classifier.json").read_text())["training"]["split"]
    enc = json.loads((REPO / "models" / "wsip-dino-r10" / "encoder.json").read_text())["training"]["config"]
    assert (clf["seed"], clf["test_fraction"], clf["min_sources"]) == (0, 0.3, 8)
    assert (enc["subset"], enc["split_seed"], enc["test_fraction"]) == ("train", 0, 0.3)
    split = split_kather_by_source(kather_dir, test_fraction=0.3, seed=0, min_sources=8)
    side = dict(zip(split.file, split.split, strict=True))
    source = dict(zip(split.file, split.source, strict=True))
    used = _tiles_used()
    assert len(used) > 500
    assert {side[f] for f in used} == {"test"}
    assert not {source[f] for f in used} & set(clf["train_sources"])
    assert not used & set(clf["train_files_split_by_tile"])


def test_each_cell_holds_a_tile_of_its_class(kather_dir: Path) -> None:
    split = split_kather_by_source(kather_dir)
    class_of = dict(zip(split.file, split.class_name, strict=True))
    for sid in SLIDE_IDS:
        t = np.load(SAMPLES / "truth" / f"{sid}.npz")
        assert list(t["class_names"]) == list(CLASS_NAMES) and list(t["kather_classes"]) == list(CLASS_FOLDERS)
        assert t["tiles"].shape == t["class_map"].shape
        assert all(class_of[f] == CLASS_FOLDERS[c] for f, c in zip(t["tiles"].ravel(), t["class_map"].ravel(),
                                                                    strict=True))


def test_structure_labels_and_truth(labels: pd.DataFrame) -> None:
    import openslide

    assert list(labels.columns[: len(LABEL_COLUMNS)]) == list(LABEL_COLUMNS)
    assert {"response_prob", "tumour_fraction", "stroma_fraction", "os_true_log_hazard"} <= set(labels.columns)
    assert sorted(labels.slide_id) == SLIDE_IDS and labels.patient_id.nunique() == 6
    assert labels.set_index("slide_id").loc["P005_on", "timepoint"] == "on_treatment"
    assert set(labels.arm) == {"control", "treatment"}
    assert set(labels.immune_phenotype) == {"inflamed", "excluded", "desert"}
    for _, r in labels.iterrows():
        t = np.load(SAMPLES / "truth" / f"{r.slide_id}.npz")
        assert str(t["immune_phenotype"]) == r.immune_phenotype
        assert float(t["til_fraction"]) == pytest.approx(r.til_fraction, abs=1e-4)
        assert float(t["cell_px"]) == 150 and float(t["mpp"]) == pytest.approx(0.495)
        with openslide.OpenSlide(str(SAMPLES / f"{r.slide_id}.svs")) as s:
            assert s.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
            assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.495)
            assert s.level_count == 3 and "thumbnail" in s.associated_images
            assert s.dimensions == (t["class_map"].shape[1] * 150, t["class_map"].shape[0] * 150)


def test_samples_are_small() -> None:
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total < 12.5e6, total


@pytest.mark.slow
def test_script_rebuilds_the_samples_exactly(tmp_path: Path, labels: pd.DataFrame) -> None:
    out = tmp_path / "samples"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_data_samples.py"), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    assert (out / "labels.csv").read_text() == (SAMPLES / "labels.csv").read_text()
    for sid in SLIDE_IDS:
        a, b = np.load(out / "truth" / f"{sid}.npz"), np.load(SAMPLES / "truth" / f"{sid}.npz")
        assert set(a.files) == set(b.files)
        for k in a.files:
            assert np.array_equal(a[k], b[k]), (sid, k)
        assert _pixels(out / f"{sid}.svs").shape == _pixels(SAMPLES / f"{sid}.svs").shape
        diff = np.abs(_pixels(out / f"{sid}.svs") - _pixels(SAMPLES / f"{sid}.svs"))
        assert diff.mean() < 0.5, (sid, diff.mean())  # the same mosaic (a libjpeg build may differ in bits)


def _pixels(path: Path) -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"), dtype=np.int16)
