"""Per-tile scores of one slide, gathered from a RUN folder into named *channels* (one scalar per tile).

A binary/regression/survival target gives one channel (``response``); a multiclass target gives one channel
per class (``immune_phenotype.inflamed``) plus a per-tile top class; attention maps are optional channels
(``response.attention``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import ConfigError, FormatError, TilesNotFoundError
from wsi_pipeline.formats.h5 import (
    A_CLASS_NAMES,
    A_PARAMS_HASH,
    A_SLIDE_PATH,
    A_TARGETS,
    read_h5_attrs,
    read_scores_h5,
    read_tiles_h5,
)
from wsi_pipeline.formats.tables import read_predictions_csv
from wsi_pipeline.runfolder.layout import RunLayout, safe_name
from wsi_pipeline.runfolder.status import read_status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Channel:
    """One scalar map per tile."""

    key: str  # file-safe id: "response", "immune_phenotype.inflamed", "response.attention"
    target: str
    label: str  # for people: "response", "immune_phenotype: inflamed", "response attention"
    kind: str  # "score" | "class" | "attention"
    class_name: str | None = None
    target_kind: str = ""  # binary / multiclass / regression / survival when the scores file says so

    @property
    def is_probability(self) -> bool | None:
        """True for probabilities (binary / multiclass scores), False for other values, None if unknown."""
        if self.kind == "attention":
            return False
        if not self.target_kind:
            return None
        return self.target_kind in ("binary", "multiclass")


@dataclass
class SlideScores:
    """Tiles, tiling geometry and per-channel tile values of one slide."""

    slide_id: str
    model: str
    l0_xy: np.ndarray  # N×2 int64
    tile_size_l0: int
    tile_size: int  # tile side in pixels at target_mpp
    target_mpp: float
    slide_mpp: float | None
    level0_size: tuple[int, int]
    slide_path: str
    channels: list[Channel]
    values: dict[str, np.ndarray]  # channel key → N float64
    class_names: dict[str, list[str]] = field(default_factory=dict)  # multiclass target → classes
    top_class: dict[str, np.ndarray] = field(default_factory=dict)  # multiclass target → N class index
    scores_path: str = ""

    def __len__(self) -> int:
        return int(self.l0_xy.shape[0])

    def channel(self, key: str) -> Channel:
        for c in self.channels:
            if c.key == key:
                return c
        raise KeyError(key)


# ---------------------------------------------------------------- model and slide lookup
def resolve_model_name(layout: RunLayout, model: str | Path | None) -> str:
    """``--model DIR`` → its folder name; a bare name is used as is; nothing → the only scores folder."""
    if model:
        p = Path(model)
        name = p.resolve().name if p.exists() else str(model).rstrip("/").split("/")[-1]
        if not (layout.root / "scores" / safe_name(name)).is_dir():
            raise ConfigError(
                f"{layout.root / 'scores' / safe_name(name)}: no per-tile scores for model {name!r}; "
                f"run `wsi predict {layout.root} --model {model}` first"
            )
        return name
    scores_root = layout.root / "scores"
    names = sorted(p.name for p in scores_root.iterdir() if p.is_dir()) if scores_root.is_dir() else []
    if len(names) == 1:
        return names[0]
    if not names:
        raise ConfigError(f"{scores_root}: no per-tile scores; run `wsi predict {layout.root} --model DIR` first")
    raise ConfigError(f"{scores_root}: several models ({', '.join(names)}); choose one with --model")


def slide_paths_from_status(layout: RunLayout) -> dict[str, str]:
    """slide_id → slide path from the RUN's status (slides.csv and its journals; the tiling stage's row
    wins), in one pass."""
    out: dict[str, str] = {}
    from_tile: set[str] = set()
    for r in read_status(layout.slides_csv):
        if not (r.slide_id and r.path) or r.slide_id in from_tile:
            continue
        out[r.slide_id] = r.path
        if r.stage == "tile":
            from_tile.add(r.slide_id)
    return out


def read_predictions(layout: RunLayout) -> dict[str, dict[str, str]]:
    """slide_id → row of RUN/predictions.csv (strings), {} when there is none."""
    if not layout.predictions_csv.exists():
        return {}
    rows = read_predictions_csv(layout.predictions_csv, text=True).to_dict("records")
    return {r["slide_id"]: r for r in rows if r["slide_id"]}


def input_stamps(paths: Iterable[Path]) -> dict[str, Any]:
    """What a review output of a slide depends on in its tiles and scores files: each file's own resume key
    (``params_hash`` attr) where it has one (a re-predicted slide with unchanged scores keeps its outputs),
    else its size and modification time."""
    out: dict[str, Any] = {}
    for p in paths:
        out[p.name] = read_h5_attrs(p).get(A_PARAMS_HASH) or [p.stat().st_size, p.stat().st_mtime_ns]
    return out


def scored_slide_ids(layout: RunLayout, model: str) -> list[str]:
    """Slides with both tiles and scores of ``model``."""
    sdir = layout.scores_dir(model)
    have = {p.stem for p in sdir.glob("*.h5")} if sdir.is_dir() else set()
    return [s for s in layout.slide_ids_with_tiles() if s in have]


# ---------------------------------------------------------------- class names
def class_names_for(attrs: dict[str, Any], target: str, n_classes: int) -> list[str]:
    """Class names of a multiclass target from the scores attrs: ``class_names_<target>`` (list),
    ``class_names`` as a JSON/dict mapping target → list, or a plain list when it fits; else c0..cK."""
    for key in (f"{A_CLASS_NAMES}_{target}", f"{target}_{A_CLASS_NAMES}", f"{A_CLASS_NAMES}/{target}"):
        names = _as_list(attrs.get(key))
        if names is not None and len(names) == n_classes:
            return names
    raw = attrs.get(A_CLASS_NAMES)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raw = None
    if isinstance(raw, dict):
        names = _as_list(raw.get(target))
        if names is not None and len(names) == n_classes:
            return names
    names = _as_list(raw)
    if names is not None and len(names) == n_classes:
        return names
    log.warning("no class names for target %r in the scores attrs; using c0..c%d", target, n_classes - 1)
    return [f"c{i}" for i in range(n_classes)]


def _as_list(v: Any) -> list[str] | None:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return None
    if isinstance(v, (list, tuple, np.ndarray)) and all(isinstance(s, (str, bytes)) for s in v):
        return [s.decode() if isinstance(s, bytes) else str(s) for s in v]
    return None


def target_kinds(attrs: dict[str, Any]) -> dict[str, str]:
    """target → kind from the scores attrs ``targets`` + ``target_kinds`` (written by `wsi predict`)."""
    names, kinds = _as_list(attrs.get(A_TARGETS)), _as_list(attrs.get("target_kinds"))
    if names and kinds and len(names) == len(kinds):
        return dict(zip(names, kinds, strict=True))
    return {}


# ---------------------------------------------------------------- loading
def load_slide_scores(
    layout: RunLayout,
    slide_id: str,
    model: str,
    targets: list[str] | None = None,
    attention: bool = False,
    slide_paths: dict[str, str] | None = None,
) -> SlideScores:
    """Read tiles + scores of one slide and split them into channels (``targets`` filters, [] = all)."""
    tiles_path = layout.tiles_h5(slide_id)
    if not tiles_path.exists():
        raise TilesNotFoundError(f"{tiles_path}: no tiles for slide {slide_id!r}; run `wsi tile` first")
    scores_path = layout.scores_h5(model, slide_id)
    if not scores_path.exists():
        raise FormatError(scores_path, f"no per-tile scores for slide {slide_id!r}; run `wsi predict --model`")
    tiles = read_tiles_h5(tiles_path)
    ss = read_scores_h5(scores_path)
    # the scores file carries its own coordinates (those of the features it was computed from); the tiles
    # file gives the geometry (tile size, MPP, slide size)
    l0_xy = ss.l0_xy if len(ss.l0_xy) else tiles.l0_xy
    if len(l0_xy) != len(tiles.l0_xy) or not np.array_equal(l0_xy, tiles.l0_xy):
        log.info("%s: %d scored tiles vs %d in %s; using the scored tiles' coordinates",
                 scores_path, len(l0_xy), len(tiles.l0_xy), tiles_path)
    n = len(l0_xy)
    kinds = target_kinds(ss.attrs)
    wanted = list(targets or [])
    unknown = [t for t in wanted if t not in ss.scores]
    if unknown:
        raise ConfigError(
            f"{scores_path}: unknown target(s) {', '.join(unknown)}; available: {', '.join(sorted(ss.scores))}"
        )
    channels: list[Channel] = []
    values: dict[str, np.ndarray] = {}
    class_names: dict[str, list[str]] = {}
    top_class: dict[str, np.ndarray] = {}
    for target in wanted or sorted(ss.scores):
        arr = np.asarray(ss.scores[target], dtype=np.float64)
        if arr.shape[0] != n:
            raise FormatError(scores_path, f"scores/{target} has {arr.shape[0]} rows for {n} tiles; re-run predict")
        if arr.ndim == 2 and arr.shape[1] > 1:
            names = class_names_for(ss.attrs, target, arr.shape[1])
            class_names[target] = names
            filled = np.where(np.isfinite(arr), arr, -np.inf)
            top = np.argmax(filled, axis=1)
            top[~np.isfinite(arr).any(axis=1)] = -1
            top_class[target] = top
            for ci, cname in enumerate(names):
                key = f"{target}.{safe_name(cname)}"
                channels.append(Channel(key, target, f"{target}: {cname}", "class", cname,
                                        kinds.get(target, "multiclass")))
                values[key] = arr[:, ci]
        else:
            channels.append(Channel(target, target, target, "score", None, kinds.get(target, "")))
            values[target] = arr.reshape(n)
        att = ss.attention.get(target)
        if attention and att is not None and np.asarray(att).size == n:
            key = f"{target}.attention"
            channels.append(Channel(key, target, f"{target} attention", "attention", None, kinds.get(target, "")))
            values[key] = np.asarray(att, dtype=np.float64).reshape(n)
    slide_path = (slide_paths or {}).get(slide_id) or str(tiles.attrs.get(A_SLIDE_PATH, "") or "")
    try:
        slide_mpp: float | None = tiles.slide_mpp
    except (KeyError, TypeError, ValueError):
        slide_mpp = None
    try:
        w0, h0 = int(tiles.attrs["level0_width"]), int(tiles.attrs["level0_height"])
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(tiles_path, "tiles file lacks level0_width/height; re-run `wsi tile`") from e
    return SlideScores(
        slide_id=slide_id,
        model=model,
        l0_xy=l0_xy,
        tile_size_l0=tiles.tile_size_l0,
        tile_size=tiles.tile_size,
        target_mpp=tiles.target_mpp,
        slide_mpp=slide_mpp,
        level0_size=(w0, h0),
        slide_path=slide_path,
        channels=channels,
        values=values,
        class_names=class_names,
        top_class=top_class,
        scores_path=str(scores_path),
    )
