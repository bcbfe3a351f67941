"""Operating characteristics of the `wsi predictive` interaction test, by simulation.

Simulated 1:1 randomised trials (``wsi_pipeline.analysis.simulate``) are analysed with
``wsi_pipeline.analysis.predictive.analyse_cohort`` — the function `wsi predictive` calls after loading
its tables — and the interaction p-values are summarised:

- power: with a true interaction (the outcome depends on the biomarker in the treated arm only), the
  fraction of cohorts of n patients with interaction p < 0.01, and the median p;
- false-positive rate: with no interaction (a treatment effect and a *prognostic* biomarker, equal in
  both arms), the fraction of cohorts with p < 0.05 (target 0.03–0.07), with its Wilson 95% CI.

Both for a binary outcome (logistic) and a survival outcome (Cox); the biomarker continuous (per SD) and
dichotomised at the median of a separately simulated training cohort.

    nice python scripts/sim_predictive.py            # ~3 min on one core
    python scripts/sim_predictive.py --quick         # ~30 s, fewer cohorts
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from wsi_pipeline.analysis.cutoff import CutoffSpec, dichotomise, learn_cutoff
from wsi_pipeline.analysis.predictive import analyse_cohort
from wsi_pipeline.analysis.simulate import TrialEffects, simulate_binary_trial, simulate_survival_trial
from wsi_pipeline.analysis.stats import MODEL_COX, MODEL_LOGISTIC, wilson

SIMULATORS = {MODEL_LOGISTIC: simulate_binary_trial, MODEL_COX: simulate_survival_trial}


def interaction_pvalues(model: str, effects: TrialEffects, n: int, n_sims: int, seed: int,
                        dichotomised: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sim = SIMULATORS[model]
    ps = np.empty(n_sims)
    for i in range(n_sims):
        data = sim(n, effects, rng)
        if dichotomised:  # cut-off = median of an independent training cohort, never the analysed one
            train = sim(n, effects, rng)
            cut = learn_cutoff(CutoffSpec(quantile=0.5), train["biomarker"].to_numpy(), "simulated training")
            data["biomarker"] = dichotomise(data["biomarker"].to_numpy(), cut)
        ps[i] = analyse_cohort(data, model, overall=False).fit.interaction.p
    return ps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="patients per simulated cohort")
    ap.add_argument("--power-sims", type=int, default=200)
    ap.add_argument("--null-sims", type=int, default=1000, help="null cohorts for the logistic model")
    ap.add_argument("--survival-null-sims", type=int, default=400)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--quick", action="store_true", help="50 power / 200 null cohorts per setting")
    args = ap.parse_args()
    if args.quick:
        args.power_sims, args.null_sims, args.survival_null_sims = 50, 200, 200
    warnings.simplefilter("ignore")  # convergence chatter of single simulated fits

    # (model, label, effects with interaction, null effects)
    settings = [
        (MODEL_LOGISTIC, "logistic", TrialEffects(b_int=1.5, intercept=-0.5),
         TrialEffects(b_arm=0.5, b_bm=0.8, intercept=-0.5)),
        (MODEL_COX, "cox", TrialEffects(b_int=-0.9, intercept=-0.5),
         TrialEffects(b_arm=-0.4, b_bm=0.5, intercept=-0.5)),
    ]
    print(f"n = {args.n} patients per cohort, 1:1 randomised, biomarker ~ N(0, 1)\n")
    header = (f"{'model':9s} {'biomarker':13s} {'true log-ratio':>14s}  {'cohorts':>7s}  "
              f"{'P(p<0.01)':>9s}  {'median p':>9s}  |  {'null cohorts':>12s}  {'FPR@0.05':>8s}  {'95% CI':>13s}"
              f"  {'s':>5s}")
    print(header)
    print("-" * len(header))
    seed = args.seed
    for model, label, alt, null in settings:
        n_null = args.null_sims if model == MODEL_LOGISTIC else args.survival_null_sims
        for dich in (False, True):
            t0 = time.perf_counter()
            p_alt = interaction_pvalues(model, alt, args.n, args.power_sims, seed, dich)
            p_null = interaction_pvalues(model, null, args.n, n_null, seed + 1, dich)
            seed += 2
            power = float(np.mean(p_alt < 0.01))
            k = int(np.sum(p_null < 0.05))
            fpr, lo, hi = wilson(k, n_null)
            print(f"{label:9s} {'median-split' if dich else 'continuous':13s} {alt.b_int:>14.2f}  "
                  f"{args.power_sims:>7d}  {power:>9.3f}  {np.median(p_alt):>9.2e}  |  {n_null:>12d}  "
                  f"{fpr:>8.3f}  {lo:.3f}–{hi:.3f}  {time.perf_counter() - t0:>5.0f}", flush=True)
    print("\nP(p<0.01): fraction of cohorts with a true interaction where the test reaches p < 0.01.")
    print("FPR@0.05: fraction of no-interaction cohorts (prognostic biomarker + treatment effect) with p < 0.05.")


if __name__ == "__main__":
    main()
