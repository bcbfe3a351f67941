"""The RUN tables a pipeline would write for a labelled synthetic cohort (tests and demos of the analyses):
``predictions.csv`` and ``tme.csv`` derived from the per-slide truth that :mod:`wsi_pipeline.synth.cohort`
writes into the labels. Write them with :func:`wsi_pipeline.analysis.simulate.write_cohort_tables`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from wsi_pipeline.analysis.simulate import CohortTables
from wsi_pipeline.synth.cohort import OutcomeModel


def run_tables_from_truth(labels: pd.DataFrame, seed: int = 0, noise: float = 0.01) -> CohortTables:
    """The ``predictions.csv`` and ``tme.csv`` a pipeline would write for a labelled synthetic cohort of
    :mod:`wsi_pipeline.synth.cohort` (its labels carry per-slide truth: ``til_fraction``,
    ``tumour_fraction``, ``stroma_fraction``, ``immune_phenotype``).

    ``tme.csv``: the class-map truth read with Gaussian ``noise`` (a near-perfect tissue classifier).
    ``predictions.csv``: a model that learned the treated arm's image → response relation of the
    generator (``OutcomeModel.image_score``), applied per slide, with noise on the logit scale; its
    phenotype call is right 90% of the time.
    """
    rng = np.random.default_rng(seed)
    om = OutcomeModel()
    phenos = ("inflamed", "excluded", "desert")
    n = len(labels)
    til = np.clip(labels["til_fraction"].to_numpy(float) + rng.normal(0, noise, n), 0, 1)
    tum = np.clip(labels["tumour_fraction"].to_numpy(float) + rng.normal(0, noise, n), 0, 1)
    stro = np.clip(labels["stroma_fraction"].to_numpy(float) + rng.normal(0, noise, n), 0, 1)
    truth_ph = labels["immune_phenotype"].astype(str).to_numpy()
    tme = pd.DataFrame({
        "slide_id": labels["slide_id"].astype(str), "area_frac_tumor": tum.round(4),
        "area_frac_stroma": stro.round(4), "area_frac_lympho": til.round(4), "til_fraction": til.round(4),
        "tumour_stroma_ratio": (tum / np.maximum(tum + stro, 1e-9)).round(4), "immune_phenotype": truth_ph,
    })
    score = np.array([om.image_score(t, p) for t, p in zip(til, truth_ph, strict=True)])
    logit = om.intercept + om.image_effect_treatment * score + rng.normal(0, 0.5, n)
    prob = 1 / (1 + np.exp(-logit))
    called = np.where(rng.random(n) < 0.9, truth_ph, rng.choice(phenos, n))
    probs = np.where(np.array(phenos)[None, :] == called[:, None], 0.8, 0.1)
    preds = pd.DataFrame({
        "slide_id": labels["slide_id"].astype(str), "patient_id": labels["patient_id"].astype(str),
        "response_prob": prob.round(4), "response_pred": (prob >= 0.5).astype(int),
        **{f"immune_phenotype_prob_{p}": probs[:, k] for k, p in enumerate(phenos)},
        "immune_phenotype_pred": called, "til_fraction_pred": (til + rng.normal(0, 0.02, n)).round(4),
    })
    return CohortTables(labels=labels, predictions=preds, tme=tme)
