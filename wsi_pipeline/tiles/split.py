"""The source split of a labelled tile folder: train/test by *source image*, never by tile where the
sources are known, so that near-neighbour tiles of one image never straddle the split.

The one split of the project: ``wsi eval-encoder``, ``wsi ssl-train --subset``, ``wsi tissue-train`` and the
kather16 mosaics all call :func:`source_split`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.tiles.folders import LabelledTiles


def seeded_rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and string keys (stable across runs and Python versions)."""
    h = hashlib.sha256("|".join([str(seed), *keys]).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


@dataclass
class SplitInfo:
    """How each class was split: 'source' (by source image) or 'tile' (too few sources / none known)."""

    mode: dict[str, str]
    n_sources: dict[str, int]
    test_sources: list[str]


def _split_by_tile(idx: np.ndarray, test_fraction: float, rng: np.random.Generator, is_test: np.ndarray) -> None:
    order = rng.permutation(idx)
    is_test[order[: round(test_fraction * len(idx))]] = True


def _split_by_source(idx: np.ndarray, srcs: list[str], test_fraction: float, rng: np.random.Generator,
                     side: dict[str, bool], is_test: np.ndarray) -> None:
    """Sources in a seeded order go to test until the class holds ≥ ``test_fraction`` of its tiles there;
    a source already placed (by an earlier class) keeps its side."""
    distinct = sorted(set(srcs))
    count = {s: 0 for s in distinct}
    for s in srcs:
        count[s] += 1
    target = test_fraction * len(idx)
    n_test = sum(count[s] for s in distinct if side.get(s) is True)
    for s in [distinct[i] for i in rng.permutation(len(distinct))]:
        if s in side:
            continue
        to_test = n_test < target
        side[s] = to_test
        n_test += count[s] if to_test else 0
    for i, s in zip(idx, srcs, strict=True):
        is_test[i] = side[s]


def source_split(
    tiles: LabelledTiles, test_fraction: float = 0.3, seed: int = 0, min_sources: int = 8
) -> tuple[np.ndarray, SplitInfo]:
    """Deterministic train/test split; returns (is_test bool mask, :class:`SplitInfo`).

    Classes whose tiles all carry a source id and that have ≥ ``min_sources`` distinct sources are split
    *by source*: sources (in a seeded order) go to test until the class holds ≥ ``test_fraction`` of its
    tiles there. A source seen in an earlier class keeps its side, so no source straddles the split among
    source-split classes. Other classes (Kather's 07_ADIPOSE with 7 sources, 08_EMPTY with 2, or folders
    without source ids) are split *by tile* (seeded shuffle, ``test_fraction`` of the tiles to test).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test fraction must lie in (0, 1), got {test_fraction}")
    is_test = np.zeros(len(tiles), bool)
    side: dict[str, bool] = {}
    modes: dict[str, str] = {}
    n_src: dict[str, int] = {}
    for ci, cname in enumerate(tiles.class_names):
        idx = np.flatnonzero(tiles.labels == ci)
        srcs = [tiles.sources[i] for i in idx]
        known = [s for s in srcs if s is not None]
        n_src[cname] = len(set(known))
        if len(known) < len(srcs) or n_src[cname] < min_sources:
            modes[cname] = "tile"
            _split_by_tile(idx, test_fraction, seeded_rng(seed, "tile", cname), is_test)
        else:
            modes[cname] = "source"
            _split_by_source(idx, known, test_fraction, seeded_rng(seed, "source", cname), side, is_test)
    return is_test, SplitInfo(modes, n_src, sorted(s for s, t in side.items() if t))
