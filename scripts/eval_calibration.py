#!/usr/bin/env python
"""Held-out calibration of the MIL heads before and after `wsi train`'s post-hoc calibration (issue #17).

Same cohorts, tiles, features and trained models as ``scripts/eval_mil_heads.py`` (it is imported; pass the
same ``--work`` and everything cached there is reused): the kather mosaics of real tiles and the synthetic
cohort, each a train cohort (5-fold CV, fold ensemble, calibrator fitted on the out-of-fold predictions) and
a held-out test cohort of other patients. Both generators record every slide's true response probability
(``response_prob``), so calibration can be judged against the truth, not only against 0/1 outcomes.

For every model (default ``auto@1`` and each registered head with one context ring) and the binary target
``response``, printed as markdown tables and written to ``<work>/<tag>.md`` / ``.json``:

* held out (test patients): AUROC, ECE, calibration slope and intercept, Brier score, each with a 95 % CI
  from ``--n-boot`` patient-level bootstrap resamples (the same for every row), and the mean absolute
  error of the predicted P(response) against the generator's true probability; *before* = the fold
  ensemble's raw probabilities (`wsi predict` with ``calibrated=False``), *after* = as `wsi predict`
  writes them (the model's recorded calibrator);
* out of fold (training cohort, from the model's ``oof_predictions.csv``): the same figures, *after* being
  the cross-fitted calibrated OOF probabilities;
* held out, *after, aligned*: calibrated, with the features standardised by the test cohort's own
  statistics (`wsi predict --align-features`: test-time alignment to a shifted site);
* the generator's own probability as a reference row (its ECE is not 0 on a few dozen patients);
* for ``auto``: the head it chose, why, and every candidate's inner-CV scores.

    nice python scripts/eval_calibration.py --work /tmp/mil-eval --cohorts kather
    nice python scripts/eval_calibration.py --work /tmp/mil-eval --cohorts synthetic --tag calibration-synth

``--sites N`` (kather): the train cohort's source images are dealt to N sites and `wsi train` runs with
``--group-by site``, so the out-of-fold predictions that the calibrator is fitted on come from models that
never saw the slide's source images, as the test cohort's do. Use another ``--work`` (the train cohort
differs); the test cohort can be linked from a run without sites.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import eval_mil_heads as E

DEFAULT_MODELS = ["auto@1", "abmil@1", "meanpool@1", "transmil@1", "chowder@1"]
TARGET = "response"
TRUE_PROB = "response_prob"
COLUMNS = ("auroc", "ece", "calibration_slope", "calibration_intercept", "brier", "mae_true_prob")
TITLES = {"auroc": "AUROC", "ece": "ECE", "calibration_slope": "slope", "calibration_intercept": "intercept",
          "brier": "Brier", "mae_true_prob": "MAE vs true P"}


def figures(y: Any, prob: Any, true_prob: Any, weights: Any) -> dict[str, Any]:
    """The table's figures of one set of patient probabilities (MetricCI each)."""
    import numpy as np

    from wsi_pipeline.evaluate import metrics as M
    from wsi_pipeline.evaluate.bootstrap import Truth, bootstrap_metrics, ci_from

    out = {k: v for k, v in bootstrap_metrics(Truth("binary", y), prob, weights).items() if k in COLUMNS}
    point = float(M.mae(true_prob, prob, np.ones((1, len(y))))[0])
    out["mae_true_prob"] = ci_from(point, M.mae(true_prob, prob, weights))
    return out


def patient_table(slides: Any, labels: Any, spec: Any) -> Any:
    """Patient rows (sorted) with the predicted and true P(response) and the observed response."""
    import numpy as np

    from wsi_pipeline.mil.tables import patient_frame
    from wsi_pipeline.mil.targets import PATIENT_ID, SLIDE_ID

    slides = slides.copy()
    pmap = labels[PATIENT_ID].to_dict()
    slides[PATIENT_ID] = [pmap[s] for s in slides[SLIDE_ID].astype(str)]
    pat = patient_frame(slides, [spec]).set_index(PATIENT_ID)
    lab = labels.groupby(PATIENT_ID)
    y = lab[spec.column].first().astype(float)
    truth = lab[TRUE_PROB].apply(lambda c: float(np.mean(c.astype(float))))
    return pat.assign(y=y.loc[pat.index], true_prob=truth.loc[pat.index])


def heldout(cdir: Path, mdir: Path, encoder: str, spec: Any, weights: Any, labels: Any) -> dict[str, Any]:
    from wsi_pipeline.formats.tables import read_predictions_csv
    from wsi_pipeline.mil.config import PredictConfig
    from wsi_pipeline.mil.predict import predict_run

    out = {}
    # "aligned": calibrated, with the test cohort's own feature statistics (`wsi predict --align-features`);
    # last, so the table left in place is the plain calibrated one
    for when, calibrated, aligned in (("before", False, False), ("aligned", True, True), ("after", True, False)):
        predict_run(PredictConfig(run=str(cdir / "test"), model=str(mdir), encoder=encoder, write_scores=False,
                                  labels=str(cdir / "test_slides" / "labels.csv"), calibrated=calibrated,
                                  align_features=aligned))
        pat = patient_table(read_predictions_csv(cdir / "test" / "predictions.csv"), labels, spec)
        out[when] = figures(pat["y"].to_numpy(), pat[f"{TARGET}_prob"].to_numpy(), pat["true_prob"].to_numpy(),
                            weights)
    out["reference"] = figures(pat["y"].to_numpy(), pat["true_prob"].to_numpy(), pat["true_prob"].to_numpy(),
                               weights)
    return out


def out_of_fold(mdir: Path, train_labels: Any, n_boot: int, seed: int) -> dict[str, Any]:
    """Before/after figures of the main variant's OOF patient predictions (after = cross-fitted)."""
    import numpy as np

    from wsi_pipeline.evaluate.bootstrap import bootstrap_weights
    from wsi_pipeline.formats.cards import read_model_json
    from wsi_pipeline.formats.tables import read_oof_predictions_csv
    from wsi_pipeline.mil.oof import UNCALIBRATED_SUFFIX
    from wsi_pipeline.mil.targets import PATIENT_ID

    card = read_model_json(mdir)
    oof = read_oof_predictions_csv(mdir / "oof_predictions.csv")
    oof = oof[oof["model"] == card["main_variant"]].set_index(PATIENT_ID).sort_index()
    oof = oof[oof[f"{TARGET}_true"].astype(str) != ""]
    classes = next(t["classes"] for t in card["targets"] if t["name"] == TARGET)
    y = (oof[f"{TARGET}_true"].astype(str) == str(classes[1])).astype(float).to_numpy()
    truth = train_labels.groupby(PATIENT_ID)[TRUE_PROB].apply(lambda c: float(np.mean(c.astype(float))))
    tp = truth.loc[oof.index].to_numpy()
    w = bootstrap_weights(len(oof), n_boot, seed)
    raw_col = f"{TARGET}_prob{UNCALIBRATED_SUFFIX}"
    return {"before": figures(y, oof[raw_col].to_numpy(dtype=float), tp, w),
            "after": figures(y, oof[f"{TARGET}_prob"].to_numpy(dtype=float), tp, w)}


def _row(label: str, head: str, when: str, figs: dict[str, Any]) -> str:
    return f"| {label} | {head} | {when} | " + " | ".join(figs[k].fmt() for k in COLUMNS) + " |"


def markdown(kind: str, encoder: str, res: dict[str, Any], n_test: int, n_train: int) -> str:
    header = ["| model | head | | " + " | ".join(TITLES[k] for k in COLUMNS) + " |", "|---|---|---|" + "---|" * len(COLUMNS)]
    lines = [f"## {kind}: calibration of P({TARGET}) (encoder {encoder})", "",
             f"### Held out ({n_test} test patients; 95% CIs from patient-level bootstrap)", "", *header]
    ref = None
    for label, r in res.items():
        for when in ("before", "after", "aligned"):
            lines.append(_row(label, r["head"], when if when != "aligned" else "after, aligned", r["heldout"][when]))
        ref = r["heldout"]["reference"]
    if ref is not None:
        lines.append(_row("generator's true P", "–", "reference", ref))
    lines += ["", f"### Out of fold ({n_train} training patients; after = cross-fitted calibration)", "", *header]
    for label, r in res.items():
        for when in ("before", "after"):
            lines.append(_row(label, r["head"], when, r["oof"][when]))
    for label, r in res.items():
        sel = r["selection"]
        if sel.get("requested") == "auto":
            scores = "; ".join(f"{c}: " + ", ".join(f"{v:.3f}" for v in sc["per_fold"]) + f" (mean {sc['mean']:.3f})"
                               for c, sc in sel["scores"].items())
            lines += ["", f"`{label}` chose **{sel['chosen']}**: {sel['reason']}. Inner-CV scores per outer fold "
                          f"({sel['criterion']}): {scores}. Selection took {sel['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def run_cohort(kind: str, a: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    from wsi_pipeline.evaluate.bootstrap import bootstrap_weights
    from wsi_pipeline.formats.cards import read_model_json
    from wsi_pipeline.mil.model_io import ModelDir
    from wsi_pipeline.mil.targets import read_labels_table

    cdir = a.work / kind
    sizes = {"train": a.n_train or E.DEFAULT_SIZES[kind][0], "test": a.n_test or E.DEFAULT_SIZES[kind][1]}
    for split in ("train", "test"):
        E.build_cohort(kind, split, cdir / f"{split}_slides", E.cohort_params(kind, split, sizes[split], a))
    for split in ("train", "test"):
        E.tile_run(cdir / f"{split}_slides", cdir / split, a.workers)
        encoder, sha = E.extract(cdir / split, a.encoder, E.encoder_weights(a.work, a.encoder))
    labels = read_labels_table(cdir / "test_slides" / "labels.csv")
    train_labels = read_labels_table(cdir / "train_slides" / "labels.csv")
    n_test = labels["patient_id"].nunique()
    weights = bootstrap_weights(n_test, a.n_boot, a.seed)
    res: dict[str, Any] = {}
    for spec in a.models:
        t0 = time.perf_counter()
        _, _, mdir = E.train_and_predict(spec, cdir, encoder, sha, a)
        card = read_model_json(mdir)
        target = next(s for s in ModelDir(mdir).read_card().target_specs if s.name == TARGET)
        res[E.model_label(spec)] = {
            "head": card["variants"][card["main_variant"]]["head"], "selection": card.get("head_selection", {}),
            "heldout": heldout(cdir, mdir, encoder, target, weights, labels),
            "oof": out_of_fold(mdir, train_labels, a.n_boot, a.seed)}
        E.log(f"{kind} {E.model_label(spec)}: {time.perf_counter() - t0:.0f}s")
    md = markdown(kind, encoder, res, n_test, train_labels["patient_id"].nunique())
    print(md, flush=True)
    plain = {m: {"head": r["head"], "selection": r["selection"],
                 **{part: {w: {k: v.to_dict() for k, v in figs.items()} for w, figs in r[part].items()}
                    for part in ("heldout", "oof")}} for m, r in res.items()}
    return md, plain


def main(argv: list[str] | None = None) -> int:
    argv = list(argv) if argv is not None else None
    a = E.parse_args(argv)
    if a.models == E.DEFAULT_MODELS:
        a.models = DEFAULT_MODELS
    if a.tag == "results":
        a.tag = "calibration"
    a.out = a.work / f"{a.tag}.md" if a.out == a.work / "results.md" else a.out
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("wsi_pipeline.encoders.registry").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.retrain:
        import shutil

        for c in a.cohorts:
            shutil.rmtree(a.work / c / "models", ignore_errors=True)
    t0 = time.perf_counter()
    out = {kind: run_cohort(kind, a) for kind in a.cohorts}
    a.out.write_text("\n".join(md for md, _ in out.values()))
    (a.work / f"{a.tag}.json").write_text(json.dumps({k: v for k, (_, v) in out.items()}, indent=1))
    E.log(f"wrote {a.out} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
