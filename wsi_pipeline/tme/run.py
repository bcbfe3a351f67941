"""``wsi tme RUN``: dense tissue-class maps (or per-tile classes), class maps, QuPath GeoJSON and the per-slide
TME table.

Per slide (tiles from ``RUN/tiles/<slide_id>.h5``), with the footprint ``dense`` (what ``auto`` uses for a
classifier validated for it, :func:`dense_validated`; :mod:`wsi_pipeline.tme.dense`): the classifier over
overlapping windows of its field of view, one per map cell, over the area the RUN tiles cover, read from the
slide at the classifier's µm/px → a class-probability map (stored in ``RUN/tme/<slide_id>.h5`` next to each RUN
tile's mean probabilities) → metrics from the map
(:func:`wsi_pipeline.tme.spatial.map_metrics`: expected areas, corrected for the classifier's confusions) →
phenotype, a class-map PNG of the map and a QuPath GeoJSON of its class polygons.

With the per-tile footprints (``tile``, ``classifier``, ``grid``):

1. **features** at the classifier's µm/px: ``RUN/features/<encoder>/<slide_id>.h5`` when it was made by the
   classifier's encoder (same weights checksum) at the same µm/px (``target_mpp × tile_size / input_size``
   within ``mpp_tolerance``); otherwise each tile's own level-0 extent is read from the slide at the
   classifier's µm/px and embedded exactly as the training tiles were (:mod:`wsi_pipeline.tiles.transform`).
2. **probabilities** → ``RUN/tme/<slide_id>.h5`` (``coords`` + ``probs`` N×C, aligned with the tiles file;
   resumable: kept while classifier, encoder and tiles are unchanged).
3. **metrics** on the tile grid (:mod:`wsi_pipeline.tme.spatial`) and the **immune phenotype**
   (:mod:`wsi_pipeline.tme.rules`); a class-map PNG and a QuPath GeoJSON next to the h5.

``RUN/tme.csv`` (one row per slide, first column ``slide_id``) is rewritten from the stored probabilities
on every run, so changing the band or the rules never re-embeds. Join it to labels or predictions on
``slide_id`` (``labels.merge(tme, on="slide_id")``) to use its columns in ``wsi report`` or as targets /
covariates in ``wsi train``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_pipeline.errors import ConfigError, ScaleMismatchError, TilesNotFoundError
from wsi_pipeline.formats import api as F
from wsi_pipeline.runfolder.executor import Progress, SlideItem, SlideOutcome, StageSummary, run_per_slide
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.slide.open import require_recorded_slide
from wsi_pipeline.tme.classifier import TissueClassifier
from wsi_pipeline.tme.config import TMEConfig

if TYPE_CHECKING:
    from wsi_pipeline.encoders.base import Encoder

log = logging.getLogger(__name__)

STAGE = "tme"
SOURCE_RUN_FEATURES = "run-features"
SOURCE_SLIDE = "slide"
SOURCE_SLIDE_CENTRE = "slide-centre"  # the tile's centre, over the classifier's training field of view
SOURCE_SLIDE_GRID = "slide-grid"  # the TME's own grid of cells one training field of view wide
SOURCE_DENSE = "slide-dense"  # the dense map (wsi_pipeline.tme.dense), per RUN tile: the mean of its cells
FOOTPRINT_DENSE = "dense"
A_CLASSIFIER_MPP = "classifier_mpp"
A_FEATURE_SOURCE = "feature_source"
A_CLASSIFIER_SHA256 = "classifier_sha256"
ROW_VERSION = 2  # what a tme.csv row holds (2: phenotype_margin); in the stage key, so older rows are recomputed
FIRST_COLUMNS = (
    "slide_id", "immune_phenotype", "til_fraction", "til_fraction_soft", "lymph_density_tumour",
    "lymph_density_margin", "stromal_til_fraction", "tumour_stroma_ratio",
)


# ---------------------------------------------------------------- features
def features_mpp(attrs: dict[str, Any]) -> float | None:
    """µm/px of the pixels the encoder saw for a features file: target_mpp × tile_size / input_size
    (the extractor resizes each tile to the encoder input). None when the attributes are missing."""
    try:
        return float(attrs[F.A_TARGET_MPP]) * float(attrs[F.A_TILE_SIZE]) / float(attrs[F.A_INPUT_SIZE])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def check_features(fs: F.FeatureSet, tiles: F.TileSet, clf: TissueClassifier, tolerance: float) -> None:
    """Raise :class:`ScaleMismatchError` (or ValueError) when RUN features cannot feed ``clf``."""
    enc = str(fs.attrs.get(F.A_ENCODER, ""))
    if enc != clf.encoder:
        raise ValueError(f"made by encoder {enc!r}, the classifier needs {clf.encoder!r}")
    sha = str(fs.attrs.get(F.A_WEIGHTS_SHA256, ""))
    if not sha or not clf.encoder_weights_sha256 or sha != clf.encoder_weights_sha256:
        raise ValueError("encoder weights differ from (or cannot be matched to) the classifier's")
    attrs = {**tiles.attrs, **fs.attrs}
    clf.check_scale(features_mpp(attrs), tolerance, what="RUN features")
    if fs.features.shape[1] != clf.embed_dim:
        raise ValueError(f"{fs.features.shape[1]}-d features, the classifier expects {clf.embed_dim}")
    if fs.l0_xy.shape != tiles.l0_xy.shape or not np.array_equal(fs.l0_xy, tiles.l0_xy):
        raise ValueError("coordinates differ from the tiles file (re-run `wsi extract`)")


def embed_slide_tiles(
    tiles: F.TileSet,
    encoder: Encoder,
    fit: str,
    batch_size: int = 64,
    precision: str = "fp32",
    device: str = "cpu",
    centre_um: float = 0.0,
) -> np.ndarray:
    """Read each tile's level-0 extent from its slide at the encoder's µm/px (the extraction reader,
    :func:`wsi_pipeline.features.reader.open_tile_reader`) and embed it as the classifier's training tiles
    were (resize by scale only, then :func:`~wsi_pipeline.tiles.transform.fit_tile`). With ``centre_um`` > 0 only
    the tile's centre square of that many µm is embedded (the classifier's field of view)."""
    from wsi_pipeline.features.reader import ReadSpec, open_tile_reader
    from wsi_pipeline.tiles.embed import embed_tiles
    from wsi_pipeline.tiles.transform import fit_tile, scaled_size

    path = require_recorded_slide(tiles.attrs.get(F.A_SLIDE_PATH))
    mpp = encoder.meta.mpp
    size_l0, l0_xy = tiles.tile_size_l0, tiles.l0_xy
    if centre_um > 0:  # read only the centre square: its level-0 size and corners
        size_l0 = min(size_l0, round(centre_um / tiles.slide_mpp))
        l0_xy = l0_xy + (tiles.tile_size_l0 - size_l0) // 2
    spec = ReadSpec(target_mpp=mpp, tile_size=scaled_size(size_l0, tiles.slide_mpp, mpp), slide_mpp=tiles.slide_mpp)
    out = np.empty((len(tiles), encoder.embed_dim), np.float32)
    with open_tile_reader(path, spec) as reader:
        for s in range(0, len(tiles), batch_size):
            batch = reader.read_many(l0_xy[s : s + batch_size])
            imgs = [fit_tile(im, encoder.meta.input_size, fit) for im in batch]
            out[s : s + len(imgs)] = embed_tiles(encoder, imgs, batch_size, precision, device)
    return out


FOOTPRINT_EVAL = "footprint_eval"  # classifier.json metrics key (scripts/eval_tme.py --record)
EVAL_FIGURES = ("phenotype_accuracy", "til_spearman", "area_fraction_mae")  # higher, higher, lower is better


def dense_validated(clf: TissueClassifier, map_refinement: bool = True) -> tuple[bool, str]:
    """Whether ``--footprint auto`` may use the dense map for ``clf``: the classifier was trained for it (context
    windows, :mod:`wsi_pipeline.tme.context`) and its weights were evaluated on misaligned held-out mosaics
    (``metrics.footprint_eval`` in classifier.json, written by ``scripts/eval_tme.py --record`` with the
    checksum of ``model.safetensors``, compared with the one taken when the classifier was loaded), where the
    dense map was at least as good as the ``grid`` footprint on phenotype accuracy, TIL Spearman and
    composition MAE. An evaluation made with the classifier's map refinement does not validate the unrefined
    map (``map_refinement`` False: ``--no-map-refinement``). Returns (ok, why)."""
    if not int((clf.training.get("context") or {}).get("n_mosaics", 0) or 0):
        return False, "not trained on context windows (`wsi tissue-train --context-mosaics N`)"
    ev = clf.metrics.get(FOOTPRINT_EVAL) or {}
    if not ev or not clf.weights_sha256 or ev.get("classifier_sha256") != clf.weights_sha256:
        return False, "no misaligned mosaic evaluation of these weights (scripts/eval_tme.py --record)"
    if ev.get("map_refinement") and not (map_refinement and clf.has_map_refinement):
        return False, "evaluated with the map refinement, which this read-out leaves out (--no-map-refinement)"
    grid, dense = ev.get("grid") or {}, ev.get("dense") or {}
    try:
        worse = [k for k, sign in zip(EVAL_FIGURES, (1, 1, -1), strict=True)
                 if sign * (float(dense[k]) - float(grid[k])) < -1e-9]
    except (KeyError, TypeError, ValueError):
        return False, "incomplete misaligned mosaic evaluation (scripts/eval_tme.py --record)"
    if worse:
        return False, f"worse than grid on misaligned mosaics ({', '.join(worse)})"
    return True, f"at least as good as grid on {ev.get('n_slides', '?')} misaligned mosaics"


def resolve_footprint(cfg: TMEConfig, clf: TissueClassifier, tiles: F.TileSet) -> str:
    """The footprint actually used for these RUN tiles: ``dense``, ``tile``, ``classifier`` or ``grid`` (see
    TMEConfig). ``auto`` is ``dense`` for a classifier validated for it (:func:`dense_validated`), else
    ``grid``, or ``tile`` for a classifier that does not record its field of view."""
    fov = clf.tile_um
    if cfg.footprint in ("grid", FOOTPRINT_DENSE) and fov <= 0:
        raise ConfigError(f"--footprint {cfg.footprint}: the classifier {clf.path} does not record its field of "
                          "view (tile_um); retrain it with `wsi tissue-train` or use --footprint tile")
    if cfg.footprint in ("grid", FOOTPRINT_DENSE):
        return cfg.footprint
    if cfg.footprint == "auto":
        if fov <= 0:
            return "tile"
        ok, why = dense_validated(clf, cfg.map_refinement)
        log.debug("--footprint auto: %s for %s (%s)", FOOTPRINT_DENSE if ok else "grid", clf.path, why)
        return FOOTPRINT_DENSE if ok else "grid"
    if cfg.footprint == "tile" or fov <= 0 or not len(tiles):
        return "tile"
    tile_um = tiles.tile_size_l0 * tiles.slide_mpp
    return "classifier" if tile_um > fov else "tile"


def fov_grid(tiles: F.TileSet, fov_um: float, fov_mpp: float) -> F.TileSet:
    """The TME's own tiles for ``--footprint grid``: a regular grid of cells ``fov_um`` wide (the classifier's
    training field of view, read at ``fov_mpp``), anchored at the RUN tiles' top-left corner, keeping every
    cell whose centre lies inside a RUN tile. Pure: coordinates in, coordinates out (level 0)."""
    fov_l0 = max(1, round(fov_um / tiles.slide_mpp))
    attrs = {**tiles.attrs, F.A_TARGET_MPP: float(fov_mpp), F.A_TILE_SIZE: round(fov_um / fov_mpp),
             F.A_PATCH_SIZE: round(fov_um / fov_mpp), F.A_PATCH_SIZE_L0: fov_l0, F.A_OVERLAP: 0}
    if not len(tiles):
        return F.TileSet(np.zeros((0, 2), np.int64), attrs)
    xy = np.asarray(tiles.l0_xy, np.int64)
    size = tiles.tile_size_l0
    stride = max(1.0, tile_stride_l0(tiles))
    origin = xy.min(axis=0)
    span = xy.max(axis=0) + size - origin
    gx, gy = np.meshgrid(np.arange(0, span[0], fov_l0), np.arange(0, span[1], fov_l0))
    cells = np.stack([gx.ravel(), gy.ravel()], axis=1) + origin
    centres = cells + fov_l0 / 2.0
    # the RUN tile whose grid slot holds each centre, then whether the centre is inside that tile
    slot = np.floor((centres - origin) / stride).astype(np.int64)
    index = {(int(c), int(r)): i for i, (c, r) in enumerate(np.round((xy - origin) / stride).astype(np.int64))}
    owner = np.array([index.get((int(c), int(r)), -1) for c, r in slot])
    inside = owner >= 0
    rel = centres[inside] - xy[owner[inside]]
    inside[inside] = np.all((rel >= 0) & (rel < size), axis=1)
    return F.TileSet(cells[inside].astype(np.int64), attrs)


# ---------------------------------------------------------------- per slide
@dataclass
class TMEContext:
    """What every slide needs: the layout, classifier, config and a lazily created encoder."""

    layout: RunLayout
    clf: TissueClassifier
    cfg: TMEConfig
    classifier_sha256: str  # of its whole model.safetensors (map refinement included): the rows' key
    device: str = "cpu"
    _encoder: Any = field(default=None, repr=False)
    _net: Any = field(default=None, repr=False)

    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = create_classifier_encoder(self.clf, self.cfg.encoder_weights, self.device)
        return self._encoder

    def feature_map_net(self) -> Any:
        """The encoder's fused feature-map module for the dense map (None for encoders without one)."""
        from wsi_pipeline.encoders.base import prepare_for_inference, resolve_device
        from wsi_pipeline.tme.dense import fcn_capable, feature_map_net

        if self._net is None and fcn_capable(self.encoder()):
            self._net = feature_map_net(prepare_for_inference(self.encoder(), resolve_device(self.device)))
        return self._net

    @cached_property
    def map_sha256(self) -> str:
        """:meth:`TissueClassifier.window_map_sha256`: what the stored probabilities and maps depend on."""
        return self.clf.window_map_sha256()

    def resume_key(self, tiles_key: str) -> str:
        """The stored probabilities' (and dense map's) key: not the map refinement, which reads them."""
        return F.params_hash({**self.cfg.params(), "window_map_sha256": self.map_sha256, "tiles": tiles_key})


def create_classifier_encoder(clf: TissueClassifier, weights: str | None, device: str) -> Encoder:
    """The classifier's encoder; its weights must be the ones it was trained on (checksum)."""
    from wsi_pipeline.encoders.registry import create_encoder
    from wsi_pipeline.errors import UnknownNameError, WeightsError

    # a random-init encoder (plumbing tests) is seeded by the registry: the same weights as at training
    # by name (as the features files record it), else by what was passed to `wsi tissue-train` (a folder)
    refs = list(dict.fromkeys(r for r in (clf.encoder, clf.training.get("config", {}).get("encoder")) if r))
    for i, ref in enumerate(refs):
        try:
            enc = create_encoder(str(ref), weights, device=device)
            break
        except UnknownNameError:
            if i == len(refs) - 1:
                raise
    if clf.encoder_weights_sha256 and enc.weights_sha256 != clf.encoder_weights_sha256:
        raise WeightsError(
            f"encoder {clf.encoder}: weights checksum {enc.weights_sha256[:12] or 'none'} differs from the "
            f"one the tissue classifier {clf.path} was trained on ({clf.encoder_weights_sha256[:12]}) — pass "
            "--encoder-weights with the right file or retrain the classifier"
        )
    clf.check_scale(enc.meta.mpp, 1e-6, what=f"encoder {clf.encoder}")
    return enc


def slide_probs(ctx: TMEContext, slide_id: str, tiles: F.TileSet, footprint: str) -> tuple[np.ndarray, str]:
    """Class probabilities of ``tiles`` (the RUN tiles, or the :func:`fov_grid` cells when ``footprint`` is
    ``grid``), from the stored file when still valid; returns (probs, source). The footprint used follows from
    ``cfg.footprint``, the tiles and the classifier, all in the resume key."""
    layout, clf, cfg = ctx.layout, ctx.clf, ctx.cfg
    key = ctx.resume_key(str(tiles.attrs.get(F.A_PARAMS_HASH, "")))
    out = layout.tme_h5(slide_id)
    if out.exists() and not cfg.overwrite:
        attrs = F.read_h5_attrs(out)
        if attrs.get(F.A_PARAMS_HASH) == key:
            xy, probs, attrs = F.read_tme_h5(out)
            if np.array_equal(xy, tiles.l0_xy) and probs.shape[1] == clf.n_classes:
                return probs, str(attrs.get(A_FEATURE_SOURCE, ""))
    feats = None
    grid = footprint == "grid"
    centre_um = float(clf.tile_um) if footprint == "classifier" else 0.0
    source = SOURCE_SLIDE_GRID if grid else SOURCE_SLIDE_CENTRE if centre_um else SOURCE_SLIDE
    fpath = layout.features_h5(clf.encoder, slide_id)
    if cfg.reuse_features and not centre_um and not grid and fpath.exists() and len(tiles):
        fs = F.read_features_h5(fpath)
        try:
            check_features(fs, tiles, clf, cfg.mpp_tolerance)
            feats, source = fs.features.astype(np.float32), SOURCE_RUN_FEATURES
        except (ValueError, ScaleMismatchError) as e:
            log.info("%s: not using %s (%s); embedding tiles from the slide at %.3g µm/px",
                     slide_id, fpath, e, clf.mpp)
    if len(tiles) == 0:
        probs = np.zeros((0, clf.n_classes), np.float32)
    else:
        if feats is None:
            enc = ctx.encoder()
            feats = embed_slide_tiles(tiles, enc, clf.fit or "pad", cfg.batch_size, cfg.precision, ctx.device,
                                      centre_um)
        probs = clf.predict_proba(feats)
    F.write_tme_h5(out, tiles.l0_xy, probs, _tme_attrs(ctx, slide_id, tiles, source, key))
    return probs, source


def _tme_attrs(ctx: TMEContext, slide_id: str, tiles: F.TileSet, source: str, key: str) -> dict[str, Any]:
    clf = ctx.clf
    return {
        F.A_SLIDE_ID: slide_id,
        F.A_MODEL: clf.path,
        F.A_CLASS_NAMES: list(clf.class_names),
        F.A_ENCODER: clf.encoder,
        F.A_TARGET_MPP: tiles.target_mpp,
        F.A_SLIDE_MPP: tiles.slide_mpp,
        F.A_TILE_SIZE: tiles.tile_size,
        F.A_PATCH_SIZE_L0: tiles.tile_size_l0,
        A_CLASSIFIER_MPP: clf.mpp,
        A_CLASSIFIER_SHA256: ctx.classifier_sha256,
        A_FEATURE_SOURCE: source,
        F.A_PARAMS_HASH: key,
    }


def slide_dense(ctx: TMEContext, slide_id: str, tiles: F.TileSet) -> tuple[np.ndarray, F.TMEDenseMap, str]:
    """The dense map of the RUN tiles' area (:func:`wsi_pipeline.tme.dense.dense_slide_map`) and each RUN
    tile's mean probabilities, from the stored file when still valid; returns (probs, map, source)."""
    from wsi_pipeline.tme.dense import dense_slide_map, tile_means

    clf, cfg = ctx.clf, ctx.cfg
    key = ctx.resume_key(str(tiles.attrs.get(F.A_PARAMS_HASH, "")))
    out = ctx.layout.tme_h5(slide_id)
    if out.exists() and not cfg.overwrite and F.read_h5_attrs(out).get(F.A_PARAMS_HASH) == key:
        dense = F.read_tme_dense(out)
        xy, probs, attrs = F.read_tme_h5(out)
        if dense is not None and np.array_equal(xy, tiles.l0_xy) and probs.shape[1] == clf.n_classes:
            return probs, dense, str(attrs.get(A_FEATURE_SOURCE, ""))
    dense = F.stored_dense(dense_slide_map(tiles, ctx.encoder(), clf, cfg.dense_method, cfg.precision,
                                           cfg.batch_size, ctx.device, net=ctx.feature_map_net(),
                                           threads=cfg.num_workers or None))
    probs = tile_means(dense, tiles)
    source = f"{SOURCE_DENSE}-{dense.method}"
    F.write_tme_h5(out, tiles.l0_xy, probs, _tme_attrs(ctx, slide_id, tiles, source, key), dense=dense)
    return probs, dense, source


def tile_stride_l0(tiles: F.TileSet) -> float:
    """Level-0 pixels between neighbouring tile corners: (tile_size - overlap) × target_mpp / slide_mpp."""
    overlap = float(tiles.attrs.get(F.A_OVERLAP, 0) or 0)
    try:
        return (tiles.tile_size - overlap) * tiles.target_mpp / tiles.slide_mpp
    except (KeyError, ZeroDivisionError):
        from wsi_pipeline.tme.spatial import infer_stride_l0

        return infer_stride_l0(tiles.l0_xy) or float(tiles.tile_size_l0)


def run_tiles(layout: RunLayout, clf: TissueClassifier, cfg: TMEConfig, slide_id: str) -> tuple[F.TileSet, str]:
    """The tiles the TME classifies for one slide (the RUN tiles, or its own :func:`fov_grid`) and the
    footprint used."""
    tiles_path = layout.tiles_h5(slide_id)
    if not tiles_path.exists():
        raise TilesNotFoundError(f"{tiles_path}: no tiles for {slide_id}; run `wsi tile` first")
    tiles = F.read_tiles_h5(tiles_path)
    if len(tiles):  # the slide, where it is now (the map and the grid read it)
        tiles.attrs[F.A_SLIDE_PATH] = require_recorded_slide(tiles.attrs.get(F.A_SLIDE_PATH), cfg.slide_dirs)
    footprint = resolve_footprint(cfg, clf, tiles)
    if footprint == "grid":
        tiles = fov_grid(tiles, clf.tile_um, clf.mpp)
    return tiles, footprint


def slide_row(ctx: TMEContext, slide_id: str) -> dict[str, Any]:
    """Everything for one slide: probabilities, metrics, phenotype, PNG and GeoJSON; returns the CSV row."""
    tiles, footprint = run_tiles(ctx.layout, ctx.clf, ctx.cfg, slide_id)
    if footprint == FOOTPRINT_DENSE:
        return dense_row(ctx, slide_id, tiles)
    return grid_row(ctx, slide_id, tiles, footprint)


def _row_head(slide_id: str, metrics: dict[str, Any], ctx: TMEContext, source: str, tiles: F.TileSet,
              footprint: str) -> dict[str, Any]:
    """The row's phenotype (with its reason and margin, :func:`wsi_pipeline.tme.rules.phenotype_margin`), the
    metrics and where they come from."""
    from wsi_pipeline.tme.rules import immune_phenotype, phenotype_margin

    clf, rules = ctx.clf, ctx.cfg.rules
    phenotype, reason = immune_phenotype(metrics, rules)
    row: dict[str, Any] = {"slide_id": slide_id, "immune_phenotype": phenotype, "phenotype_reason": reason,
                           "phenotype_margin": phenotype_margin(metrics, rules)}
    row.update(metrics)
    row.update({"classifier": Path(clf.path).name, "classifier_mpp": clf.mpp, "feature_source": source,
                "footprint": footprint, "tiles_target_mpp": tiles.target_mpp})
    return row


def refinement_applies(ctx: TMEContext, slide_id: str, dense: F.TMEDenseMap) -> bool:
    """Whether this slide's composition is read through the classifier's map refinement: asked for
    (``map_refinement``), present, and fitted on maps of this geometry (a map of another cell size or window
    method, e.g. ``--dense-method window``, falls back to the area-corrected window map, with a warning)."""
    clf = ctx.clf
    if not (ctx.cfg.map_refinement and clf.has_map_refinement):
        return False
    ok, why = clf.map_refinement_applies(dense.cell_um, dense.window_um, dense.method)
    if not ok:
        log.warning("%s: map refinement left out: %s; the composition comes from the window map with the "
                    "area correction (use --dense-method %s to apply it)", slide_id, why,
                    (clf.map_refinement.get("fitted_on") or {}).get("method", "auto"))
    return ok


def dense_row(ctx: TMEContext, slide_id: str, tiles: F.TileSet) -> dict[str, Any]:
    """The read-out of one slide from its dense map (see the module docstring)."""
    from wsi_pipeline.tme.spatial import class_column, map_metrics

    layout, clf, cfg = ctx.layout, ctx.clf, ctx.cfg
    _, dense, source = slide_dense(ctx, slide_id, tiles)
    roles = cfg.roles.resolve(clf.class_names)
    # the composition from the refined map when the classifier has a refinement (it estimates each cell's class
    # areas from its neighbourhood: no global confusion correction on top), else the corrected window map
    refined = clf.refine_map(dense.probs, dense.area) if refinement_applies(ctx, slide_id, dense) else None
    correct = clf.correct_areas if cfg.area_correction and clf.area_correction and refined is None else None
    metrics, comp = map_metrics(dense.probs, dense.area, clf.class_names, roles, dense.cell_um, clf.tile_um,
                                cfg.spatial, correct, refined=refined)
    row = _row_head(slide_id, metrics, ctx, source, tiles, FOOTPRINT_DENSE)
    phenotype = row["immune_phenotype"]
    row.update({"n_tiles": len(tiles), "area_corrected": bool(correct is not None),
                "map_refined": refined is not None,
                "map_window_um": dense.window_um})
    if not dense.area.any() or not (cfg.write_png or cfg.write_geojson):
        return row
    labels = np.where(dense.area, dense.probs.argmax(axis=-1), -1)
    regions = {"tumour_region": comp.tumour_region & dense.area, "margin_band": comp.band & dense.area}
    if cfg.write_png:
        from wsi_pipeline.tme.render import class_map_png_dense

        thumb, scale = _thumbnail(layout, slide_id, tiles, cfg.thumbnail_max)
        shares = {n: float(row.get(f"area_frac_{class_column(n)}", np.nan)) for n in clf.class_names}
        class_map_png_dense(layout.tme_map_png(slide_id), thumb, scale, dense, labels, clf.class_names, shares,
                            title=f"{slide_id}: {phenotype}", outlines=regions)
    if cfg.write_geojson:
        from wsi_pipeline.tme.render import dense_map_feature_collection

        fc = dense_map_feature_collection(dense, labels, clf.class_names, regions)
        F.check_feature_collection(fc, layout.tme_geojson(slide_id))
        F.write_geojson(layout.tme_geojson(slide_id), fc)
    return row


def grid_row(ctx: TMEContext, slide_id: str, tiles: F.TileSet, footprint: str) -> dict[str, Any]:
    """The read-out of one slide from one class per classified tile (footprints tile, classifier, grid)."""
    from wsi_pipeline.tme.spatial import compartments, grid_metrics, rasterise

    layout, clf, cfg = ctx.layout, ctx.clf, ctx.cfg
    probs, source = slide_probs(ctx, slide_id, tiles, footprint)
    labels = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    roles = cfg.roles.resolve(clf.class_names)
    stride_l0 = tile_stride_l0(tiles)
    grid = rasterise(tiles.l0_xy, labels, stride_l0, tiles.slide_mpp)
    prob_grid = np.zeros((*grid.labels.shape, clf.n_classes), np.float32)
    prob_grid[grid.rows, grid.cols] = probs
    metrics = grid_metrics(grid.labels, clf.class_names, roles, grid.stride_um, cfg.spatial, prob_grid)
    row = _row_head(slide_id, metrics, ctx, source, tiles, footprint)
    phenotype = row["immune_phenotype"]
    if len(tiles) and (cfg.write_png or cfg.write_geojson):
        comp = compartments(grid.labels, roles, grid.stride_um, cfg.spatial)
        per_tile = {
            "tumour_region": comp.tumour_region[grid.rows, grid.cols].astype(np.float64),
            "margin_band": comp.band[grid.rows, grid.cols].astype(np.float64),
            "distance_to_tumour_um": comp.distance_um[grid.rows, grid.cols].astype(np.float64),
        }
        if cfg.write_png:
            thumb, scale = _thumbnail(layout, slide_id, tiles, cfg.thumbnail_max)
            from wsi_pipeline.tme.render import class_map_png

            class_map_png(layout.tme_map_png(slide_id), thumb, scale, tiles.l0_xy, tiles.tile_size_l0, labels,
                          clf.class_names, title=f"{slide_id}: {phenotype}",
                          outlines={k: per_tile[k] > 0 for k in ("tumour_region", "margin_band")})
        if cfg.write_geojson:
            from wsi_pipeline.tme.render import classified_tiles_geojson

            classified_tiles_geojson(layout.tme_geojson(slide_id), tiles.l0_xy, tiles.tile_size_l0, probs,
                                     clf.class_names, per_tile)
    return row


class TMEStage:
    """The TME read-out as a per-slide stage (:mod:`wsi_pipeline.runfolder.executor`), in this process (it
    holds the classifier's encoder). A slide's record ``tme/<slide_id>.json`` (written last) holds its
    resume key and its ``tme.csv`` row."""

    name = STAGE
    component = ""

    def __init__(self, ctx: TMEContext) -> None:
        self.ctx = ctx

    def key(self, item: SlideItem) -> str:
        ctx = self.ctx
        tiles, footprint = run_tiles(ctx.layout, ctx.clf, ctx.cfg, item.slide_id)
        cfg = ctx.cfg
        return F.params_hash({"probs": ctx.resume_key(str(tiles.attrs.get(F.A_PARAMS_HASH, ""))),
                              "classifier_sha256": ctx.classifier_sha256,  # the map refinement reads the row
                              "row_version": ROW_VERSION, "footprint": footprint,
                              "spatial": cfg.spatial, "rules": cfg.rules, "roles": cfg.roles, "png": cfg.write_png,
                              "area_correction": ctx.clf.area_correction if cfg.area_correction else None,
                              "map_refinement": cfg.map_refinement,  # read-out only: the stored map is reused
                              "geojson": cfg.write_geojson, "thumb": cfg.thumbnail_max, "n": len(tiles)})

    def done(self, item: SlideItem, key: str) -> SlideOutcome | None:
        rec = F.read_stage_record(self.ctx.layout.tme_record_json(item.slide_id))
        if self.ctx.cfg.overwrite or rec.get("key") != key or not isinstance(rec.get("row"), dict):
            return None
        return SlideOutcome(item.slide_id, n_tiles=rec["row"].get("n_tiles"), value=rec["row"])

    def process(self, item: SlideItem, key: str) -> SlideOutcome:
        row = slide_row(self.ctx, item.slide_id)
        F.write_stage_record(self.ctx.layout.tme_record_json(item.slide_id), {"key": key, "row": row})
        return SlideOutcome(item.slide_id, n_tiles=row.get("n_tiles"), value=row)


def _thumbnail(layout: RunLayout, slide_id: str, tiles: F.TileSet, max_size: int) -> tuple[np.ndarray, float]:
    """RUN/thumbnails/<slide_id>.png (written by `wsi tile`) with its level-0 px per thumbnail px, or a
    fresh thumbnail from the slide."""
    from PIL import Image

    p = layout.thumbnail_png(slide_id)
    w0 = tiles.attrs.get(F.A_LEVEL0_W)
    if p.exists() and w0:
        with Image.open(p) as im:
            thumb = np.asarray(im.convert("RGB"))
        return thumb, float(w0) / thumb.shape[1]
    from wsi_pipeline.slide.open import open_slide

    with open_slide(tiles.attrs[F.A_SLIDE_PATH], mpp=tiles.slide_mpp) as slide:
        return slide.thumbnail(max_size)


# ---------------------------------------------------------------- the run
def write_tme_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """``tme.csv`` (format owned by :func:`wsi_pipeline.formats.write_tme_csv`): one row per slide;
    ``slide_id`` and the headline read-outs first."""
    return F.write_tme_csv(path, rows, leading=FIRST_COLUMNS)


def run_tme(
    run_root: str | Path,
    cfg: TMEConfig,
    slide_ids: list[str] | None = None,
    progress: Progress | None = None,
) -> StageSummary:
    """TME read-out for every tiled slide of ``run_root`` (or ``slide_ids``); failures are recorded in
    RUN/slides.csv (stage ``tme``) and the others go on. Writes RUN/tme.csv (the rows of every slide read
    so far) and RUN/configs/tme.yaml. The summary's values are the rows; ``figures["csv"]`` the table."""
    from wsi_pipeline.encoders.base import resolve_device
    from wsi_pipeline.runfolder.resolved import save_resolved
    from wsi_pipeline.tme.classifier import WEIGHTS_FILE, load_classifier

    cfg.validate()
    layout = RunLayout(run_root)
    ids = slide_ids if slide_ids is not None else layout.slide_ids_with_tiles()
    if not ids:
        raise TilesNotFoundError(f"{layout.tiles_dir}: no tiles/*.h5 — run `wsi tile` on this RUN first")
    fitted_here = sorted(set(ids) & set(cfg.rules.fitted_on))
    if fitted_here:
        raise ConfigError(
            f"the phenotype rules were fitted on {len(fitted_here)} of these slides (e.g. {fitted_here[0]}): a "
            "read-out never uses thresholds fitted on the slides it reports — fit them on another labelled RUN "
            "(`wsi tme TRAIN_RUN --fit-rules --labels CSV`) or drop rules.fitted_on from the config"
        )
    clf = load_classifier(cfg.classifier or None)
    cfg.roles.resolve(clf.class_names)  # fail early on a classifier without tumour/lymphocyte classes
    clf_sha = F.file_sha256(Path(clf.path) / WEIGHTS_FILE)
    ctx = TMEContext(layout, clf, cfg, clf_sha, str(resolve_device(cfg.device)))
    save_resolved(run_root, STAGE, {"tme": cfg, "classifier_path": clf.path, "classifier_mpp": clf.mpp})
    summary = run_per_slide(TMEStage(ctx), [SlideItem(sid) for sid in ids], layout, workers=0,
                            progress=progress)
    rows = list(summary.values().values())
    if slide_ids is not None and layout.tme_csv.exists():  # keep the other slides' rows
        old = F.read_tme_csv(layout.tme_csv)
        done = {r["slide_id"] for r in rows}
        rows = [r for r in old.to_dict("records") if r["slide_id"] not in done] + rows
    summary.figures["csv"] = str(write_tme_csv(layout.tme_csv, rows))
    return summary


# ---------------------------------------------------------------- fitting the rules on a labelled RUN
FIT_RULES_COMMAND = "tme-fit-rules"  # RUN/configs/tme-fit-rules.yaml: a `tme:` section for `wsi tme --config`


def fit_rules_on_run(run_root: str | Path, labels_csv: str | Path, cfg: TMEConfig, folds: int = 5,
                     column: str = "immune_phenotype") -> tuple[Path, dict[str, Any]]:
    """Fit the phenotype thresholds to the labelled slides of a RUN whose read-out is done (``tme.csv``, with
    ``cfg.rules`` as the starting point; :func:`wsi_pipeline.tme.rules.fit_rules`, ``folds``-fold CV) and write
    them, with the ids of the slides they were fitted on, to ``RUN/configs/tme-fit-rules.yaml`` (a ``tme:``
    section: apply them to *another* RUN with ``wsi tme OTHER --config`` that file; ``wsi tme`` refuses to
    report the slides they were fitted on). This RUN's ``tme.csv`` is left as it was. Returns (path,
    report)."""
    import dataclasses

    from wsi_pipeline.runfolder.resolved import save_resolved
    from wsi_pipeline.tme.rules import fit_rules

    layout = RunLayout(run_root)
    labels = F.read_labels_csv(labels_csv)
    if column not in labels.columns:
        raise ConfigError(f"{labels_csv}: no {column!r} column to fit the phenotype rules to")
    truth = {str(r[F.SLIDE_ID]): str(r[column]) for r in labels.to_dict("records")
             if str(r.get(column, "")).strip() not in ("", "nan")}
    rows = [r for r in F.read_tme_csv(layout.tme_csv).to_dict("records") if str(r[F.SLIDE_ID]) in truth]
    if not rows:
        raise ConfigError(f"{labels_csv}: none of its slides is in {layout.tme_csv}; label the slides of this RUN")
    fitted, report = fit_rules(rows, [truth[str(r[F.SLIDE_ID])] for r in rows], cfg.rules, folds=folds)
    ids = tuple(sorted(str(r[F.SLIDE_ID]) for r in rows))
    fitted = dataclasses.replace(fitted, fitted_on=ids)
    save_resolved(run_root, FIT_RULES_COMMAND, {"tme": {"rules": fitted}, "fit": {**report, "labels": str(labels_csv),
                                                                                  "column": column}})
    return layout.command_config_yaml(FIT_RULES_COMMAND), report


# ---------------------------------------------------------------- joining the read-out to labels
def join_tme_to_labels(
    labels_csv: str | Path, tme_csv: str | Path, out_csv: str | Path, prefix: str = "tme_"
) -> Path:
    """Write ``labels ⟕ tme`` on ``slide_id`` (left join: every label row kept, slides without a TME
    read-out get empty cells); TME columns are prefixed (``tme_til_fraction``, ``tme_immune_phenotype``, …)
    so they never overwrite a label. The result is a labels CSV for `wsi train` (TME columns as targets or
    as ``--covariates``)."""
    labels = F.read_labels_csv(labels_csv)  # label cells kept as written (text), ids stripped
    tme = F.read_tme_csv(tme_csv)
    tme = tme.rename(columns={c: f"{prefix}{c}" for c in tme.columns if c != F.SLIDE_ID})
    joined = labels.merge(tme, on=F.SLIDE_ID, how="left")
    return F.write_labels_csv(out_csv, joined, float_format="%.6g")
