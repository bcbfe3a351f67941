"""Synthetic cohorts: patients, slides and labels from a documented generative model.

Generative model (all draws from one ``numpy`` generator seeded by ``seed``; patient by patient):

1. **Patient covariates.** ``age`` ~ Normal(63, 10) clipped to [30, 90] (integer years);
   ``stage`` ∈ {1, 2, 3, 4} with probabilities (0.15, 0.35, 0.35, 0.15); ``arm`` ∈ {control, treatment}
   with probability 1/2 each when ``two_arms``, else ``treatment`` for everyone. With
   ``arm_assignment="blocks"`` the arms are randomised 1:1 in permuted blocks of two (patients 1–2, 3–4,
   ...: one of each, order drawn from a second generator seeded by ``[seed, 3]``), so every even-sized
   cohort — and every even-sized prefix of one — is balanced. The main generator is consumed as with
   ``"random"``, so covariates and baseline slides are the same and a patient whose arm is unchanged
   keeps every label.
2. **Tumour microenvironment.** ``immune_phenotype`` ~ Categorical(``phenotype_probs``) over
   (inflamed, excluded, desert). Each baseline slide gets its own class map with that phenotype
   (``layout.make_class_map``: the phenotype is the *geometry* of lymphocyte cells relative to tumour
   nests; inflamed and excluded share one TIL-count distribution). ``til_fraction`` is read back from
   the class map (lymphocyte cells / tissue cells). A fraction ``multi_slide_fraction`` of patients has
   a second baseline slide (a new section: new layout, same phenotype).
3. **Image score** (patient level, baseline slides averaged):
   ``s = til_weight · (til − til_ref) / til_scale + inflamed_weight · [inflamed] + desert_weight · [desert]``.
4. **Response** ~ Bernoulli(σ(η)) with
   ``η = intercept + arm_effect·T + (image_effect_control + (image_effect_treatment −
   image_effect_control)·T) · s + stage_effect·(stage − 2.5) + age_effect·(age − 63)/10``,
   T = 1 in the treatment arm. The image predicts response much more under treatment than in control
   (a treatment × biomarker interaction: a *predictive* biomarker, partly prognostic), and the Bernoulli
   draw keeps the best achievable AUROC below 1 (``response_prob`` holds σ(η) for reference).
5. **Overall survival** (patient level, from what the baseline slides show): event time
   T_ev ~ Exponential(rate λ) per month with ``λ = baseline_hazard · exp(h)`` and the true log relative
   hazard ``h = os_inflamed_log_hr · [inflamed] + os_desert_log_hr · [desert] + os_til_log_hr · (til −
   til_ref) / til_scale + os_tumour_log_hr · (tumour − tumour_ref) / tumour_scale + response_log_hr ·
   response + stage_log_hr · (stage − 2.5)`` (``til``, ``tumour``: the TIL and tumour fractions of the class
   map, baseline slides averaged). By default the last two coefficients are 0, so the hazard is a function of
   the image alone (inflamed and TIL-rich tumours live longer, deserts and tumour-rich slides shorter) and
   the noise is the exponential draw and the censoring: C = min(``max_follow_up``,
   Exponential(``censor_rate``)); ``os_months`` = min(T_ev, C), ``os_event`` = [T_ev ≤ C]. The generator
   records ``h`` as ``os_true_log_hazard``, so the best C-index any model can reach on a cohort (the
   *oracle*: Harrell's C of ``h`` on the observed times) can be computed.
6. **Timepoints** (``timepoint_fraction`` > 0): that share of patients also has an ``on_treatment``
   slide whose TME
   shifts given the arm and the response: treated responders move up one phenotype step
   (desert → excluded → inflamed) with probability ``shift_up_prob``, their TIL target is multiplied
   by U(1.5, 2.5) and their tumour target by U(0.85, 1.05), with more necrosis and room for up to
   90% of a nest's interior to turn lymphocytic (infiltrating lymphocytes replace tumour); everyone
   else keeps the phenotype (or moves one step down with probability ``shift_down_prob``), TIL × U(0.7,
   1.1), tumour × U(0.95, 1.25). Patient-level labels (response, survival, arm, age, stage) are repeated on
   every slide of the patient; ``immune_phenotype`` and ``til_fraction`` are per slide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.synth.layout import PHENOTYPES, LayoutParams
from wsi_pipeline.synth.slides import DEFAULT_CELL_UM, SlideSpec, make_slide_spec

ARM_ASSIGNMENTS = ("random", "blocks")
LABEL_COLUMNS = (
    "slide_id", "patient_id", "response", "immune_phenotype", "til_fraction", "os_months", "os_event",
    "arm", "timepoint", "age", "stage",
)


@dataclass(frozen=True)
class OutcomeModel:
    """Coefficients of the response and survival model (see the module docstring)."""

    intercept: float = -0.6
    arm_effect: float = 0.2
    image_effect_control: float = 0.3
    image_effect_treatment: float = 1.2
    til_weight: float = 1.0
    til_ref: float = 0.05
    til_scale: float = 0.03
    inflamed_weight: float = 1.0
    desert_weight: float = -0.8
    stage_effect: float = -0.3
    age_effect: float = -0.1
    baseline_hazard: float = 1.0 / 20.0  # per month
    os_inflamed_log_hr: float = -1.2
    os_desert_log_hr: float = 1.0
    os_til_log_hr: float = -0.2  # per til_scale of TIL fraction above til_ref
    os_tumour_log_hr: float = 0.4  # per tumour_scale of tumour fraction above tumour_ref
    tumour_ref: float = 0.3
    tumour_scale: float = 0.05
    response_log_hr: float = 0.0  # not visible in the image: 0 keeps survival learnable from the slide
    stage_log_hr: float = 0.0
    max_follow_up: float = 60.0
    censor_rate: float = 1.0 / 120.0

    def image_score(self, til: float, phenotype: str) -> float:
        return (self.til_weight * (til - self.til_ref) / self.til_scale
                + self.inflamed_weight * (phenotype == "inflamed") + self.desert_weight * (phenotype == "desert"))

    def response_logit(self, til: float, phenotype: str, treated: bool, age: float, stage: int) -> float:
        slope = self.image_effect_control + (self.image_effect_treatment - self.image_effect_control) * treated
        return (self.intercept + self.arm_effect * treated + slope * self.image_score(til, phenotype)
                + self.stage_effect * (stage - 2.5) + self.age_effect * (age - 63.0) / 10.0)

    def os_log_hazard(self, til: float, tumour: float, phenotype: str, response: int = 0, stage: int = 2) -> float:
        """True log relative hazard ``h`` of overall survival (step 5 of the module docstring)."""
        return (self.os_inflamed_log_hr * (phenotype == "inflamed") + self.os_desert_log_hr * (phenotype == "desert")
                + self.os_til_log_hr * (til - self.til_ref) / self.til_scale
                + self.os_tumour_log_hr * (tumour - self.tumour_ref) / self.tumour_scale
                + self.response_log_hr * response + self.stage_log_hr * (stage - 2.5))

    def draw_survival(self, rng: np.random.Generator, log_hazard: float) -> dict[str, Any]:
        """``os_months``, ``os_event`` and ``os_true_log_hazard`` for one patient (two draws from ``rng``)."""
        rate = self.baseline_hazard * math.exp(log_hazard)
        t_event = rng.exponential(1.0 / rate)
        t_cens = min(self.max_follow_up, rng.exponential(1.0 / self.censor_rate))
        return {"os_months": round(float(min(t_event, t_cens)), 2), "os_event": int(t_event <= t_cens),
                "os_true_log_hazard": round(float(log_hazard), 4)}


def draw_age_stage(rng: np.random.Generator) -> tuple[int, int]:
    """A patient's age (years, N(63, 10) rounded and clipped to 30–90) and stage (1–4), two draws from ``rng``."""
    age = int(np.clip(round(rng.normal(63, 10)), 30, 90))
    return age, int(rng.choice([1, 2, 3, 4], p=[0.15, 0.35, 0.35, 0.15]))


@dataclass(frozen=True)
class CohortParams:
    """What cohort to draw. ``n_patients`` patients; slides of ``size_l0`` px at ``mpp`` µm/px."""

    n_patients: int = 20
    seed: int = 0
    size_l0: tuple[int, int] = (4000, 3000)
    mpp: float = 0.5
    cell_um: float = DEFAULT_CELL_UM
    two_arms: bool = False
    arm_assignment: str = "random"  # or "blocks": 1:1 in permuted blocks of two (see the module docstring)
    timepoint_fraction: float = 0.0  # share of patients who also have an on_treatment slide
    multi_slide_fraction: float = 0.2
    phenotype_probs: tuple[float, float, float] = (0.35, 0.35, 0.30)
    shift_up_prob: float = 0.6
    shift_down_prob: float = 0.2
    layout: LayoutParams = field(default_factory=LayoutParams)
    outcome: OutcomeModel = field(default_factory=OutcomeModel)
    id_prefix: str = "P"


@dataclass
class PlannedSlide:
    """A slide of a cohort: its spec (class map) and its label row."""

    spec: SlideSpec
    labels: dict[str, Any]


def _shift(phenotype: str, up: bool) -> str:
    order = ("desert", "excluded", "inflamed")
    i = order.index(phenotype) + (1 if up else -1)
    return order[min(max(i, 0), 2)]


def _slide(params: CohortParams, slide_id: str, seed: int, phenotype: str, layout: LayoutParams,
           til_target: float | None = None, tumour_target: float | None = None) -> SlideSpec:
    return make_slide_spec(slide_id, seed, phenotype, params.size_l0, params.mpp, params.cell_um, layout,
                           til_target, tumour_target)


def plan_cohort(params: CohortParams) -> list[PlannedSlide]:
    """Draw every patient, slide class map and label (no pixels yet). Deterministic in ``params``."""
    from wsi_pipeline.synth.tissue import stable_seed

    if params.arm_assignment not in ARM_ASSIGNMENTS:
        from wsi_pipeline.errors import ConfigError

        raise ConfigError(f"arm_assignment {params.arm_assignment!r}: use one of {', '.join(ARM_ASSIGNMENTS)}")
    rng = np.random.default_rng(params.seed)
    arm_rng = np.random.default_rng([params.seed, 3])  # permuted blocks; independent of the patient draws
    block_first_treated = False
    om = params.outcome
    probs = np.asarray(params.phenotype_probs, float)
    probs /= probs.sum()
    out: list[PlannedSlide] = []
    width = max(3, len(str(params.n_patients)))
    for i in range(params.n_patients):
        pid = f"{params.id_prefix}{i + 1:0{width}d}"
        age, stage = draw_age_stage(rng)
        treated = bool(rng.random() < 0.5) if params.two_arms else True
        if params.two_arms and params.arm_assignment == "blocks":
            if i % 2 == 0:
                block_first_treated = bool(arm_rng.random() < 0.5)
            treated = block_first_treated if i % 2 == 0 else not block_first_treated
        phenotype = str(rng.choice(PHENOTYPES, p=probs))
        n_base = 2 if rng.random() < params.multi_slide_fraction else 1
        base = [_slide(params, f"{pid}_{k + 1}", stable_seed(params.seed, pid, k), phenotype, params.layout)
                for k in range(n_base)]
        til = float(np.mean([s.truth()["til_fraction"] for s in base]))
        tumour = float(np.mean([s.truth()["tumour_fraction"] for s in base]))
        eta = om.response_logit(til, phenotype, treated, age, stage)
        p_resp = 1.0 / (1.0 + math.exp(-eta))
        response = int(rng.random() < p_resp)
        survival = om.draw_survival(rng, om.os_log_hazard(til, tumour, phenotype, response, stage))
        patient = {
            "patient_id": pid, "response": response, "response_prob": round(p_resp, 4),
            "os_months": survival["os_months"], "os_event": survival["os_event"],
            "arm": "treatment" if treated else "control", "age": age, "stage": stage,
        }
        slides = [(s, "baseline") for s in base]
        if params.timepoint_fraction > 0 and rng.random() < params.timepoint_fraction:
            slides.append((_on_treatment(params, rng, pid, base[0], phenotype, treated and response == 1),
                           "on_treatment"))
        for spec, tp in slides:
            t = spec.truth()
            row = {"slide_id": spec.slide_id, **patient, "immune_phenotype": spec.phenotype,
                   "til_fraction": round(t["til_fraction"], 4), "timepoint": tp,
                   "tumour_fraction": round(t["tumour_fraction"], 4),
                   "stroma_fraction": round(t["stroma_fraction"], 4),
                   "os_true_log_hazard": survival["os_true_log_hazard"]}
            out.append(PlannedSlide(spec, row))
    return out


def _on_treatment(params: CohortParams, rng: np.random.Generator, pid: str, base: SlideSpec,
                  phenotype: str, benefit: bool) -> SlideSpec:
    from wsi_pipeline.synth.tissue import stable_seed

    t0 = base.truth()
    layout = params.layout
    if benefit:
        new_ph = _shift(phenotype, up=True) if rng.random() < params.shift_up_prob else phenotype
        til_mult, tum_mult = rng.uniform(1.5, 2.5), rng.uniform(0.85, 1.05)
        layout = replace(layout, necrosis_prob=min(1.0, layout.necrosis_prob + 0.4),
                         max_interior_lymph=max(layout.max_interior_lymph, 0.9))
    else:
        new_ph = _shift(phenotype, up=False) if rng.random() < params.shift_down_prob else phenotype
        til_mult, tum_mult = rng.uniform(0.7, 1.1), rng.uniform(0.95, 1.25)
    til_target = None  # desert: drawn from the desert range
    if new_ph != "desert":
        lo = layout.til_target[0]
        til_target = float(np.clip(max(t0["til_fraction"], lo) * til_mult, 0.5 * lo, 0.3))
    tumour_target = float(np.clip(t0["tumour_fraction"] * tum_mult, 0.08, 0.6))
    return _slide(params, f"{pid}_on", stable_seed(params.seed, pid, "on"), new_ph, layout, til_target,
                  tumour_target)


def labels_frame(planned: list[PlannedSlide]) -> Any:
    """The labels table (pandas DataFrame): ``LABEL_COLUMNS`` first, then truth extras."""
    import pandas as pd

    df = pd.DataFrame([p.labels for p in planned])
    extra = [c for c in df.columns if c not in LABEL_COLUMNS]
    return df[list(LABEL_COLUMNS) + extra]


@dataclass(frozen=True)
class WriteOptions:
    """How slides are written."""

    downsamples: tuple[int, ...] = (1, 4, 16)
    quality: int = 80
    tile: int = 256
    extension: str = ".svs"
    truth_dir: str = "truth"  # class maps as <out>/truth/<slide_id>.npz ('' to skip)
    thumbnail_max: int = 768  # longest side of the Aperio thumbnail image
    workers: int = 1


def _write_one(job: tuple[PlannedSlide, str, WriteOptions]) -> str:
    from wsi_pipeline.synth.slides import save_truth, write_slide

    planned, out_dir, wo = job
    spec = planned.spec
    path = Path(out_dir) / f"{spec.slide_id}{wo.extension}"
    write_slide(spec, path, wo.downsamples, wo.quality, wo.tile, thumbnail_max=wo.thumbnail_max)
    if wo.truth_dir:
        save_truth(spec, Path(out_dir) / wo.truth_dir / f"{spec.slide_id}.npz")
    return str(path)


def write_cohort(out_dir: str | Path, params: CohortParams, write: WriteOptions | None = None) -> Any:
    """Draw a cohort, write every slide (``<out_dir>/<slide_id>.svs``), its truth and
    ``<out_dir>/labels.csv``; return the labels DataFrame. Slides already present are rewritten."""
    import logging

    from wsi_pipeline.errors import WSIPipelineError
    from wsi_pipeline.formats.atomic import write_text_atomic
    from wsi_pipeline.runfolder.batch import map_isolated

    log = logging.getLogger(__name__)
    wo = write or WriteOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    planned = plan_cohort(params)
    jobs = [(p, str(out), wo) for p in planned]
    failed = []
    for res in map_isolated(_write_one, jobs, workers=wo.workers):
        if res.ok:
            log.info("wrote %s (%.1f s)", res.value, res.seconds)
        else:
            failed.append(f"{res.item[0].spec.slide_id}: {res.error}")
    if failed:
        raise WSIPipelineError(f"{out}: could not write {len(failed)} synthetic slide(s): " + "; ".join(failed))
    df = labels_frame(planned)
    write_text_atomic(out / "labels.csv", df.to_csv(index=False))
    return df
