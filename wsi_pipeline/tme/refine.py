"""Map refinement: a small convolutional network that turns the dense map's window probabilities into
per-cell class-area estimates, reading each cell together with its neighbourhood.

Why: a window of the classifier's field of view straddling lymphocytes and stroma looks like complex stroma,
so the dense map reads the lymphocytes of an excluded slide's margin band at about half their area, and a
single global correction of the classifier's confusions cannot undo it: the loss depends on what lies around
the cell (scripts/eval_tme.py; models/wsip-tissue-kather16/README.md). The refinement sees the map around each
cell (a receptive field of about three fields of view) and is fitted to predict the true class fractions of
each map cell on mosaics with known class maps (``scripts/train_map_refiner.py``).

`wsi tme` (dense footprint) reads the slide's composition (``area_frac_*``, ``til_fraction``,
``tumour_stroma_ratio``) from the refined map, in place of the classifier's global area correction. The
compartments, their lymphocyte densities and so the immune phenotype stay those of the window map, on which the
phenotype rules were validated (a refinement fitted on the generator's layouts alone under-read lymphocytes
inside tumour nests against the rules' thresholds: 4 of 10 held-out inflamed slides would have read as desert).

What it learns is also the tissue architecture of the mosaics it was fitted on (which classes border which,
how much of each): it is a prior, recorded in the classifier's ``map_refinement`` entry. Fitted on the project's
layout generator alone it read other layouts worse than the window map (it assumed the generator's class
frequencies), so the shipped one is fitted on the generator's layouts and random ones together
(``scripts/train_map_refiner.py``). It is also fitted on maps that fold classifiers read of source images they
never saw (``--cross-fit``): the classifier reads its own training tiles almost perfectly, so a refinement
fitted on its own maps of them never learned what it must undo on a user's slide (lymphocytes of unseen source
images read at about half their area). ``wsi tme --no-map-refinement`` reads the window map as it is.

Network: the map's C class probabilities (zero outside the tissue area) and the area mask in (with
``global_context``, also the slide's mean window probabilities in every cell); dilated 3 × 3
convolutions with ReLU; a 1 × 1 convolution whose output is *added* to the log of the input probabilities
(zero-initialised, so an untrained refinement is the identity); softmax out. Fitted with the soft cross-entropy
against each cell's true class fractions, over the cells of the tissue area, with random flips and 90°
rotations of whole maps. The shipped refinement is an ensemble (``RefinerSpec.members``): networks fitted alike
with consecutive seeds, combined as the normalised geometric mean of their class fractions, since one fit's
held-out TIL ranking moves by about ±0.03 between seeds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

STATE_PREFIX = "refine."  # the refinement's tensors in the classifier's model.safetensors
EPS = 1e-4


@dataclass(frozen=True)
class RefinerSpec:
    """Architecture and fit of the refinement network."""

    hidden: int = 32
    dilations: tuple[int, ...] = (1, 2, 4, 1)
    epochs: int = 60
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # also give every cell the slide's mean window probabilities (its tissue composition as the window map reads
    # it), so that how much of a class there is can be read from the slide rather than assumed from the layouts
    # fitted on
    global_context: bool = False
    # networks fitted alike with seeds seed, seed + 1, …; the refinement is the normalised geometric mean of their
    # class fractions (one fit's figures move by about ±0.03 in TIL Spearman between seeds; the mean of several
    # does not depend on one fit's luck)
    members: int = 1

    @property
    def receptive_cells(self) -> int:
        """Map cells on a side of one output cell's receptive field."""
        return 1 + 2 * sum(self.dilations)

    def to_json(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "dilations": list(self.dilations), "epochs": self.epochs, "lr": self.lr,
                "weight_decay": self.weight_decay, "seed": self.seed, "global_context": self.global_context,
                "members": self.members}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RefinerSpec:
        try:
            return cls(hidden=int(doc["hidden"]), dilations=tuple(int(d) for d in doc["dilations"]),
                       epochs=int(doc.get("epochs", 60)), lr=float(doc.get("lr", 3e-3)),
                       weight_decay=float(doc.get("weight_decay", 1e-4)), seed=int(doc.get("seed", 0)),
                       global_context=bool(doc.get("global_context", False)),
                       members=int(doc.get("members", 1)))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"map_refinement: bad architecture entry {dict(doc)!r} ({e}); re-fit it with "
                              "scripts/train_map_refiner.py") from e


def build_refiner(spec: RefinerSpec, n_classes: int) -> nn.Module:
    """The refinement network (untrained: the identity on probability maps); with ``spec.members`` > 1, the
    ensemble of that many (tensors ``members.<i>.*``) whose output is the mean of their log class fractions."""
    import torch
    from torch import nn

    if spec.members < 1:
        raise ConfigError(f"map_refinement: members must be >= 1, got {spec.members}")
    if spec.members == 1:
        return _member_net(spec, n_classes)

    class RefinerEnsemble(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.members = nn.ModuleList([_member_net(spec, n_classes) for _ in range(spec.members)])

        def forward(self, probs: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
            """(B, C, H, W) logits: the mean of the members' log class fractions (softmax: their normalised
            geometric mean)."""
            return torch.stack([torch.log_softmax(m(probs, area), dim=1) for m in self.members]).mean(0)

    return RefinerEnsemble()


def _member_net(spec: RefinerSpec, n_classes: int) -> nn.Module:
    """One refinement network (see the module docstring)."""
    import torch
    from torch import nn

    class MapRefiner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            cin = n_classes + 1 + (n_classes if spec.global_context else 0)
            for d in spec.dilations:
                layers += [nn.Conv2d(cin, spec.hidden, 3, padding=d, dilation=d), nn.ReLU()]
                cin = spec.hidden
            self.body = nn.Sequential(*layers)
            self.out = nn.Conv2d(cin, n_classes, 1)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

        def forward(self, probs: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
            """(B, C, H, W) probabilities and (B, 1, H, W) area → (B, C, H, W) logits."""
            x = torch.cat([probs * area, area], dim=1)
            if spec.global_context:  # the area-weighted mean of the map, the same in every cell
                mean = (probs * area).sum((2, 3), keepdim=True) / area.sum((2, 3), keepdim=True).clamp_min(1.0)
                x = torch.cat([x, mean.expand_as(probs) * area], dim=1)
            return self.out(self.body(x)) + torch.log(probs.clamp_min(EPS))

    return MapRefiner()


def _tensors(probs: np.ndarray, area: np.ndarray) -> tuple[Any, Any]:
    import torch

    p = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(probs, np.float32), -1, 0))[None])
    a = torch.from_numpy(np.asarray(area, np.float32)[None, None])
    return p, a


def refine_probs(net: nn.Module, probs: np.ndarray, area: np.ndarray) -> np.ndarray:
    """H×W×C window map → H×W×C refined class fractions (float32; cells outside ``area`` unchanged)."""
    import torch

    probs = np.asarray(probs, np.float32)
    area = np.asarray(area, bool)
    if probs.size == 0 or not area.any():
        return probs
    p, a = _tensors(probs, area)
    with torch.inference_mode():
        out = torch.softmax(net.eval()(p, a), dim=1)[0].numpy()
    return np.where(area[..., None], np.moveaxis(out, 0, -1), probs).astype(np.float32)


def load_refiner(spec: RefinerSpec, n_classes: int, state: Mapping[str, np.ndarray]) -> nn.Module:
    """The network with the ``refine.*`` tensors of a classifier's state (strict: raises RuntimeError on a
    mismatch)."""
    import torch

    net = build_refiner(spec, n_classes)
    sd = {k[len(STATE_PREFIX):]: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()
          if k.startswith(STATE_PREFIX)}
    net.load_state_dict(sd, strict=True)
    return net.eval()


def geometry_matches(fitted_on: Mapping[str, Any], cell_um: float, window_um: float, method: str,
                     tolerance: float = 0.02) -> tuple[bool, str]:
    """Whether a dense map of this geometry is what the refinement was fitted on (``fitted_on``: its
    ``map_cell_um``, ``window_um`` and ``method``; a key it does not record is not checked). Returns (ok, why)."""
    for key, value in (("map_cell_um", cell_um), ("window_um", window_um)):
        want = fitted_on.get(key)
        if want and abs(float(value) - float(want)) > tolerance * float(want):
            return False, f"the map refinement was fitted on {key} {float(want):g}, this map has {float(value):g}"
    want_method = fitted_on.get("method")
    if want_method and str(want_method) != str(method):
        return False, f"the map refinement was fitted on {want_method} window maps, this map is {method}"
    return True, ""


@dataclass
class RefinerExample:
    """One map to fit on: the window map (H×W×C), its tissue area (H×W) and the true class fractions of each
    cell (H×W×C, rows sum to 1 inside the area)."""

    probs: np.ndarray
    area: np.ndarray
    truth: np.ndarray


def _augment(rng: np.random.Generator, *xs: Any) -> list[Any]:
    import torch

    k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
    out = [torch.rot90(x, k, (-2, -1)) for x in xs]
    return [x.flip(-1) for x in out] if flip else out


def fit_refiner(examples: Sequence[RefinerExample], spec: RefinerSpec = RefinerSpec(),
                progress: Any = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fit the refinement on ``examples`` (one map per step, soft cross-entropy over the area cells; with
    ``spec.members`` > 1 each member on its own, with seed ``spec.seed + i``); returns (the ``refine.*``
    tensors, a training summary)."""
    if not examples:
        raise ConfigError("map refinement: no maps to fit on")
    n_classes = int(examples[0].probs.shape[-1])
    data = [(*_tensors(ex.probs, ex.area), _tensors(ex.truth, ex.area)[0]) for ex in examples]
    n_steps = spec.members * spec.epochs

    def tick(done: int) -> None:
        if progress is not None:
            progress(done, n_steps)

    fits = [_fit_member(data, dataclasses.replace(spec, members=1, seed=spec.seed + i), n_classes,
                        lambda epoch, i=i: tick(i * spec.epochs + epoch))
            for i in range(spec.members)]
    prefix = [STATE_PREFIX] if spec.members == 1 else [f"{STATE_PREFIX}members.{i}." for i in range(spec.members)]
    state = {p + k: v for p, (net_state, _) in zip(prefix, fits, strict=True) for k, v in net_state.items()}
    before = float(np.mean([_soft_ce(ex.probs, ex.area, ex.truth) for ex in examples]))
    summary = {"n_maps": len(examples), "n_cells": int(sum(ex.area.sum() for ex in examples)),
               "loss_first_epoch": float(np.mean([losses[0] for _, losses in fits])),
               "loss_last_epoch": float(np.mean([losses[-1] for _, losses in fits])), "loss_unrefined": before}
    if spec.members > 1:
        summary["members_loss_last_epoch"] = [losses[-1] for _, losses in fits]
    log.info("map refinement: %d maps, %d member(s), soft CE %.4f unrefined → %.4f", len(examples), spec.members,
             before, summary["loss_last_epoch"])
    return state, summary


def _fit_member(data: Sequence[tuple[Any, Any, Any]], spec: RefinerSpec, n_classes: int,
                on_epoch: Callable[[int], None]) -> tuple[dict[str, np.ndarray], list[float]]:
    """One network fitted on ``data`` ((probs, area, truth) tensors per map): (its tensors without prefix, the
    mean loss of every epoch); ``on_epoch(e)`` after epoch e (1-based)."""
    import torch
    import torch.nn.functional as tf

    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    net = build_refiner(spec, n_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    losses = []
    net.train()
    for epoch in range(spec.epochs):
        total = 0.0
        for i in rng.permutation(len(data)):
            p, a, y = _augment(rng, *data[i])
            logp = tf.log_softmax(net(p, a), dim=1)
            loss = -((y * logp).sum(dim=1) * a[:, 0]).sum() / a.sum().clamp_min(1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total / len(data))
        on_epoch(epoch + 1)
    return {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items()}, losses


def _soft_ce(probs: np.ndarray, area: np.ndarray, truth: np.ndarray) -> float:
    a = np.asarray(area, bool)
    if not a.any():
        return 0.0
    return float(-(np.asarray(truth)[a] * np.log(np.clip(np.asarray(probs)[a], EPS, None))).sum(-1).mean())
