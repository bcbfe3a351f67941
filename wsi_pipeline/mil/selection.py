"""Choosing the MIL head (``wsi train --head auto``, the default) and checking it against its baseline.

Protocol. For every outer fold k of the cross-validation, the training patients of that fold (never its
out-of-fold patients) are split again into ``selection_folds`` stratified inner folds; every candidate head
(``head_candidates``, default meanpool and abmil, in order of simplicity) is trained on the inner training
folds (at most ``selection_epochs`` epochs, the same early stopping) and predicts the inner held-out fold.
The candidate's inner score in outer fold k is the criterion on its pooled inner out-of-fold patient
predictions:

    criterion = mean over targets of each target's primary metric
                (binary AUROC, multiclass macro one-vs-rest AUROC, regression Spearman, survival C-index)

The chosen head has the highest inner score averaged over the outer folds, except that the simplest
candidate within ``selection_margin`` of the best is preferred (a more complex head has to earn its keep).
The model card and ``metrics.json`` record every candidate's per-fold and mean scores, per-target means,
each outer fold's winner and the reason. An explicit ``--head`` skips the selection.

Cost: candidates × selection_folds × folds extra trainings of ≤ selection_epochs epochs on about
(1 − 1/selection_folds)(1 − 1/folds) of the patients: with the defaults (2 candidates, 3 inner folds, 5
folds, 20 epochs) about as much as training the main model and its baseline once more (+80–100 % of the
``wsi train`` time on CPU).

Baseline check (:func:`baseline_check`): whatever way the head was chosen, a main model whose out-of-fold
criterion is below its own mean-pool baseline's is flagged in ``metrics.json`` and ``metrics.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_pipeline.evaluate.bootstrap import PRIMARY_METRIC, metric_functions
from wsi_pipeline.mil.tables import patient_frame, patient_truth, prediction_array, slide_frame, truth_for
from wsi_pipeline.mil.targets import TargetSpec

if TYPE_CHECKING:
    from wsi_pipeline.mil.cv import Cohort

AUTO = "auto"
CRITERION = ("mean over targets of each target's primary metric (binary AUROC, multiclass macro one-vs-rest "
             "AUROC, regression Spearman, survival C-index) on the pooled inner out-of-fold patient predictions")
METRIC_NAMES = {"auroc": "AUROC", "spearman": "Spearman", "c_index": "C-index"}


def criterion_scores(cohort: Cohort, preds: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Each target's primary metric on the patient-level predictions of the slides in ``preds``
    (slide → target → prediction); NaN where undefined (e.g. one class only)."""
    specs = cohort.specs
    slides = [s for s in cohort.labels.slide_ids if s in preds]
    frame = patient_frame(slide_frame(slides, [cohort.patient_of[s] for s in slides], [preds[s] for s in slides],
                                      specs), specs)
    truth = patient_truth(cohort.labels.subset(slides))
    frame = frame.set_index("patient_id").loc[truth.index]
    out: dict[str, float] = {}
    for s in specs:
        tr, mask = truth_for(s, truth)
        if mask.sum() < 2:
            out[s.name] = float("nan")
            continue
        fn = metric_functions(tr)[PRIMARY_METRIC[s.kind]]
        out[s.name] = float(fn(prediction_array(frame, s)[mask], np.ones((1, int(mask.sum()))))[0])
    return out


def mean_score(per_target: Mapping[Any, float]) -> float:
    vals = [v for v in per_target.values() if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


@dataclass
class HeadSelection:
    """What ``--head auto`` compared and why it chose ``chosen`` (recorded in model.json and metrics.json)."""

    requested: str
    chosen: str
    candidates: list[str] = field(default_factory=list)
    criterion: str = CRITERION
    selection_folds: int = 0
    selection_epochs: int = 0
    margin: float = 0.0
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # candidate → per_fold, per_target, mean
    fold_winners: list[str] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fixed_head(head: str) -> HeadSelection:
    return HeadSelection(requested=head, chosen=head, reason=f"--head {head} given explicitly (no selection)")


def choose_head(candidates: Sequence[str], per_fold: Mapping[str, Sequence[Mapping[str, float]]],
                margin: float, folds: int, epochs: int) -> HeadSelection:
    """Pick the head from each candidate's per-outer-fold per-target inner scores."""
    scores: dict[str, dict[str, Any]] = {}
    for c in candidates:
        fold_means = [mean_score(f) for f in per_fold[c]]
        targets = sorted({t for f in per_fold[c] for t in f})
        per_target = {t: mean_score({str(k): f.get(t, np.nan) for k, f in enumerate(per_fold[c])}) for t in targets}
        scores[c] = {"per_fold": fold_means, "per_target": per_target,
                     "mean": mean_score(dict(enumerate(map(float, fold_means))))}
    best = max(candidates, key=lambda c: (np.nan_to_num(scores[c]["mean"], nan=-np.inf), -candidates.index(c)))
    chosen = next(c for c in candidates if scores[best]["mean"] - scores[c]["mean"] <= margin)
    n_folds = len(next(iter(per_fold.values())))
    winners = [max(candidates, key=lambda c, k=k: (np.nan_to_num(scores[c]["per_fold"][k], nan=-np.inf),
                                                   -candidates.index(c))) for k in range(n_folds)]
    others = ", ".join(f"{c} {scores[c]['mean']:.3f}" for c in candidates if c != chosen)
    if chosen == best:
        reason = (f"{chosen} has the highest mean inner-CV score ({scores[chosen]['mean']:.3f}; {others}); "
                  f"it won {winners.count(chosen)} of {n_folds} outer folds")
    else:
        reason = (f"{best} scores {scores[best]['mean']:.3f} but does not beat the simpler {chosen} "
                  f"({scores[chosen]['mean']:.3f}) by more than the margin {margin:g}; {chosen} won "
                  f"{winners.count(chosen)} of {n_folds} outer folds")
    return HeadSelection(requested=AUTO, chosen=chosen, candidates=list(candidates), selection_folds=folds,
                         selection_epochs=epochs, margin=margin, scores=scores, fold_winners=winners, reason=reason)


def baseline_check(models: Mapping[str, Any], main: str, specs: Sequence[TargetSpec]) -> dict[str, Any]:
    """Compare the main model's OOF criterion with its mean-pool baseline's (``models``: metrics.json's
    ``models``); {} when there is no baseline."""
    base = next((m for m in models if m.endswith("-baseline")), None)
    if base is None or main not in models:
        return {}
    per: dict[str, dict[str, float]] = {}
    for name in (main, base):
        per[name] = {}
        for s in specs:
            d = models[name].get(s.name, {}).get(PRIMARY_METRIC[s.kind]) or {}
            if d.get("estimate") is not None:
                per[name][s.name] = float(d["estimate"])
    a, b = mean_score(per[main]), mean_score(per[base])
    worse = [t for t in per[main] if t in per[base] and per[main][t] < per[base][t]]
    loses = bool(np.isfinite(a) and np.isfinite(b) and a < b)
    return {"main": main, "baseline": base, "main_score": a, "baseline_score": b, "loses_to_baseline": loses,
            "targets_below_baseline": worse}


def selection_markdown(selection: Mapping[str, Any], check: Mapping[str, Any]) -> list[str]:
    """The metrics.md lines about the head: how it was chosen and whether it beats its baseline."""
    lines = ["## Head", ""]
    if selection.get("requested") == AUTO:
        cands = selection["candidates"]
        n = len(selection["fold_winners"])
        lines += [f"`--head auto` chose **{selection['chosen']}**: {selection['reason']}.", "",
                  f"Criterion: {selection['criterion']}; inner {selection['selection_folds']}-fold CV of each "
                  f"outer fold's training patients only (≤ {selection['selection_epochs']} epochs); "
                  f"{selection['seconds']:.0f} s.", "",
                  "| candidate | " + " | ".join(f"fold {k + 1}" for k in range(n)) + " | mean | per target |",
                  "|---|" + "---|" * (n + 2)]
        for c in cands:
            sc = selection["scores"][c]
            tgt = ", ".join(f"{t} {v:.3f}" for t, v in sc["per_target"].items())
            lines.append(f"| {c} | " + " | ".join(f"{v:.3f}" for v in sc["per_fold"]) + f" | {sc['mean']:.3f} | "
                         f"{tgt} |")
        lines.append("")
    elif selection:
        lines += [f"Head `{selection['chosen']}`: {selection.get('reason', '')}.", ""]
    if check:
        same_head = check["baseline"] == f"{check['main']}-baseline"  # the baseline differs by its context only
        advice = ("The baseline is the same head on the raw tile embeddings (no context rings): `--context-rings 0` "
                  "trains it as the main model; the paired comparisons below show whether the difference is more "
                  "than noise." if same_head else
                  "Prefer the baseline's head (`--head meanpool`) or `--head auto`.")
        verdict = (f"**Warning: the main model `{check['main']}` scores below its own baseline "
                   f"`{check['baseline']}`** (mean primary metric {check['main_score']:.3f} vs "
                   f"{check['baseline_score']:.3f}; below on {', '.join(check['targets_below_baseline'])}). "
                   + advice
                   if check["loses_to_baseline"] else
                   f"The main model `{check['main']}` scores at least as well as its baseline `{check['baseline']}` "
                   f"(mean primary metric {check['main_score']:.3f} vs {check['baseline_score']:.3f}).")
        lines += [verdict, ""]
    return lines
