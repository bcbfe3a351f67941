"""The JSON files: model cards (``model.json`` of a MIL model folder, ``encoder.json`` of an encoder
folder, ``classifier.json`` of a tissue-classifier folder) and the stage records of a RUN folder.

Every file is one JSON object with a ``format_version`` key. Readers check the version (a newer one is
refused: upgrade wsi-pipeline), the required keys and the types the code relies on, and return a plain
``dict``; the dataclasses built from it stay with their stage (``mil.model_io.ModelCard``,
``tme.classifier.TissueClassifier``). Writers add ``format_version`` and write atomically.

=================  =======  ====================================================================
file               version  required keys
=================  =======  ====================================================================
model.json         3        name, main_variant, targets (list), encoder (object with name),
                            variants (object); cards written before ``format_version`` carry
                            their version as ``version`` and are read as such
encoder.json       1        name, arch, embed_dim, input_size, mean, std, mpp
classifier.json    1        class_names, encoder, embed_dim, mpp, head
stages/<s>.json    1        (free-form record of a cohort stage's last run)
=================  =======  ====================================================================

model.json, optional keys (version 2; a version-1 card lacks them and is read with their defaults):

- ``variants.<v>.calibration``: target → ``{"method": platt|temperature|isotonic|none|stacked,
  "multiclass": bool, "params": {...}, "members": {"center": [per fold], "scale": [per fold]}}``, the
  post-hoc calibrator fitted on the variant's out-of-fold predictions (:mod:`wsi_pipeline.mil.calibration`);
  absent: the probabilities are used as the heads give them. Version 3 adds method ``stacked`` with its
  feature layout ``"context": [{"target": str, "kind": str, "columns": [int], "center": [per fold],
  "scale": [per fold]}]`` (one weight per column in ``params.w``, in order) and, for ``--calibration auto``,
  ``"selection": {"rule", "log_loss": {method: float}, "chosen"}``; version-2 entries read unchanged (a
  version-2 reader refuses version 3: upgrade wsi-pipeline).
- ``variants.<v>.thresholds``: binary target → cut-off of ``t_pred`` (``t_prob`` ≥ cut-off), chosen on the
  calibrated out-of-fold predictions; absent: 0.5.
- ``subgroups``: ``{"target", "cutoffs": [low|intermediate, intermediate|high], "labels", "source"}``.
- ``head_selection``: how the main head was chosen (``--head auto``: candidates, per-fold inner-CV scores,
  the criterion, the choice and why; an explicit ``--head``: ``{"requested": head}``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import FormatError
from wsi_pipeline.formats.atomic import write_text_atomic

VERSION_KEY = "format_version"

MODEL_JSON = "model.json"
MODEL_JSON_VERSION = 3  # 2: regression targets carry their bounds; calibration, thresholds, head_selection;
# 3: stacked calibrators (calibration entries' "context" and "selection")
MODEL_JSON_REQUIRED = ("name", "main_variant", "targets", "encoder", "variants")
_MODEL_FIX = "re-run `wsi train`"

ENCODER_JSON = "encoder.json"
ENCODER_JSON_VERSION = 1
ENCODER_JSON_REQUIRED = ("name", "arch", "embed_dim", "input_size", "mean", "std", "mpp")
_ENCODER_FIX = "re-export the encoder with `wsi ssl-train`"

CLASSIFIER_JSON = "classifier.json"
CLASSIFIER_JSON_VERSION = 1
CLASSIFIER_JSON_REQUIRED = ("class_names", "encoder", "embed_dim", "mpp", "head")
_CLASSIFIER_FIX = "re-run `wsi tissue-train`"

STAGE_RECORD_VERSION = 1


# ---------------------------------------------------------------- shared JSON plumbing
def _json_default(o: Any) -> Any:
    """numpy scalars and arrays as plain JSON numbers and lists."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _card_path(path: str | Path, name: str) -> Path:
    """The card file itself, or ``name`` inside a folder."""
    p = Path(path)
    return p / name if p.is_dir() else p


def _load_object(path: Path, fix: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(path, f"not valid JSON ({e}); {fix}") from e
    if not isinstance(doc, dict):
        raise FormatError(path, f"expected a JSON object, found {type(doc).__name__}; {fix}")
    return doc


def _check_version(path: Path, doc: Mapping[str, Any], supported: int, legacy_key: str = "") -> int:
    raw = doc.get(VERSION_KEY, doc.get(legacy_key, 1) if legacy_key else 1)
    try:
        version = int(raw)
    except (TypeError, ValueError) as e:
        raise FormatError(path, f"{VERSION_KEY} {raw!r} is not an integer; re-create the file") from e
    if version > supported:
        raise FormatError(path, f"{VERSION_KEY} {version} is newer than this wsi-pipeline understands "
                                f"({supported}); upgrade wsi-pipeline")
    return version


def _require(path: Path, doc: Mapping[str, Any], keys: Sequence[str], fix: str) -> None:
    missing = [k for k in keys if k not in doc]
    if missing:
        raise FormatError(path, f"missing keys {missing}; {fix}")


def _dumps(doc: Mapping[str, Any], version: int, indent: int = 2) -> str:
    body = {k: v for k, v in doc.items() if k != VERSION_KEY}
    return json.dumps({VERSION_KEY: version, **body}, indent=indent, default=_json_default) + "\n"


# ---------------------------------------------------------------- model.json (MIL model card)
def read_model_json(path: str | Path) -> dict[str, Any]:
    """The MIL model card ``DIR/model.json`` (``path``: the file or DIR), validated; without its
    ``format_version`` key."""
    path = _card_path(path, MODEL_JSON)
    if not path.is_file():
        raise FormatError(path, "no model card; is this a model directory written by `wsi train`?")
    doc = _load_object(path, _MODEL_FIX)
    _check_version(path, doc, MODEL_JSON_VERSION, legacy_key="version")
    _require(path, doc, MODEL_JSON_REQUIRED, _MODEL_FIX)
    enc = doc["encoder"]
    if not isinstance(enc, dict) or "name" not in enc:
        raise FormatError(path, f"'encoder' must be an object with a 'name'; {_MODEL_FIX}")
    if not isinstance(doc["targets"], list) or not isinstance(doc["variants"], dict):
        raise FormatError(path, f"'targets' must be a list and 'variants' an object; {_MODEL_FIX}")
    for name, v in doc["variants"].items():
        _check_calibration(path, name, v)
    doc.pop(VERSION_KEY, None)
    return doc


def _check_calibration(path: Path, variant: str, v: Any) -> None:
    """The optional ``calibration`` and ``thresholds`` blocks of one variant (see the module docstring)."""
    if not isinstance(v, dict):
        raise FormatError(path, f"variant {variant!r} must be an object; {_MODEL_FIX}")
    cal = v.get("calibration", {})
    bad = not isinstance(cal, dict) or any(
        not isinstance(c, dict) or not isinstance(c.get("method"), str) or not isinstance(c.get("params", {}), dict)
        for c in cal.values())
    if bad:
        raise FormatError(path, f"variant {variant!r}: 'calibration' must map targets to "
                                f"{{method, multiclass, params}}; {_MODEL_FIX}")
    for target, c in cal.items():
        _check_context(path, variant, target, c)
    thr = v.get("thresholds", {})
    if not isinstance(thr, dict) or any(not isinstance(t, (int, float)) for t in thr.values()):
        raise FormatError(path, f"variant {variant!r}: 'thresholds' must map targets to numbers; {_MODEL_FIX}")


def _check_context(path: Path, variant: str, target: str, c: Mapping[str, Any]) -> None:
    """A calibration entry's optional ``context`` (the stacked feature layout) and ``selection``."""
    ctx, sel = c.get("context", []), c.get("selection", {})
    keys = {"target": str, "kind": str, "columns": list, "center": list, "scale": list}
    ok_ctx = isinstance(ctx, list) and all(
        isinstance(f, dict) and all(isinstance(f.get(k), t) for k, t in keys.items())
        and len(f["center"]) == len(f["scale"]) for f in ctx)
    if not ok_ctx or not isinstance(sel, dict):
        raise FormatError(path, f"variant {variant!r}, calibration of {target!r}: 'context' must be a list of "
                                f"{{{', '.join(keys)}}} (per-fold centre and scale) and 'selection' an object; "
                                f"{_MODEL_FIX}")


def write_model_json(path: str | Path, card: Mapping[str, Any]) -> Path:
    """Write a model card (a mapping with at least :data:`MODEL_JSON_REQUIRED`) atomically."""
    missing = [k for k in MODEL_JSON_REQUIRED if k not in card]
    if missing:
        raise ValueError(f"write_model_json: the card lacks {missing}")
    write_text_atomic(path, _dumps(card, MODEL_JSON_VERSION))
    return Path(path)


# ---------------------------------------------------------------- encoder.json (project encoder)
def read_encoder_json(path: str | Path) -> dict[str, Any]:
    """An ``encoder.json`` (``path``: the file or its folder), validated, with defaults for the optional keys
    (``timm_kwargs``, ``licence``, ``description``)."""
    path = _card_path(path, ENCODER_JSON)
    if not path.is_file():
        raise FormatError(path, f"no {ENCODER_JSON}; pass a folder written by `wsi ssl-train`")
    doc = _load_object(path, _ENCODER_FIX)
    _require(path, doc, ENCODER_JSON_REQUIRED, _ENCODER_FIX)
    _check_version(path, doc, ENCODER_JSON_VERSION)
    doc.setdefault("timm_kwargs", {})
    doc.setdefault("licence", "unknown")
    doc.setdefault("description", "")
    return doc


def write_encoder_json(path: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write ``encoder.json`` atomically: the numbers normalised to the types readers rely on, the
    defaults filled in, ``weights_source`` dropped (where the weights are is known at load time)."""
    missing = [k for k in ENCODER_JSON_REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"write_encoder_json: meta lacks {missing}")
    full = {"timm_kwargs": {}, "licence": "unknown", "description": "", **dict(meta)}
    full.pop("weights_source", None)
    full["input_size"] = int(full["input_size"])
    full["embed_dim"] = int(full["embed_dim"])
    full["mpp"] = float(full["mpp"])
    full["mean"] = [float(x) for x in full["mean"]]
    full["std"] = [float(x) for x in full["std"]]
    write_text_atomic(path, _dumps(full, ENCODER_JSON_VERSION))
    return Path(path)


# ---------------------------------------------------------------- classifier.json (tissue classifier)
def read_classifier_json(path: str | Path) -> dict[str, Any]:
    """A ``classifier.json`` (``path``: the file or its folder), validated."""
    path = _card_path(path, CLASSIFIER_JSON)
    if not path.is_file():
        raise FormatError(path, f"no {CLASSIFIER_JSON}; pass a folder written by `wsi tissue-train`")
    doc = _load_object(path, _CLASSIFIER_FIX)
    _require(path, doc, CLASSIFIER_JSON_REQUIRED, _CLASSIFIER_FIX)
    _check_version(path, doc, CLASSIFIER_JSON_VERSION)
    if not isinstance(doc["class_names"], list) or not doc["class_names"]:
        raise FormatError(path, f"'class_names' must be a non-empty list; {_CLASSIFIER_FIX}")
    return doc


def write_classifier_json(path: str | Path, meta: Mapping[str, Any]) -> Path:
    missing = [k for k in CLASSIFIER_JSON_REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"write_classifier_json: meta lacks {missing}")
    write_text_atomic(path, _dumps(meta, CLASSIFIER_JSON_VERSION))
    return Path(path)


# ---------------------------------------------------------------- stage records (RUN/stages/<stage>.json)
def write_stage_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """The record of a cohort stage's last run: its resume key (every input), when it finished, how many
    slides. Written after the stage's outputs, so a record names outputs that are complete."""
    write_text_atomic(path, json.dumps({VERSION_KEY: STAGE_RECORD_VERSION, **record}, indent=1))


def read_stage_record(path: str | Path) -> dict[str, Any]:
    """The stage record at ``path``; {} when there is none or it cannot be read (the stage then runs)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    _check_version(p, data, STAGE_RECORD_VERSION)
    return data
