"""Evaluate `wsi tme` on a held-out cohort of kather16 mosaic slides with known class maps.

1. Mosaic slides (150-px kather16 tiles at 0.495 µm/px laid out by `synth.layout.make_class_map`, one third
   of each immune phenotype) from the **test** tiles of the source split the classifier was trained with
   (`wsi_pipeline.tiles.split.source_split`, seed and fraction read from the classifier): no tile comes from a
   source image the classifier (or the demo encoder) was trained on — checked before anything runs.
2. `wsi tile` → (`wsi extract`) → `wsi tme`, in one or both tilings:
   * ``aligned``: tiles of 150 px at 0.495 µm/px, one per mosaic cell. The RUN features would be at
     0.33 µm/px for a 224-px encoder input, so `wsi tme` reads each tile at the classifier's 0.5 µm/px
     from the slide (no extraction needed).
   * ``default``: the pipeline's default 224 px at 0.5 µm/px, `wsi extract` with the classifier's encoder,
     and `wsi tme` reuses those features (same encoder, weights and µm/px). Tiles straddle mosaic cells.
3. Prints, per tiling: `til_fraction` Spearman vs the truth, immune-phenotype accuracy (and confusion),
   per-class area-fraction MAE (fractions of tissue), and (aligned) the tile-level balanced accuracy.

    nice python scripts/eval_tme.py --out runs/eval-tme                  # 30 slides of 16×20 tiles
    nice python scripts/eval_tme.py --out /tmp/e --n-slides 6 --grid 10 12 --tilings aligned   # quick

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


def build_cohort(out: Path, pools: dict[str, list[str]], seen: tuple[set[str], set[str]], n: int,
                 grid: tuple[int, int], seed: int) -> list[dict[str, Any]]:
    """Mosaic slides + truth; refuses any tile from a training source (or a training file)."""
    from wsi_pipeline.formats import atomic_path
    from wsi_pipeline.synth.kather import (
        KATHER_LAYOUT,
        KATHER_MPP,
        compose_mosaic,
        mosaic_truth,
    )
    from wsi_pipeline.synth.layout import PHENOTYPES, make_class_map
    from wsi_pipeline.synth.pyramid import array_painter, write_pyramid_tiff
    from wsi_pipeline.tiles.folders import parse_source_id

    slides_dir = out / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cohort = []
    for i in range(n):
        sid = f"heldout-{i + 1:03d}"
        phenotype = PHENOTYPES[i % 3]
        cm = make_class_map(grid, phenotype, rng, KATHER_LAYOUT)
        img, used = compose_mosaic(cm, pools, rng)
        for name in used.ravel():
            if parse_source_id(name) in seen[0] or name in seen[1]:
                raise SystemExit(f"{name}: seen by the classifier in training — the cohort would not be held out")
        path = slides_dir / f"{sid}.svs"
        if not path.exists():
            with atomic_path(path) as tmp:
                write_pyramid_tiff(tmp, array_painter(img), (img.shape[1], img.shape[0]), KATHER_MPP, (1, 4, 16),
                                   quality=90)
        truth = mosaic_truth(cm)
        with atomic_path(out / "truth" / f"{sid}.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, class_map=cm, tiles=used.astype(str), immune_phenotype=np.array(phenotype),
                                **{k: np.asarray(v) for k, v in truth.items()})
        cohort.append({"slide_id": sid, "path": path, "phenotype": phenotype, "class_map": cm, "truth": truth})
    return cohort


def tile_run(run: Path, cohort: list[dict[str, Any]], target_mpp: float, tile_size: int) -> None:
    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.tiling.stage import run_tile

    cfg = TilingConfig(target_mpp=target_mpp, tile_size=tile_size, min_tissue=0.05).validate()
    summary = run_tile([c["path"] for c in cohort], run, cfg, workers=0)
    if summary.failed:
        raise SystemExit(f"tiling failed: {summary.failed}")


def run_extract(run: Path, encoder: str, weights: str | None) -> None:
    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.extract import run_extract as _extract

    cfg = ExtractConfig(encoder=encoder, weights=weights, device="cpu", precision="fp32", num_workers=0)
    res = _extract(run, cfg)
    if getattr(res, "failed", None):
        raise SystemExit(f"extraction failed: {res.failed}")


def covered_truth(class_map: np.ndarray, l0_xy: np.ndarray, tile_size_l0: float, cell_l0: float) -> dict[str, float]:
    """Truth over the mosaic cells whose centre lies in a tile (what the TME stage could see): the tiler's
    tissue detection drops some cells, and this separates that from the read-out's own error."""
    from wsi_pipeline.synth.kather import CLASS_FOLDERS

    rows, cols = class_map.shape
    covered = np.zeros(class_map.shape, bool)
    for x, y in l0_xy:
        c0, c1 = int(np.ceil(x / cell_l0 - 0.5)), int(np.floor((x + tile_size_l0) / cell_l0 - 0.5))
        r0, r1 = int(np.ceil(y / cell_l0 - 0.5)), int(np.floor((y + tile_size_l0) / cell_l0 - 0.5))
        covered[max(0, r0) : min(rows, r1 + 1), max(0, c0) : min(cols, c1 + 1)] = True
    seen = class_map[covered & (class_map != 0)]
    counts = np.bincount(seen.astype(np.int64), minlength=len(CLASS_FOLDERS))
    n = max(1, int(counts.sum()))
    out = {f"frac_{name}": counts[code] / n for code, name in enumerate(CLASS_FOLDERS) if code}
    out["til_fraction"] = out["frac_04_LYMPHO"]
    return out


def evaluate(run: Path, cohort: list[dict[str, Any]], class_names: list[str], aligned: bool) -> dict[str, Any]:
    """Slide-level agreement of RUN/tme.csv with the truth (and tile-level for aligned tiles)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    from wsi_pipeline import formats as F
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.synth.kather import CLASS_FOLDERS, KATHER_MPP, KATHER_TILE_PX
    from wsi_pipeline.tme.spatial import class_column

    layout = RunLayout(run)
    tme = F.read_tme_csv(layout.tme_csv).set_index("slide_id")
    seen = []
    for c in cohort:
        xy, _, attrs = F.read_tme_h5(layout.tme_h5(c["slide_id"]))
        cell_l0 = KATHER_TILE_PX * KATHER_MPP / float(attrs[F.A_SLIDE_MPP])
        seen.append(covered_truth(c["class_map"], xy, float(attrs[F.A_PATCH_SIZE_L0]), cell_l0))
    truth_til = np.array([c["truth"]["til_fraction"] for c in cohort])
    pred_til = np.array([tme.loc[c["slide_id"], "til_fraction"] for c in cohort])
    pred_soft = np.array([tme.loc[c["slide_id"], "til_fraction_soft"] for c in cohort])
    phen_true = [c["phenotype"] for c in cohort]
    phen_pred = [tme.loc[c["slide_id"], "immune_phenotype"] for c in cohort]
    labels = ["inflamed", "excluded", "desert", "not_evaluable"]
    out: dict[str, Any] = {
        "n_slides": len(cohort),
        "class_names": list(class_names),
        "til_spearman": float(spearmanr(pred_til, truth_til).statistic),
        "til_mae": float(np.mean(np.abs(pred_til - truth_til))),
        "til_soft_spearman": float(spearmanr(pred_soft, truth_til).statistic),
        "til_soft_mae": float(np.mean(np.abs(pred_soft - truth_til))),
        "phenotype_accuracy": float(np.mean([a == b for a, b in zip(phen_true, phen_pred, strict=True)])),
        "phenotype_confusion": {"labels": labels,
                                "matrix": confusion_matrix(phen_true, phen_pred, labels=labels).tolist()},
    }
    seen_til = np.array([t["til_fraction"] for t in seen])
    out["til_spearman_vs_tiled_truth"] = float(spearmanr(pred_til, seen_til).statistic)
    mae, mae_seen = {}, {}
    for name in class_names:
        if name == "08_EMPTY":
            continue
        col = f"area_frac_{class_column(name)}"
        pred = np.array([tme.loc[c["slide_id"], col] for c in cohort])
        true = np.array([c["truth"][f"frac_{name}"] for c in cohort])
        mae[name] = float(np.mean(np.abs(pred - true)))
        mae_seen[name] = float(np.mean(np.abs(pred - np.array([t[f"frac_{name}"] for t in seen]))))
    out["area_fraction_mae"] = mae
    out["area_fraction_mae_mean"] = float(np.mean(list(mae.values())))
    out["area_fraction_mae_vs_tiled_truth"] = mae_seen
    out["area_fraction_mae_vs_tiled_truth_mean"] = float(np.mean(list(mae_seen.values())))
    if aligned:  # every tile is one mosaic cell: tile-level agreement
        yt, yp = [], []
        n_tissue_cells = n_tissue_tiled = 0
        cells = np.zeros(len(CLASS_FOLDERS), np.int64)
        tiled = np.zeros(len(CLASS_FOLDERS), np.int64)
        clf_index = {n: i for i, n in enumerate(class_names)}
        for c in cohort:
            xy, probs, attrs = F.read_tme_h5(layout.tme_h5(c["slide_id"]))
            step = KATHER_TILE_PX * KATHER_MPP / float(attrs[F.A_SLIDE_MPP])
            rows, cols = np.rint(xy[:, 1] / step).astype(int), np.rint(xy[:, 0] / step).astype(int)
            yt += [clf_index[CLASS_FOLDERS[int(k)]] for k in c["class_map"][rows, cols]]
            n_tissue_cells += int((c["class_map"] != 0).sum())
            n_tissue_tiled += int((c["class_map"][rows, cols] != 0).sum())
            cells += np.bincount(c["class_map"].ravel().astype(np.int64), minlength=len(CLASS_FOLDERS))
            tiled += np.bincount(c["class_map"][rows, cols].astype(np.int64), minlength=len(CLASS_FOLDERS))
            yp += probs.argmax(1).tolist()
        out["tile_balanced_accuracy"] = float(balanced_accuracy_score(yt, yp))
        out["tile_confusion"] = confusion_matrix(yt, yp, labels=list(range(len(class_names)))).tolist()
        out["n_tiles"] = len(yt)
        out["tissue_cells_tiled"] = n_tissue_tiled / max(1, n_tissue_cells)
        # share of the mosaic cells of each class that the tiler kept (08_EMPTY: background glass)
        out["cells_tiled_by_class"] = {name: float(tiled[k] / cells[k]) for k, name in enumerate(CLASS_FOLDERS)
                                       if cells[k]}
    return out


def print_result(name: str, r: dict[str, Any], seconds: float) -> None:
    print(f"\n== tiling: {name} ({r['n_slides']} held-out slides, {seconds:.0f} s)")
    print(f"til_fraction Spearman vs truth: {r['til_spearman']:.3f}   (MAE {r['til_mae']:.3f}); "
          f"til_fraction_soft: {r['til_soft_spearman']:.3f} (MAE {r['til_soft_mae']:.3f})")
    print(f"immune-phenotype accuracy:      {r['phenotype_accuracy']:.3f}")
    cm = r["phenotype_confusion"]
    print("  truth \\ pred  " + " ".join(f"{lab[:9]:>9}" for lab in cm["labels"]))
    for lab, row in zip(cm["labels"], cm["matrix"], strict=True):
        if sum(row):
            print(f"  {lab:<13} " + " ".join(f"{v:>9}" for v in row))
    print(f"area-fraction MAE (of tissue), mean {r['area_fraction_mae_mean']:.3f}:")
    print("  " + "  ".join(f"{k}={v:.3f}" for k, v in r["area_fraction_mae"].items()))
    print(f"  vs the truth of the cells the tiler kept: mean {r['area_fraction_mae_vs_tiled_truth_mean']:.3f}; "
          f"til_fraction Spearman {r['til_spearman_vs_tiled_truth']:.3f}")
    print("  " + "  ".join(f"{k}={v:.3f}" for k, v in r["area_fraction_mae_vs_tiled_truth"].items()))
    if "tile_balanced_accuracy" in r:
        print(f"tile-level balanced accuracy (aligned tiles): {r['tile_balanced_accuracy']:.3f} "
              f"(n={r['n_tiles']}; {100 * r['tissue_cells_tiled']:.0f}% of tissue cells kept by the tiler)")
        print("  cells kept by the tiler, per class: " + "  ".join(
            f"{n}={v:.2f}" for n, v in r["cells_tiled_by_class"].items()))
        cm = np.asarray(r["tile_confusion"])
        print("  per-class tile recall: " + "  ".join(
            f"{n}={cm[i, i] / cm[i].sum():.2f}" for i, n in enumerate(r["class_names"]) if cm[i].sum()))


CARD_BEGIN, CARD_END = "<!-- eval_tme:begin -->", "<!-- eval_tme:end -->"


def card_section(results: dict[str, Any], n: int, grid: tuple[int, int]) -> str:
    """Markdown summary of the mosaic evaluation, for the classifier's model card."""
    lines = [CARD_BEGIN, "## Held-out mosaic evaluation (`scripts/eval_tme.py`)",
             f"{n} mosaic slides of {grid[0]}×{grid[1]} kather16 tiles (one third per immune phenotype) built from "
             "the held-out source images only; `wsi tile` → (`wsi extract`) → `wsi tme` with default rules "
             "(band 200 µm). Figures are computed, not typed: rerun the script to refresh them.", "",
             "| tiling | til_fraction Spearman | phenotype accuracy | area-fraction MAE (mean) | tile bal. acc. |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        tile = f"{r['tile_balanced_accuracy']:.3f}" if "tile_balanced_accuracy" in r else "–"
        lines.append(f"| {name} | {r['til_spearman']:.3f} (soft {r['til_soft_spearman']:.3f}) | "
                     f"{r['phenotype_accuracy']:.3f} | {r['area_fraction_mae_mean']:.3f} | {tile} |")
    for name, r in results.items():
        if "tissue_cells_tiled" in r:
            by_class = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r.get("cells_tiled_by_class", {}).items())
            lines += ["", f"`wsi tile`'s tissue detection kept {100 * r['tissue_cells_tiled']:.0f}% of the tissue "
                      f"cells ({name} tiling; per class: {by_class} — 08_EMPTY is background glass): against the "
                      f"truth of the kept cells the mean area-fraction MAE is "
                      f"{r['area_fraction_mae_vs_tiled_truth_mean']:.3f} and the til_fraction Spearman "
                      f"{r['til_spearman_vs_tiled_truth']:.3f}."]
    lines += ["", "Per-class area-fraction MAE (fractions of tissue tiles):", ""]
    for name, r in results.items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["area_fraction_mae"].items()))
    lines += ["", "`aligned`: 150-px tiles at 0.495 µm/px, one per mosaic cell (the classifier reads them at "
              "0.5 µm/px from the slide); `default`: 224-px tiles at 0.5 µm/px (112 µm), each straddling up to four "
              "unrelated mosaic cells; `wsi tme` (`--footprint auto`, which picks `grid` for tiles this wide) "
              "classifies its own grid of 74-µm cells (the classifier's field of view) over the area the tiles "
              "cover, read from the slide — the grid is anchored at the tiles' corner, so on these mosaics its "
              "cells fall on the mosaic cells; `default-centre`: the same tiles with `--footprint classifier`, "
              "each tile's centre over 74 µm (the `auto` of earlier versions), which misses most isolated "
              "lymphocyte cells (`features:` in the results says which source was used).", CARD_END]
    return "\n".join(lines) + "\n"


def update_card(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        text = head + section + rest.split(CARD_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "runs" / "eval-tme"))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--classifier", default="", help="classifier folder (default: the shipped one)")
    ap.add_argument("--encoder-weights", default=None)
    ap.add_argument("--n-slides", type=int, default=30)
    ap.add_argument("--grid", type=int, nargs=2, default=(16, 20), metavar=("ROWS", "COLS"))
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--band-um", type=float, default=200.0)
    ap.add_argument("--tilings", nargs="+", default=["aligned", "default", "default-centre"],
                    choices=("aligned", "default", "default-centre"))
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    ap.add_argument("--card", default=None, help="update the evaluation section of this model card (README.md)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")

    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.config import SpatialConfig, TMEConfig
    from wsi_pipeline.tme.run import run_tme

    clf = load_classifier(args.classifier or None)
    out = Path(args.out)
    pools, train_sources, train_files = held_out_pools(Path(args.data), clf)
    print(f"classifier {clf.path} (encoder {clf.encoder}, {clf.mpp:g} µm/px); held-out pools: "
          + ", ".join(f"{k}={len(v)}" for k, v in pools.items()))
    t0 = time.perf_counter()
    cohort = build_cohort(out, pools, (train_sources, train_files), args.n_slides, tuple(args.grid), args.seed)
    print(f"built {len(cohort)} mosaic slides of {args.grid[0]}×{args.grid[1]} tiles in "
          f"{time.perf_counter() - t0:.0f} s (held-out sources checked)")
    results = {}
    for tiling in args.tilings:
        t0 = time.perf_counter()
        run = out / f"run-{tiling}"
        if tiling == "aligned":
            tile_run(run, cohort, 0.495, 150)
        else:
            tile_run(run, cohort, clf.mpp, clf.input_size or 224)
            run_extract(run, clf.encoder, args.encoder_weights)
        cfg = TMEConfig(classifier=clf.path, encoder_weights=args.encoder_weights, device="cpu",
                        spatial=SpatialConfig(band_um=args.band_um),
                        footprint="classifier" if tiling == "default-centre" else "auto")
        summary = run_tme(run, cfg)
        if summary.failed:
            raise SystemExit(f"tme failed on {len(summary.failed)} slides, e.g. {summary.failed[:2]}")
        r = evaluate(run, cohort, clf.class_names, aligned=tiling == "aligned")
        r["feature_source"] = sorted({str(row["feature_source"]) for row in summary.values().values()})
        results[tiling] = r
        print_result(tiling, r, time.perf_counter() - t0)
        print(f"  features: {', '.join(r['feature_source'])}")
    if args.card:
        update_card(Path(args.card), card_section(results, args.n_slides, tuple(args.grid)))
    if args.json:
        Path(args.json).write_text(json.dumps({"classifier": clf.path, "grid": list(args.grid),
                                               "n_slides": args.n_slides, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
