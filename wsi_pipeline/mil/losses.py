"""Per-target losses with missing-label masks, and the conversion of logits to predictions.

binary → BCE-with-logits; multiclass → cross-entropy; regression → MSE on the standardised target;
survival → negative Cox partial log-likelihood (Breslow ties) over the slides of the mini-batch.
A missing label (NaN) drops that slide from that target's loss only; a target without any label in the
batch contributes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from wsi_pipeline.mil.targets import BINARY, MULTICLASS, REGRESSION, SURVIVAL, TargetSpec


def cox_loss(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Negative Cox partial log-likelihood (Breslow), averaged over events; 0 when there is no event."""
    if event.sum() == 0:
        return risk.sum() * 0.0
    order = torch.argsort(time, descending=True, stable=True)
    r, t, e = risk[order], time[order], event[order]
    log_cum = torch.logcumsumexp(r, dim=0)
    # risk set of subject i: everyone with time >= t_i, i.e. up to the last index of its tie group
    neg_t = -t
    last = torch.searchsorted(neg_t.contiguous(), neg_t.contiguous(), right=True) - 1
    ll = (r - log_cum[last]) * e
    return -ll.sum() / e.sum()


def task_loss(spec: TargetSpec, logits: Tensor, y: Tensor, event: Tensor | None = None) -> Tensor | None:
    """Loss of one target over a batch; ``logits`` is B×n_out, ``y`` B (NaN = missing). None if no label."""
    mask = ~torch.isnan(y)
    if event is not None:
        mask = mask & ~torch.isnan(event)
    if not bool(mask.any()):
        return None
    lg, yy = logits[mask], y[mask]
    if spec.kind == BINARY:
        return F.binary_cross_entropy_with_logits(lg[:, 0], yy)
    if spec.kind == MULTICLASS:
        return F.cross_entropy(lg, yy.long())
    if spec.kind == REGRESSION:
        return F.mse_loss(lg[:, 0], yy)
    if spec.kind == SURVIVAL:
        assert event is not None
        if int(mask.sum()) < 2:
            return None
        return cox_loss(lg[:, 0], yy, event[mask])
    raise ValueError(spec.kind)


def multitask_loss(
    specs: Sequence[TargetSpec], logits: Mapping[str, Tensor], ys: Mapping[str, Tensor],
    events: Mapping[str, Tensor],
) -> tuple[Tensor, dict[str, float]]:
    """Sum of the per-target losses (each a mean over its labelled slides) and the parts."""
    total: Tensor | None = None
    parts: dict[str, float] = {}
    for s in specs:
        loss = task_loss(s, logits[s.name], ys[s.name], events.get(s.name))
        if loss is None:
            continue
        parts[s.name] = float(loss.detach())
        total = loss if total is None else total + loss
    if total is None:
        any_logit = next(iter(logits.values()))
        total = any_logit.sum() * 0.0
    return total, parts


def to_prediction(spec: TargetSpec, logits: np.ndarray, scaler: Sequence[float] | None = None) -> np.ndarray:
    """Logits (… × n_out) → prediction: binary P(positive) (…), multiclass probabilities (… × C),
    regression value in label units (…, clamped into the target's bounds), survival risk = log relative hazard (…)."""
    logits = np.asarray(logits, dtype=np.float64)
    if spec.kind == BINARY:
        return 1.0 / (1.0 + np.exp(-logits[..., 0]))
    if spec.kind == MULTICLASS:
        z = logits - logits.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)
    if spec.kind == REGRESSION:
        mean, std = scaler if scaler is not None else (0.0, 1.0)
        return spec.clamp(logits[..., 0] * std + mean)  # a bounded target (a fraction) stays in its bounds
    if spec.kind == SURVIVAL:
        return logits[..., 0]
    raise ValueError(spec.kind)
