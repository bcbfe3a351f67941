"""What the server and the sites say to each other: the message types, their payloads, and the rule that
only model updates and aggregate counts and metrics leave a site.

A message is a Flower ``Message`` whose content holds up to three records (:class:`Payload`): ``arrays``
(tensors), ``metrics`` (numbers and lists of numbers) and ``config`` (scalars and strings). Server → site:

==================  ==================================================================================
message type        content
==================  ==================================================================================
``query.join``      the run specification (targets, validation fraction, seed, context rings)
``train``           the global model (arrays) and the round's settings (FedAvg/FedProx via Flower's
                    strategies: ``server-round``, ``proximal-mu``)
``evaluate``        a model to score on the sites' validation patients
``query.calibrate`` a model and candidate calibration parameters per target
``query.summary``   the final model and calibrators: cut-off histograms and validation figures
``query.refuse``    why the site cannot take part (another encoder or µm/px)
``query.done``      the run is over
==================  ==================================================================================

Site → server (:data:`SITE_METRICS`, :data:`SITE_CONFIG`; :func:`check_site_reply` enforces it before a
reply leaves the site): the model's own state (``train`` replies only: exactly the model's parameter and
buffer names and shapes) and sums, counts and histograms over the site's tiles or patients, never features,
tiles, coordinates, slide or patient identifiers, or one row per patient.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsi_pipeline.errors import FederatedError

JOIN = "query.join"
TRAIN = "train"
EVALUATE = "evaluate"
CALIBRATE = "query.calibrate"
SUMMARY = "query.summary"
REFUSE = "query.refuse"
DONE = "query.done"
MESSAGE_TYPES = (JOIN, TRAIN, EVALUATE, CALIBRATE, SUMMARY, REFUSE, DONE)

NUM_EXAMPLES = "num-examples"  # the weight of a site's model in Flower's FedAvg
ERROR = "error"  # config key of a site's refusal to go on (its typed error, e.g. a missing label column)
MAX_TEXT = 4096  # longest string a site may send (a label vocabulary, an error message)

_T = r"(?P<t>[A-Za-z_][\w.\-]*)"  # a target name (mil.targets)
SITE_METRICS: dict[str, tuple[str, ...]] = {
    JOIN: (r"n/(slides|patients|tiles|train_slides|val_slides|train_patients|val_patients)",
           r"features/(sum|sumsq|n)", rf"reg/{_T}/(n|sum|sumsq)", rf"labelled/{_T}"),
    TRAIN: (NUM_EXAMPLES, r"train_loss", rf"val/{_T}/(sum|n)"),
    EVALUATE: (rf"val/{_T}/(sum|n)", rf"count/{_T}"),
    CALIBRATE: (rf"cal/{_T}/(loss|grad|hess)",),
    SUMMARY: (rf"hist/{_T}/(all|pos|neg)", rf"prob/{_T}/(sum|n)", rf"confusion/{_T}", rf"abs_err/{_T}/(sum|n)"),
    REFUSE: (),
    DONE: (),
}
SITE_CONFIG: dict[str, tuple[str, ...]] = {
    JOIN: (r"site", r"encoder", rf"vocab/{_T}", ERROR),
    TRAIN: (ERROR,), EVALUATE: (ERROR,), CALIBRATE: (ERROR,), SUMMARY: (ERROR,), REFUSE: (), DONE: (),
}


@dataclass
class Payload:
    """The content of one message, engine-neutral (:mod:`wsi_pipeline.federated.apps` converts it)."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float | list[float]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> str:
        return str(self.config.get(ERROR, ""))


@dataclass
class Reply:
    """A site's answer: its payload, or why there is none (a Flower error, a typed error of the site)."""

    site: str
    payload: Payload | None = None
    failure: str = ""

    @property
    def ok(self) -> bool:
        return self.payload is not None and not self.failure and not self.payload.error

    @property
    def reason(self) -> str:
        return self.failure or (self.payload.error if self.payload is not None else "no answer")


def dumps(obj: Any) -> str:
    """A JSON string for a config entry."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def loads(text: Any, what: str) -> Any:
    try:
        return json.loads(str(text))
    except ValueError as e:
        raise FederatedError(f"malformed {what} in a message ({e}); are the server and the site the same "
                             "wsi-pipeline version?") from e


def _matches(key: str, patterns: Sequence[str], targets: Sequence[str]) -> bool:
    for pat in patterns:
        m = re.fullmatch(pat, key)
        if m and ("t" not in m.groupdict() or m.group("t") in targets):
            return True
    return False


def check_site_reply(kind: str, payload: Payload, model_shapes: Mapping[str, tuple[int, ...]] | None,
                     targets: Sequence[str], forbidden: Sequence[str] = ()) -> None:
    """Refuse to send anything but what a ``kind`` reply may hold (module docstring): arrays only in a
    ``train`` reply and exactly the model's state (``model_shapes``: name → shape), metric and config keys
    of the reply's allow-list about the run's ``targets``, numbers only in metrics, short strings in config,
    and none of the ``forbidden`` strings (the site's slide and patient identifiers; bare numbers and ids of
    under 3 characters are not checked, as they collide with label values) as a word anywhere."""
    if kind not in MESSAGE_TYPES:
        raise FederatedError(f"unknown message type {kind!r}")
    if payload.arrays:
        if kind != TRAIN or model_shapes is None:
            raise FederatedError(f"a {kind} reply must not carry arrays ({sorted(payload.arrays)[:3]})")
        got = {k: tuple(np.shape(v)) for k, v in payload.arrays.items()}
        if got != {k: tuple(v) for k, v in model_shapes.items()}:
            raise FederatedError("a train reply may carry exactly the model's parameters and buffers")
    for key, value in payload.metrics.items():
        if not _matches(key, SITE_METRICS[kind], targets):
            raise FederatedError(f"metric {key!r} is not one a site sends in a {kind} reply")
        vals = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            raise FederatedError(f"metric {key!r} must hold numbers only")
    for key, value in payload.config.items():
        if not _matches(key, SITE_CONFIG[kind], targets):
            raise FederatedError(f"config entry {key!r} is not one a site sends in a {kind} reply")
        if not isinstance(value, (str, int, float, bool)) or (isinstance(value, str) and len(value) > MAX_TEXT):
            raise FederatedError(f"config entry {key!r} must be a scalar or a string of at most {MAX_TEXT} chars")
    ids = {s for s in forbidden if len(s) >= 3 and not re.fullmatch(r"[\d.]+", s)}  # not a bare number
    if ids:
        tokens = set(re.split(r"[^\w.\-]+", dumps({"m": list(payload.metrics), "c": payload.config})))
        leaked = sorted(tokens & ids)
        if leaked:
            raise FederatedError(f"a {kind} reply would name the site's slides or patients ({leaked[:3]})")


def describe(kind: str, payload: Payload) -> dict[str, Any]:
    """What a message carried, for the site's audit log: arrays by name, shape and dtype (never values);
    metrics and config with their values."""
    return {
        "message_type": kind,
        "records": {
            "arrays": {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
                       for k, v in payload.arrays.items()},
            "metrics": {k: (list(v) if isinstance(v, list) else v) for k, v in payload.metrics.items()},
            "config": dict(payload.config),
        },
    }
