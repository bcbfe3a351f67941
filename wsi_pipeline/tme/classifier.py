"""The tile tissue classifier: a linear (or small MLP) head on frozen encoder features.

A classifier folder holds::

    classifier.json     format_version, class_names, encoder, embed_dim, mpp (µm/px of the pixels the encoder
                        saw), tile_um (field of view of a training tile), input_size, fit (how a training
                        tile met the encoder input), head, hidden, metrics, training summary
    model.safetensors   feature mean/std, the head's weights and the optional map refinement's ``refine.*``
                        tensors (float32; :mod:`wsi_pipeline.tme.refine`)
    README.md           model card (for shipped classifiers)

Physical scale is part of the model: :meth:`TissueClassifier.check_scale` refuses features made at another
µm/px (raises :class:`~wsi_pipeline.errors.ScaleMismatchError`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_pipeline.errors import ConfigError, ScaleMismatchError, WeightsError
from wsi_pipeline.formats import api as F

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

CLASSIFIER_JSON = F.CLASSIFIER_JSON
WEIGHTS_FILE = "model.safetensors"
CLASSIFIER_FORMAT_VERSION = F.CLASSIFIER_JSON_VERSION
DEFAULT_CLASSIFIER = "wsip-tissue-kather16"  # shipped under models/
HEADS = ("linear", "mlp")


@dataclass
class TissueClassifier:
    class_names: list[str]
    encoder: str
    embed_dim: int
    mpp: float  # µm/px of the pixels the encoder saw during training
    head: str = "linear"
    hidden: int = 256
    tile_um: float = 0.0  # field of view of one training tile (µm), informative
    input_size: int = 0  # encoder input size (px)
    fit: str = ""  # how training tiles met the encoder input: native | pad (wsi_pipeline.tiles.transform)
    encoder_weights_sha256: str = ""
    state: dict[str, np.ndarray] = field(default_factory=dict)  # feat_mean, feat_std, head.* weights
    # {"method": "soft-confusion", "matrix": C×C (row = true class: its mean predicted probabilities), ...}
    area_correction: dict[str, Any] = field(default_factory=dict)
    # {"architecture": RefinerSpec.to_json(), "fitted_on": ..., "training": ..., "validation": ...} when
    # model.safetensors holds ``refine.*`` tensors (wsi_pipeline.tme.refine); {} = none
    map_refinement: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    weights_sha256: str = ""  # of the model.safetensors it was loaded from ('' when built in memory)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    # ---- scale
    def check_scale(self, mpp: float, tolerance: float = 0.05, what: str = "features") -> None:
        """Raise :class:`ScaleMismatchError` unless ``mpp`` is within ``tolerance`` (relative) of the
        classifier's µm/px."""
        if mpp is None or not np.isfinite(float(mpp)) or float(mpp) <= 0:
            raise ScaleMismatchError(
                f"{what}: unknown µm/px; the tissue classifier {self.path or self.encoder} needs "
                f"{self.mpp:g} µm/px — re-tile with a known MPP"
            )
        rel = abs(float(mpp) - self.mpp) / self.mpp
        if rel > tolerance:
            raise ScaleMismatchError(
                f"{what} are at {float(mpp):.4g} µm/px but the tissue classifier "
                f"{self.path or ''} was trained at {self.mpp:.4g} µm/px ({rel:.0%} apart, tolerance "
                f"{tolerance:.0%}); embed the tiles at {self.mpp:.4g} µm/px (`wsi tme` does so from the "
                f"slides when the RUN features do not match) or retrain the classifier at this scale"
            )

    # ---- compute
    def module(self) -> nn.Module:
        import torch

        net = build_head(self.head, self.embed_dim, self.n_classes, self.hidden)
        sd = {k[len("head."):]: torch.from_numpy(np.asarray(v, np.float32)) for k, v in self.state.items()
              if k.startswith("head.")}
        net.load_state_dict(sd, strict=True)
        return net.eval()

    def predict_proba(self, features: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """(N, embed_dim) features → (N, n_classes) float32 probabilities."""
        import torch

        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.embed_dim:
            raise ConfigError(
                f"features have shape {x.shape}; the tissue classifier expects (N, {self.embed_dim}) "
                f"from encoder {self.encoder}"
            )
        mean, std = self.state["feat_mean"], self.state["feat_std"]
        net = self.module()
        out = np.empty((len(x), self.n_classes), np.float32)
        with torch.inference_mode():
            for s in range(0, len(x), batch_size):
                xb = torch.from_numpy((x[s : s + batch_size] - mean) / std)
                out[s : s + batch_size] = torch.softmax(net(xb), dim=1).numpy()
        return out

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.predict_proba(features).argmax(axis=1)

    def correct_areas(self, expected: np.ndarray) -> np.ndarray:
        """Expected class areas (Σ of probabilities over a region, C values) → estimated true class areas:
        the non-negative ``t`` with the same total that best explains them through the classifier's soft
        confusion matrix ``M`` (``Mᵀ t ≈ expected``, least squares; the "adjusted count" of quantification).
        Unchanged without an ``area_correction``."""
        m = self.area_correction.get("matrix") if self.area_correction else None
        if m is None:
            return np.asarray(expected, np.float64)
        return soft_adjusted_areas(np.asarray(m, np.float64), np.asarray(expected, np.float64))

    @property
    def has_map_refinement(self) -> bool:
        return bool(self.map_refinement)

    def refiner(self) -> nn.Module:
        """The map refinement network (:mod:`wsi_pipeline.tme.refine`); ConfigError when there is none."""
        from wsi_pipeline.tme.refine import RefinerSpec, load_refiner

        if not self.map_refinement:
            raise ConfigError(f"the classifier {self.path or self.encoder} has no map refinement; fit one with "
                              "scripts/train_map_refiner.py or use --no-map-refinement")
        spec = RefinerSpec.from_json(self.map_refinement.get("architecture", {}))
        return load_refiner(spec, self.n_classes, self.state)

    def map_refinement_applies(self, cell_um: float, window_um: float, method: str) -> tuple[bool, str]:
        """Whether the map refinement fits a dense map of this geometry (map cell, window, method), as recorded
        when it was fitted (``map_refinement.fitted_on``); returns (ok, why not)."""
        from wsi_pipeline.tme.refine import geometry_matches

        if not self.map_refinement:
            return False, "the classifier has no map refinement"
        return geometry_matches(self.map_refinement.get("fitted_on") or {}, cell_um, window_um, method)

    def refine_map(self, probs: np.ndarray, area: np.ndarray) -> np.ndarray:
        """A dense window map (H×W×C) → per-cell class-area estimates (see :mod:`wsi_pipeline.tme.refine`)."""
        from wsi_pipeline.tme.refine import refine_probs

        return refine_probs(self.refiner(), probs, area)

    def window_map_sha256(self) -> str:
        """Checksum of what makes the classifier's per-tile and per-window probabilities: its head tensors
        (not the map refinement's ``refine.*``, which only reads the stored map) and the fields of
        classifier.json that shape a window (classes, encoder and its weights, µm/px, field of view, input, head).
        The resume key of the stored probabilities and dense maps of `wsi tme`, so that refitting only the map
        refinement reuses every stored map."""
        import hashlib

        from wsi_pipeline.tme.refine import STATE_PREFIX

        h = hashlib.sha256()
        for name in sorted(k for k in self.state if not k.startswith(STATE_PREFIX)):
            a = np.ascontiguousarray(self.state[name], dtype=np.float32)
            h.update(f"{name}:{a.shape}".encode())
            h.update(a.tobytes())
        fields = {k: getattr(self, k) for k in ("class_names", "encoder", "encoder_weights_sha256", "embed_dim",
                                                  "mpp", "tile_um", "input_size", "fit", "head", "hidden")}
        return F.params_hash({"head_tensors": h.hexdigest(), **fields})

    # ---- I/O
    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": CLASSIFIER_FORMAT_VERSION,
            "kind": "tissue-classifier",
            "class_names": list(self.class_names),
            "encoder": self.encoder,
            "encoder_weights_sha256": self.encoder_weights_sha256,
            "embed_dim": int(self.embed_dim),
            "mpp": float(self.mpp),
            "tile_um": float(self.tile_um),
            "input_size": int(self.input_size),
            "fit": self.fit,
            "head": self.head,
            "hidden": int(self.hidden),
            "area_correction": self.area_correction,
            "map_refinement": self.map_refinement,
            "metrics": self.metrics,
            "training": self.training,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``classifier.json`` + ``model.safetensors`` into ``out_dir`` (atomic per file)."""
        from safetensors.numpy import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.state.items()}
        with F.atomic_path(out / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"encoder": self.encoder, "mpp": f"{self.mpp:g}"})
        F.write_classifier_json(out / CLASSIFIER_JSON, self.to_json())
        self.path = str(out)
        return out


def soft_adjusted_areas(confusion: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Solve ``min ‖Mᵀ t − e‖²`` over ``t ≥ 0`` with ``Σ t = Σ e`` (the sum as a heavily weighted extra
    equation; scipy's NNLS). ``M[i]`` is the mean predicted probability vector of true class ``i``."""
    from scipy.optimize import nnls

    total = float(expected.sum())
    if total <= 0:
        return expected.copy()
    weight = 100.0
    a = np.vstack([confusion.T, weight * np.ones((1, confusion.shape[0]))])
    b = np.concatenate([expected / total, [weight]])
    t, _ = nnls(a, b)
    return t / max(t.sum(), 1e-12) * total


def build_head(kind: str, embed_dim: int, n_classes: int, hidden: int = 256) -> nn.Module:
    from torch import nn

    if kind == "linear":
        return nn.Sequential(nn.Linear(embed_dim, n_classes))
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, n_classes)
        )
    raise ConfigError(f"unknown head {kind!r}; expected one of {HEADS}")


def resolve_classifier(name_or_path: str | Path | None) -> Path:
    """A classifier folder from a path (folder or its classifier.json) or a name under ``models/``;
    '' / None → the shipped default."""
    from wsi_pipeline.encoders.project import find_model_folder, models_dir

    target = str(name_or_path or DEFAULT_CLASSIFIER)
    found = find_model_folder(target, CLASSIFIER_JSON)
    if found is not None:
        return found
    raise WeightsError(
        f"{target}: no tissue classifier there (no {CLASSIFIER_JSON}, and none of that name in "
        f"{models_dir()}) — pass --classifier DIR written by `wsi tissue-train`"
    )


def load_classifier(name_or_path: str | Path | None = None) -> TissueClassifier:
    """Load a classifier folder (see :func:`resolve_classifier`)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = resolve_classifier(name_or_path)
    jpath = folder / CLASSIFIER_JSON
    meta = F.read_classifier_json(jpath)
    wpath = folder / WEIGHTS_FILE
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, FileNotFoundError) as e:
        raise WeightsError(
            f"{wpath}: cannot read the classifier weights ({e}); re-run `wsi tissue-train`"
        ) from e
    clf = TissueClassifier(
        class_names=list(meta["class_names"]),
        encoder=str(meta["encoder"]),
        embed_dim=int(meta["embed_dim"]),
        mpp=float(meta["mpp"]),
        head=str(meta["head"]),
        hidden=int(meta.get("hidden", 256)),
        tile_um=float(meta.get("tile_um", 0.0)),
        input_size=int(meta.get("input_size", 0)),
        fit=str(meta.get("fit", "")),
        encoder_weights_sha256=str(meta.get("encoder_weights_sha256", "")),
        state=dict(state),
        area_correction=dict(meta.get("area_correction") or {}),
        map_refinement=dict(meta.get("map_refinement") or {}),
        metrics=dict(meta.get("metrics", {})),
        training=dict(meta.get("training", {})),
        path=str(folder),
        weights_sha256=F.file_sha256(wpath),
    )
    for key in ("feat_mean", "feat_std"):
        if key not in clf.state:
            raise WeightsError(f"{wpath}: no {key!r} tensor; re-run `wsi tissue-train`")
    try:
        clf.module()
    except RuntimeError as e:
        raise WeightsError(f"{wpath}: weights do not match the {clf.head} head in {jpath} ({e})") from e
    if clf.map_refinement:
        try:
            clf.refiner()
        except RuntimeError as e:
            raise WeightsError(f"{wpath}: the map refinement's tensors do not match its architecture in {jpath} "
                               f"({e}); re-fit it with scripts/train_map_refiner.py, or delete "
                               "'map_refinement' from classifier.json") from e
    return clf


def fit_head(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    head: str = "linear",
    hidden: int = 256,
    epochs: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-3,
    seed: int = 0,
    sample_weight: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Fit a head on standardised features with class-balanced cross-entropy (full-batch AdamW, cosine
    learning rate). ``labels``: N class indices, or N×C soft targets (rows summing to 1: e.g. the class-area
    fractions of mixed windows, :mod:`wsi_pipeline.tme.context`); class weights balance the total target mass
    of the classes; ``sample_weight`` (N) weighs rows on top. Returns the state (``feat_mean``, ``feat_std``,
    ``head.*``) for :class:`TissueClassifier`. Deterministic for a given seed on one machine."""
    import torch

    x = np.asarray(features, np.float32)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ConfigError(f"fit_head: need (N, D) features and N labels, got {x.shape} and {y.shape}")
    if y.ndim == 1:
        if y.min() < 0 or y.max() >= n_classes:
            raise ConfigError(f"fit_head: labels must be in 0..{n_classes - 1}")
        target = np.eye(n_classes, dtype=np.float32)[y.astype(np.int64)]
    else:
        if y.shape[1] != n_classes or np.any(y < 0):
            raise ConfigError(f"fit_head: soft targets must be N×{n_classes} and ≥ 0, got {y.shape}")
        target = (y / np.maximum(y.sum(axis=1, keepdims=True), 1e-12)).astype(np.float32)
    sw = np.ones(len(x), np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
    mean = x.mean(axis=0)
    std = x.std(axis=0) + 1e-6
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = build_head(head, x.shape[1], n_classes, hidden)
    for p in net.parameters():  # seeded init independent of global RNG state
        if p.ndim > 1:
            torch.nn.init.kaiming_uniform_(p, a=5**0.5, generator=g)
        else:
            torch.nn.init.zeros_(p)
    xt = torch.from_numpy((x - mean) / std)
    mass = (target * sw[:, None]).sum(axis=0)
    w = np.where(mass > 0, mass.sum() / (n_classes * np.maximum(mass, 1e-12)), 0.0).astype(np.float32)
    tt = torch.from_numpy(target * w[None, :])  # class-balanced soft targets
    swt = torch.from_numpy(sw / sw.sum())
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    net.train()
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        loss = -(swt * (tt * torch.log_softmax(net(xt), dim=1)).sum(dim=1)).sum()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    state = {"feat_mean": mean.astype(np.float32), "feat_std": std.astype(np.float32)}
    for k, v in net.state_dict().items():
        state[f"head.{k}"] = v.detach().cpu().numpy().astype(np.float32)
    log.debug("fitted %s head: final loss %.4f", head, float(loss.detach()))
    return state


def classification_report(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]
) -> dict[str, Any]:
    """Balanced accuracy, accuracy, per-class recall and the confusion matrix (rows = truth)."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    labels = list(range(len(class_names)))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diag(cm) / cm.sum(axis=1)
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred))),
        "n": len(y_true),
        "per_class_recall": {
            c: (float(r) if np.isfinite(r) else None) for c, r in zip(class_names, recall, strict=True)
        },
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
    }


def format_confusion(report: Mapping[str, Any]) -> str:
    """The confusion matrix as a fixed-width text table (rows = truth, columns = predicted)."""
    names = [str(n) for n in report["class_names"]]
    cm = np.asarray(report["confusion_matrix"])
    w = max(6, *(len(n) for n in names)) + 1
    lines = ["truth \\ pred".ljust(w) + "".join(n[:w - 1].rjust(w) for n in names)]
    for n, row in zip(names, cm, strict=True):
        lines.append(n.ljust(w) + "".join(str(int(v)).rjust(w) for v in row))
    return "\n".join(lines)
