"""Bags of tile embeddings: lazy loading from ``RUN/features/<encoder>/<slide_id>.h5``, spatial context
features, and random tile subsampling for training.

Spatial context: with ``context_rings = r`` every tile's embedding is concatenated with the mean embedding
of its neighbours on the tile grid at Chebyshev distance 1, ..., r (one block per ring; zeros where a ring
has no tissue tile). Computed on the full bag before any subsampling, so training and prediction see the
same context. The raw embedding stays in the first ``embed_dim`` columns.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import ConfigError, FormatError
from wsi_pipeline.formats.h5 import A_ENCODER, A_TARGET_MPP, A_WEIGHTS_SHA256, read_features_h5, read_h5_attrs
from wsi_pipeline.mil.grid import grid_rc, ring_offsets
from wsi_pipeline.runfolder.layout import RunLayout

log = logging.getLogger(__name__)


@dataclass
class EncoderInfo:
    """Which features a model was trained on: predicting from another encoder or µm/px is an error."""

    name: str
    embed_dim: int
    target_mpp: float | None
    weights_sha256: str = ""  # checksum of the encoder's weights ("random-init"; "" when unknown)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "embed_dim": self.embed_dim, "target_mpp": self.target_mpp}
        if self.weights_sha256:
            d["weights_sha256"] = self.weights_sha256
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderInfo:
        mpp = d.get("target_mpp")
        return cls(str(d["name"]), int(d["embed_dim"]), None if mpp in (None, "") else float(mpp),
                   str(d.get("weights_sha256") or ""))


@dataclass
class Bag:
    slide_id: str
    features: np.ndarray  # N×D float32 (with context blocks when enabled)
    l0_xy: np.ndarray  # N×2 int64


def neighbour_context(features: np.ndarray, l0_xy: np.ndarray, rings: int) -> np.ndarray:
    """``[x, mean(ring 1), ..., mean(ring r)]`` per tile (N × D·(1+r)), float32."""
    x = np.asarray(features, dtype=np.float32)
    if rings <= 0 or len(x) == 0:
        return x
    rc = grid_rc(l0_xy) + rings  # shift so neighbour offsets stay non-negative
    width = int(rc[:, 1].max()) + rings + 1
    keys = rc[:, 0] * width + rc[:, 1]
    order = np.argsort(keys, kind="stable")
    skeys = keys[order]
    blocks = [x]
    for k in range(1, rings + 1):
        acc = np.zeros_like(x)
        cnt = np.zeros(len(x), dtype=np.float32)
        for dr, dc in ring_offsets(k):
            nk = (rc[:, 0] + dr) * width + (rc[:, 1] + dc)
            pos = np.clip(np.searchsorted(skeys, nk), 0, len(skeys) - 1)
            hit = skeys[pos] == nk
            src = order[pos[hit]]
            acc[hit] += x[src]
            cnt[hit] += 1
        blocks.append(acc / np.maximum(cnt, 1)[:, None])
    return np.concatenate(blocks, axis=1)


def subsample(bag: Bag, max_tiles: int, rng: np.random.Generator) -> Bag:
    """At most ``max_tiles`` random tiles of the bag (all of them when it is smaller, in random order)."""
    n = len(bag.features)
    if max_tiles <= 0 or n <= max_tiles:
        return bag
    idx = np.sort(rng.choice(n, size=max_tiles, replace=False))
    return Bag(bag.slide_id, bag.features[idx], bag.l0_xy[idx])


def resolve_encoder(layout: RunLayout, encoder: str | None) -> str:
    """The features folder to use: ``encoder`` if given, else the only one in RUN/features."""
    feats = layout.root / "features"
    if encoder:
        if not layout.features_dir(encoder).is_dir():
            have = sorted(p.name for p in feats.iterdir()) if feats.is_dir() else []
            raise ConfigError(
                f"{layout.features_dir(encoder)}: no features for encoder {encoder!r} (have: {have}); "
                f"run `wsi extract {layout.root} --encoder {encoder}` first"
            )
        return encoder
    have = sorted(p.name for p in feats.iterdir() if p.is_dir()) if feats.is_dir() else []
    if not have:
        raise ConfigError(f"{feats}: no features; run `wsi extract {layout.root}` first")
    if len(have) > 1:
        raise ConfigError(f"{feats}: features of several encoders {have}; choose one with --encoder")
    return have[0]


class BagStore:
    """Lazy, cached access to the bags of one RUN and encoder.

    Bags are read on first use and kept in an LRU cache bounded by ``cache_mb`` (0 = no cache), so a
    cohort that fits in memory is read once, and a huge one streams from disk.
    """

    def __init__(self, run: str | Path, encoder: str | None = None, context_rings: int = 0,
                 cache_mb: int = 2048) -> None:
        self.layout = RunLayout(run)
        self.encoder = resolve_encoder(self.layout, encoder)
        self.context_rings = int(context_rings)
        self.cache_bytes = int(cache_mb) << 20
        self._cache: OrderedDict[str, Bag] = OrderedDict()
        self._cached = 0
        self._dir = self.layout.features_dir(self.encoder)

    def slide_ids(self) -> list[str]:
        return sorted(p.stem for p in self._dir.glob("*.h5") if not p.name.startswith("."))

    def path(self, slide_id: str) -> Path:
        return self.layout.features_h5(self.encoder, slide_id)

    def info(self, slide_ids: list[str] | None = None) -> EncoderInfo:
        """Encoder name, embedding size and tile µm/px, checked to agree across the given slides."""
        ids = slide_ids or self.slide_ids()
        if not ids:
            raise ConfigError(f"{self._dir}: no feature files")
        seen: dict[tuple[str, int, float | None, str], str] = {}
        for sid in ids:
            fs = read_features_h5(self.path(sid), load_features=False)
            name = str(fs.attrs.get(A_ENCODER) or self.encoder)
            dim = int(fs.features.shape[1])
            mpp = fs.attrs.get(A_TARGET_MPP)
            if mpp in (None, ""):
                mpp = read_h5_attrs(self.layout.tiles_h5(sid)).get(A_TARGET_MPP)
            mpp_f = None if mpp in (None, "") else round(float(mpp), 4)
            sha = str(fs.attrs.get(A_WEIGHTS_SHA256) or "")
            seen.setdefault((name, dim, mpp_f, sha), sid)
        if len(seen) > 1:
            desc = "; ".join(f"{k[0]} dim {k[1]} at {k[2]} µm/px, weights {k[3][:12] or '?'} (e.g. {v})"
                             for k, v in seen.items())
            raise FormatError(self._dir, f"feature files disagree: {desc}; re-extract them with one encoder")
        (name, dim, mpp_f, sha), = seen
        return EncoderInfo(name, dim, mpp_f, sha)

    def get(self, slide_id: str) -> Bag:
        if slide_id in self._cache:
            self._cache.move_to_end(slide_id)
            return self._cache[slide_id]
        path = self.path(slide_id)
        if not path.exists():
            raise FormatError(path, f"no features for slide {slide_id!r}; run `wsi extract` for it")
        fs = read_features_h5(path)
        if len(fs.l0_xy) != len(fs.features):
            raise FormatError(path, f"{len(fs.features)} feature rows but {len(fs.l0_xy)} coords; re-extract")
        feats = neighbour_context(fs.features, fs.l0_xy, self.context_rings)
        bag = Bag(slide_id, feats, fs.l0_xy)
        size = feats.nbytes + fs.l0_xy.nbytes
        if size <= self.cache_bytes:
            self._cache[slide_id] = bag
            self._cached += size
            while self._cached > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.features.nbytes + old.l0_xy.nbytes
        return bag
