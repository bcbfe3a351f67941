"""The files of federated training (``wsi federated``, :mod:`wsi_pipeline.federated`).

=====================  =======  =====================================================================
file                   version  content
=====================  =======  =====================================================================
``federated.json``     1        in the model folder, next to ``model.json``: the run's record and its
                                checkpoint. Required keys: ``status`` (running | failed | complete),
                                ``config`` (the resolved server configuration), ``sites`` (per site:
                                sample counts), ``rounds`` (per round: the sites that answered, the
                                training loss, the federated validation losses of the model entering the
                                round). Optional: ``error``, ``refused``, ``checkpoint`` (what a
                                restarted server resumes from), ``calibration``, ``cutoffs``,
                                ``validation``, ``engine``, ``resumed``,
                                ``traceback``.
site status (JSON)     1        written by a site's ClientApp for its ``wsi federated client`` process:
                                ``state`` (joined | refused | failed: a message failed at the
                                site | stopped: the server stopped the run | done), ``message``.
audit log (JSON lines) 1        ``wsi federated client --audit FILE``: one line per message the site
                                received or sent: ``direction`` (received | sent), ``message_type``,
                                ``records``: per record its kind (arrays | metrics | config) and entries
                                (arrays: name → shape and dtype, never values; metrics and config: the
                                values, which are aggregates by construction).
=====================  =======  =====================================================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import FormatError
from wsi_pipeline.formats.atomic import write_text_atomic
from wsi_pipeline.formats.cards import VERSION_KEY, _check_version, _dumps, _load_object, _require

FEDERATED_JSON = "federated.json"
FEDERATED_JSON_VERSION = 1
FEDERATED_JSON_REQUIRED = ("status", "config", "sites", "rounds")
FEDERATED_STATES = ("running", "failed", "complete")
_FEDERATED_FIX = "re-run `wsi federated server` with another --model-out"

SITE_STATUS_VERSION = 1
SITE_STATES = ("joined", "refused", "failed", "stopped", "done")

AUDIT_LOG_VERSION = 1


# ---------------------------------------------------------------- federated.json
def read_federated_json(path: str | Path) -> dict[str, Any]:
    """``federated.json`` (``path``: the file or its model folder), validated; without ``format_version``."""
    p = Path(path)
    p = p / FEDERATED_JSON if p.is_dir() else p
    if not p.is_file():
        raise FormatError(p, "no federated training record; is this a model folder of `wsi federated`?")
    doc = _load_object(p, _FEDERATED_FIX)
    _check_version(p, doc, FEDERATED_JSON_VERSION)
    _require(p, doc, FEDERATED_JSON_REQUIRED, _FEDERATED_FIX)
    if doc["status"] not in FEDERATED_STATES:
        raise FormatError(p, f"status {doc['status']!r} is not one of {FEDERATED_STATES}; {_FEDERATED_FIX}")
    if not isinstance(doc["rounds"], list) or not isinstance(doc["sites"], dict):
        raise FormatError(p, f"'rounds' must be a list and 'sites' an object; {_FEDERATED_FIX}")
    doc.pop(VERSION_KEY, None)
    return doc


def write_federated_json(path: str | Path, doc: Mapping[str, Any]) -> Path:
    """Write ``federated.json`` atomically (``path``: the file)."""
    missing = [k for k in FEDERATED_JSON_REQUIRED if k not in doc]
    if missing:
        raise ValueError(f"write_federated_json: the record lacks {missing}")
    if doc["status"] not in FEDERATED_STATES:
        raise ValueError(f"write_federated_json: status {doc['status']!r} is not one of {FEDERATED_STATES}")
    write_text_atomic(path, _dumps(doc, FEDERATED_JSON_VERSION))
    return Path(path)


# ---------------------------------------------------------------- site status
def write_site_status(path: str | Path, state: str, message: str = "") -> None:
    if state not in SITE_STATES:
        raise ValueError(f"site state {state!r} is not one of {SITE_STATES}")
    write_text_atomic(path, json.dumps({VERSION_KEY: SITE_STATUS_VERSION, "state": state, "message": message}))


def read_site_status(path: str | Path) -> dict[str, Any]:
    """The site status at ``path``; {} while there is none (or it is being replaced)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("state") not in SITE_STATES:
        return {}
    _check_version(p, doc, SITE_STATUS_VERSION)
    return doc


# ---------------------------------------------------------------- message audit log
def append_audit_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one message's record (a line) to the audit log."""
    line = json.dumps({VERSION_KEY: AUDIT_LOG_VERSION, **record}, separators=(",", ":"))
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(line + "\n")


def read_audit_log(path: str | Path) -> list[dict[str, Any]]:
    """Every record of an audit log, in order."""
    p = Path(path)
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise FormatError(p, f"line {i} is not JSON ({e})") from e
        if not isinstance(rec, dict) or "direction" not in rec or "records" not in rec:
            raise FormatError(p, f"line {i} is not an audit record (direction, records)")
        _check_version(p, rec, AUDIT_LOG_VERSION)
        out.append(rec)
    return out
