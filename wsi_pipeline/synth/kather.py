"""Mosaic slides built from real kather16 tiles, for evaluating TME read-outs and slide models.

kather16 (Kather et al. 2016, CC BY 4.0) holds 150×150-px H&E tiles at 0.495 µm/px in eight class
folders. Tiles of one source image are near neighbours, so train and test pools are split **by source
image** (parsed from the file name ``<n>_<SOURCE>.tif_Row_<r>_Col_<c>.jpg``); ``07_ADIPOSE`` and
``08_EMPTY`` come from very few sources and are split tile by tile.

A mosaic slide is a grid of tiles laid out by a class map from :func:`layout.make_class_map`: its
immune phenotype is the *position* of ``04_LYMPHO`` tiles relative to ``01_TUMOR`` tiles (inside nests:
inflamed; in the stroma band around them: excluded; few: desert), while inflamed and excluded slides
share one lymphocyte-count distribution. Each tile is drawn from the pool of its class (without
replacement within a slide while the pool lasts) and randomly rotated by a multiple of 90° and
flipped. Mosaics are written at run time into a folder you choose; never copy them into the repository
(the small demo samples of ``data_samples/``, built by ``scripts/make_data_samples.py`` from held-out
source images only and attributed there, are the one exception).

Labels: ``response`` is logistic in the TIL fraction and the phenotype (the model of
:mod:`wsi_pipeline.synth.cohort`, coefficients in :attr:`MosaicParams.outcome`), and overall survival is
drawn from what the mosaic shows: the true log relative hazard is ``h = os_inflamed_log_hr · [inflamed] +
os_desert_log_hr · [desert] + os_tumour_log_hr · (tumour − tumour_ref) / tumour_scale`` (TIL term 0 by
default: phenotype and tumour fraction), ``os_months`` ~ Exponential(``baseline_hazard · exp(h)``) censored
as in the cohort model, and ``h`` is recorded as ``os_true_log_hazard`` (:meth:`OutcomeModel.os_log_hazard`).

Two builders: :func:`build_kather_mosaic_cohort` (one treated slide per patient, phenotypes in equal
shares: evaluation cohorts) and :func:`write_kather_cohort` (the full cohort model of
:func:`wsi_pipeline.synth.cohort.plan_cohort` — arms, second slides, on-treatment slides — with each
class map filled by kather16 tiles instead of procedural drawing: the demo samples and the demo model's
training cohort).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import LabelsError, WSIPipelineError
from wsi_pipeline.synth.cohort import OutcomeModel, draw_age_stage
from wsi_pipeline.synth.layout import PHENOTYPES, LayoutParams, TissueClass, class_map_truth, lymph_geometry

log = logging.getLogger(__name__)

KATHER_MPP = 0.495
KATHER_TILE_PX = 150
KATHER_CLASSES: tuple[str, ...] = (
    "01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE", "08_EMPTY",
)
# classes split tile by tile: what source_split's min_sources=8 gives on kather16 (7 and 2 source images)
SPLIT_BY_TILE_CLASSES: tuple[str, ...] = ("07_ADIPOSE", "08_EMPTY")
# kather folder of every class-map code (index = TissueClass)
CLASS_FOLDERS: tuple[str, ...] = (
    "08_EMPTY", "01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE",
)

KATHER_LAYOUT = LayoutParams(
    tissue_coverage=(0.55, 0.75),
    necrosis_prob=0.5,
    adipose_prob=0.6,
    complex_fraction=0.15,
    mucosa_prob=0.5,
    patch_cells=(8, 30),
)

class KatherDataError(WSIPipelineError):
    """The kather16 folder is missing, incomplete or has unexpected file names."""


def parse_source(file_name: str) -> str:
    """Source-image id of a kather16 tile name, e.g. ``CRC-Prim-HE-07_022`` (the name pattern of
    :data:`wsi_pipeline.tiles.folders.KATHER_NAME`, which the source split uses too)."""
    from wsi_pipeline.tiles.folders import KATHER_NAME

    m = KATHER_NAME.match(Path(file_name).name)
    if not m:
        raise KatherDataError(
            f"{file_name}: not a kather16 tile name (<n>_<SOURCE>.tif_Row_<r>_Col_<c>.jpg); "
            "keep the original file names"
        )
    return m.group("source")


def list_kather_tiles(kather_dir: str | Path) -> Any:
    """DataFrame of every tile: ``path``, ``class_name``, ``source``, ``file``."""
    import pandas as pd

    root = Path(kather_dir)
    missing = [c for c in KATHER_CLASSES if not (root / c).is_dir()]
    if missing:
        raise KatherDataError(f"{root}: missing class folder(s) {', '.join(missing)}; point at the kather16 "
                              "folder holding 01_TUMOR … 08_EMPTY")
    rows = []
    for c in KATHER_CLASSES:
        for p in sorted((root / c).iterdir()):
            if p.suffix.lower() in (".jpg", ".jpeg"):
                rows.append({"path": str(p), "class_name": c, "source": parse_source(p.name), "file": p.name})
    df = pd.DataFrame(rows)
    empty = [c for c in KATHER_CLASSES if not (df.class_name == c).any()]
    if empty:
        raise KatherDataError(f"{root}: no .jpg tiles in {', '.join(empty)}")
    return df


def split_kather_by_source(kather_dir: str | Path, test_fraction: float = 0.3, seed: int = 0,
                           min_sources: int = 8) -> Any:
    """Every tile with its side of the kather16 train/test split (column ``split``: ``train``/``test``).

    This is :func:`wsi_pipeline.tiles.split.source_split` — the one split of the project, used to pretrain
    the demo encoder and to fit the shipped tissue classifier (seed 0, test fraction 0.3) — presented as
    a table. Classes with ≥ ``min_sources`` source images are split by source image (a source is on one
    side for all of them); the others (on kather16: :data:`SPLIT_BY_TILE_CLASSES`) tile by tile. Column
    ``split_unit`` says which rule applied (``source`` or ``tile``).
    """
    from wsi_pipeline.tiles.folders import LabelledTiles
    from wsi_pipeline.tiles.split import source_split

    tiles = list_kather_tiles(kather_dir)
    class_index = {c: i for i, c in enumerate(KATHER_CLASSES)}
    labelled = LabelledTiles(Path(kather_dir), [Path(x) for x in tiles.path],
                             np.asarray([class_index[c] for c in tiles.class_name], np.int64),
                             list(KATHER_CLASSES), tiles.source.tolist())
    is_test, info = source_split(labelled, test_fraction, seed, min_sources)
    unit = tiles.class_name.map(info.mode).to_numpy()
    return tiles.assign(split=np.where(is_test, "test", "train"), split_unit=unit)


@dataclass(frozen=True)
class MosaicParams:
    """How mosaic slides are drawn and written."""

    grid: tuple[int, int] = (24, 32)  # (rows, cols) of 150-px tiles
    phenotype_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    layout: LayoutParams = KATHER_LAYOUT
    # mosaics carry more lymphocytes than small synthetic slides: centre the TIL term higher and weigh the
    # lymphocytes' position (inflamed) more, so response depends on where they sit as well as how many
    # survival from phenotype and tumour fraction only (the tumour fraction is centred on the mosaics' mean)
    outcome: OutcomeModel = field(default_factory=lambda: OutcomeModel(intercept=-0.5, til_ref=0.10,
                                                                       inflamed_weight=1.5, os_til_log_hr=0.0,
                                                                       tumour_ref=0.32))
    test_fraction: float = 0.3
    split_seed: int = 0  # seed of the train/test split (keep it fixed across cohorts)
    downsamples: tuple[int, ...] = (1, 4, 16)
    quality: int = 90
    # > 0: the split's source images are dealt to this many "sites" (a class with fewer source images than
    # sites is dealt tile by tile) and slide i draws its tiles from site i mod sites only, recorded in a
    # ``site`` column: a multi-site cohort whose sites differ as hospitals do, for ``wsi train --group-by site``
    sites: int = 0


def site_pools(pool_df: Any, sites: int, seed: int) -> list[dict[str, list[str]]]:
    """``pool_df`` (rows of :func:`split_kather_by_source`) dealt to ``sites`` disjoint pools, class by class:
    whole source images, seeded round-robin, where a class has at least ``sites`` of them; else its tiles."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, list[str]]] = [{c: [] for c in KATHER_CLASSES} for _ in range(sites)]
    for c in KATHER_CLASSES:
        rows = pool_df[pool_df.class_name == c]
        units = sorted(rows.source.unique())
        by_source = len(units) >= sites
        keys = [units[i] for i in rng.permutation(len(units))] if by_source else \
            [rows.path.iloc[i] for i in rng.permutation(len(rows))]
        for k, key in enumerate(keys):
            paths = rows.path[rows.source == key].tolist() if by_source else [key]
            out[k % sites][c].extend(sorted(paths))
    for k, pools in enumerate(out):
        empty = [c for c, v in pools.items() if not v and (pool_df.class_name == c).any()]
        if empty:
            raise LabelsError(f"site {k + 1} of {sites} has no tile of {empty}; use fewer sites")
    return out


def _load_tile(path: str, k: int, flip: bool) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"))
    if a.shape[:2] != (KATHER_TILE_PX, KATHER_TILE_PX):
        raise KatherDataError(f"{path}: tile is {a.shape[1]}×{a.shape[0]} px, expected "
                              f"{KATHER_TILE_PX}×{KATHER_TILE_PX}")
    a = np.rot90(a, k)
    return a[:, ::-1] if flip else a


def compose_mosaic(class_map: np.ndarray, pools: dict[str, list[str]], rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Tile image for a class map and the file name used at each cell."""
    rows, cols = class_map.shape
    t = KATHER_TILE_PX
    img = np.empty((rows * t, cols * t, 3), np.uint8)
    used = np.empty(class_map.shape, dtype=object)
    queues: dict[int, list[str]] = {}
    for r in range(rows):
        for c in range(cols):
            code = int(class_map[r, c])
            q = queues.get(code)
            if not q:
                pool = pools[CLASS_FOLDERS[code]]
                q = queues[code] = [pool[i] for i in rng.permutation(len(pool))]
            path = q.pop()
            img[r * t:(r + 1) * t, c * t:(c + 1) * t] = _load_tile(path, int(rng.integers(4)), bool(rng.random() < 0.5))
            used[r, c] = Path(path).name
    return img, used


def mosaic_truth(class_map: np.ndarray) -> dict[str, Any]:
    """Per-class tile counts and fractions (``frac_<CLASS>`` over tissue tiles, i.e. all but 08_EMPTY;
    ``area_<CLASS>`` over all tiles), ``til_fraction`` = 04_LYMPHO tiles / tissue tiles, tumour and
    stroma fractions, and the lymphocyte geometry."""
    counts = np.bincount(class_map.ravel().astype(np.int64), minlength=len(CLASS_FOLDERS))
    n_all, n_tissue = int(counts.sum()), int(counts[1:].sum())
    out: dict[str, Any] = {}
    for code, name in enumerate(CLASS_FOLDERS):
        out[f"n_{name}"] = int(counts[code])
        out[f"area_{name}"] = counts[code] / max(1, n_all)
        out[f"frac_{name}"] = 0.0 if code == TissueClass.GLASS else counts[code] / max(1, n_tissue)
    t = class_map_truth(class_map)
    out.update(til_fraction=t["til_fraction"], tumour_fraction=t["tumour_fraction"],
               stroma_fraction=t["stroma_fraction"], tissue_tiles=n_tissue)
    out.update({f"geom_{k}": v for k, v in lymph_geometry(class_map).items()})
    return out


def build_kather_mosaic_cohort(
    kather_dir: str | Path,
    out_dir: str | Path,
    n_slides: int,
    split: str = "train",
    seed: int = 0,
    grid: tuple[int, int] | None = None,
    params: MosaicParams | None = None,
) -> Any:
    """Build ``n_slides`` mosaic slides from the ``split`` pool of kather16 tiles.

    Writes ``<out_dir>/<slide_id>.svs`` (Aperio-style pyramid, MPP 0.495 in the metadata),
    ``<out_dir>/truth/<slide_id>.npz`` (``class_map`` with :class:`TissueClass` codes,
    ``class_names`` = kather folder per code, ``tile_px``, ``mpp``, ``tiles`` used per cell, counts and
    fractions), ``<out_dir>/labels.csv`` and ``<out_dir>/tile_split.csv`` (the tile → split table, so a
    classifier can be trained on exactly the other pool). Returns the labels DataFrame.

    Labels follow the cohort model of :mod:`wsi_pipeline.synth.cohort` (single treated arm, one slide
    per patient): ``response`` is logistic in the TIL fraction and the phenotype with Bernoulli noise;
    survival from the phenotype and the tumour fraction (module docstring), with ``os_true_log_hazard``.
    """
    import math

    import pandas as pd

    from wsi_pipeline.formats.atomic import atomic_path, write_text_atomic
    from wsi_pipeline.synth.layout import make_class_map
    from wsi_pipeline.synth.pyramid import array_painter, write_pyramid_tiff
    from wsi_pipeline.synth.tissue import stable_seed

    if split not in ("train", "test"):
        raise LabelsError(f"split must be 'train' or 'test', not {split!r}")
    p = params or MosaicParams()
    grid = tuple(grid or p.grid)
    out = Path(out_dir)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    tiles = split_kather_by_source(kather_dir, p.test_fraction, p.split_seed)
    write_text_atomic(out / "tile_split.csv", tiles.drop(columns=["path"]).to_csv(index=False))
    pool_df = tiles[tiles.split == split]
    pools = {c: pool_df.path[pool_df.class_name == c].tolist() for c in KATHER_CLASSES}
    per_site = site_pools(pool_df, p.sites, stable_seed("kather-sites", seed, split)) if p.sites > 0 else []
    rng = np.random.default_rng(stable_seed("kather-cohort", seed, split))
    probs = np.asarray(p.phenotype_probs, float) / sum(p.phenotype_probs)
    om = p.outcome
    rows = []
    for i in range(n_slides):
        slide_id = f"kather-{split}-{i + 1:03d}"
        phenotype = str(rng.choice(PHENOTYPES, p=probs))
        cm = make_class_map(grid, phenotype, rng, p.layout)
        img, used = compose_mosaic(cm, per_site[i % p.sites] if per_site else pools, rng)
        truth = mosaic_truth(cm)
        path = out / f"{slide_id}.svs"
        size = (img.shape[1], img.shape[0])
        with atomic_path(path) as tmp:
            write_pyramid_tiff(tmp, array_painter(img), size, KATHER_MPP, p.downsamples, quality=p.quality,
                               flavor="aperio")
            tmp.chmod(0o644)
        with atomic_path(out / "truth" / f"{slide_id}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(
                    f, class_map=cm, class_names=np.array(CLASS_FOLDERS), tile_px=np.int64(KATHER_TILE_PX),
                    mpp=np.float64(KATHER_MPP), tiles=used.astype(str), immune_phenotype=np.array(phenotype),
                    **{k: np.asarray(v) for k, v in truth.items()},
                )
            tmp.chmod(0o644)
        age, stage = draw_age_stage(rng)
        eta = om.response_logit(truth["til_fraction"], phenotype, True, age, stage)
        p_resp = 1.0 / (1.0 + math.exp(-eta))
        response = int(rng.random() < p_resp)
        survival = om.draw_survival(rng, om.os_log_hazard(truth["til_fraction"], truth["tumour_fraction"],
                                                          phenotype, response, stage))
        row = {
            "slide_id": slide_id, "patient_id": slide_id, "response": response,
            "immune_phenotype": phenotype, "til_fraction": round(truth["til_fraction"], 4),
            "os_months": survival["os_months"], "os_event": survival["os_event"],
            "arm": "treatment", "timepoint": "baseline", "age": age, "stage": stage, "split": split,
            "response_prob": round(p_resp, 4), "tumour_fraction": round(truth["tumour_fraction"], 4),
            "stroma_fraction": round(truth["stroma_fraction"], 4),
            "os_true_log_hazard": survival["os_true_log_hazard"],
        }
        row.update({f"frac_{c}": round(truth[f"frac_{c}"], 4) for c in KATHER_CLASSES if c != "08_EMPTY"})
        if per_site:
            row["site"] = f"site-{i % p.sites + 1}"
        rows.append(row)
        log.info("wrote %s (%s, TIL %.3f)", path, phenotype, truth["til_fraction"])
    df = pd.DataFrame(rows)
    write_text_atomic(out / "labels.csv", df.to_csv(index=False))
    return df


KATHER_CELL_UM = KATHER_TILE_PX * KATHER_MPP  # one mosaic cell = one kather16 tile (74.25 µm)

# The demo cohort design (data_samples/ and the demo MIL's training cohort): 16 × 20 cells; lymphocyte-rich
# slides with larger nests, so an inflamed nest holds about a fifth lymphocyte tiles (10–90th percentile of
# the tumour region's lymphocyte density 0.18–0.28, against the `wsi tme` rule's 0.10) and the phenotype
# survives the tissue classifier's lymphocyte recall on held-out sources (0.83); the response model is
# centred on the design's TIL level (non-desert slides: TIL fraction about 0.14).
DEMO_GRID = (16, 20)
DEMO_LAYOUT = replace(KATHER_LAYOUT, til_target=(0.12, 0.22), inflamed_intratumoural=(0.9, 1.0),
                      max_interior_lymph=0.8, nest_radius_cells=(3.5, 5.5))


def kather_cohort_params(n_patients: int, seed: int, grid: tuple[int, int] = DEMO_GRID, **kw: Any) -> Any:
    """:class:`~wsi_pipeline.synth.cohort.CohortParams` whose class maps are ``grid`` (rows, cols) mosaic
    cells of one kather16 tile each, with the mosaic layout and outcome model of :class:`MosaicParams`;
    ``kw`` sets the other fields (``two_arms``, ``timepoint_fraction``, ``multi_slide_fraction`` ...).
    :func:`demo_cohort_params` is the demo design."""
    from wsi_pipeline.synth.cohort import CohortParams

    mp = MosaicParams()
    base: dict[str, Any] = {"layout": mp.layout, "outcome": mp.outcome, "phenotype_probs": mp.phenotype_probs}
    base.update(kw)
    return CohortParams(n_patients=n_patients, seed=seed, size_l0=(grid[1] * KATHER_TILE_PX, grid[0] * KATHER_TILE_PX),
                        mpp=KATHER_MPP, cell_um=KATHER_CELL_UM, **base)


def demo_cohort_params(n_patients: int, seed: int, **kw: Any) -> Any:
    """The demo design: :data:`DEMO_GRID` mosaics with :data:`DEMO_LAYOUT`, the mosaic outcome model centred
    on its TIL level, two arms randomised in permuted blocks; ``kw`` sets the other
    :class:`~wsi_pipeline.synth.cohort.CohortParams` fields. Write them with
    ``KatherWriteOptions(crop_to_tissue=True)``."""
    base: dict[str, Any] = {"two_arms": True, "arm_assignment": "blocks", "layout": DEMO_LAYOUT,
                            "outcome": replace(MosaicParams().outcome, til_ref=0.14)}
    base.update(kw)
    return kather_cohort_params(n_patients, seed, DEMO_GRID, **base)


@dataclass(frozen=True)
class KatherWriteOptions:
    """How :func:`write_kather_cohort` writes its slides."""

    split: str = "train"  # which side of the source split the tiles come from
    test_fraction: float = 0.3
    split_seed: int = 0
    downsamples: tuple[int, ...] = (1, 4, 16)
    quality: int = 90
    thumbnail_max: int = 768
    tile_split_csv: bool = True  # also write <out>/tile_split.csv (the tile → side table)
    # drop the glass rows and columns above and left of the tissue, so the tissue starts at the slide's top-left
    # edge: the first 224-px tile then lies at (0, 0), and a grid anchored there (``wsi tme``'s 74-µm cells)
    # falls on the mosaic's 150-px tiles instead of straddling four tiles of different source images
    crop_to_tissue: bool = False


def crop_to_tissue(spec: Any) -> Any:
    """``spec`` (a :class:`~wsi_pipeline.synth.slides.SlideSpec` of a mosaic) without the glass rows and
    columns before its first tissue row and column; tissue fractions and geometry are unchanged."""
    from wsi_pipeline.synth.layout import TissueClass

    tissue = spec.class_map != TissueClass.GLASS
    if not tissue.any():
        return spec
    r0, c0 = int(np.argmax(tissue.any(axis=1))), int(np.argmax(tissue.any(axis=0)))
    cm = spec.class_map[r0:, c0:]
    return replace(spec, class_map=cm, size_l0=(cm.shape[1] * KATHER_TILE_PX, cm.shape[0] * KATHER_TILE_PX))


def _save_mosaic_truth(path: Path, planned: Any, used: np.ndarray) -> None:
    """The truth of :func:`wsi_pipeline.synth.slides.save_truth` (same keys; one cell = one kather tile) plus
    ``tiles`` (the kather16 file at each cell) and ``kather_classes`` (kather folder per class code)."""
    from wsi_pipeline.formats.atomic import atomic_path
    from wsi_pipeline.synth.layout import CLASS_NAMES

    spec = planned.spec
    arrays: dict[str, Any] = {
        "class_map": spec.class_map, "class_names": np.array(CLASS_NAMES), "cell_um": np.float64(spec.cell_um),
        "mpp": np.float64(spec.mpp), "cell_px": np.float64(KATHER_TILE_PX), "seed": np.int64(spec.seed),
    }
    arrays.update({k: np.asarray(v) for k, v in spec.truth().items()})
    arrays.update(tiles=used.astype(str), kather_classes=np.array(CLASS_FOLDERS))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        tmp.chmod(0o644)


def write_kather_cohort(kather_dir: str | Path, out_dir: str | Path, params: Any,
                        options: KatherWriteOptions | None = None) -> Any:
    """Draw a cohort with :func:`wsi_pipeline.synth.cohort.plan_cohort` (``params`` from
    :func:`kather_cohort_params`) and fill every class map with kather16 tiles of the ``options.split``
    side of the source split. Writes ``<out>/<slide_id>.svs`` (Aperio-style pyramid, MPP 0.495),
    ``<out>/truth/<slide_id>.npz``, ``<out>/labels.csv`` (the cohort's label table) and, unless switched off,
    ``<out>/tile_split.csv``. Deterministic in (``params``, ``options``, the kather16 folder); slides
    already written are rewritten. Returns the labels DataFrame."""
    from wsi_pipeline.formats.atomic import atomic_path, write_text_atomic
    from wsi_pipeline.synth.cohort import labels_frame, plan_cohort
    from wsi_pipeline.synth.pyramid import array_painter, write_pyramid_tiff
    from wsi_pipeline.synth.tissue import stable_seed

    o = options or KatherWriteOptions()
    if o.split not in ("train", "test"):
        raise LabelsError(f"split must be 'train' or 'test', not {o.split!r}")
    if abs(params.mpp - KATHER_MPP) > 1e-9 or abs(params.cell_um - KATHER_CELL_UM) > 1e-9:
        raise LabelsError(f"cohort parameters at {params.mpp} µm/px with {params.cell_um}-µm cells: build them "
                          "with kather_cohort_params() (one kather16 tile per cell at 0.495 µm/px)")
    out = Path(out_dir)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    tiles = split_kather_by_source(kather_dir, o.test_fraction, o.split_seed)
    if o.tile_split_csv:
        write_text_atomic(out / "tile_split.csv", tiles.drop(columns=["path"]).to_csv(index=False))
    side = tiles[tiles.split == o.split]
    pools = {c: side.path[side.class_name == c].tolist() for c in KATHER_CLASSES}
    planned = plan_cohort(params)
    if o.crop_to_tissue:
        planned = [replace(p, spec=crop_to_tissue(p.spec)) for p in planned]
    for p in planned:
        spec = p.spec
        rng = np.random.default_rng(stable_seed("kather-slide", spec.seed, o.split))
        img, used = compose_mosaic(spec.class_map, pools, rng)
        path = out / f"{spec.slide_id}.svs"
        with atomic_path(path) as tmp:
            write_pyramid_tiff(tmp, array_painter(img), (img.shape[1], img.shape[0]), KATHER_MPP, o.downsamples,
                               quality=o.quality, flavor="aperio", thumbnail_max=o.thumbnail_max)
            tmp.chmod(0o644)
        _save_mosaic_truth(out / "truth" / f"{spec.slide_id}.npz", p, used)
        log.info("wrote %s (%s, TIL %.3f)", path, spec.phenotype, p.labels["til_fraction"])
    df = labels_frame(planned)
    write_text_atomic(out / "labels.csv", df.to_csv(index=False))
    return df
