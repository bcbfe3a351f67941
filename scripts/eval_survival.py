#!/usr/bin/env python
"""Held-out check of the survival (Cox) head on cohorts whose survival is learnable from the image (issue #17).

Both generators draw overall survival from what the slide shows and record the true log relative hazard
per patient (``os_true_log_hazard``; see `wsi_pipeline/synth/cohort.py` and `wsi_pipeline/synth/kather.py`):

* ``synthetic``: the project's procedural slides; hazard from the immune phenotype, the TIL fraction and the
  tumour fraction;
* ``kather``: mosaics of real kather16 tiles; hazard from the phenotype and the tumour fraction. Train
  mosaics use tiles of the training source images, test mosaics tiles of the held-out ones.

For each cohort: build (or reuse) the train and test cohorts, tile them, extract features with ``--encoder``
(default: the shipped default encoder, `wsip-dino-r10`), train the survival head alone
(`wsi train ... --targets "os:survival(os_months,os_event)"`), predict the test cohort (`os_risk`), and print
at patient level, with 95 % CIs from ``--n-boot`` patient bootstrap resamples shared by both rows:

* the **oracle** C-index: Harrell's C of the true hazard on the observed (censored) test times — the best
  any model can do on these patients;
* the **model** C-index of `os_risk`;
* the **gap** (oracle − model) with its paired-bootstrap CI.

Cohorts and tiles are cached as in `scripts/eval_mil_heads.py` (whose cohort and tiling steps this script
uses), features per encoder weights, trained models per training settings.

    nice python scripts/eval_survival.py --work /tmp/surv-eval --cohorts synthetic        # ~15 min, 2 cores
    nice python scripts/eval_survival.py --work /tmp/surv-eval --cohorts kather --head abmil  # ~20 min
    nice python scripts/eval_survival.py --work /tmp/surv-smoke --cohorts kather --n-train 20 --n-test 12 \\
        --grid 8 10 --folds 2 --epochs 3                                          # smoke test (minutes)

Pass criteria of issue #17 (printed with the tables): model C-index ≥ 0.6, within 0.05 of the oracle, and
the lower end of its 95 % CI above 0.5.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import eval_mil_heads as cohorts  # same folder: the cached cohort / tiling / extraction steps

REPO = Path(__file__).resolve().parents[1]
TARGET = "os:survival(os_months,os_event)"
TRUTH_COLUMN = "os_true_log_hazard"
DEFAULT_SIZES = {"synthetic": (80, 60), "kather": (400, 80)}
MODEL, ORACLE = "model", "oracle"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(kind: str, a: argparse.Namespace) -> tuple[Path, str, str]:
    """Cohorts (built or reused), tiles and features of both splits; returns (cohort dir, encoder, sha)."""
    from wsi_pipeline.formats.tables import read_labels_csv

    cdir = a.work / kind
    sizes = {"train": a.n_train or DEFAULT_SIZES[kind][0], "test": a.n_test or DEFAULT_SIZES[kind][1]}
    for split in ("train", "test"):
        labels = build_or_refresh(kind, split, cdir / f"{split}_slides",
                                  cohorts.cohort_params(kind, split, sizes[split], a))
        if TRUTH_COLUMN not in read_labels_csv(labels).columns:
            raise SystemExit(f"{labels}: no {TRUTH_COLUMN} column after a rebuild; this is a bug")
    found = ("", "")
    for split in ("train", "test"):
        cohorts.tile_run(cdir / f"{split}_slides", cdir / split, a.workers)
        found = extract(cdir / split, a.encoder)
    return cdir, found[0], found[1]


def labels_current(kind: str, out: Path) -> bool:
    """Whether a cached cohort's survival labels are what the current generator draws: a synthetic cohort's
    labels are checked by its parameters (``labels_sha1``); for a kather cohort the recorded true hazard must
    be the current model's hazard of each slide's truth."""
    import numpy as np

    from wsi_pipeline.formats.tables import read_labels_csv
    from wsi_pipeline.synth.kather import MosaicParams

    lab = read_labels_csv(out / "labels.csv")
    if TRUTH_COLUMN not in lab.columns:
        return False
    if kind != "kather":
        return True
    om = MosaicParams().outcome
    for sid, phenotype, h in zip(lab["slide_id"], lab["immune_phenotype"], lab[TRUTH_COLUMN].astype(float), strict=True):
        with np.load(out / "truth" / f"{sid}.npz") as t:
            if abs(om.os_log_hazard(float(t["til_fraction"]), float(t["tumour_fraction"]), phenotype) - h) > 1e-3:
                return False
    return True


def build_or_refresh(kind: str, split: str, out: Path, params: dict[str, Any]) -> Path:
    """The cohort of ``params`` in ``out``: reused when current; otherwise rebuilt beside it and moved in,
    keeping every existing slide whose bytes did not change (so its tiles and features stay cached: a cohort
    grown to more patients, or whose labels changed, re-tiles only what is new)."""
    have = cohorts.cached_params(kind, split, out) if (out / "labels.csv").exists() else None
    if have == params and labels_current(kind, out):
        return out / "labels.csv"
    if have is None:
        return cohorts.build_cohort(kind, split, out, params)
    fresh = out.parent / f"{out.name}.rebuild"
    shutil.rmtree(fresh, ignore_errors=True)
    cohorts.build_cohort(kind, split, fresh, params)
    kept = 0
    for old in [p for p in out.rglob("*") if p.is_file()]:
        if not (fresh / old.relative_to(out)).exists():
            old.unlink()
    for new in sorted(p for p in fresh.rglob("*") if p.is_file()):
        dest = out / new.relative_to(fresh)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.suffix == ".svs" and dest.exists() and dest.read_bytes() == new.read_bytes():
            kept += 1
            continue
        new.replace(dest)
    shutil.rmtree(fresh)
    log(f"{kind}/{split}: cohort rebuilt with the current generator ({kept} unchanged slides kept)")
    return out / "labels.csv"


def extract(run: Path, encoder: str) -> tuple[str, str]:
    """Features of every tiled slide (slides done with the same weights are skipped): (encoder, weights sha)."""
    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.extract import run_extract
    from wsi_pipeline.formats.h5 import A_WEIGHTS_SHA256, read_h5_attrs

    t0 = time.perf_counter()
    e = run_extract(run, ExtractConfig(encoder=encoder, precision="fp32", num_workers=0, batch_size=64))
    if e.failed:
        raise SystemExit(f"extraction failed: {e.failed[:3]}")
    if e.done:
        log(f"{run.parent.name}/{run.name}: extracted {e.figures['tiles']} tiles of {len(e.done)} slides in "
            f"{time.perf_counter() - t0:.0f}s ({len(e.skipped)} cached)")
    first = sorted(Path(e.figures["features_dir"]).glob("*.h5"))[0]
    return e.figures["encoder"], str(read_h5_attrs(first).get(A_WEIGHTS_SHA256, ""))


def train_and_predict(cdir: Path, encoder: str, sha: str, a: argparse.Namespace) -> Any:
    """Train the survival-only model on the train cohort (cached by settings); test-cohort predictions."""
    from wsi_pipeline.runfolder.layout import safe_name

    label = a.head if a.instance_encoder == "mlp" else f"{a.head}-{a.instance_encoder}"
    label += "" if a.context_rings == 1 else f"-r{a.context_rings}"
    mdir = cdir / "models" / f"{safe_name(encoder)}-{sha[:8] or 'na'}" / f"survival-{label}"
    cfg = {"run": str(cdir / "train"), "labels": str(cdir / "train_slides" / "labels.csv"), "targets": TARGET,
           "model_out": str(mdir), "head": a.head, "folds": a.folds, "epochs": a.epochs, "seed": a.seed,
           "encoder": encoder, "batch_bags": a.batch_bags, "baseline": False, "threads": a.threads,
           "n_bootstrap": a.n_boot, "instance_encoder": a.instance_encoder,
           "context_rings": a.context_rings}
    return cohorts.train_cached_and_predict(cdir, cfg, {"weights_sha256": sha}, f"the survival model ({label})")


def oracle_frame(labels: Any, specs: list) -> Any:
    """A predictions-like frame whose ``os_risk`` is the generator's true log hazard."""
    from wsi_pipeline.mil.tables import slide_frame

    return slide_frame(labels.index.astype(str).tolist(), labels["patient_id"].astype(str).tolist(),
                       [{specs[0].name: float(h)} for h in labels[TRUTH_COLUMN]], specs)


def evaluate(cdir: Path, pred: Any, a: argparse.Namespace) -> dict[str, Any]:
    from wsi_pipeline.mil.report import evaluate_heldout
    from wsi_pipeline.mil.targets import parse_targets, read_labels_table

    specs = parse_targets(TARGET)
    labels = read_labels_table(cdir / "test_slides" / "labels.csv")
    frames = {MODEL: pred, ORACLE: oracle_frame(labels, specs)}
    m = evaluate_heldout(frames, labels, specs, n_boot=a.n_boot, seed=a.seed, pairs=[(ORACLE, MODEL)])
    name = specs[0].name
    model, oracle = m["models"][MODEL][name], m["models"][ORACLE][name]
    gap = next(c for c in m["comparisons"] if c["target"] == name)
    pat = labels.groupby("patient_id").first()
    return {"n_patients": m["cohort"]["n_patients"], "n_events": int(pat["os_event"].astype(float).sum()),
            "oracle": oracle["c_index"], "model": model["c_index"], "gap": gap}


def _ci(m: dict[str, Any]) -> str:
    return f"{m['estimate']:.3f} ({m['ci_low']:.3f}–{m['ci_high']:.3f})"


def verdict(r: dict[str, Any]) -> tuple[bool, list[str]]:
    model, oracle = r["model"], r["oracle"]
    gap = oracle["estimate"] - model["estimate"]
    checks = [(model["estimate"] >= 0.6, f"model C-index {model['estimate']:.3f} ≥ 0.6"),
              (gap <= 0.05, f"gap to the oracle {gap:.3f} ≤ 0.05"),
              (model["ci_low"] > 0.5, f"CI lower end {model['ci_low']:.3f} > 0.5")]
    return all(ok for ok, _ in checks), [("pass: " if ok else "FAIL: ") + what for ok, what in checks]


def markdown(results: dict[str, dict[str, Any]], a: argparse.Namespace, encoder: str) -> str:
    lines = [f"Survival head alone (`--targets \"{TARGET}\"`, head `{a.head}`, {a.folds}-fold CV ensemble, "
             f"≤ {a.epochs} epochs, encoder {encoder}); held-out test patients; 95 % CIs from {a.n_boot} "
             "patient bootstrap resamples (shared, so the gap is paired).", "",
             "| cohort (held-out) | patients (events) | oracle C-index | model C-index (`os_risk`) | gap (oracle − model) |",
             "|---|---|---|---|---|"]
    for kind, r in results.items():
        g = r["gap"]
        lines.append(f"| {kind} | {r['n_patients']} ({r['n_events']}) | {_ci(r['oracle'])} | {_ci(r['model'])} | "
                     f"{g['estimate']:.3f} ({g['ci_low']:.3f}–{g['ci_high']:.3f}) |")
    lines.append("")
    for kind, r in results.items():
        lines.append(f"- {kind}: " + "; ".join(verdict(r)[1]) + f" (train {r['n_train']} patients, "
                     f"{r['seconds']:.0f}s)")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (outside the repository)")
    ap.add_argument("--out", type=Path, default=None, help="markdown file for the table (default <work>/survival.md)")
    ap.add_argument("--cohorts", nargs="+", default=["synthetic", "kather"], choices=["synthetic", "kather"])
    ap.add_argument("--n-train", type=int, default=None, help="train patients (default: synthetic 80, kather 400)")
    ap.add_argument("--n-test", type=int, default=None, help="test patients (default: synthetic 60, kather 80)")
    ap.add_argument("--grid", type=int, nargs=2, default=(16, 20), metavar=("ROWS", "COLS"),
                    help="kather mosaic size in 150-px tiles (default 16 20)")
    ap.add_argument("--slide-size", type=int, nargs=2, default=(2600, 2200), metavar=("W", "H"),
                    help="synthetic slide size in px at 0.5 µm/px (default 2600 2200)")
    ap.add_argument("--encoder", default=None, help="encoder (default: the shipped default encoder)")
    ap.add_argument("--head", default="meanpool", help="MIL head of the survival model (default meanpool)")
    ap.add_argument("--instance-encoder", default="mlp", choices=("mlp", "interact"),
                    help="tile encoder of the head: mlp (default) or interact (tile × neighbourhood; 1 ring)")
    ap.add_argument("--context-rings", type=int, default=1, help="context rings of the head's tiles (default 1)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-bags", type=int, default=16,
                    help="slides per mini-batch: the Cox partial likelihood compares the slides of a batch")
    ap.add_argument("--n-boot", type=int, default=1000, help="patient-level bootstrap resamples (>= 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--workers", type=int, default=1, help="parallel slides when tiling")
    a = ap.parse_args(argv)
    if a.work.resolve().is_relative_to(REPO):
        ap.error("--work must be outside the repository (mosaics of kather16 must not be committed)")
    if a.n_boot < 1000:
        ap.error("--n-boot must be >= 1000")
    if a.encoder is None:
        from wsi_pipeline.encoders.registry import default_encoder_name

        a.encoder = default_encoder_name()
    a.out = a.out or a.work / "survival.md"
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    a.work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(a.threads)
    results: dict[str, dict[str, Any]] = {}
    encoder = a.encoder
    for kind in a.cohorts:
        t0 = time.perf_counter()
        cdir, encoder, sha = prepare(kind, a)
        pred = train_and_predict(cdir, encoder, sha, a)
        r = evaluate(cdir, pred, a)
        from wsi_pipeline.formats.tables import read_labels_csv

        r["n_train"] = int(read_labels_csv(cdir / "train_slides" / "labels.csv")["patient_id"].nunique())
        r["seconds"] = time.perf_counter() - t0
        r["pass"] = verdict(r)[0]
        results[kind] = r
        log(f"{kind}: oracle {_ci(r['oracle'])}, model {_ci(r['model'])}")
    md = markdown(results, a, encoder)
    print(md, flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(md)
    (a.work / "survival.json").write_text(json.dumps(results, indent=2, default=float))
    return 0 if all(r["pass"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
