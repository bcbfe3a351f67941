"""Simulated two-arm trials with a known treatment × biomarker interaction (for tests and
``scripts/sim_predictive.py``). Frames carry the standard columns of :mod:`wsi_pipeline.analysis.stats`.

Binary outcome: ``logit P(response) = intercept + b_arm·arm + b_bm·biomarker + b_int·arm·biomarker``.
Survival: exponential times with hazard ``h0·exp(b_arm·arm + b_bm·biomarker + b_int·arm·biomarker)`` and
uniform censoring on ``[0, censor_max]``. The biomarker is standard normal; the arm is 1:1 randomised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class TrialEffects:
    b_int: float = 0.0  # treatment × biomarker (log OR / log HR per SD of the biomarker)
    b_arm: float = 0.0
    b_bm: float = 0.0  # prognostic effect, the same in both arms
    intercept: float = -0.5  # binary: baseline log odds; survival: log baseline hazard


def _design(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    arm = rng.permutation(np.arange(n) % 2).astype(float)
    biomarker = rng.standard_normal(n)
    return arm, biomarker


def simulate_binary_trial(n: int, effects: TrialEffects, rng: np.random.Generator) -> pd.DataFrame:
    arm, b = _design(n, rng)
    eta = effects.intercept + effects.b_arm * arm + effects.b_bm * b + effects.b_int * arm * b
    outcome = (rng.random(n) < 1.0 / (1.0 + np.exp(-eta))).astype(float)
    return pd.DataFrame({"arm": arm, "biomarker": b, "outcome": outcome})


def simulate_survival_trial(
    n: int, effects: TrialEffects, rng: np.random.Generator, censor_max: float = 3.0
) -> pd.DataFrame:
    arm, b = _design(n, rng)
    hazard = np.exp(effects.intercept + effects.b_arm * arm + effects.b_bm * b + effects.b_int * arm * b)
    t_event = rng.exponential(1.0 / hazard)
    t_censor = rng.uniform(0.0, censor_max, n)
    return pd.DataFrame({"arm": arm, "biomarker": b, "time": np.minimum(t_event, t_censor),
                         "event": (t_event <= t_censor).astype(float)})


# ------------------------------------------------------------------ a whole cohort's RUN tables
@dataclass
class CohortTables:
    """What a RUN folder and its labels would hold for a two-arm, multi-timepoint cohort."""

    labels: pd.DataFrame  # slide_id, patient_id, arm, timepoint, response, os_months, os_event, age, stage, split
    predictions: pd.DataFrame  # predictions.csv columns (issue 4 naming)
    tme: pd.DataFrame  # tme.csv columns (TME stage naming)


def _phenotype(til: np.ndarray, intratumoural: np.ndarray) -> np.ndarray:
    return np.where(til < 0.05, "desert", np.where(intratumoural > 0.5, "inflamed", "excluded"))


def simulate_cohort_tables(
    n_patients: int = 60,
    timepoints: tuple[str, ...] = ("baseline", "on_treatment"),
    seed: int = 0,
    b_int: float = 2.0,
    arms: tuple[str, str] = ("control", "drug"),
) -> CohortTables:
    """A cohort where the baseline TIL fraction predicts response to the drug only (treatment ×
    biomarker interaction ``b_int`` per SD), and where TILs rise on treatment in responders and fall in
    non-responders. The model's ``response_prob`` is a noisy read of the baseline TIL fraction."""
    rng = np.random.default_rng(seed)
    pid = [f"P{i:03d}" for i in range(n_patients)]
    arm = rng.permutation(np.arange(n_patients) % 2)
    til0 = rng.beta(2.0, 9.0, n_patients)
    z = (til0 - til0.mean()) / til0.std()
    eta = -0.6 + 0.2 * arm + 0.2 * z + b_int * arm * z
    response = (rng.random(n_patients) < 1 / (1 + np.exp(-eta))).astype(int)
    hazard = np.exp(-2.8 - 0.3 * arm - 0.2 * z - 0.5 * b_int * arm * z)
    t_event = rng.exponential(1 / hazard)
    t_cens = rng.uniform(12, 48, n_patients)
    intra0 = rng.uniform(0, 1, n_patients)
    age = rng.integers(40, 80, n_patients)
    labels, preds, tme = [], [], []
    for k, tp in enumerate(timepoints):
        shift = k * np.where(response == 1, 0.06, -0.03) * (arm == 1 if k else 1)
        til = np.clip(til0 + shift + rng.normal(0, 0.015, n_patients), 0.0, 0.9)
        intra = np.clip(intra0 + k * np.where(response == 1, 0.3, -0.2), 0, 1)
        pheno = _phenotype(til, intra)
        tumour = np.clip(rng.uniform(0.2, 0.5, n_patients) - k * 0.08 * response, 0.02, 0.9)
        stroma = np.clip(1 - tumour - til - rng.uniform(0.05, 0.2, n_patients), 0.02, 0.9)
        for i in range(n_patients):
            n_slides = 2 if (k == 0 and i % 10 == 0) else 1  # some patients have two baseline slides
            for s in range(n_slides):
                sid = f"{pid[i]}_{tp}_{s}"
                noisy_til = float(np.clip(til[i] + rng.normal(0, 0.01), 0, 1))
                labels.append({"slide_id": sid, "patient_id": pid[i], "arm": arms[arm[i]], "timepoint": tp,
                               "response": int(response[i]), "os_months": round(float(min(t_event[i], t_cens[i])), 2),
                               "os_event": int(t_event[i] <= t_cens[i]), "age": int(age[i]),
                               "stage": "III" if i % 3 == 0 else "II", "split": "train" if i % 4 == 0 else "test"})
                p_resp = float(1 / (1 + np.exp(-(-1.2 + 8.0 * noisy_til + rng.normal(0, 0.3)))))
                probs = rng.dirichlet(np.where(np.array(["inflamed", "excluded", "desert"]) == pheno[i], 8.0, 1.0))
                preds.append({"slide_id": sid, "patient_id": pid[i], "response_prob": round(p_resp, 4),
                              "response_pred": int(p_resp >= 0.5),
                              "immune_phenotype_prob_inflamed": round(float(probs[0]), 4),
                              "immune_phenotype_prob_excluded": round(float(probs[1]), 4),
                              "immune_phenotype_prob_desert": round(float(probs[2]), 4),
                              "immune_phenotype_pred": ["inflamed", "excluded", "desert"][int(np.argmax(probs))],
                              "til_fraction_pred": round(noisy_til + float(rng.normal(0, 0.02)), 4),
                              "os_risk": round(float(-z[i] + rng.normal(0, 0.5)), 4)})
                tme.append({"slide_id": sid, "area_frac_tumor": round(float(tumour[i]), 4),
                            "area_frac_stroma": round(float(stroma[i]), 4), "area_frac_lympho": round(noisy_til * 0.8, 4),
                            "til_fraction": round(noisy_til, 4),
                            "tumour_stroma_ratio": round(float(tumour[i] / (tumour[i] + stroma[i])), 4),
                            "lymph_density_tumour": round(float(noisy_til * intra[i]), 4),
                            "lymph_density_margin": round(float(noisy_til * (1 - intra[i])), 4),
                            "immune_phenotype": pheno[i]})
    return CohortTables(labels=pd.DataFrame(labels), predictions=pd.DataFrame(preds), tme=pd.DataFrame(tme))


def write_cohort_tables(tables: CohortTables, run: str | Path, labels_csv: str | Path) -> None:
    """Write ``predictions.csv`` and ``tme.csv`` into the RUN folder, and the labels CSV."""
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout

    layout = RunLayout(run)
    F.write_predictions_csv(layout.predictions_csv, tables.predictions)
    F.write_tme_csv(layout.tme_csv, tables.tme)
    F.write_labels_csv(labels_csv, tables.labels)

