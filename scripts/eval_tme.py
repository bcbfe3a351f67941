"""Evaluate `wsi tme` on held-out kather16 mosaic slides with known class maps, with the grid aligned to the
mosaic cells and with the grid falling anywhere.

1. Mosaic slides (kather16 tiles laid out by `synth.layout.make_class_map`, one third of each immune phenotype)
   from the **test** tiles of the source split the classifier was trained with
   (`wsi_pipeline.tiles.split.source_split`, seed and fraction read from the classifier): no tile comes from a
   source image the classifier (or the demo encoder) was trained on — checked before anything runs.
   Two cohorts (same class maps and tiles, seeded):
   * ``aligned``: 150-px cells (the tiles as they are, 74.25 µm) from the slide's corner;
   * ``misaligned``: per slide, a cell size drawn from 140–160 px (each tile resized to it: 69–79 µm, a size
     that does not divide the tile grid) and the whole mosaic shifted by a random offset of up to one cell;
   * ``random`` (only when asked, ``--cohorts random``): placed as ``misaligned``, but with *random* layouts
     instead of the generator's (:func:`random_class_map`: no nests, bands or phenotypes, every class about
     as frequent): what a read-out has learned of the generator's tissue architecture does not help there.
     Its slides have no immune phenotype (accuracy not applicable).
2. `wsi tile` with every default (224 px at 0.5 µm/px), then `wsi tme` with each footprint (`--footprint grid`:
   one class per 74-µm cell of the TME's own grid anchored at the tiles' corner; `dense`: the dense
   class-probability map of overlapping field-of-view windows, its composition through the classifier's map
   refinement; `dense-raw`: the same map without it, `--no-map-refinement`), timed; `--extract` also times
   `wsi extract` on the same RUN.
3. Per cohort × footprint: immune-phenotype accuracy, `til_fraction` Spearman against the truth and the mean
   per-class area-fraction MAE (fractions of tissue), each with a 95 % bootstrap CI over slides, and the
   map's balanced accuracy against the truth class at the centre of each classified cell / map cell.
   `--agreement N` also checks the fully convolutional window probabilities against the same windows
   classified one by one on N slides (`wsi_pipeline.tme.dense.fcn_window_agreement`).

    nice python scripts/eval_tme.py --out runs/eval-tme --json models/wsip-tissue-kather16/eval_tme.json \\
        --card models/wsip-tissue-kather16/README.md --agreement 3 --extract   # 30 slides of 16×20 cells per cohort
    # --record: also write the misaligned grid/dense figures into classifier.json (`wsi tme --footprint auto`)
    nice python scripts/eval_tme.py --out /tmp/e --n-slides 6 --grid 10 12 --cohorts misaligned   # quick
    nice python scripts/eval_tme.py --out /tmp/s --samples data_samples --extract   # the demo against its truth

Mosaics are written under --out (never into the repository). Uses the shipped classifier by default.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "kather16"
COHORTS = ("aligned", "misaligned", "random")
DEFAULT_COHORTS = ("aligned", "misaligned")
NO_PHENOTYPE = "n/a"  # the truth phenotype of a random layout
FOOTPRINTS = ("grid", "dense", "dense-raw")  # dense-raw: `wsi tme --footprint dense --no-map-refinement`
CELL_RANGE = (140, 160)  # misaligned: mosaic cell sizes (px at 0.495 µm/px)


def held_out_pools(kather_dir: Path, clf: Any) -> tuple[dict[str, list[str]], set[str], set[str]]:
    """Test-side tile paths per class of the classifier's own source split, minus anything the classifier
    saw (its recorded training sources and, for classes split by tile, training files)."""
    from wsi_pipeline.tiles.folders import load_labelled_folder
    from wsi_pipeline.tiles.split import source_split

    split = clf.training.get("split", {})
    if "train_sources" not in split:
        raise SystemExit(f"{clf.path}: the classifier does not record its training sources; retrain it")
    train_sources = set(split["train_sources"])
    train_files = set(split.get("train_files_split_by_tile", []))
    tiles = load_labelled_folder(kather_dir)
    is_test, _ = source_split(tiles, float(split.get("test_fraction", 0.3)), int(split.get("seed", 0)),
                              int(split.get("min_sources", 8)))
    keep = [bool(t) and s not in train_sources and p.name not in train_files
            for t, s, p in zip(is_test, tiles.sources, tiles.paths, strict=True)]
    pools = {c: [str(tiles.paths[i]) for i in np.flatnonzero(np.asarray(keep) & (tiles.labels == k))]
             for k, c in enumerate(tiles.class_names)}
    return pools, train_sources, train_files


def training_pools(kather_dir: Path, clf: Any) -> dict[str, list[str]]:
    """Tile paths per class that the classifier was trained on (its training sources, and the training files of
    the classes split by tile): the complement of :func:`held_out_pools` (scripts/train_map_refiner.py)."""
    split = clf.training.get("split", {})
    if "train_sources" not in split:
        raise SystemExit(f"{clf.path}: the classifier does not record its training sources; retrain it")
    return pools_of(kather_dir, set(split["train_sources"]), set(split.get("train_files_split_by_tile", [])))


def pools_of(kather_dir: Path, sources: set[str], files: set[str]) -> dict[str, list[str]]:
    """Tile paths per class of the tiles from ``sources`` (source image ids) or named in ``files``."""
    from wsi_pipeline.tiles.folders import load_labelled_folder

    tiles = load_labelled_folder(kather_dir)
    keep = np.array([s in sources or p.name in files for s, p in zip(tiles.sources, tiles.paths, strict=True)])
    return {c: [str(tiles.paths[i]) for i in np.flatnonzero(keep & (tiles.labels == k))]
            for k, c in enumerate(tiles.class_names)}


def placement(cohort: str, rng: np.random.Generator) -> tuple[int, tuple[int, int]]:
    """(cell px at 0.495 µm/px, (x, y) offset px) of one slide of ``cohort``."""
    from wsi_pipeline.synth.kather import KATHER_TILE_PX

    if cohort == "aligned":
        return KATHER_TILE_PX, (0, 0)
    cell = int(rng.integers(CELL_RANGE[0], CELL_RANGE[1] + 1))
    return cell, (int(rng.integers(cell)), int(rng.integers(cell)))


def place(img: np.ndarray, n_cells: tuple[int, int], cell: int, offset: tuple[int, int]) -> np.ndarray:
    """The 150-px mosaic resized to ``cell`` px per cell and shifted by ``offset`` on white glass."""
    from wsi_pipeline.slide.base import resize_rgb
    from wsi_pipeline.synth.kather import KATHER_TILE_PX

    if cell != KATHER_TILE_PX:
        img = resize_rgb(img, (n_cells[1] * cell, n_cells[0] * cell))
    if offset == (0, 0):
        return img
    out = np.full((img.shape[0] + offset[1], img.shape[1] + offset[0], 3), 255, np.uint8)
    out[offset[1]:, offset[0]:] = img
    return out


def random_class_map(grid: tuple[int, int], rng: np.random.Generator, coherence: float = 0.6) -> np.ndarray:
    """A random layout in the codes of ``synth.kather.CLASS_FOLDERS`` (0 = glass): each cell copies its upper or
    left neighbour with probability ``coherence``, else draws one of the 8 codes uniformly; a glass frame."""
    from wsi_pipeline.tme.context import random_layout

    cm = random_layout(grid, 8, rng, coherence)
    cm[0, :] = cm[-1, :] = cm[:, 0] = cm[:, -1] = 0
    return cm.astype(np.int8)


def build_cohort(out: Path, cohort: str, pools: dict[str, list[str]], seen: tuple[set[str], set[str]], n: int,
                 grid: tuple[int, int], seed: int) -> list[dict[str, Any]]:
    """Mosaic slides + truth (same class maps and tiles in every cohort); refuses any tile from a training
    source (or a training file)."""
    from wsi_pipeline.formats.atomic import atomic_path
    from wsi_pipeline.synth.kather import KATHER_LAYOUT, KATHER_MPP, compose_mosaic, mosaic_truth
    from wsi_pipeline.synth.layout import PHENOTYPES, make_class_map
    from wsi_pipeline.synth.pyramid import array_painter, write_pyramid_tiff
    from wsi_pipeline.tiles.folders import parse_source_id

    slides_dir = out / f"slides-{cohort}"
    slides_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rng_place = np.random.default_rng([seed, COHORTS.index(cohort)])
    result = []
    for i in range(n):
        sid = f"heldout-{i + 1:03d}"
        if cohort == "random":
            phenotype, cm = NO_PHENOTYPE, random_class_map(grid, rng)
        else:
            phenotype = PHENOTYPES[i % 3]
            cm = make_class_map(grid, phenotype, rng, KATHER_LAYOUT)
        img, used = compose_mosaic(cm, pools, rng)
        for name in used.ravel():
            if parse_source_id(name) in seen[0] or name in seen[1]:
                raise SystemExit(f"{name}: seen by the classifier in training — the cohort would not be held out")
        cell, offset = placement(cohort, rng_place)
        path = slides_dir / f"{sid}.svs"
        if not path.exists():
            img = place(img, cm.shape, cell, offset)
            with atomic_path(path) as tmp:
                write_pyramid_tiff(tmp, array_painter(img), (img.shape[1], img.shape[0]), KATHER_MPP, (1, 4, 16),
                                   quality=90)
        result.append({"slide_id": sid, "path": path, "phenotype": phenotype, "class_map": cm,
                       "truth": mosaic_truth(cm), "cell_px": cell, "offset_px": offset})
    return result


def samples_cohort(folder: Path) -> list[dict[str, Any]]:
    """The slides of a ``data_samples``-like folder with their truth (``truth/<slide_id>.npz``: ``class_map`` in
    the codes of ``synth.kather.CLASS_FOLDERS``, ``cell_px`` at 0.495 µm/px, ``immune_phenotype``)."""
    from wsi_pipeline.synth.kather import mosaic_truth

    out = []
    for npz in sorted((folder / "truth").glob("*.npz")):
        t = np.load(npz, allow_pickle=True)
        path = next(iter(sorted(folder.glob(f"{npz.stem}.*"))), None)
        if path is None or path.suffix == ".npz":
            continue
        cm = np.asarray(t["class_map"])
        out.append({"slide_id": npz.stem, "path": path, "phenotype": str(t["immune_phenotype"]), "class_map": cm,
                    "truth": mosaic_truth(cm), "cell_px": int(t["cell_px"]), "offset_px": (0, 0)})
    if not out:
        raise SystemExit(f"{folder}: no slides with truth/<slide_id>.npz")
    return out


def print_samples(run: Path, cohort: list[dict[str, Any]], class_names: list[str]) -> dict[str, Any]:
    """Per-slide read-out against the truth of a samples folder; returns the figures."""
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.tme.spatial import class_column

    tme = F.read_tme_csv(RunLayout(run).tme_csv).set_index("slide_id")
    rows = []
    print("\n| slide | phenotype (truth → read) | TIL fraction (truth / read) | composition MAE |")
    print("|---|---|---|---|")
    for c in cohort:
        r = tme.loc[c["slide_id"]]
        err = np.mean([abs(float(r[f"area_frac_{class_column(n)}"]) - c["truth"][f"frac_{n}"])
                       for n in class_names if n != "08_EMPTY"])
        rows.append({"slide_id": c["slide_id"], "truth": c["phenotype"], "read": str(r["immune_phenotype"]),
                     "til_truth": c["truth"]["til_fraction"], "til_read": float(r["til_fraction"]), "mae": err})
        print(f"| {c['slide_id']} | {c['phenotype']} → {r['immune_phenotype']} | "
              f"{c['truth']['til_fraction']:.3f} / {float(r['til_fraction']):.3f} | {err:.3f} |")
    ok = np.mean([x["truth"] == x["read"] for x in rows])
    til_err = np.mean([abs(x["til_truth"] - x["til_read"]) for x in rows])
    print(f"phenotype {ok * len(rows):.0f}/{len(rows)}; TIL fraction MAE {til_err:.3f}; composition MAE "
          f"{np.mean([x['mae'] for x in rows]):.3f}")
    return {"slides": rows, "phenotype_accuracy": float(ok), "til_mae": float(til_err),
            "composition_mae": float(np.mean([x["mae"] for x in rows]))}


def tile_run(run: Path, cohort: list[dict[str, Any]]) -> None:
    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.tiling.stage import run_tile

    summary = run_tile([c["path"] for c in cohort], run, TilingConfig(min_tissue=0.05).validate(), workers=0)
    if summary.failed:
        raise SystemExit(f"tiling failed: {summary.failed}")


def run_extract(run: Path, encoder: str, weights: str | None) -> None:
    """`wsi extract` of the RUN from scratch (``force``: a resumed extraction takes no time, which is not what the
    timing compares)."""
    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.extract import run_extract as _extract

    res = _extract(run, ExtractConfig(encoder=encoder, weights=weights, device="cpu", num_workers=0, force=True))
    if getattr(res, "failed", None):
        raise SystemExit(f"extraction failed: {res.failed}")


def truth_at(c: dict[str, Any], l0_xy: np.ndarray, slide_mpp: float) -> np.ndarray:
    """Truth class-map code (0 = glass, −1 = off the mosaic) at level-0 points of one slide."""
    from wsi_pipeline.synth.kather import KATHER_MPP

    px = np.asarray(l0_xy, np.float64) * slide_mpp / KATHER_MPP - np.asarray(c["offset_px"], np.float64)
    col, row = np.floor(px[:, 0] / c["cell_px"]).astype(int), np.floor(px[:, 1] / c["cell_px"]).astype(int)
    cm = c["class_map"]
    ok = (row >= 0) & (row < cm.shape[0]) & (col >= 0) & (col < cm.shape[1])
    out = np.full(len(px), -1, np.int64)
    out[ok] = cm[row[ok], col[ok]]
    return out


def map_points(layout: Any, sid: str, footprint: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Centres (level 0) and top classes of what the TME classified for one slide: dense map cells in the
    RUN tiles' area, or the classified grid cells."""
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.tme.dense import map_shape

    xy, probs, attrs = F.read_tme_h5(layout.tme_h5(sid))
    if footprint.startswith("dense"):
        dense = F.read_tme_dense(layout.tme_h5(sid))
        h, w = map_shape(dense)
        yy, xx = np.mgrid[0:h, 0:w]
        pts = np.stack([dense.origin_l0[0] + (xx + 0.5) * dense.cell_l0,
                        dense.origin_l0[1] + (yy + 0.5) * dense.cell_l0], axis=-1)
        return pts[dense.area], dense.probs[dense.area].argmax(1), float(attrs[F.A_SLIDE_MPP])
    return xy + float(attrs[F.A_PATCH_SIZE_L0]) / 2, probs.argmax(1), float(attrs[F.A_SLIDE_MPP])


def bootstrap(values: dict[str, np.ndarray], stat: Any, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of ``stat(values resampled over slides)``."""
    rng = np.random.default_rng(seed)
    m = len(next(iter(values.values())))
    out = []
    for _ in range(n):
        i = rng.integers(0, m, m)
        v = stat({k: a[i] for k, a in values.items()})
        if np.isfinite(v):
            out.append(v)
    return (float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))) if out else (np.nan, np.nan)


def _spearman(v: dict[str, np.ndarray]) -> float:
    from scipy.stats import spearmanr

    if np.ptp(v["pred"]) == 0 or np.ptp(v["true"]) == 0:
        return float("nan")
    return float(spearmanr(v["pred"], v["true"]).statistic)


def evaluate(run: Path, cohort: list[dict[str, Any]], class_names: list[str], footprint: str) -> dict[str, Any]:
    """Slide-level agreement of RUN/tme.csv with the truth, with bootstrap CIs, and the map's cell-level
    agreement with the truth class map."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.synth.kather import CLASS_FOLDERS
    from wsi_pipeline.tme.spatial import class_column

    layout = RunLayout(run)
    tme = F.read_tme_csv(layout.tme_csv).set_index("slide_id")
    ids = [c["slide_id"] for c in cohort]
    truth_til = np.array([c["truth"]["til_fraction"] for c in cohort])
    pred_til = tme.loc[ids, "til_fraction"].to_numpy(float)
    phen_true = np.array([c["phenotype"] for c in cohort])
    phen_pred = tme.loc[ids, "immune_phenotype"].astype(str).to_numpy()
    tissue_classes = [n for n in class_names if n != "08_EMPTY"]
    err = np.stack([np.abs(tme.loc[ids, f"area_frac_{class_column(n)}"].to_numpy(float)
                           - np.array([c["truth"][f"frac_{n}"] for c in cohort])) for n in tissue_classes], axis=1)
    ok = np.where(phen_true == NO_PHENOTYPE, np.nan, (phen_true == phen_pred).astype(float))
    v = {"pred": pred_til, "true": truth_til, "ok": ok, "err": err}
    labels = ["inflamed", "excluded", "desert", "not_evaluable"]
    out: dict[str, Any] = {
        "n_slides": len(cohort),
        "phenotype_accuracy": float(v["ok"].mean()),
        "phenotype_accuracy_ci": bootstrap(v, lambda s: float(s["ok"].mean())),
        "til_spearman": _spearman(v),
        "til_spearman_ci": bootstrap(v, _spearman),
        "til_mae": float(np.mean(np.abs(pred_til - truth_til))),
        "area_fraction_mae_mean": float(err.mean()),
        "area_fraction_mae_ci": bootstrap(v, lambda s: float(s["err"].mean())),
        "area_fraction_mae": {n: float(err[:, i].mean()) for i, n in enumerate(tissue_classes)},
        "phenotype_confusion": {"labels": labels,
                                "matrix": confusion_matrix(phen_true, phen_pred, labels=labels).tolist()
                                if np.isin(phen_true, labels).any() else []},
        "misread": [f"{s}: {t} → {p}" for s, t, p in zip(ids, phen_true, phen_pred, strict=True)
                    if t not in (p, NO_PHENOTYPE)],
        # mean read/true TIL fraction per true phenotype: where the read-out loses lymphocytes (a ranking across
        # phenotypes suffers when one phenotype's lymphocytes are read at a lower share than another's)
        "til_read_over_true": {ph: float(np.mean(pred_til[phen_true == ph]) / np.mean(truth_til[phen_true == ph]))
                               for ph in ("inflamed", "excluded", "desert") if np.any(phen_true == ph)},
    }
    clf_index = {n: i for i, n in enumerate(class_names)}
    yt, yp = [], []
    for c in cohort:
        pts, top, slide_mpp = map_points(layout, c["slide_id"], footprint)
        code = truth_at(c, pts, slide_mpp)
        keep = code > 0  # tissue cells of the truth (glass and off-mosaic left out)
        yt += [clf_index[CLASS_FOLDERS[k]] for k in code[keep]]
        yp += top[keep].tolist()
    out["map_balanced_accuracy"] = float(balanced_accuracy_score(yt, yp))
    cm = confusion_matrix(yt, yp, labels=list(range(len(class_names))))
    with np.errstate(invalid="ignore", divide="ignore"):
        out["map_recall"] = {n: float(cm[i, i] / cm[i].sum()) for i, n in enumerate(class_names) if cm[i].sum()}
    return out


def agreement(cohort: list[dict[str, Any]], run: Path, clf: Any, weights: str | None, n_slides: int,
              stain: str = "local") -> dict[str, Any]:
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.tme.dense import fcn_window_agreement
    from wsi_pipeline.tme.run import create_classifier_encoder

    enc = create_classifier_encoder(clf, weights, "cpu")
    rows = []
    for c in cohort[:n_slides]:
        tiles = F.read_tiles_h5(RunLayout(run).tiles_h5(c["slide_id"]))
        rows.append(fcn_window_agreement(str(c["path"]), tiles, enc, clf, n_windows=200, seed=0, stain=stain))
    n = sum(r["n_windows"] for r in rows)
    agg = {k: float(sum(r[k] * r["n_windows"] for r in rows) / n) for k in ("prob_mae", "tv_distance",
                                                                            "argmax_agreement")}
    return {**agg, "n_windows": n, "n_slides": len(rows), **{k: rows[0][k] for k in ("window_um", "read_um",
                                                                                      "cell_um", "stain")}}


def _ci(r: dict[str, Any], key: str) -> str:
    lo, hi = r[f"{key}_ci"]
    return f"[{lo:.3f}, {hi:.3f}]"


def _phenotype(r: dict[str, Any]) -> str:
    """Phenotype accuracy with its CI, or n/a (random layouts have no phenotype)."""
    if not np.isfinite(r["phenotype_accuracy"]):
        return "n/a"
    return f"{r['phenotype_accuracy']:.3f} {_ci(r, 'phenotype_accuracy')}"


def print_result(name: str, r: dict[str, Any]) -> None:
    print(f"\n== {name} ({r['n_slides']} held-out slides, wsi tme {r['seconds']:.0f} s)")
    print(f"immune-phenotype accuracy {_phenotype(r)}; "
          f"til_fraction Spearman {r['til_spearman']:.3f} {_ci(r, 'til_spearman')} (MAE {r['til_mae']:.3f}); "
          f"area-fraction MAE {r['area_fraction_mae_mean']:.3f} {_ci(r, 'area_fraction_mae')}")
    print("  per class: " + "  ".join(f"{k}={v:.3f}" for k, v in r["area_fraction_mae"].items()))
    print(f"  map vs truth classes: balanced accuracy {r['map_balanced_accuracy']:.3f}; recall "
          + "  ".join(f"{k}={v:.2f}" for k, v in r["map_recall"].items()))
    print("  TIL read / true, by true phenotype: "
          + "  ".join(f"{k}={v:.2f}" for k, v in r.get("til_read_over_true", {}).items()))
    if r["misread"]:
        print("  misread: " + "; ".join(r["misread"]))


CARD_BEGIN, CARD_END = "<!-- eval_tme:begin -->", "<!-- eval_tme:end -->"


def results_table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| mosaic cells | footprint | phenotype accuracy | til_fraction Spearman | area-fraction MAE | "
             "map bal. acc. | `wsi tme` s |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        cohort, footprint = name.split("/")
        lines.append(f"| {cohort} | {footprint} | {_phenotype(r)} | "
                     f"{r['til_spearman']:.3f} {_ci(r, 'til_spearman')} | {r['area_fraction_mae_mean']:.3f} "
                     f"{_ci(r, 'area_fraction_mae')} | {r['map_balanced_accuracy']:.3f} | {r['seconds']:.0f} |")
    return lines


def card_section(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown summary of the mosaic evaluation, for the classifier's model card."""
    n, grid = meta["n_slides"], meta["grid"]
    lines = [CARD_BEGIN, "## Held-out mosaic evaluation (`scripts/eval_tme.py`)",
             f"{n} mosaic slides per cohort of {grid[0]}×{grid[1]} kather16 tiles (one third per immune phenotype), "
             "built from the held-out source images only. `aligned`: 150-px cells from the slide corner; "
             f"`misaligned`: the same mosaics with cells of {CELL_RANGE[0]}–{CELL_RANGE[1]} px (drawn per slide) "
             "shifted by a random offset; `random` (when evaluated): placed as misaligned, with random layouts "
             "instead of the generator's (no nests, bands or phenotypes; every class about as frequent). "
             "`wsi tile` (224 px at 0.5 µm/px) → `wsi tme` with every other default (band 200 µm). 95 % bootstrap "
             "CIs over slides. Figures are computed, not typed: rerun the script to refresh them.", "", *results_table(results), ""]
    lines += ["Per-class area-fraction MAE (fractions of tissue):", ""]
    for name, r in results.items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["area_fraction_mae"].items()))
    lines += ["", "Mean TIL fraction read over the true one, by true phenotype (the lymphocytes a read-out loses):",
              ""]
    for name, r in results.items():
        if r.get("til_read_over_true"):
            lines.append(f"- {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["til_read_over_true"].items()))
    if meta.get("agreement"):
        a = meta["agreement"]
        lines += ["", f"Fully convolutional windows against the same windows classified one by one "
                  f"({a['n_windows']} windows on {a['n_slides']} misaligned slides; {a['window_um']:.0f}-µm "
                  f"windows of {a['cell_um']:.0f}-µm cells, read as {a['read_um']:.0f}-µm tiles): probability "
                  f"MAE {a['prob_mae']:.3f}, total-variation distance {a['tv_distance']:.3f}, same top class for "
                  f"{100 * a['argmax_agreement']:.0f}% of windows (the encoder's per-tile stain standardisation "
                  "sliding with each pixel over one field of view)."]
        others = [(k.removeprefix("agreement_stain_"), v) for k, v in meta.items() if k.startswith("agreement_stain_")]
        if others:
            lines[-1] += " Standardised instead " + "; ".join(
                f"{'once per region' if k == 'region' else 'not at all'}: MAE {v['prob_mae']:.3f}, same top class "
                f"{100 * v['argmax_agreement']:.0f}%" for k, v in others) + "."
    if meta.get("extract_seconds"):
        lines += ["", "`wsi extract` (same RUN, default encoder, CPU) took "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in meta["extract_seconds"].items()) + "."]
    lines += ["", "`grid`: one class per 74-µm cell of the TME's own grid anchored at the tiles' corner; `dense`: "
              "overlapping windows of the classifier's field of view, one per 16-µm map cell, combined into a "
              "class-probability map (`wsi_pipeline.tme.dense`), its composition read through the classifier's map "
              "refinement when it has one (`wsi_pipeline.tme.refine`); `dense-raw`: the composition from the same "
              "window map with the classifier's global area correction (`--no-map-refinement`). `wsi tme --footprint auto` uses `dense` only for a "
              "classifier trained on context windows whose classifier.json records this evaluation (`--record`) "
              "with `dense` at least as good as `grid` on the misaligned mosaics; otherwise `grid`.", CARD_END]
    return "\n".join(lines) + "\n"


def update_card(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        text = head + section + rest.split(CARD_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def record_footprint_eval(clf: Any, results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Write the misaligned grid-against-dense figures into the classifier's classifier.json
    (``metrics.footprint_eval``, with the checksum of its weights): ``wsi tme --footprint auto`` uses the dense
    map only for a context-trained classifier that was at least as good as grid there
    (``wsi_pipeline.tme.run.dense_validated``)."""
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.tme.classifier import CLASSIFIER_JSON
    from wsi_pipeline.tme.run import FOOTPRINT_EVAL, dense_validated

    names = {f: f"misaligned/{f}" for f in ("grid", "dense")}
    missing = [k for k in names.values() if k not in results]
    if missing:
        raise SystemExit(f"--record needs the misaligned cohort with both footprints (missing {missing})")
    rec: dict[str, Any] = {"cohort": "misaligned", "n_slides": meta["n_slides"], "grid_cells": meta.get("grid"),
                           "seed": meta.get("seed"), "classifier_sha256": clf.weights_sha256,
                           "map_refinement": clf.has_map_refinement}
    for f, k in names.items():
        r = results[k]
        rec[f] = {"phenotype_accuracy": r["phenotype_accuracy"], "phenotype_accuracy_ci": r["phenotype_accuracy_ci"],
                  "til_spearman": r["til_spearman"], "til_spearman_ci": r["til_spearman_ci"],
                  "area_fraction_mae": r["area_fraction_mae_mean"], "area_fraction_mae_ci": r["area_fraction_mae_ci"],
                  "seconds": r.get("seconds")}
    clf.metrics[FOOTPRINT_EVAL] = rec
    F.write_classifier_json(Path(clf.path) / CLASSIFIER_JSON, clf.to_json())
    ok, why = dense_validated(clf)
    print(f"recorded in {Path(clf.path) / CLASSIFIER_JSON}: --footprint auto → {'dense' if ok else 'grid'} ({why})")
    return rec


def run_cohort(args: argparse.Namespace, clf: Any, cohort_name: str, cohort: list[dict[str, Any]],
               results: dict[str, Any], meta: dict[str, Any]) -> None:
    from wsi_pipeline.tme.config import SpatialConfig, TMEConfig
    from wsi_pipeline.tme.run import run_tme

    run = Path(args.out) / f"run-{cohort_name}"
    tile_run(run, cohort)
    if args.extract:
        t0 = time.perf_counter()
        run_extract(run, clf.encoder, args.encoder_weights)
        meta.setdefault("extract_seconds", {})[cohort_name] = time.perf_counter() - t0
    for footprint in args.footprints:
        cfg = TMEConfig(classifier=clf.path, encoder_weights=args.encoder_weights, device="cpu",
                        spatial=SpatialConfig(band_um=args.band_um), footprint=footprint.removesuffix("-raw"),
                        overwrite=True, precision=args.precision, map_refinement=footprint != "dense-raw")
        t0 = time.perf_counter()
        summary = run_tme(run, cfg)
        seconds = time.perf_counter() - t0
        if summary.failed:
            raise SystemExit(f"tme failed on {len(summary.failed)} slides, e.g. {summary.failed[:2]}")
        r = evaluate(run, cohort, clf.class_names, footprint)
        r["seconds"] = seconds
        results[f"{cohort_name}/{footprint}"] = r
        print_result(f"{cohort_name}/{footprint}", r)
    if args.agreement and cohort_name == args.cohorts[-1]:
        meta["agreement"] = agreement(cohort, run, clf, args.encoder_weights, args.agreement)
        print(f"\nFCN vs per-window: {meta['agreement']}")
        for stain in args.stain_modes:  # the other ways to apply the encoder's per-tile stain standardisation
            meta[f"agreement_stain_{stain}"] = agreement(cohort, run, clf, args.encoder_weights, args.agreement, stain)
            print(f"FCN (stain {stain}) vs per-window: {meta[f'agreement_stain_{stain}']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "runs" / "eval-tme"))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--classifier", default="", help="classifier folder (default: the shipped one)")
    ap.add_argument("--encoder-weights", default=None)
    ap.add_argument("--n-slides", type=int, default=30)
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"),
                    help="autocast of `wsi tme`'s encoder (default bf16, its default)")
    ap.add_argument("--grid", type=int, nargs=2, default=(16, 20), metavar=("ROWS", "COLS"))
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--band-um", type=float, default=200.0)
    ap.add_argument("--cohorts", nargs="+", default=list(DEFAULT_COHORTS), choices=COHORTS)
    ap.add_argument("--footprints", nargs="+", default=list(FOOTPRINTS), choices=FOOTPRINTS)
    ap.add_argument("--extract", action="store_true", help="also time `wsi extract` on each cohort's RUN")
    ap.add_argument("--agreement", type=int, default=0, metavar="N",
                    help="check FCN windows against per-window classification on N slides of the last cohort")
    ap.add_argument("--stain-modes", nargs="*", default=[], choices=("region", "none"),
                    help="with --agreement: also check FCN windows with the stain standardisation per region / off")
    ap.add_argument("--samples", default=None, metavar="DIR",
                    help="instead: read the slides of DIR (e.g. data_samples) and compare with DIR/truth/*.npz")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    ap.add_argument("--card", default=None, help="update the evaluation section of this model card (README.md)")
    ap.add_argument("--record", action="store_true",
                    help="write the misaligned grid/dense figures into the classifier's classifier.json (what "
                         "`wsi tme --footprint auto` decides on)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")

    from wsi_pipeline.tme.classifier import load_classifier

    clf = load_classifier(args.classifier or None)
    if args.samples:
        cohort = samples_cohort(Path(args.samples))
        results: dict[str, Any] = {}
        meta: dict[str, Any] = {"classifier": clf.path, "samples": args.samples}
        args.cohorts = ["samples"]
        run_cohort(args, clf, "samples", cohort, results, meta)
        meta["samples_table"] = print_samples(Path(args.out) / "run-samples", cohort, clf.class_names)
        if args.json:
            Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=2))
        return 0
    pools, train_sources, train_files = held_out_pools(Path(args.data), clf)
    print(f"classifier {clf.path} (encoder {clf.encoder}, {clf.mpp:g} µm/px); held-out pools: "
          + ", ".join(f"{k}={len(v)}" for k, v in pools.items()))
    results: dict[str, Any] = {}
    meta: dict[str, Any] = {"classifier": clf.path, "grid": list(args.grid), "n_slides": args.n_slides,
                            "seed": args.seed}
    for name in args.cohorts:
        t0 = time.perf_counter()
        cohort = build_cohort(Path(args.out), name, pools, (train_sources, train_files), args.n_slides,
                              tuple(args.grid), args.seed)
        print(f"{name}: {len(cohort)} mosaic slides of {args.grid[0]}×{args.grid[1]} cells in "
              f"{time.perf_counter() - t0:.0f} s (held-out sources checked)")
        run_cohort(args, clf, name, cohort, results, meta)
    print("\n" + "\n".join(results_table(results)))
    if args.record:
        meta["footprint_eval"] = record_footprint_eval(clf, results, meta)
    if args.card:
        update_card(Path(args.card), card_section(results, meta))
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
