"""The shipped tissue classifier: consistent with the shipped demo encoder and accurate on held-out tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_pipeline.formats import api as F
from wsi_pipeline.tme.classifier import DEFAULT_CLASSIFIER, load_classifier, resolve_classifier


def test_shipped_classifier_pins_the_shipped_encoder_and_its_scale() -> None:
    from wsi_pipeline.encoders.project import read_encoder_json, resolve_project_encoder

    clf = load_classifier(None)
    assert Path(clf.path).name == DEFAULT_CLASSIFIER and (resolve_classifier(None) / "README.md").is_file()
    assert len(clf.class_names) == 8 and clf.class_names[3] == "04_LYMPHO"
    folder = resolve_project_encoder(clf.encoder)
    assert folder is not None, f"the classifier's encoder {clf.encoder} is not shipped"
    # retraining the demo encoder requires retraining this classifier (scripts/train_tissue_classifier.py)
    assert clf.encoder_weights_sha256 == F.file_sha256(folder / "model.safetensors")
    assert clf.mpp == read_encoder_json(folder)["mpp"]
    assert clf.training["data_mpp"] == 0.495 and clf.training["fit_on"] == "train"
    assert clf.metrics["held_out"]["balanced_accuracy"] > clf.metrics["colour_baseline_held_out"]["balanced_accuracy"]


def test_shipped_classifier_on_held_out_kather_tiles(kather_dir: Path) -> None:
    from wsi_pipeline.encoders.registry import create_encoder
    from wsi_pipeline.tiles.embed import embed_image_files
    from wsi_pipeline.tiles.folders import load_labelled_folder

    clf = load_classifier(None)
    split = clf.training["split"]
    tiles = load_labelled_folder(kather_dir)
    seen = set(split["train_sources"])
    rng = np.random.default_rng(0)
    pick = []
    for k in range(8):  # 3 held-out tiles per class, from sources the classifier never saw
        cand = [i for i in np.flatnonzero(tiles.labels == k)
                if tiles.sources[i] not in seen and tiles.paths[i].name not in split["train_files_split_by_tile"]]
        pick += rng.choice(cand, 3, replace=False).tolist()
    enc = create_encoder(clf.encoder)
    feats = embed_image_files(enc, [tiles.paths[i] for i in pick], 0.495, clf.fit)
    acc = float(np.mean(clf.predict(feats) == tiles.labels[pick]))
    assert acc >= 0.6, acc
