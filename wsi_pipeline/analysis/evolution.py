"""How the tumour and its microenvironment change under treatment.

For patients biopsied at several timepoints (e.g. baseline → on-treatment → progression):

- per-patient trajectories of numeric read-outs — the TME read-out of ``tme.csv`` (TIL fraction,
  tumour/stroma fractions, ...) and the model scores of ``predictions.csv``;
- transition tables of categorical read-outs (immune phenotype) between consecutive timepoints, overall
  and per response group;
- change scores Δ = later − earlier for each consecutive pair of timepoints (and first → last when there
  are more than two), compared between responders and non-responders with a two-sided Mann–Whitney U
  test; effect size Cliff's delta (= rank-biserial correlation; > 0: responders' Δ larger) with a
  percentile bootstrap 95% CI; Benjamini–Hochberg q-values over all tests;
- plots per patient (spaghetti) and per group (mean ± 95% CI).

Several slides of one patient at one timepoint are aggregated (mean / majority, see
:mod:`wsi_pipeline.analysis.tables`). Outputs go to ``RUN/analysis/evolution/``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_pipeline.analysis.config import EvolutionConfig
from wsi_pipeline.analysis.stats import compare_groups
from wsi_pipeline.analysis.tables import (
    PATIENT_ID,
    SRC_PRED,
    SRC_TME,
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
from wsi_pipeline.errors import ConfigError, LabelsError
from wsi_pipeline.formats.atomic import atomic_path, write_text_atomic
from wsi_pipeline.runfolder.layout import RunLayout

log = logging.getLogger(__name__)

# timepoint names in clinical order, used when --order is not given and the values are not numeric
KNOWN_ORDER = (
    "screening", "pre", "pre_treatment", "pre-treatment", "pretreatment", "baseline", "diagnosis",
    "on_treatment", "on-treatment", "ontreatment", "during", "week", "surgery", "post_treatment",
    "post-treatment", "post", "end_of_treatment", "progression", "relapse", "recurrence",
)
TME_METRICS = ("til_fraction", "stromal_til_fraction", "tumour_stroma_ratio", "lymph_density_tumour",
               "lymph_density_margin")
TME_AREA_HINTS = ("tumour", "tumor", "stroma")
GROUP_LABELS = {1.0: "responders", 0.0: "non-responders", "all": "all patients"}


@dataclass
class EvolutionResult:
    order: list[str]
    n_patients: int
    n_longitudinal: int  # patients with >= 2 timepoints
    metrics: dict[str, str]  # display name -> source:column
    phenotypes: dict[str, str]
    trajectories: pd.DataFrame  # long: patient_id, timepoint, group, metric, value
    changes: pd.DataFrame  # long: patient_id, group, metric, interval, delta
    tests: pd.DataFrame  # metric, interval, n/medians, u, p, q, cliffs_delta, ci
    transitions: pd.DataFrame  # long: variable, interval, group, from, to, n
    response: str | None = None
    select: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------ choosing read-outs
def _is_tme_metric(col: str) -> bool:
    c = col.lower()
    return c in TME_METRICS or (c.startswith("area_frac_") and any(h in c for h in TME_AREA_HINTS))


def _is_phenotype(col: str) -> bool:
    return col.lower().endswith(("phenotype", "phenotype_pred"))


def default_readouts(sources: Sources) -> tuple[list[ColumnRef], list[ColumnRef]]:
    """Numeric metrics and categorical phenotypes to follow when none are named: the TME read-out
    (:data:`TME_METRICS`, tumour/stroma area fractions, immune phenotype) and the model's slide scores
    (``*_prob`` of binary targets, ``*_risk``, numeric ``*_pred``; predicted phenotypes)."""
    metrics, phenotypes = [], []
    if sources.tme is not None:
        for col in sources.columns(SRC_TME):
            s = sources.tme[col]
            if is_numeric(s) and _is_tme_metric(col):
                metrics.append(ColumnRef(SRC_TME, col))
            elif not is_numeric(s) and _is_phenotype(col):
                phenotypes.append(ColumnRef(SRC_TME, col))
    if sources.predictions is not None:
        for col in sources.columns(SRC_PRED):
            s = sources.predictions[col]
            if is_numeric(s) and (col.endswith(("_prob", "_risk")) or (col.endswith("_pred")
                                                                        and s.nunique() > 2)):
                metrics.append(ColumnRef(SRC_PRED, col))
            elif not is_numeric(s) and _is_phenotype(col):
                phenotypes.append(ColumnRef(SRC_PRED, col))
    return metrics, phenotypes


def _display_names(refs: list[ColumnRef]) -> dict[str, ColumnRef]:
    """Bare column names, source-prefixed where two sources share one."""
    counts = pd.Series([r.column for r in refs]).value_counts()
    return {(r.column if counts[r.column] == 1 else r.label): r for r in refs}


def timepoint_order(values: list[str], given: list[str]) -> list[str]:
    """The timepoints in time order: ``given``; else numeric order; else :data:`KNOWN_ORDER`."""
    present = sorted(set(values))
    if given:
        missing = [v for v in present if v not in given]
        if missing:
            log.warning("timepoints %s are not in --order; their slides are ignored", missing)
        return [v for v in given if v in present]
    numeric = pd.to_numeric(pd.Series(present), errors="coerce")
    if numeric.notna().all():
        return [present[i] for i in np.argsort(numeric.to_numpy(), kind="stable")]
    rank = {name: i for i, name in enumerate(KNOWN_ORDER)}
    unknown = [v for v in present if v.lower() not in rank]
    if unknown:
        raise ConfigError(f"cannot order the timepoints {present} (unknown: {unknown}); pass --order "
                          "T1,T2,... in time order")
    return sorted(present, key=lambda v: rank[v.lower()])


# ------------------------------------------------------------------ statistics (pure)
def long_trajectories(per_tp: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    return per_tp.melt(id_vars=[PATIENT_ID, "timepoint", "group"], value_vars=metrics, var_name="metric",
                       value_name="value").dropna(subset=["value"]).reset_index(drop=True)


def intervals(order: list[str]) -> list[tuple[str, str]]:
    pairs = list(pairwise(order))
    if len(order) > 2:
        pairs.append((order[0], order[-1]))
    return pairs


def change_scores(long: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Δ = value(later) − value(earlier) per patient, metric and interval (patients with both timepoints)."""
    wide = long.pivot_table(index=[PATIENT_ID, "group", "metric"], columns="timepoint", values="value",
                            aggfunc="first")
    rows = []
    for a, b in intervals(order):
        if a not in wide.columns or b not in wide.columns:
            continue
        d = (wide[b] - wide[a]).dropna().rename("delta").reset_index()
        d["interval"] = f"{a}→{b}"
        rows.append(d)
    if not rows:
        return pd.DataFrame(columns=[PATIENT_ID, "group", "metric", "interval", "delta"])
    return pd.concat(rows, ignore_index=True)[[PATIENT_ID, "group", "metric", "interval", "delta"]]


def compare_changes(changes: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Responders vs non-responders per metric and interval (see the module docstring)."""
    from statsmodels.stats.multitest import multipletests

    rows = []
    for (metric, interval), d in changes.groupby(["metric", "interval"], sort=False):
        x = d.loc[d["group"] == 1.0, "delta"].to_numpy()
        y = d.loc[d["group"] == 0.0, "delta"].to_numpy()
        if len(x) < 2 or len(y) < 2:
            continue
        cmp = compare_groups(x, y, n_boot=n_boot, seed=seed)
        rows.append({"metric": metric, "interval": interval, "n_responders": cmp.n_x,
                     "n_non_responders": cmp.n_y, "median_delta_responders": cmp.median_x,
                     "median_delta_non_responders": cmp.median_y, "u": cmp.u, "p": cmp.p,
                     "cliffs_delta": cmp.cliffs_delta, "cliffs_delta_ci_low": cmp.ci_low,
                     "cliffs_delta_ci_high": cmp.ci_high})
    out = pd.DataFrame(rows)
    if len(out):
        out["q_bh"] = multipletests(out["p"].to_numpy(), method="fdr_bh")[1]
    return out


def transition_counts(per_tp: pd.DataFrame, phenotypes: list[str], order: list[str]) -> pd.DataFrame:
    """Counts of (from, to) categories between consecutive timepoints, for all patients and per group."""
    rows = []
    for var in phenotypes:
        wide = per_tp.pivot_table(index=[PATIENT_ID, "group"], columns="timepoint", values=var, aggfunc="first")
        for a, b in pairwise(order):
            if a not in wide.columns or b not in wide.columns:
                continue
            pair = wide[[a, b]].dropna().reset_index()
            for group, d in [("all", pair), *((g, pair[pair["group"] == g]) for g in sorted(
                    pair["group"].dropna().unique()) if g != "all")]:
                counts = d.groupby([a, b]).size()
                for (frm, to), n in counts.items():
                    rows.append({"variable": var, "interval": f"{a}→{b}", "group": GROUP_LABELS.get(group, group),
                                 "from": frm, "to": to, "n": int(n)})
    return pd.DataFrame(rows, columns=["variable", "interval", "group", "from", "to", "n"])


# ------------------------------------------------------------------ orchestration
def prepare(cfg: EvolutionConfig, sources: Sources) -> tuple[pd.DataFrame, list[str], dict[str, ColumnRef],
                                                                dict[str, ColumnRef], list[str]]:
    """One row per patient × timepoint with ``group`` (1/0 response or 'all') and the read-outs."""
    notes: list[str] = []
    if cfg.metrics or cfg.phenotypes:
        metric_refs = [resolve_column(m, sources, "--metrics") for m in cfg.metrics]
        pheno_refs = [resolve_column(p, sources, "--phenotypes") for p in cfg.phenotypes]
    else:
        metric_refs, pheno_refs = default_readouts(sources)
    if not metric_refs and not pheno_refs:
        raise ConfigError(f"{cfg.run}: no read-outs to follow — the RUN folder needs tme.csv or predictions.csv, "
                          "or pass --metrics / --phenotypes")
    metrics, phenos = _display_names(metric_refs), _display_names(pheno_refs)
    refs = {"timepoint": resolve_column(cfg.timepoint, sources, "--timepoint"), **metrics, **phenos}
    if cfg.response:
        refs["response"] = resolve_column(cfg.response, sources, "--response")
    slides = apply_select(slide_frame(sources, refs), sources, cfg.select)
    if cfg.select:
        notes.append(f"slides selected by {', '.join(cfg.select)}")
    slides["timepoint"] = as_text(slides["timepoint"])
    slides = slides.dropna(subset=["timepoint"])
    order = timepoint_order(list(slides["timepoint"].unique()), cfg.order)
    slides = slides[slides["timepoint"].isin(order)]
    for name in metrics:
        slides[name] = pd.to_numeric(slides[name], errors="coerce")
    if cfg.response:
        slides["group"] = encode_binary(slides["response"], cfg.response)
        aggregate_patients(slides, patient_level=["group"])  # response must be one value per patient
    else:
        slides["group"] = "all"
    per_tp = aggregate_patients(slides, readouts=[*metrics, *phenos], patient_level=["group"],
                                by=(PATIENT_ID, "timepoint"))
    n_multi = int((per_tp["n_slides"] > 1).sum())
    if n_multi:
        notes.append(f"{n_multi} patient × timepoint cell(s) with several slides: averaged (numeric) or "
                     "majority (categorical)")
    if cfg.response and per_tp["group"].isna().any():
        n = per_tp.loc[per_tp["group"].isna(), PATIENT_ID].nunique()
        notes.append(f"{n} patient(s) without a response label: in trajectories, not in the change tests")
    return per_tp, order, metrics, phenos, notes


def analyse_evolution(cfg: EvolutionConfig, sources: Sources | None = None) -> EvolutionResult:
    sources = sources or Sources.load(cfg.run, cfg.labels)
    per_tp, order, metrics, phenos, notes = prepare(cfg, sources)
    long = long_trajectories(per_tp, list(metrics)) if metrics else pd.DataFrame(
        columns=[PATIENT_ID, "timepoint", "group", "metric", "value"])
    changes = change_scores(long, order)
    tests = compare_changes(changes, cfg.n_boot, cfg.seed) if cfg.response else pd.DataFrame()
    transitions = transition_counts(per_tp, list(phenos), order)
    n_tp = per_tp.groupby(PATIENT_ID)["timepoint"].nunique()
    if int((n_tp >= 2).sum()) == 0:
        raise LabelsError(f"{cfg.labels}: no patient has slides at two or more timepoints of {order}; "
                          "check --timepoint and patient_id")
    return EvolutionResult(order=order, n_patients=len(n_tp), n_longitudinal=int((n_tp >= 2).sum()),
                           metrics={k: v.label for k, v in metrics.items()},
                           phenotypes={k: v.label for k, v in phenos.items()}, trajectories=long,
                           changes=changes, tests=tests, transitions=transitions, response=cfg.response,
                           select=list(cfg.select), notes=notes)


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def render_markdown(res: EvolutionResult, layout: RunLayout) -> str:
    lines = ["# Tumour evolution over timepoints", "",
             f"- **Timepoints**: {' → '.join(res.order)}",
             f"- **Patients**: {res.n_patients} ({res.n_longitudinal} with two or more timepoints)",
             f"- **Read-outs**: {', '.join(f'`{k}`' for k in res.metrics) or '–'}; phenotypes: "
             f"{', '.join(f'`{k}`' for k in res.phenotypes) or '–'}"]
    if res.response:
        lines.append(f"- **Response groups**: `{res.response}` (1 = responder)")
    if res.select:
        lines.append(f"- **Slides**: {', '.join(f'`{s}`' for s in res.select)}")
    lines.append("")
    if len(res.trajectories):
        lines += ["## Read-outs per timepoint (median [IQR], n)", ""]
        g = res.trajectories.groupby(["metric", "group", "timepoint"])["value"]
        summ = pd.DataFrame({"median": g.median(), "q1": g.quantile(0.25), "q3": g.quantile(0.75),
                             "n": g.count()}).reset_index()
        header = "| metric | group | " + " | ".join(res.order) + " |"
        lines += [header, "|" + "---|" * (2 + len(res.order))]
        for (metric, group), d in summ.groupby(["metric", "group"], sort=False):
            cells = []
            for tp in res.order:
                r = d[d["timepoint"] == tp]
                cells.append("–" if r.empty else f"{_f(r['median'].iloc[0])} [{_f(r['q1'].iloc[0])}–"
                             f"{_f(r['q3'].iloc[0])}], {int(r['n'].iloc[0])}")
            lines.append(f"| {metric} | {GROUP_LABELS.get(group, group)} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(res.tests):
        lines += ["## Change scores: responders vs non-responders", "",
                  "Δ = later − earlier; Mann–Whitney U (two-sided); Cliff's delta > 0: responders' Δ larger "
                  "(bootstrap 95% CI); q: Benjamini–Hochberg.", "",
                  "| metric | interval | n (R / NR) | median Δ R | median Δ NR | Cliff's δ (95% CI) | p | q |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res.tests.itertuples():
            lines.append(f"| {r.metric} | {r.interval} | {r.n_responders} / {r.n_non_responders} | "
                         f"{_f(r.median_delta_responders)} | {_f(r.median_delta_non_responders)} | "
                         f"{_f(r.cliffs_delta, 2)} ({_f(r.cliffs_delta_ci_low, 2)} to {_f(r.cliffs_delta_ci_high, 2)})"
                         f" | {_f(r.p)} | {_f(r.q_bh)} |")
        lines.append("")
    if len(res.transitions):
        lines += ["## Phenotype transitions", ""]
        for (var, interval), d in res.transitions.groupby(["variable", "interval"], sort=False):
            for group, dg in d.groupby("group", sort=False):
                tab = dg.pivot_table(index="from", columns="to", values="n", aggfunc="sum", fill_value=0)
                lines += [f"**{var}, {interval}, {group}** (rows: from, columns: to)", "",
                          "| from \\ to | " + " | ".join(map(str, tab.columns)) + " |",
                          "|" + "---|" * (1 + tab.shape[1])]
                for frm, row in tab.iterrows():
                    lines.append(f"| {frm} | " + " | ".join(str(int(v)) for v in row) + " |")
                lines.append("")
    for key, path in res.outputs.items():
        if path.endswith(".png"):
            lines += [f"![{key}]({Path(path).name})", ""]
    if res.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in res.notes), ""]
    return "\n".join(lines) + "\n"


def write_outputs(res: EvolutionResult, layout: RunLayout) -> None:
    from wsi_pipeline.analysis import plots

    layout.evolution_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"json": layout.evolution_json, "markdown": layout.evolution_md,
               "trajectories": layout.evolution_trajectories_csv, "changes": layout.evolution_changes_csv,
               "transitions": layout.evolution_transitions_csv}
    if len(res.tests):
        outputs["tests"] = layout.evolution_tests_csv
    for key, df in (("trajectories", res.trajectories), ("changes", res.changes), ("tests", res.tests),
                    ("transitions", res.transitions)):
        if key in outputs:
            with atomic_path(outputs[key]) as tmp:
                df.to_csv(tmp, index=False)
    groups = sorted(res.trajectories["group"].dropna().unique(), key=str) if len(res.trajectories) else []
    labels = {g: GROUP_LABELS.get(g, str(g)) for g in groups}
    for metric in res.metrics:
        path = layout.evolution_metric_png(metric)
        plots.trajectories(res.trajectories, metric, res.order, labels, path)
        outputs[f"plot_{metric}"] = path
    if len(res.transitions):
        overall = res.transitions[res.transitions["group"] == GROUP_LABELS["all"]]
        tables = [(f"{var}\n{interval}", d.pivot_table(index="from", columns="to", values="n", aggfunc="sum",
                                                        fill_value=0))
                  for (var, interval), d in overall.groupby(["variable", "interval"], sort=False)]
        plots.transition_heatmaps(tables[:6], layout.evolution_transitions_png)
        outputs["plot_transitions"] = layout.evolution_transitions_png
    res.outputs = {k: str(v) for k, v in outputs.items()}
    write_text_atomic(layout.evolution_md, render_markdown(res, layout))
    summary = {
        "order": res.order, "n_patients": res.n_patients, "n_longitudinal": res.n_longitudinal,
        "metrics": res.metrics, "phenotypes": res.phenotypes, "response": res.response, "select": res.select,
        "change_tests": json.loads(res.tests.to_json(orient="records")) if len(res.tests) else [],
        "notes": res.notes, "outputs": res.outputs,
    }
    write_text_atomic(layout.evolution_json, json.dumps(summary, indent=2))


def run_evolution(cfg: EvolutionConfig) -> EvolutionResult:
    """`wsi evolution`: trajectories, transitions and change-score tests → RUN/analysis/evolution/."""
    from wsi_pipeline.runfolder.resolved import save_resolved

    cfg.validate()
    layout = RunLayout(cfg.run)
    if not layout.root.is_dir():
        raise ConfigError(f"{layout.root}: RUN folder not found")
    res = analyse_evolution(cfg)
    write_outputs(res, layout)
    save_resolved(layout.root, "evolution", {"evolution": cfg})
    log.info("evolution: %d patients, timepoints %s; outputs in %s", res.n_patients, res.order,
             layout.evolution_dir)
    return res
