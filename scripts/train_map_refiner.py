"""Fit the map refinement of a tissue classifier (``wsi_pipeline.tme.refine``) and store it in the classifier
folder (``model.safetensors`` tensors ``refine.*``, ``classifier.json`` ``map_refinement``).

1. Mosaic slides of the classifier's **training** tiles (``eval_tme.training_pools``: its training source
   images only; the held-out mosaics of ``scripts/eval_tme.py`` use the other sources), laid out by the
   project's layout generator (``synth.layout.make_class_map``, kather mosaic parameters, one third per immune
   phenotype) and placed as the evaluation's ``misaligned`` cohort does (cells of 140–160 px, random origin),
   with their own seed; and ``--random-slides`` more with random layouts (``eval_tme.random_class_map``: no
   nests, bands or phenotypes, every class about as frequent), placed the same way.
2. ``wsi tile`` with every default, then ``wsi tme --footprint dense --no-map-refinement``: the window maps
   exactly as `wsi tme` computes them. With ``--cross-fit K`` (what the shipped refinement uses) the maps are
   not read by the classifier itself, which has seen every one of these tiles and reads them almost perfectly,
   but by K fold classifiers (:func:`wsi_pipeline.tme.train.source_fold_classifiers`: the classifier's recipe
   refit without one fold of its training sources), each reading mosaics of the tiles it left out: the
   refinement then learns how the classifier reads source images it never saw, which is how it meets every
   user's slide (stacking, as in cross-fitted calibration).
3. The true class fractions of every map cell (4 × 4 points per cell against the mosaic's class map).
4. The refinement is fitted on ``1 − --val-fraction`` of the slides of both kinds and checked on the rest of
   each (slide-level TIL fraction Spearman and composition MAE: the window map with the classifier's area
   correction against the refined map); what is stored is that fit, with the figures. ``--members 3`` (the
   default) fits 3 networks alike with seeds ``--seed``, ``--seed`` + 1, … and stores their ensemble (the
   normalised geometric mean of their class fractions): one fit's held-out TIL ranking moves by about ±0.03
   between seeds, the ensemble's figures do not hang on one of them.

    nice python scripts/train_map_refiner.py --out /tmp/refiner            # --cross-fit 4 (default)
    nice python scripts/eval_tme.py --out /tmp/eval --record   # then re-evaluate on the held-out mosaics

The refinement learns the tissue architecture and class frequencies of the layouts it is fitted on as well as
the classifier's local confusions: fitted on the generator's layouts alone it read random layouts worse than the
window map with the area correction (`eval_tme.py --cohorts random`), hence the random layouts beside them. It
is recorded as fitted on them (``fitted_on``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_tme as E

REPO = Path(__file__).resolve().parents[1]


def cell_truth(c: dict[str, Any], dense: Any, slide_mpp: float, class_names: list[str], ss: int = 4) -> np.ndarray:
    """H×W×C true class fractions of the dense map's cells (``ss`` × ``ss`` points per cell; glass and points
    off the mosaic count as 08_EMPTY)."""
    from wsi_pipeline.synth.kather import CLASS_FOLDERS

    h, w = dense.probs.shape[:2]
    yy, xx = np.mgrid[0:h * ss, 0:w * ss]
    pts = np.stack([dense.origin_l0[0] + (xx.ravel() + 0.5) / ss * dense.cell_l0,
                    dense.origin_l0[1] + (yy.ravel() + 0.5) / ss * dense.cell_l0], axis=1)
    code = np.maximum(E.truth_at(c, pts, slide_mpp), 0).reshape(h * ss, w * ss)
    to_clf = np.array([class_names.index(n) for n in CLASS_FOLDERS])
    onehot = np.eye(len(class_names), dtype=np.float32)[to_clf[code]]
    return onehot.reshape(h, ss, w, ss, len(class_names)).mean(axis=(1, 3))


def map_geometry(run: Path, cohort: list[dict[str, Any]]) -> dict[str, Any]:
    """The dense maps' cell, window and method (one geometry for all: the refinement is fitted on it)."""
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout

    geos = set()
    for c in cohort:
        d = F.read_tme_dense(RunLayout(run).tme_h5(c["slide_id"]))
        if d is not None:
            geos.add((round(d.cell_um, 3), round(d.window_um, 3), d.method))
    if len(geos) != 1:
        raise SystemExit(f"the training maps do not share one geometry: {sorted(geos)}")
    cell_um, window_um, method = geos.pop()
    return {"map_cell_um": cell_um, "window_um": window_um, "method": method}


def examples(run: Path, cohort: list[dict[str, Any]], class_names: list[str]) -> list[Any]:
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.tme.refine import RefinerExample

    layout = RunLayout(run)
    out = []
    for c in cohort:
        path = layout.tme_h5(c["slide_id"])
        dense = F.read_tme_dense(path)
        if dense is None:
            raise SystemExit(f"{path}: no dense map")
        mpp = float(F.read_h5_attrs(path)[F.A_SLIDE_MPP])
        out.append(RefinerExample(dense.probs, dense.area, cell_truth(c, dense, mpp, class_names)))
    return out


def slide_figures(clf: Any, exs: list[Any], cohort: list[dict[str, Any]], refined: bool) -> dict[str, float]:
    """TIL fraction Spearman, composition MAE and phenotype accuracy of ``exs`` read as `wsi tme` reads a dense
    map (the composition from the refined map, or from the window map with the area correction; the phenotype
    from the window map either way). With ``refined``, also the phenotype read from the refined map itself
    (``refined_map_phenotype_accuracy``: why `wsi tme` keeps the window map's)."""
    from scipy.stats import spearmanr

    from wsi_pipeline.tme.config import TMEConfig
    from wsi_pipeline.tme.rules import immune_phenotype
    from wsi_pipeline.tme.spatial import class_column, map_metrics

    cfg = TMEConfig()
    roles = cfg.roles.resolve(clf.class_names)
    tissue = [n for n in clf.class_names if n != "08_EMPTY"]
    til, true_til, err, ok, ok_refined = [], [], [], [], []
    for ex, c in zip(exs, cohort, strict=True):
        ref = clf.refine_map(ex.probs, ex.area) if refined else None
        met, _ = map_metrics(ex.probs, ex.area, clf.class_names, roles, 16.0, clf.tile_um, cfg.spatial,
                             None if refined else clf.correct_areas, refined=ref)
        til.append(met["til_fraction"])
        true_til.append(c["truth"]["til_fraction"])
        err.append(np.mean([abs(met[f"area_frac_{class_column(n)}"] - c["truth"][f"frac_{n}"]) for n in tissue]))
        if c["phenotype"] == E.NO_PHENOTYPE:  # a random layout: no phenotype to read
            continue
        ok.append(immune_phenotype(met, cfg.rules)[0] == c["phenotype"])
        if ref is not None:
            met_ref, _ = map_metrics(ref, ex.area, clf.class_names, roles, 16.0, clf.tile_um, cfg.spatial)
            ok_refined.append(immune_phenotype(met_ref, cfg.rules)[0] == c["phenotype"])
    out = {"til_spearman": float(spearmanr(til, true_til).statistic), "area_fraction_mae": float(np.mean(err))}
    if ok:
        out["phenotype_accuracy"] = float(np.mean(ok))
    if ok_refined:
        out["refined_map_phenotype_accuracy"] = float(np.mean(ok_refined))
    return out


def window_maps(args: argparse.Namespace, clf: Any, pools: dict[str, list[str]], cohort_name: str, n: int,
                seed: int, out: Path) -> tuple[list[dict[str, Any]], list[Any], Path]:
    """``n`` mosaics of ``cohort_name`` (``misaligned``: the generator's layouts; ``random``: random layouts, both
    placed as the misaligned cohort) under ``out``, tiled and read by `wsi tme --footprint dense
    --no-map-refinement` with ``clf``; and their RUN."""
    from wsi_pipeline.tme.config import TMEConfig
    from wsi_pipeline.tme.run import run_tme

    cohort = E.build_cohort(out, cohort_name, pools, (set(), set()), n, tuple(args.grid), seed)
    run = out / ("run" if cohort_name == "misaligned" else f"run-{cohort_name}")
    E.tile_run(run, cohort)
    summary = run_tme(run, TMEConfig(classifier=clf.path, device="cpu", footprint="dense", map_refinement=False,
                                     overwrite=args.overwrite))
    if summary.failed:
        raise SystemExit(f"tme failed: {summary.failed[:3]}")
    return cohort, examples(run, cohort, clf.class_names), run


def fold_classifiers(args: argparse.Namespace, clf: Any) -> list[Any]:
    """The classifier's recipe refit ``--cross-fit`` times, each without one fold of its training sources
    (:func:`wsi_pipeline.tme.train.source_fold_classifiers`; kept in ``--out``/folds and reused)."""
    from wsi_pipeline.config import from_dict
    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.config import TissueTrainConfig
    from wsi_pipeline.tme.train import source_fold_classifiers

    folder = Path(args.out) / "folds"
    paths = [folder / f"fold-{k}" for k in range(args.cross_fit)]
    if all((p / "classifier.json").exists() for p in paths):
        return [load_classifier(p) for p in paths]
    conf = dict(clf.training["config"])
    conf["context_grid"] = tuple(conf["context_grid"])
    cfg = from_dict(TissueTrainConfig, {**conf, "out": str(folder), "data": args.data,
                                        "feature_cache": str(Path(args.out) / "features")})
    t0 = time.perf_counter()
    source_fold_classifiers(cfg, args.cross_fit)
    print(f"{args.cross_fit} fold classifiers in {time.perf_counter() - t0:.0f} s")
    return [load_classifier(p) for p in paths]


def fold_pools(data: Path, fold_clf: Any) -> dict[str, list[str]]:
    """Tile paths per class of the training tiles ``fold_clf`` left out."""
    cf = fold_clf.training["cross_fit"]
    return E.pools_of(data, set(cf["held_out_sources"]), set(cf["held_out_files"]))


def all_window_maps(args: argparse.Namespace, clf: Any) -> tuple[list[Any], list[Any], list[Any], list[Any], Path]:
    """(generator-layout cohort, its examples, random-layout cohort, its examples, a RUN of the first kind): read
    by ``clf`` itself from mosaics of its training tiles, or, with ``--cross-fit K``, by K fold classifiers, each
    from mosaics of the tiles it left out."""
    out = Path(args.out)
    if not args.cross_fit:
        parts = [(clf, E.training_pools(Path(args.data), clf), out, args.n_slides, args.random_slides, 0)]
    else:
        folds = fold_classifiers(args, clf)
        k = len(folds)
        parts = [(f, fold_pools(Path(args.data), f), out / f"fold-{i}", args.n_slides // k, args.random_slides // k,
                  100 * (i + 1)) for i, f in enumerate(folds)]
    cohort, exs, rcohort, rexs, run = [], [], [], [], None
    for reader, pools, where, n, n_random, shift in parts:
        c, e, r = window_maps(args, reader, pools, "misaligned", n, args.seed + shift, where)
        cohort += c
        exs += e
        run = run or r
        if n_random:
            c, e, _ = window_maps(args, reader, pools, "random", n_random, args.seed + 1 + shift, where)
            rcohort += c
            rexs += e
    return cohort, exs, rcohort, rexs, run


def split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(validation, fit) indices."""
    n_val = round(fraction * n)
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[:n_val]), sorted(order[n_val:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classifier", default=str(REPO / "models" / "wsip-tissue-kather16"))
    ap.add_argument("--data", default=str(E.DATA))
    ap.add_argument("--out", default=str(REPO / "runs" / "map-refiner"), help="mosaics and RUN (not the repo)")
    ap.add_argument("--n-slides", type=int, default=240, help="mosaics laid out by the generator")
    ap.add_argument("--random-slides", type=int, default=120,
                    help="mosaics with random layouts, fitted on too (a refinement fitted on the generator's layouts "
                         "alone learns their class frequencies and architecture: it then misreads other layouts)")
    ap.add_argument("--grid", type=int, nargs=2, default=(16, 20), metavar=("ROWS", "COLS"))
    ap.add_argument("--seed", type=int, default=777, help="mosaics (the evaluation uses 2024)")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--members", type=int, default=3,
                    help="networks fitted alike with seeds --seed, --seed + 1, …; the refinement is their normalised "
                         "geometric mean (RefinerSpec.members: one fit's held-out TIL Spearman moves by about ±0.03 "
                         "between seeds)")
    ap.add_argument("--overwrite", action="store_true", help="recompute the window maps of an existing --out")
    ap.add_argument("--cross-fit", type=int, default=4, metavar="K",
                    help="read the training mosaics with K fold classifiers, each refit without the source images "
                         "its mosaics are made of (so the refinement learns how the classifier reads sources it "
                         "never saw); 0: with the classifier itself")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--dilations", type=int, nargs="+", default=(1, 2, 4, 1))
    ap.add_argument("--global-context", action="store_true",
                    help="also give every cell the slide's mean window probabilities (RefinerSpec.global_context)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")

    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.refine import STATE_PREFIX, RefinerSpec, fit_refiner

    clf = load_classifier(args.classifier)
    t0 = time.perf_counter()
    cohort, exs, rcohort, rexs, run = all_window_maps(args, clf)
    print(f"{len(exs)} + {len(rexs)} (random layouts) training mosaics and their window maps in "
          f"{time.perf_counter() - t0:.0f} s")
    val, fit = split(len(exs), args.val_fraction, args.seed)
    rval, rfit = split(len(rexs), args.val_fraction, args.seed + 1)
    spec = RefinerSpec(hidden=args.hidden, dilations=tuple(args.dilations), epochs=args.epochs, seed=args.seed,
                       global_context=args.global_context, members=args.members)
    t0 = time.perf_counter()
    state, training = fit_refiner([exs[i] for i in fit] + [rexs[i] for i in rfit], spec)
    training["seconds"] = time.perf_counter() - t0
    clf.state = {k: v for k, v in clf.state.items() if not k.startswith(STATE_PREFIX)} | state
    clf.map_refinement = {
        "architecture": spec.to_json(),
        "fitted_on": {"mosaics": len(fit) + len(rfit), "generator_layouts": len(fit), "random_layouts": len(rfit),
                      "grid_cells": list(args.grid), "seed": args.seed,
                      "layout": "wsi_pipeline.synth.layout.make_class_map (synth.kather.KATHER_LAYOUT), one third "
                                "per immune phenotype; and random layouts (scripts/eval_tme.py random_class_map)",
                      "cell_px": list(E.CELL_RANGE), "tiles": "the classifier's training sources only",
                      "read_by": (f"cross-fitted: {args.cross_fit} fold classifiers (the classifier's recipe "
                                  "refit without one fold of its training sources), each reading mosaics of the "
                                  "tiles it left out" if args.cross_fit else "the classifier itself"),
                      "script": "scripts/train_map_refiner.py", **map_geometry(run, cohort)},
        "training": training,
    }
    validation = {}
    for key, cs, es, idx in (("validation", cohort, exs, val), ("validation_random_layouts", rcohort, rexs, rval)):
        if idx:
            vc, ve = [cs[i] for i in idx], [es[i] for i in idx]
            validation[key] = {"mosaics": len(idx), "window_map": slide_figures(clf, ve, vc, refined=False),
                               "refined": slide_figures(clf, ve, vc, refined=True)}
            print(f"{key} ({len(idx)} training-source mosaics not fitted on): {validation[key]}")
    if "validation" in validation:
        validation["validation"]["note"] = ("phenotype from the window map in both rows, as wsi tme reads it "
                                            "(refined_map_phenotype_accuracy: read from the refined map itself)")
    clf.map_refinement.update(validation)
    clf.save(clf.path)
    print(f"stored the map refinement in {clf.path} (fit {training['seconds']:.0f} s; soft CE "
          f"{training['loss_unrefined']:.4f} unrefined → {training['loss_last_epoch']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
