"""The HDF5 files of a RUN folder (tiles, features, per-tile scores, TME probabilities and dense maps): dataset and
attribute names, format version, atomic writers and validating readers.

Coordinates are always level-0 pixels (x, y) of a tile's top-left corner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline._version import __version__
from wsi_pipeline.errors import FormatError
from wsi_pipeline.formats.atomic import atomic_path

FORMAT_VERSION = 1

# ---- dataset names (CLAM / TRIDENT compatible where they have one) ----
DS_COORDS = "coords"  # N×2 int64, level-0 (x, y) of the top-left corner
DS_FEATURES = "features"  # N×D float16/float32
DS_SCORES_GROUP = "scores"  # group: one dataset per target (N or N×C)
DS_ATTENTION_GROUP = "attention"  # group: one dataset per target (N), MIL attention weights
DS_TME_PROBS = "probs"  # N×C tissue-class probabilities
DS_TME_DENSE = "dense_probs"  # H×W×C float16: the dense class-probability map (`wsi tme --footprint dense`)
DS_TME_DENSE_AREA = "dense_area"  # H×W uint8: 1 where the cell centre lies in a RUN tile

# ---- attribute names ----
A_FORMAT_VERSION = "format_version"
A_PIPELINE_VERSION = "pipeline_version"
A_PARAMS_HASH = "params_hash"  # hash of the parameters that produced the file: resume key
A_SLIDE_ID = "slide_id"
A_SLIDE_PATH = "slide_path"
# tiling (CLAM/TRIDENT names first)
A_PATCH_SIZE = "patch_size"  # output tile size in pixels (at target_mpp)
A_PATCH_SIZE_L0 = "patch_size_level0"  # tile side in level-0 pixels
A_PATCH_LEVEL = "patch_level"  # pyramid level read for this target MPP
A_LEVEL0_W = "level0_width"
A_LEVEL0_H = "level0_height"
A_TARGET_MPP = "target_mpp"
A_SLIDE_MPP = "slide_mpp"
A_SLIDE_MPP_SOURCE = "slide_mpp_source"
A_TILE_SIZE = "tile_size"
A_OVERLAP = "overlap"
A_MIN_TISSUE = "min_tissue"
A_TARGET_MAG = "target_magnification"  # TRIDENT: 10 / target_mpp
A_LEVEL0_MAG = "level0_magnification"  # TRIDENT: 10 / slide_mpp
A_NAME = "name"  # CLAM/TRIDENT: slide id
# features
A_ENCODER = "encoder"
A_WEIGHTS_SHA256 = "weights_sha256"
A_EMBED_DIM = "embed_dim"
A_INPUT_SIZE = "input_size"
A_PRECISION = "precision"
# scores / tme
A_MODEL = "model"
A_TARGETS = "targets"
A_CLASS_NAMES = "class_names"
# dense TME map (on the DS_TME_DENSE dataset): cell (i, j) covers level-0 x ∈ origin_x + [j, j+1)·cell_l0, y likewise
A_DENSE_ORIGIN_L0 = "origin_level0"  # (x, y) level-0 corner of cell (0, 0)
A_DENSE_CELL_L0 = "cell_level0"  # cell side in level-0 pixels (float)
A_DENSE_CELL_UM = "cell_um"
A_DENSE_WINDOW_UM = "window_um"  # side of the classified windows (one per cell, overlapping)
A_DENSE_METHOD = "method"  # fcn (fully convolutional) | window (each window embedded on its own)

TILE_ATTRS_REQUIRED = (A_TARGET_MPP, A_SLIDE_MPP, A_TILE_SIZE, A_PATCH_SIZE_L0, A_LEVEL0_W, A_LEVEL0_H)


def _attr_value(v: Any) -> Any:
    if isinstance(v, (list, tuple)) and v and all(isinstance(s, str) for s in v):
        return np.array(v, dtype=object)
    if v is None:
        return ""
    return v


def _decode(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.dtype == object:
        return [s.decode() if isinstance(s, bytes) else s for s in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_attrs(obj: Any) -> dict[str, Any]:
    return {k: _decode(v) for k, v in obj.attrs.items()}


def _write_attrs(obj: Any, attrs: Mapping[str, Any]) -> None:
    import h5py

    for k, v in attrs.items():
        v = _attr_value(v)
        if isinstance(v, np.ndarray) and v.dtype == object:
            obj.attrs.create(k, v, dtype=h5py.string_dtype())
        else:
            obj.attrs[k] = v


def base_attrs() -> dict[str, Any]:
    return {A_FORMAT_VERSION: FORMAT_VERSION, A_PIPELINE_VERSION: __version__}


def _check_version(path: Path, attrs: Mapping[str, Any]) -> None:
    v = attrs.get(A_FORMAT_VERSION)
    if v is not None and int(v) > FORMAT_VERSION:
        raise FormatError(
            path, f"format_version {v} is newer than this wsi-pipeline understands ({FORMAT_VERSION}); upgrade"
        )


# ---------------------------------------------------------------- tiles
@dataclass
class TileSet:
    """Tile coordinates of one slide plus the tiling attributes."""

    l0_xy: np.ndarray  # N×2 int64
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.l0_xy.shape[0])

    @property
    def target_mpp(self) -> float:
        return float(self.attrs[A_TARGET_MPP])

    @property
    def slide_mpp(self) -> float:
        return float(self.attrs[A_SLIDE_MPP])

    @property
    def tile_size(self) -> int:
        return int(self.attrs[A_TILE_SIZE])

    @property
    def tile_size_l0(self) -> int:
        return int(self.attrs[A_PATCH_SIZE_L0])


def write_tiles_h5(path: str | Path, l0_xy: np.ndarray, attrs: Mapping[str, Any]) -> None:
    import h5py

    l0_xy = np.asarray(l0_xy, dtype=np.int64).reshape(-1, 2)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset(DS_COORDS, data=l0_xy, maxshape=(None, 2))
        _write_attrs(ds, {**base_attrs(), **attrs})
        _write_attrs(f, {**base_attrs(), **attrs})


def read_tiles_h5(path: str | Path) -> TileSet:
    """Read our tiles file, or a CLAM / TRIDENT coordinates file (attrs normalised to ours where possible)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if DS_COORDS not in f:
                raise FormatError(path, f"no '{DS_COORDS}' dataset; is this a tiles/coords .h5 file?")
            ds = f[DS_COORDS]
            l0_xy = np.asarray(ds[:], dtype=np.int64).reshape(-1, 2)
            attrs = read_attrs(f)
            if A_PARAMS_HASH not in attrs:  # ours carry the same attrs on both; CLAM / TRIDENT on the dataset
                attrs.update(read_attrs(ds))
    except OSError as e:
        raise FormatError(path, f"cannot read HDF5 file ({e}); delete it and re-run the tiling") from e
    _check_version(path, attrs)
    return TileSet(l0_xy=l0_xy, attrs=normalise_foreign_tile_attrs(attrs))


def read_tiles_count(path: str | Path) -> int:
    """The number of tiles in a tiles/coords file without reading them (planning a cohort)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if DS_COORDS not in f:
                raise FormatError(path, f"no '{DS_COORDS}' dataset; is this a tiles/coords .h5 file?")
            return int(f[DS_COORDS].shape[0])
    except OSError as e:
        raise FormatError(path, f"cannot read HDF5 file ({e}); delete it and re-run the tiling") from e


def normalise_foreign_tile_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Map CLAM / TRIDENT attribute conventions onto ours (missing ones stay missing)."""
    out = dict(attrs)
    if A_TILE_SIZE not in out and A_PATCH_SIZE in out:
        out[A_TILE_SIZE] = int(out[A_PATCH_SIZE])
    if A_PATCH_SIZE_L0 not in out and A_PATCH_SIZE in out:
        # CLAM: patch_size is at patch_level with 'downsample' (a pair) attribute
        ds = out.get("downsample")
        factor = float(np.asarray(ds).ravel()[0]) if ds is not None else 1.0
        out[A_PATCH_SIZE_L0] = round(int(out[A_PATCH_SIZE]) * factor)
    if A_TARGET_MPP not in out and A_TARGET_MAG in out and out.get(A_TARGET_MAG):
        out[A_TARGET_MPP] = 10.0 / float(out[A_TARGET_MAG])
    return out


# ---------------------------------------------------------------- features
@dataclass
class FeatureSet:
    features: np.ndarray  # N×D
    l0_xy: np.ndarray  # N×2 int64
    attrs: dict[str, Any] = field(default_factory=dict)


def write_features_h5(
    path: str | Path, features: np.ndarray, l0_xy: np.ndarray, attrs: Mapping[str, Any]
) -> None:
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        chunks = (min(len(features), 4096), features.shape[1]) if len(features) else None  # empty: contiguous
        f.create_dataset(DS_FEATURES, data=features, chunks=chunks)
        f.create_dataset(DS_COORDS, data=np.asarray(l0_xy, dtype=np.int64).reshape(-1, 2))
        _write_attrs(f, {**base_attrs(), **attrs})


def read_features_h5(path: str | Path, load_features: bool = True) -> FeatureSet:
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if DS_FEATURES not in f:
                raise FormatError(path, f"no '{DS_FEATURES}' dataset; re-run `wsi extract`")
            feats = np.asarray(f[DS_FEATURES][:]) if load_features else np.empty((0, f[DS_FEATURES].shape[1]))
            l0_xy = np.asarray(f[DS_COORDS][:], dtype=np.int64) if DS_COORDS in f else np.empty((0, 2), np.int64)
            attrs = read_attrs(f)
    except OSError as e:
        raise FormatError(path, f"cannot read HDF5 file ({e}); delete it and re-run `wsi extract`") from e
    _check_version(path, attrs)
    return FeatureSet(features=feats, l0_xy=l0_xy, attrs=attrs)


def read_h5_attrs(path: str | Path) -> dict[str, Any]:
    """Root attributes of any of our h5 files; {} when the file is missing or unreadable."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return read_attrs(f)
    except (OSError, KeyError):
        return {}


# ---------------------------------------------------------------- per-tile scores (MIL) and TME probs
@dataclass
class ScoreSet:
    """Per-tile scores of one slide: ``scores[target]`` is N (binary/regression/survival) or N×C
    (multiclass, per-class scores), ``attention[target]`` is N (may be empty when the head has none)."""

    l0_xy: np.ndarray
    scores: dict[str, np.ndarray]
    attention: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)


def write_scores_h5(path: str | Path, scores: ScoreSet) -> None:
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(DS_COORDS, data=np.asarray(scores.l0_xy, dtype=np.int64).reshape(-1, 2))
        g = f.create_group(DS_SCORES_GROUP)
        for name, arr in scores.scores.items():
            g.create_dataset(name, data=np.asarray(arr, dtype=np.float32))
        a = f.create_group(DS_ATTENTION_GROUP)
        for name, arr in scores.attention.items():
            a.create_dataset(name, data=np.asarray(arr, dtype=np.float32))
        _write_attrs(f, {**base_attrs(), **scores.attrs})


def read_scores_h5(path: str | Path) -> ScoreSet:
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            l0_xy = np.asarray(f[DS_COORDS][:], dtype=np.int64)
            scores = {k: np.asarray(v[:]) for k, v in f[DS_SCORES_GROUP].items()}
            att = {k: np.asarray(v[:]) for k, v in f[DS_ATTENTION_GROUP].items()} if DS_ATTENTION_GROUP in f else {}
            attrs = read_attrs(f)
    except (OSError, KeyError) as e:
        raise FormatError(path, f"not a scores file ({e}); re-run `wsi predict`") from e
    _check_version(path, attrs)
    return ScoreSet(l0_xy=l0_xy, scores=scores, attention=att, attrs=attrs)


@dataclass
class TMEDenseMap:
    """The dense class-probability map of one slide as stored in ``RUN/tme/<slide_id>.h5``."""

    probs: np.ndarray  # H×W×C float32
    area: np.ndarray  # H×W bool
    origin_l0: tuple[float, float]
    cell_l0: float
    cell_um: float
    window_um: float
    method: str


def stored_dense(dense: TMEDenseMap) -> TMEDenseMap:
    """``dense`` as :func:`write_tme_h5` stores it and :func:`read_tme_dense` reads it back (probabilities at
    float16): a read-out computed from a fresh map then equals one from the stored map (a resumed run)."""
    import dataclasses

    return dataclasses.replace(dense, probs=np.asarray(dense.probs, np.float16).astype(np.float32))


def write_tme_h5(path: str | Path, l0_xy: np.ndarray, probs: np.ndarray, attrs: Mapping[str, Any],
                 dense: TMEDenseMap | None = None) -> None:
    """``coords`` + ``probs`` (per classified tile, or per RUN tile for the dense footprint), and the dense
    map when there is one (float16, compressed)."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(DS_COORDS, data=np.asarray(l0_xy, dtype=np.int64).reshape(-1, 2))
        f.create_dataset(DS_TME_PROBS, data=np.asarray(probs, dtype=np.float32))
        if dense is not None:
            opts = {"compression": "gzip", "compression_opts": 4} if dense.probs.size else {}
            ds = f.create_dataset(DS_TME_DENSE, data=np.asarray(dense.probs, dtype=np.float16), **opts)
            _write_attrs(ds, {A_DENSE_ORIGIN_L0: np.asarray(dense.origin_l0, np.float64),
                              A_DENSE_CELL_L0: float(dense.cell_l0), A_DENSE_CELL_UM: float(dense.cell_um),
                              A_DENSE_WINDOW_UM: float(dense.window_um), A_DENSE_METHOD: dense.method})
            f.create_dataset(DS_TME_DENSE_AREA, data=np.asarray(dense.area, dtype=np.uint8), **opts)
        _write_attrs(f, {**base_attrs(), **attrs})


def read_tme_dense(path: str | Path) -> TMEDenseMap | None:
    """The dense map of a TME file (None when it has none: a footprint other than dense)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if DS_TME_DENSE not in f:
                return None
            ds = f[DS_TME_DENSE]
            a = read_attrs(ds)
            origin = np.asarray(a[A_DENSE_ORIGIN_L0], np.float64).ravel()
            out = TMEDenseMap(np.asarray(ds[:], np.float32), np.asarray(f[DS_TME_DENSE_AREA][:]).astype(bool),
                              (float(origin[0]), float(origin[1])), float(a[A_DENSE_CELL_L0]),
                              float(a[A_DENSE_CELL_UM]), float(a[A_DENSE_WINDOW_UM]), str(a[A_DENSE_METHOD]))
            _check_version(path, read_attrs(f))
    except (OSError, KeyError, IndexError) as e:
        raise FormatError(path, f"not a TME file with a dense map ({e}); re-run `wsi tme`") from e
    return out


def read_tme_h5(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            out = (np.asarray(f[DS_COORDS][:], np.int64), np.asarray(f[DS_TME_PROBS][:]), read_attrs(f))
    except (OSError, KeyError) as e:
        raise FormatError(path, f"not a TME file ({e}); re-run `wsi tme`") from e
    _check_version(path, out[2])
    return out
