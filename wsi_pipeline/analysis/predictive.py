"""Is a biomarker *predictive* of benefit from the treatment (not merely prognostic)?

A predictive biomarker changes the treatment effect: we test the treatment × biomarker interaction in a
cohort with a comparator arm —

- binary outcome: logistic regression ``outcome ~ arm * biomarker (+ covariates)`` (statsmodels);
- survival outcome: Cox model ``hazard ~ arm * biomarker (+ covariates)`` (lifelines);

and report the interaction on the ratio scale (OR or HR) with its 95% Wald CI and p, plus the treatment
effect within each biomarker subgroup (responder rates per arm with Wilson CIs, risk difference and OR;
or Kaplan–Meier medians, HR and log-rank p) and a forest plot.

The biomarker is any column of ``predictions.csv``, ``tme.csv`` or the labels (see
:mod:`wsi_pipeline.analysis.tables` for name resolution and patient aggregation). It enters the model
continuous, as a 0/1 indicator (binary column, or ``--positive LEVEL`` of a categorical one), or
dichotomised at a cut-off fixed before the test data are seen (:mod:`wsi_pipeline.analysis.cutoff`).
For a continuous biomarker the subgroup table uses tertiles of the analysed cohort — descriptive only;
the test is the continuous interaction.

Layers: :func:`prepare_cohort` (I/O: labels + RUN tables → one row per patient), :func:`analyse_cohort`
(pure statistics, also used by ``scripts/sim_predictive.py``), :func:`write_outputs`, and
:func:`run_predictive` tying them together for ``wsi predictive``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_pipeline.analysis.config import PredictiveConfig
from wsi_pipeline.analysis.cutoff import Cutoff, dichotomise, learn_cutoff, parse_cutoff
from wsi_pipeline.analysis.stats import (
    MODEL_COX,
    MODEL_LOGISTIC,
    SHORT,
    CohortAnalysis,
    GroupEffect,
    binary_effect,
    fit_interaction,
    survival_effect,
)
from wsi_pipeline.analysis.tables import (
    PATIENT_ID,
    SLIDE_ID,
    SRC_PRED,
    ColumnRef,
    Sources,
    aggregate_patients,
    apply_select,
    as_text,
    encode_binary,
    is_numeric,
    resolve_column,
    slide_frame,
)
from wsi_pipeline.errors import ConfigError, FormatError, LabelsError
from wsi_pipeline.formats import api as F
from wsi_pipeline.formats.atomic import atomic_path, write_text_atomic
from wsi_pipeline.runfolder.layout import RunLayout

log = logging.getLogger(__name__)

CONTROL_NAMES = frozenset(
    {"control", "placebo", "soc", "standard", "standard_of_care", "standard-of-care", "comparator", "ctrl", "usual_care"}
)
STANDARD_COLUMNS = ("arm", "biomarker", "outcome", "time", "event")
OOF_FILE = F.OOF_PREDICTIONS_CSV  # written by `wsi train` (wsi_pipeline.mil.model_io.ModelDir)
MODEL_CARD = F.MODEL_JSON
TIMEPOINT_COLUMNS = ("timepoint", "time_point", "visit")


# ------------------------------------------------------------------ the prepared cohort
@dataclass
class BiomarkerInfo:
    name: str  # resolved, e.g. pred:response_prob
    kind: str  # continuous | dichotomised | binary
    scale: str  # what one unit of the model's biomarker means
    cutoff: float | None = None
    cutoff_source: str = ""
    positive: str | None = None
    sd: float | None = None
    subgroup_note: str = ""


@dataclass
class Cohort:
    """One row per analysed patient with standard columns (see :mod:`wsi_pipeline.analysis.stats`)."""

    data: pd.DataFrame
    model: str
    covariates: list[str]
    biomarker: BiomarkerInfo
    treatment: dict[str, str]  # column, treated, control
    outcome: dict[str, str]  # column(s)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class PredictiveResult:
    cohort: Cohort
    analysis: CohortAnalysis
    outputs: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        fit, c = self.analysis.fit, self.cohort
        return _clean({
            "interaction_estimate": fit.interaction.estimate,
            "interaction_ci_low": fit.interaction.ci_low,
            "interaction_ci_high": fit.interaction.ci_high,
            "interaction_p": fit.interaction.p,
            "interaction_scale": fit.scale,
            "interaction_term": fit.interaction.term,
            "model": fit.model,
            "formula": fit.formula,
            "n_patients": fit.n,
            "n_events": fit.n_events,
            "biomarker": asdict(c.biomarker),
            "treatment": c.treatment,
            "outcome": c.outcome,
            "covariates": c.covariates,
            "counts": c.counts,
            "overall_effect": self.analysis.overall.to_dict() if self.analysis.overall else None,
            "subgroup_effects": [g.to_dict() for g in self.analysis.subgroups],
            "coefficients": [asdict(t) for t in fit.terms],
            "warnings": fit.warnings,
            "notes": c.notes,
            "outputs": self.outputs,
        })


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf → None, numpy scalars → Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ------------------------------------------------------------------ encoding helpers
def encode_arm(values: pd.Series, treated: str | None, column: str) -> tuple[np.ndarray, str, str]:
    """Treatment column → 1 (treated) / 0 (control) / NaN, plus the treated and control labels."""
    text = as_text(values)
    levels = sorted(text.dropna().unique())
    if len(levels) != 2:
        raise LabelsError(f"labels: treatment column '{column}' must have exactly two arms; found {levels}")
    if treated is not None:
        if str(treated) not in levels:
            raise ConfigError(f"--treated {treated!r} is not a value of '{column}' (values: {levels})")
        t = str(treated)
    elif set(levels) in ({"0", "1"}, {"False", "True"}):
        t = levels[1]
    else:
        controls = [lv for lv in levels if lv.lower() in CONTROL_NAMES]
        if len(controls) != 1:
            raise ConfigError(f"cannot tell the treated arm among {levels} of '{column}'; pass --treated VALUE")
        t = next(lv for lv in levels if lv != controls[0])
    c = next(lv for lv in levels if lv != t)
    arm = np.where(text.isna(), np.nan, (text == t).astype(float))
    return arm, t, c


# ------------------------------------------------------------------ preparing the cohort (I/O)
def _default_biomarker(cfg: PredictiveConfig, sources: Sources) -> ColumnRef:
    cols = sources.columns(SRC_PRED)
    if not cols:
        raise ConfigError("no --biomarker given and the RUN folder has no predictions.csv; pass --biomarker COL")
    own = f"{cfg.outcome}_{'risk' if cfg.survival else 'prob'}"
    if own in cols:
        return ColumnRef(SRC_PRED, own)
    suffix = "_risk" if cfg.survival else "_prob"
    cands = [c for c in cols if c.endswith(suffix) and "_prob_" not in c]
    if len(cands) == 1:
        return ColumnRef(SRC_PRED, cands[0])
    raise ConfigError(f"no --biomarker given and predictions.csv has {cands or 'no'} *{suffix} columns; "
                      "pass --biomarker COL")


def _split_item(text: str) -> tuple[str, str]:
    col, value = text.split("=", 1)
    return col.strip(), value.strip()


def _oof_training_values(cfg: PredictiveConfig, ref: ColumnRef) -> tuple[pd.Series, str]:
    """Patient-level biomarker values of the model's training cohort: its out-of-fold predictions
    (``DIR/oof_predictions.csv`` of `wsi train`: one row per model variant and patient; the main variant
    named in ``DIR/model.json`` is used)."""
    from wsi_pipeline.encoders.project import find_model_folder

    mdir = find_model_folder(cfg.model_dir, OOF_FILE) or Path(cfg.model_dir)  # type: ignore[arg-type]
    path = mdir / OOF_FILE
    if not path.exists():
        raise ConfigError(f"{path}: not found; --model DIR must hold the {OOF_FILE} written by `wsi train`")
    oof = F.read_oof_predictions_csv(path)
    if ref.source != SRC_PRED or ref.column not in oof.columns:
        raise ConfigError(f"{path}: no column '{ref.column}'; a cut-off learned on the model's out-of-fold "
                          "predictions needs a prediction column as --biomarker (or use --train-split)")
    if oof["model"].nunique() > 1:
        main = _main_variant(mdir)
        if main not in set(oof["model"]):
            raise FormatError(path, f"no rows of the main model variant {main!r}; re-run `wsi train`")
        oof = oof[oof["model"] == main]
    per_patient = oof.groupby(PATIENT_ID)[ref.column].mean()
    return per_patient, f"out-of-fold predictions in {path}"


def _main_variant(mdir: Path) -> str:
    return str(F.read_model_json(mdir / MODEL_CARD)["main_variant"])


def _timepoint_warnings(sources: Sources, slides: pd.DataFrame) -> list[str]:
    """A predictive biomarker is measured before treatment: warn when the analysed slides mix timepoints."""
    out = []
    labels = sources.labels[sources.labels[SLIDE_ID].isin(slides[SLIDE_ID])]
    for col in labels.columns:
        if col.lower() in TIMEPOINT_COLUMNS and labels[col].nunique() > 1:
            values = sorted(as_text(labels[col]).dropna().unique())
            msg = (f"the analysed slides span several values of '{col}' ({values}) and are averaged per patient; "
                   f"a predictive biomarker should come from pre-treatment slides: add --select {col}=VALUE")
            log.warning(msg)
            out.append(msg)
    return out


def prepare_cohort(cfg: PredictiveConfig, sources: Sources | None = None) -> Cohort:
    """Labels + RUN tables → one row per analysable patient, biomarker encoded and cut-off fixed."""
    sources = sources or Sources.load(cfg.run, cfg.labels)
    model = MODEL_COX if cfg.survival else MODEL_LOGISTIC
    refs: dict[str, ColumnRef] = {"arm": resolve_column(cfg.treatment, sources, "--treatment")}
    if cfg.survival:
        refs["time"] = resolve_column(cfg.outcome, sources, "--outcome")
        refs["event"] = resolve_column(cfg.event, sources, "--event")  # type: ignore[arg-type]
    else:
        refs["outcome"] = resolve_column(cfg.outcome, sources, "--outcome")
    bm_ref = resolve_column(cfg.biomarker, sources, "--biomarker") if cfg.biomarker else _default_biomarker(
        cfg, sources)
    refs["biomarker"] = bm_ref
    covariates = []
    for cov in cfg.covariates:
        ref = resolve_column(cov, sources, "--covariates")
        if ref.column in STANDARD_COLUMNS or ref.column in refs:
            raise ConfigError(f"--covariates: '{ref.column}' clashes with an analysis column; rename it")
        refs[ref.column] = ref
        covariates.append(ref.column)
    if cfg.train_split:
        refs["_split"] = resolve_column(_split_item(cfg.train_split)[0], sources, "--train-split")

    slides = apply_select(slide_frame(sources, refs), sources, cfg.select)
    n_slides = len(slides)
    patient_level = [k for k in refs if k != "biomarker"]
    patients = aggregate_patients(slides, readouts=["biomarker"], patient_level=patient_level)
    notes = []
    n_multi = int((patients["n_slides"] > 1).sum())
    if n_multi:
        notes.append(f"{n_multi} patient(s) with several slides: biomarker averaged over their slides "
                     "(majority value if categorical)")
    if cfg.select:
        notes.append(f"slides selected by {', '.join(cfg.select)}")
    notes += _timepoint_warnings(sources, slides)

    counts = {"n_slides": n_slides, "n_patients_labelled": len(patients)}
    train = patients.iloc[0:0]
    if cfg.train_split:
        _, value = _split_item(cfg.train_split)
        is_train = as_text(patients["_split"]) == value
        train, patients = patients[is_train], patients[~is_train].reset_index(drop=True)
        counts["n_training_excluded"] = len(train)
        notes.append(f"{len(train)} training patient(s) ({cfg.train_split}) left out of the analysis")
        if patients.empty:
            raise LabelsError(f"--train-split {cfg.train_split}: no patient left to analyse")

    # ---- encode treatment and outcome
    data = pd.DataFrame({PATIENT_ID: patients[PATIENT_ID], "n_slides": patients["n_slides"]})
    data["arm"], treated, control = encode_arm(patients["arm"], cfg.treated, cfg.treatment)
    if cfg.survival:
        data["time"] = pd.to_numeric(patients["time"], errors="coerce")
        data["event"] = encode_binary(patients["event"], cfg.event)  # type: ignore[arg-type]
        outcome = {"time": refs["time"].label, "event": refs["event"].label}
    else:
        data["outcome"] = encode_binary(patients["outcome"], cfg.outcome)
        outcome = {"outcome": refs["outcome"].label}
    for cov in covariates:
        data[cov] = patients[cov].to_numpy()

    # ---- biomarker
    raw = patients["biomarker"]
    info, values, train_ids = _encode_biomarker(cfg, bm_ref, raw, train, notes)
    data["biomarker"] = values
    data["biomarker_raw"] = raw.to_numpy()
    seen = data[PATIENT_ID].isin(train_ids)
    if seen.any():  # patients the cut-off was learned on (the model's training cohort): not test data
        notes.append(f"{int(seen.sum())} patient(s) of the model's training cohort left out of the analysis")
        counts["n_training_excluded"] = counts.get("n_training_excluded", 0) + int(seen.sum())
        data = data[~seen].reset_index(drop=True)

    needed = ["arm", "biomarker", *(["time", "event"] if cfg.survival else ["outcome"]), *covariates]
    missing = data[needed].isna().any(axis=1)
    if missing.any():
        notes.append(f"{int(missing.sum())} patient(s) dropped for missing values in {needed}")
    data = data[~missing].reset_index(drop=True)
    counts["n_dropped_missing"] = int(missing.sum())
    counts["n_patients"] = len(data)
    if cfg.scale == "sd" and info.kind == "continuous":
        sd = float(data["biomarker"].std(ddof=1))
        if not sd > 0:
            raise LabelsError(f"biomarker {bm_ref.label} has zero spread; cannot scale per SD")
        mean = float(data["biomarker"].mean())
        data["biomarker"] = (data["biomarker"] - mean) / sd
        info.sd, info.scale = sd, f"per SD ({sd:.3g} units), centred at the cohort mean {mean:.3g}"
    if len(data) < 10:
        raise LabelsError(f"only {len(data)} analysable patient(s); need at least 10 for an interaction model")
    return Cohort(data=data, model=model, covariates=covariates, biomarker=info,
                  treatment={"column": refs["arm"].label, "treated": treated, "control": control},
                  outcome=outcome, counts=counts, notes=notes)


def _encode_biomarker(
    cfg: PredictiveConfig, ref: ColumnRef, raw: pd.Series, train: pd.DataFrame, notes: list[str]
) -> tuple[BiomarkerInfo, np.ndarray, set[str]]:
    """The biomarker as it enters the model, and the ids of the patients a cut-off was learned on."""
    spec = parse_cutoff(cfg.cutoff)
    if cfg.positive is not None:
        text = as_text(raw)
        levels = sorted(text.dropna().unique())
        if cfg.positive not in levels:
            raise ConfigError(f"--positive {cfg.positive!r} is not a value of {ref.label} (values: {levels})")
        if spec is not None:
            raise ConfigError("--positive and --cutoff exclude each other")
        values = np.where(text.isna(), np.nan, (text == cfg.positive).astype(float))
        return BiomarkerInfo(name=ref.label, kind="binary", scale=f"{cfg.positive} vs other",
                             positive=cfg.positive), values, set()
    numeric = pd.to_numeric(raw, errors="coerce")
    if not is_numeric(raw) and numeric.notna().sum() < raw.notna().sum():
        levels = sorted(as_text(raw).dropna().unique())
        raise ConfigError(f"biomarker {ref.label} is categorical ({levels}); pass --positive LEVEL")
    values = numeric.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    if spec is None:
        if set(np.unique(finite)) <= {0.0, 1.0}:
            return BiomarkerInfo(name=ref.label, kind="binary", scale="1 vs 0", positive="1"), values, set()
        return BiomarkerInfo(name=ref.label, kind="continuous", scale="per unit"), values, set()
    cutoff, train_ids = _fix_cutoff(cfg, ref, spec, train)
    notes.append(f"biomarker dichotomised at {cutoff.value:.4g} ({cutoff.source}); high = value >= cut-off")
    return BiomarkerInfo(name=ref.label, kind="dichotomised", scale=f"high (>= {cutoff.value:.4g}) vs low",
                         cutoff=cutoff.value, cutoff_source=cutoff.source), dichotomise(values, cutoff), train_ids


def _fix_cutoff(
    cfg: PredictiveConfig, ref: ColumnRef, spec: Any, train: pd.DataFrame
) -> tuple[Cutoff, set[str]]:
    """The cut-off and the ids of the patients it was learned on (to be kept out of the analysis)."""
    if not spec.needs_training:
        return learn_cutoff(spec), set()
    if cfg.train_split:
        vals = pd.to_numeric(train["biomarker"], errors="coerce").to_numpy(dtype=float)
        return learn_cutoff(spec, vals, f"--train-split {cfg.train_split}"), set(train[PATIENT_ID])
    per_patient, desc = _oof_training_values(cfg, ref)
    return learn_cutoff(spec, per_patient.to_numpy(dtype=float), desc), set(per_patient.index.astype(str))


# ------------------------------------------------------------------ statistics (pure)
def define_subgroups(cohort: Cohort) -> list[tuple[str, np.ndarray]]:
    """Biomarker subgroups for the per-subgroup treatment effects (see the module docstring)."""
    b = cohort.data["biomarker"].to_numpy(dtype=float)
    info = cohort.biomarker
    if info.kind == "dichotomised":
        return [(f"low (< {info.cutoff:.3g})", b == 0), (f"high (>= {info.cutoff:.3g})", b == 1)]
    if info.kind == "binary":
        pos = info.positive or "1"
        return [("other" if pos != "1" else "0", b == 0), (pos, b == 1)]
    raw = cohort.data["biomarker_raw"].to_numpy(dtype=float)
    q1, q2 = np.quantile(raw, [1 / 3, 2 / 3])
    info.subgroup_note = (f"subgroups are tertiles of this cohort ({q1:.3g}, {q2:.3g}): descriptive only — "
                          "the test is the continuous interaction")
    return [(f"T1 (< {q1:.3g})", raw < q1), (f"T2 ({q1:.3g}–{q2:.3g})", (raw >= q1) & (raw < q2)),
            (f"T3 (>= {q2:.3g})", raw >= q2)]


def group_effect(data: pd.DataFrame, model: str, name: str, mask: np.ndarray | None = None) -> GroupEffect:
    d = data if mask is None else data[mask]
    if model == MODEL_COX:
        return survival_effect(name, d["arm"], d["time"], d["event"])
    return binary_effect(name, d["arm"], d["outcome"])


def analyse_cohort(
    data: pd.DataFrame,
    model: str,
    covariates: Sequence[str] = (),
    subgroups: Sequence[tuple[str, np.ndarray]] = (),
    overall: bool = True,
) -> CohortAnalysis:
    """The statistics of `wsi predictive` on a prepared frame (columns arm, biomarker, outcome or
    time/event, covariates): interaction fit, overall (unless ``overall=False``: simulations that only need
    the interaction test) and per-subgroup treatment effects."""
    fit = fit_interaction(data, model, covariates)
    whole = group_effect(data, model, "all patients") if overall else None
    subs = [group_effect(data, model, name, np.asarray(mask, bool)) for name, mask in subgroups]
    return CohortAnalysis(fit=fit, overall=whole, subgroups=subs)


# ------------------------------------------------------------------ outputs
def _fmt(x: float, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}g}"


def fmt_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "–"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def _ci(lo: float, hi: float) -> str:
    negative = all(x is not None and math.isfinite(x) for x in (lo, hi)) and min(lo, hi) < 0
    return f"{_fmt(lo)}{' to ' if negative else '–'}{_fmt(hi)}"


def interpretation(result: PredictiveResult, alpha: float = 0.05) -> str:
    fit = result.analysis.fit
    t = fit.interaction
    short = SHORT[fit.model]
    what = f"interaction {short} {_fmt(t.estimate)} (95% CI {_ci(t.ci_low, t.ci_high)}), p = {fmt_p(t.p)}"
    if t.p < alpha:
        return f"The treatment effect differs with the biomarker ({what}): evidence that it is predictive."
    return f"No evidence that the treatment effect differs with the biomarker ({what})."


def render_markdown(result: PredictiveResult, layout: RunLayout) -> str:
    c, a = result.cohort, result.analysis
    fit, short = a.fit, SHORT[a.fit.model]
    lines = ["# Predictive biomarker analysis", ""]
    lines.append(f"- **Treatment**: `{c.treatment['column']}` — treated = `{c.treatment['treated']}`, "
                 f"control = `{c.treatment['control']}`")
    if fit.model == MODEL_COX:
        lines.append(f"- **Outcome**: survival, time `{c.outcome['time']}`, event `{c.outcome['event']}` "
                     f"({fit.n_events} events in {fit.n} patients)")
    else:
        lines.append(f"- **Outcome**: binary `{c.outcome['outcome']}` ({fit.n_events} responders in {fit.n} "
                     "patients)")
    bm = c.biomarker
    lines.append(f"- **Biomarker**: `{bm.name}` — {bm.kind}, {bm.scale}"
                 + (f"; cut-off {bm.cutoff:.4g} fixed from {bm.cutoff_source}" if bm.cutoff is not None else ""))
    model_name = "logistic regression (statsmodels)" if fit.model == MODEL_LOGISTIC else "Cox model (lifelines)"
    lines.append(f"- **Model**: {model_name}, `{fit.formula}`; 95% Wald CIs")
    lines += ["", f"**{interpretation(result)}**", "", "## Model terms", "",
              f"| term | {short} | 95% CI | p |", "|---|---|---|---|"]
    for t in fit.terms:
        lines.append(f"| {t.term} | {_fmt(t.estimate)} | {_ci(t.ci_low, t.ci_high)} | {fmt_p(t.p)} |")
    lines += ["", "## Treatment effect by biomarker subgroup", ""]
    if fit.model == MODEL_LOGISTIC:
        lines += ["| subgroup | n | control responders (rate, 95% CI) | treated responders (rate, 95% CI) | "
                  "risk difference (95% CI) | OR (95% CI) | p (Fisher) |", "|---|---|---|---|---|---|---|"]
        for g in a.effects:
            lines.append(
                f"| {g.group} | {g.n} | {g.events_control}/{g.n_control} ({_fmt(g.rate_control, 2)}, "
                f"{_ci(g.rate_control_ci_low, g.rate_control_ci_high)}) | {g.events_treated}/{g.n_treated} "
                f"({_fmt(g.rate_treated, 2)}, {_ci(g.rate_treated_ci_low, g.rate_treated_ci_high)}) | "
                f"{_fmt(g.risk_difference, 2)} ({_ci(g.risk_difference_ci_low, g.risk_difference_ci_high)}) | "
                f"{_fmt(g.effect)} ({_ci(g.effect_ci_low, g.effect_ci_high)}) | {fmt_p(g.effect_p)} |")
    else:
        lines += ["| subgroup | n | events control | events treated | median control | median treated | "
                  "HR (95% CI) | p (Cox) | log-rank p |", "|---|---|---|---|---|---|---|---|---|"]
        for g in a.effects:
            lines.append(
                f"| {g.group} | {g.n} | {g.events_control}/{g.n_control} | {g.events_treated}/{g.n_treated} | "
                f"{_fmt(g.median_control)} | {_fmt(g.median_treated)} | {_fmt(g.effect)} "
                f"({_ci(g.effect_ci_low, g.effect_ci_high)}) | {fmt_p(g.effect_p)} | {fmt_p(g.logrank_p)} |")
    if bm.subgroup_note:
        lines += ["", f"_{bm.subgroup_note}_"]
    rel = {k: Path(v).name for k, v in result.outputs.items() if v.endswith(".png")}
    lines += [""]
    for key, name in rel.items():
        lines += [f"![{key}]({name})", ""]
    notes = [*c.notes, *(f"fit warning: {w}" for w in fit.warnings)]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines) + "\n"


def write_outputs(result: PredictiveResult, layout: RunLayout, json_out: str | Path | None = None) -> None:
    from wsi_pipeline.analysis import plots

    layout.predictive_dir.mkdir(parents=True, exist_ok=True)
    c, a = result.cohort, result.analysis
    outputs = {
        "json": layout.predictive_json, "markdown": layout.predictive_md,
        "coefficients": layout.predictive_coefficients_csv, "subgroups": layout.predictive_subgroups_csv,
        "patients": layout.predictive_patients_csv, "forest_plot": layout.predictive_forest_png,
        "subgroup_plot": layout.predictive_effects_png,
    }
    result.outputs = {k: str(v) for k, v in outputs.items()}
    with atomic_path(layout.predictive_coefficients_csv) as tmp:
        pd.DataFrame([asdict(t) for t in a.fit.terms]).to_csv(tmp, index=False)
    with atomic_path(layout.predictive_subgroups_csv) as tmp:
        pd.DataFrame([g.to_dict() for g in a.effects]).to_csv(tmp, index=False)
    with atomic_path(layout.predictive_patients_csv) as tmp:
        c.data.to_csv(tmp, index=False)
    plots.forest_plot(a, c.treatment, c.biomarker.name, layout.predictive_forest_png)
    if a.fit.model == MODEL_COX:
        plots.km_by_subgroup(c.data, define_subgroups(c), c.treatment, layout.predictive_effects_png,
                             effects=a.subgroups, time_label=c.outcome["time"])
    else:
        plots.rates_by_subgroup(a.subgroups, c.treatment, layout.predictive_effects_png)
    write_text_atomic(layout.predictive_md, render_markdown(result, layout))
    text = json.dumps(result.to_json(), indent=2)
    write_text_atomic(layout.predictive_json, text)
    if json_out:
        write_text_atomic(json_out, text)


def run_predictive(cfg: PredictiveConfig) -> PredictiveResult:
    """`wsi predictive`: prepare the cohort, fit, write RUN/analysis/predictive/ (and ``cfg.json_out``)."""
    from wsi_pipeline.runfolder.resolved import save_resolved

    cfg.validate()
    layout = RunLayout(cfg.run)
    if not layout.root.is_dir():
        raise ConfigError(f"{layout.root}: RUN folder not found")
    cohort = prepare_cohort(cfg)
    analysis = analyse_cohort(cohort.data, cohort.model, cohort.covariates, define_subgroups(cohort))
    result = PredictiveResult(cohort=cohort, analysis=analysis)
    write_outputs(result, layout, cfg.json_out)
    save_resolved(layout.root, "predictive", {"predictive": cfg})
    t = analysis.fit.interaction
    log.info("interaction %s %.3g (%.3g–%.3g), p=%.3g; outputs in %s", SHORT[analysis.fit.model], t.estimate,
             t.ci_low, t.ci_high, t.p, layout.predictive_dir)
    return result
