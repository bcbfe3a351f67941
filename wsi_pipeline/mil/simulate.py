"""A synthetic feature-level cohort with planted signals, for tests, demos and head comparisons.

``simulate_feature_cohort`` writes ``RUN/features/<encoder>/<slide_id>.h5`` (tile embeddings on a tile
grid) and a labels CSV. Every slide is a blob of tiles with Gaussian background embeddings; signals:

- ``response`` (binary): responders carry a small fraction of "signal" tiles (embedding + a·u_resp);
  non-responders carry the same number of "decoy" tiles (+ a·u_decoy), so tile counts give nothing away.
- ``immune_phenotype`` (multiclass: desert / excluded / inflamed): every slide has a tumour core (+u_tum)
  and the same number of lymphocyte tiles (+u_lym); they sit far from the tumour (desert), on its rim
  (excluded) or inside it (inflamed): only the spatial arrangement tells the classes apart.
- ``til_fraction`` (regression): fraction of the tumour tiles with an inflamed lymphocyte signature (+u_til).
- ``os`` (survival: os_months, os_event): exponential times with log-hazard −1.2·response, censored.
- covariates ``age`` (numeric) and ``stage`` (I–IV), both mildly associated with response.
Some patients have two slides (same patient-level labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_pipeline.formats.h5 import A_EMBED_DIM, A_ENCODER, A_TARGET_MPP, write_features_h5
from wsi_pipeline.formats.tables import write_labels_csv
from wsi_pipeline.runfolder.layout import RunLayout

PHENOTYPES = ("desert", "excluded", "inflamed")
TARGETS_SPEC = "response:binary,immune_phenotype:multiclass,til_fraction:regression,os:survival(os_months,os_event)"


@dataclass
class SimSpec:
    n_patients: int = 40
    two_slide_fraction: float = 0.25
    embed_dim: int = 32
    grid: int = 10  # tiles per side of the slide's bounding box
    amplitude: float = 3.0
    signal_fraction: float = 0.08
    noise: float = 1.0
    missing_fraction: float = 0.05  # labels set missing at random per target
    encoder: str = "sim"
    target_mpp: float = 0.5
    tile_px_l0: int = 224
    seed: int = 0  # patients, layouts, noise
    direction_seed: int = 0  # signal directions: cohorts with the same value share an "encoder"
    id_prefix: str = "P"


def _unit(rng: np.random.Generator, d: int) -> np.ndarray:
    v = rng.normal(size=d)
    return v / np.linalg.norm(v)


def _slide(rng: np.random.Generator, spec: SimSpec, dirs: dict[str, np.ndarray], responder: bool,
           phenotype: int, til: float) -> tuple[np.ndarray, np.ndarray]:
    g = spec.grid
    rr, cc = np.mgrid[0:g, 0:g]
    c0 = (g - 1) / 2 + rng.normal(0, 0.4, 2)
    dist = np.hypot(rr - c0[0], cc - c0[1])
    keep = dist <= g / 2 + rng.normal(0, 0.3)
    rows, cols = rr[keep], cc[keep]
    d = dist[keep]
    n = len(rows)
    x = rng.normal(0, spec.noise, (n, spec.embed_dim))
    # tumour core and lymphocytes placed by phenotype
    core_r = g / 4
    tumour = d <= core_r
    n_lym = max(2, round(0.12 * n))
    if phenotype == 0:  # desert: lymphocytes far out
        cand = np.argsort(-d)
    elif phenotype == 1:  # excluded: on the rim of the tumour
        cand = np.argsort(np.abs(d - (core_r + 1.0)))
    else:  # inflamed: inside the tumour
        cand = np.argsort(d)
    lym = cand[:n_lym]
    x[tumour] += spec.amplitude * dirs["tum"]
    x[lym] += spec.amplitude * dirs["lym"]
    tum_idx = np.flatnonzero(tumour)
    n_til = round(til * len(tum_idx))
    if n_til:
        x[rng.choice(tum_idx, n_til, replace=False)] += spec.amplitude * dirs["til"]
    k = max(1, round(spec.signal_fraction * n))
    sig = rng.choice(n, k, replace=False)
    x[sig] += spec.amplitude * (dirs["resp"] if responder else dirs["decoy"])
    l0_xy = np.stack([cols, rows], axis=1).astype(np.int64) * spec.tile_px_l0
    return x.astype(np.float32), l0_xy


def simulate_feature_cohort(run: str | Path, labels_csv: str | Path, spec: SimSpec | None = None) -> Path:
    """Write the synthetic cohort's features into ``run`` and its labels to ``labels_csv``; returns the CSV."""
    import pandas as pd

    spec = spec or SimSpec()
    drng = np.random.default_rng([spec.direction_seed, 104729])
    dirs = {k: _unit(drng, spec.embed_dim) for k in ("resp", "decoy", "tum", "lym", "til")}
    rng = np.random.default_rng(spec.seed)
    layout = RunLayout(run)
    rows = []
    for p in range(spec.n_patients):
        pid = f"{spec.id_prefix}{p:03d}"
        age = float(rng.normal(62, 9))
        stage_n = int(rng.integers(1, 5))
        logit = 0.04 * (age - 62) - 0.3 * (stage_n - 2.5) + rng.normal(0, 1.0)
        responder = bool(logit > 0)
        phenotype = int(rng.integers(0, 3))
        til = float(np.clip(rng.beta(2, 5) + 0.15 * phenotype, 0, 1))
        hazard = 0.05 * np.exp(-1.2 * responder)
        t_event = rng.exponential(1 / hazard)
        t_cens = rng.uniform(12, 60)
        os_months, os_event = min(t_event, t_cens), int(t_event <= t_cens)
        n_slides = 2 if rng.random() < spec.two_slide_fraction else 1
        for s in range(n_slides):
            sid = f"{pid}_S{s}"
            feats, xy = _slide(rng, spec, dirs, responder, phenotype, til)
            write_features_h5(layout.features_h5(spec.encoder, sid), feats, xy,
                              {A_ENCODER: spec.encoder, A_EMBED_DIM: spec.embed_dim, A_TARGET_MPP: spec.target_mpp})
            rows.append({"slide_id": sid, "patient_id": pid, "response": int(responder),
                         "immune_phenotype": PHENOTYPES[phenotype], "til_fraction": round(til, 4),
                         "os_months": round(os_months, 2), "os_event": os_event, "age": round(age, 1),
                         "stage": ["I", "II", "III", "IV"][stage_n - 1]})
    df = pd.DataFrame(rows)
    for col in ("response", "immune_phenotype", "til_fraction"):
        miss = rng.random(len(df)) < spec.missing_fraction
        df[col] = df[col].astype(object).where(~miss, "")
    return write_labels_csv(labels_csv, df)
