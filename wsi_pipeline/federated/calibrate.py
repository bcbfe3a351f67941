"""Temperature and Platt calibration by federated optimisation.

The fits of :mod:`wsi_pipeline.mil.calibration` are searches that ask for the objective at candidate
parameters (:func:`~wsi_pipeline.mil.calibration.platt_search`: Newton–Raphson with step halving, every
halved step in one request; :func:`~wsi_pipeline.mil.calibration.temperature_search`: a refined grid over
log T). Federated, one request is one message: every site returns the objective (Platt: with its gradient
and Hessian) summed over its labelled validation slides, with the smoothed targets of the pooled class
counts, and the server adds the sites' sums. So the federated calibrator is the one ``wsi train``'s fit
would find on the pooled validation predictions, without a prediction leaving a site. All classification
targets are calibrated in the same messages. Isotonic calibration has no such form and is refused; so is
stacked calibration (it reads every patient's outputs of the other targets), and ``auto`` means platt /
temperature here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.mil.calibration import (
    NONE,
    Search,
    TargetCalibrator,
    create_calibrator,
    platt_search,
    platt_start,
    platt_targets,
    platt_terms,
    resolve_method,
    temperature_logits,
    temperature_nll,
    temperature_search,
    temperature_targets,
)
from wsi_pipeline.mil.targets import MULTICLASS, TargetSpec

FEDERATED_METHODS = ("platt", "temperature", NONE)  # the fits with a federated (summed) form
MAX_NEWTON = 30  # Platt iterations (one message each; it converges in well under 10)


def site_terms(spec: TargetSpec, prob: np.ndarray, y: np.ndarray, request: Mapping[str, Any]) -> dict[str, list[float]]:
    """A site's sums for one target: ``cal/<t>/loss`` per candidate; Platt also ``grad`` (2 per candidate)
    and ``hess`` (4 per candidate). Unlabelled slides are left out."""
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y)
    prob = np.asarray(prob, dtype=np.float64)
    prob = prob[ok] if spec.kind == MULTICLASS else prob.reshape(len(y), -1)[ok, 0]
    yi = y[ok].astype(int)
    counts = [int(c) for c in request["counts"]]
    cands = request["candidates"]
    key = f"cal/{spec.name}"
    if request["method"] == "platt":
        t = platt_targets(yi, counts[1], counts[0])
        terms = [platt_terms(prob, t, float(a), float(b)) for a, b in cands]
        return {f"{key}/loss": [r[0] for r in terms], f"{key}/grad": [float(x) for r in terms for x in r[1]],
                f"{key}/hess": [float(x) for r in terms for x in np.ravel(r[2])]}
    z = temperature_logits(prob, spec.kind == MULTICLASS).reshape(len(yi), -1)
    target = temperature_targets(yi, z.shape[1], n=sum(counts))
    return {f"{key}/loss": [temperature_nll(z, target, float(x)) for x in cands]}


class FederatedCalibration:
    """The calibration searches of every classification target, driven in lockstep: :meth:`requests` is one
    message's worth of candidates, :meth:`update` takes the summed answers."""

    def __init__(self, specs: Sequence[TargetSpec], requested: str, counts: Mapping[str, Sequence[float]]) -> None:
        self.specs = {s.name: s for s in specs if s.is_classification}
        self.counts = {t: [float(c) for c in counts.get(t, [])] for t in self.specs}
        self.methods: dict[str, str] = {}
        self.searches: dict[str, Search] = {}
        self.pending: dict[str, list[Any]] = {}
        self.results: dict[str, Any] = {}
        self.iterations: dict[str, int] = {}
        for name, spec in self.specs.items():
            method = resolve_method(requested, spec)  # auto: platt / temperature (never stacked, see config)
            if method not in FEDERATED_METHODS:
                raise ConfigError(f"--calibration {requested}: not available in federated training; use "
                                  f"{', '.join(('auto', *FEDERATED_METHODS))}")
            if method != NONE and sum(c > 0 for c in self.counts[name]) < 2:
                method = NONE  # one class in the validation labels: nothing to calibrate against
            self.methods[name] = method
            if method == NONE:
                continue
            c = self.counts[name]
            search = platt_search(platt_start(int(c[1]), int(c[0])), MAX_NEWTON) if method == "platt" \
                else temperature_search()
            self.searches[name] = search
            self.pending[name] = next(search)
            self.iterations[name] = 0

    @property
    def done(self) -> bool:
        return not self.pending

    def requests(self) -> dict[str, dict[str, Any]]:
        return {t: {"method": self.methods[t], "candidates": [list(np.atleast_1d(c)) if self.methods[t] == "platt"
                                                             else float(c) for c in cands],
                    "counts": self.counts[t]}
                for t, cands in self.pending.items()}

    def update(self, sums: Mapping[str, Sequence[float]]) -> None:
        """``sums``: the sites' ``cal/<t>/…`` metrics added up."""
        for t in list(self.pending):
            k = len(self.pending[t])
            loss = list(sums[f"cal/{t}/loss"])
            if self.methods[t] == "platt":
                g = np.asarray(sums[f"cal/{t}/grad"]).reshape(k, 2)
                h = np.asarray(sums[f"cal/{t}/hess"]).reshape(k, 2, 2)
                answer: list[Any] = [(loss[i], g[i], h[i]) for i in range(k)]
            else:
                answer = loss
            self.iterations[t] += 1
            try:
                self.pending[t] = self.searches[t].send(answer)
            except StopIteration as stop:
                self.results[t] = stop.value
                del self.pending[t]

    def calibrators(self) -> dict[str, TargetCalibrator]:
        out = {}
        for t, spec in self.specs.items():
            method = self.methods[t]
            multiclass = spec.kind == MULTICLASS
            if method == "platt":
                a, b = self.results[t]
                params: dict[str, Any] = {"a": float(a), "b": float(b)}
            elif method == "temperature":
                params = {"temperature": float(np.exp(self.results[t]))}
            else:
                params = {}
            out[t] = TargetCalibrator(create_calibrator(method, multiclass, params))
        return out
