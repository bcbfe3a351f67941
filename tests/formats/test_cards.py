"""The JSON formats (wsi_pipeline.formats.cards): model.json, encoder.json, classifier.json and the stage
records: round trips, format_version, refusals naming the file and the fix, and the shipped cards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.errors import FormatError
from wsi_pipeline.formats import api as F

MODELS = Path(__file__).resolve().parents[2] / "models"

CARD = {"name": "m", "main_variant": "abmil", "targets": [{"name": "response", "kind": "binary"}],
        "encoder": {"name": "enc", "embed_dim": 16, "target_mpp": 0.5}, "variants": {"abmil": {"folds": []}},
        "seed": np.int64(3), "subgroups": {"cutoffs": np.array([0.25, 0.5])}}
ENCODER = {"name": "e", "arch": "resnet10t", "embed_dim": np.int64(8), "input_size": "224", "mean": (0.5, 0.5, 0.5),
           "std": np.array([0.2, 0.2, 0.2]), "mpp": np.float32(0.5), "weights_source": "/somewhere/else"}
CLASSIFIER = {"kind": "tissue-classifier", "class_names": ["TUMOR", "STROMA"], "encoder": "e", "embed_dim": 8,
              "mpp": 0.5, "head": "linear", "metrics": {"balanced_accuracy": np.float64(0.9)}}


def test_model_json_round_trip_with_version_and_numpy_values(tmp_path: Path) -> None:
    path = F.write_model_json(tmp_path / F.MODEL_JSON, CARD)
    raw = json.loads(path.read_text())
    assert raw["format_version"] == F.MODEL_JSON_VERSION and next(iter(raw)) == "format_version"
    card = F.read_model_json(tmp_path)  # the folder or the file
    assert card == F.read_model_json(path)
    assert "format_version" not in card
    assert card["seed"] == 3 and card["subgroups"]["cutoffs"] == [0.25, 0.5] and card["encoder"]["name"] == "enc"


def test_model_json_reads_legacy_cards_and_refuses_newer_ones(tmp_path: Path) -> None:
    legacy = {**{k: v for k, v in CARD.items() if k not in ("seed", "subgroups")}, "version": 1}
    (tmp_path / "model.json").write_text(json.dumps(legacy))  # written before format_version existed
    assert F.read_model_json(tmp_path)["version"] == 1
    (tmp_path / "model.json").write_text(json.dumps({**legacy, "format_version": F.MODEL_JSON_VERSION + 1}))
    newer = F.MODEL_JSON_VERSION + 1
    with pytest.raises(FormatError, match=rf"model\.json: format_version {newer} is newer .*upgrade wsi-pipeline"):
        F.read_model_json(tmp_path)


@pytest.mark.parametrize(("text", "match"), [
    ("{broken", r"not valid JSON .*re-run `wsi train`"),
    ("[1, 2]", r"expected a JSON object, found list"),
    ('{"name": "m"}', r"missing keys \['main_variant', 'targets', 'encoder', 'variants'\]; re-run `wsi train`"),
    ('{"name": "m", "main_variant": "a", "targets": [], "encoder": "enc", "variants": {}}',
     r"'encoder' must be an object with a 'name'"),
])
def test_model_json_errors_name_the_file_and_the_fix(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "model.json"
    path.write_text(text)
    with pytest.raises(FormatError, match=match) as exc:
        F.read_model_json(path)
    assert exc.value.path == str(path)
    with pytest.raises(FormatError, match=r"no model card; is this a model directory written by `wsi train`"):
        F.read_model_json(tmp_path / "empty")
    with pytest.raises(ValueError, match="lacks"):
        F.write_model_json(tmp_path / "x.json", {"name": "m"})


STACKED = {"method": "stacked", "multiclass": False, "params": {"a": 0.1, "b": 0.9, "w": [0.5, -0.2, 0.3], "C": 1.0},
           "members": {"center": [0.0, 1.0], "scale": [1.0, 2.0]},
           "context": [{"target": "phenotype", "kind": "multiclass", "columns": [0, 1], "center": [0.0, 0.0],
                        "scale": [1.5, 2.5]},
                       {"target": "til", "kind": "regression", "columns": [0], "center": [0.2, 0.3],
                        "scale": [0.1, 0.1]}],
           "selection": {"rule": "lower log loss", "log_loss": {"platt": 0.6, "stacked": 0.5}, "chosen": "stacked"}}


def test_model_json_stacked_calibration_round_trips_and_bad_layouts_are_refused(tmp_path: Path) -> None:
    """Format 3: a stacked calibrator's feature layout and auto choice; format-2 entries read unchanged."""
    old = {"method": "platt", "multiclass": False, "params": {"a": -0.3, "b": 0.8},
           "members": {"center": [0.5], "scale": [2.0]}}
    card = {**CARD, "variants": {"abmil": {"folds": [], "calibration": {"response": STACKED, "other": old}}}}
    F.write_model_json(tmp_path / F.MODEL_JSON, card)
    back = F.read_model_json(tmp_path)["variants"]["abmil"]["calibration"]
    assert back == {"response": STACKED, "other": old}
    v2 = {**{k: v for k, v in card.items() if k not in ("seed", "subgroups")}, "format_version": 2,
          "variants": {"abmil": {"folds": [], "calibration": {"response": old}}}}
    (tmp_path / F.MODEL_JSON).write_text(json.dumps(v2))
    assert F.read_model_json(tmp_path)["variants"]["abmil"]["calibration"]["response"] == old
    for bad in ({**STACKED, "context": {"target": "til"}},
                {**STACKED, "context": [{**STACKED["context"][1], "center": [0.2]}]},  # one fold's centre missing
                {**STACKED, "selection": ["stacked"]}):
        card["variants"]["abmil"]["calibration"] = {"response": bad}
        F.write_model_json(tmp_path / F.MODEL_JSON, card)
        with pytest.raises(FormatError, match=r"calibration of 'response': 'context' must be a list of \{target, kind"):
            F.read_model_json(tmp_path)


def test_model_dir_card_goes_through_the_format(tmp_path: Path) -> None:
    from wsi_pipeline.mil.model_io import ModelDir

    shipped = ModelDir(MODELS / "wsip-demo-mil").read_card()  # a legacy card (version, no format_version)
    assert shipped.name == "wsip-demo-mil" and shipped.main_variant in shipped.variants
    copy = ModelDir(tmp_path / "copy")
    copy.write_card(shipped)
    assert json.loads(copy.model_json.read_text())["format_version"] == F.MODEL_JSON_VERSION
    assert copy.read_card() == shipped


def test_encoder_json_round_trip_normalises_and_fills_defaults(tmp_path: Path) -> None:
    path = F.write_encoder_json(tmp_path / F.ENCODER_JSON, ENCODER)
    raw = json.loads(path.read_text())
    assert raw["format_version"] == F.ENCODER_JSON_VERSION and "weights_source" not in raw
    meta = F.read_encoder_json(tmp_path)
    assert (meta["embed_dim"], meta["input_size"], meta["mpp"]) == (8, 224, 0.5)
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == pytest.approx([0.2, 0.2, 0.2])
    assert (meta["timm_kwargs"], meta["licence"], meta["description"]) == ({}, "unknown", "")
    raw.pop("licence")
    raw["format_version"] = 99
    path.write_text(json.dumps(raw))
    with pytest.raises(FormatError, match=r"encoder\.json: format_version 99 is newer"):
        F.read_encoder_json(path)
    del raw["mpp"]
    path.write_text(json.dumps(raw))
    with pytest.raises(FormatError, match=r"encoder\.json: missing keys \['mpp'\]; re-export the encoder"):
        F.read_encoder_json(path)


def test_classifier_json_round_trip_and_errors(tmp_path: Path) -> None:
    path = F.write_classifier_json(tmp_path / F.CLASSIFIER_JSON, CLASSIFIER)
    meta = F.read_classifier_json(tmp_path)
    assert meta["format_version"] == F.CLASSIFIER_JSON_VERSION
    assert meta["class_names"] == ["TUMOR", "STROMA"] and meta["metrics"]["balanced_accuracy"] == 0.9
    path.write_text(json.dumps({**meta, "class_names": []}))
    with pytest.raises(FormatError, match=r"classifier\.json: 'class_names' must be a non-empty list; re-run"):
        F.read_classifier_json(path)
    path.write_text(json.dumps({k: v for k, v in meta.items() if k != "head"}))
    with pytest.raises(FormatError, match=r"missing keys \['head'\]; re-run `wsi tissue-train`"):
        F.read_classifier_json(path)


def test_shipped_cards_read_through_the_formats() -> None:
    enc = F.read_encoder_json(MODELS / "wsip-dino-r10")
    clf = F.read_classifier_json(MODELS / "wsip-tissue-kather16")
    assert enc["name"] == "wsip-dino-r10" and enc["embed_dim"] == 512
    assert clf["encoder"] == enc["name"] and clf["embed_dim"] == enc["embed_dim"]


def test_stage_record_round_trip_and_unreadable_records(tmp_path: Path) -> None:
    path = tmp_path / "stages" / "predict.json"
    F.write_stage_record(path, {"stage": "predict", "key": "abc"})
    assert F.read_stage_record(path) == {"format_version": F.STAGE_RECORD_VERSION, "stage": "predict", "key": "abc"}
    assert F.read_stage_record(tmp_path / "none.json") == {}
    path.write_text("{broken")
    assert F.read_stage_record(path) == {}  # the stage then simply runs again
    path.write_text(json.dumps({"format_version": 7}))
    with pytest.raises(FormatError, match="newer"):
        F.read_stage_record(path)
