"""The report's sections. Each builder returns a :class:`Section`, or None when its inputs are absent."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_pipeline.mil.targets import BINARY, MULTICLASS, PATIENT_ID, REGRESSION, SLIDE_ID, SURVIVAL, TargetSpec
from wsi_pipeline.report import figures as F
from wsi_pipeline.report.html import (
    Cell,
    Section,
    badge,
    esc,
    figure,
    figures,
    fmt_ci,
    fmt_num,
    fmt_p,
    kv,
    prob_bar,
    table,
)
from wsi_pipeline.report.inputs import Evaluation, ReportData, truth_arrays
from wsi_pipeline.runfolder.status import STATUS_FAILED

log = logging.getLogger(__name__)

METRIC_TITLES = {
    "auroc": "AUROC", "balanced_accuracy": "balanced accuracy", "brier": "Brier score",
    "calibration_slope": "calibration slope", "calibration_intercept": "calibration intercept",
    "spearman": "Spearman ρ", "mae": "MAE", "c_index": "C-index", "ece": "ECE",
}
SUBGROUP_LABELS = ["low", "intermediate", "high"]
TME_KEY_COLUMNS = ("til_fraction", "stromal_til_fraction", "tumour_stroma_ratio", "lymph_density_tumour",
                   "lymph_density_margin")


def _rel(target: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(target, out_dir)).as_posix()


def _ci_text(m: Any, digits: int = 2) -> str:
    """'0.74 (0.53–0.93)' or '-0.72 (-1.5 to -0.06)' for a MetricCI (plain text, for figures)."""
    if not np.isfinite(m.estimate):
        return "n/a"
    if not (np.isfinite(m.ci_low) and np.isfinite(m.ci_high)):
        return f"{m.estimate:.{digits}f}"
    sep = " to " if min(m.ci_low, m.ci_high) < 0 else "–"
    return f"{m.estimate:.{digits}f} ({m.ci_low:.{digits}f}{sep}{m.ci_high:.{digits}f})"


def _ci_cell(m: dict[str, Any] | Any) -> Cell:
    if hasattr(m, "estimate"):
        return Cell(fmt_ci(m.estimate, m.ci_low, m.ci_high), "num")
    return Cell(fmt_ci(m.get("estimate"), m.get("ci_low"), m.get("ci_high")), "num")


# ---------------------------------------------------------------- cohort
def _prediction_cells(row: pd.Series, specs: Sequence[TargetSpec]) -> list[Any]:
    cells: list[Any] = []
    for s in specs:
        if s.kind == BINARY:
            pred = row.get(f"{s.name}_pred", "")
            positive = s.classes[1] if len(s.classes) == 2 else "1"
            b = badge(pred, "pos" if str(pred) == str(positive) else "neg") if pred == pred and pred != "" else ""
            cells.append(Cell(f"{prob_bar(row.get(f'{s.name}_prob'))} {b}"))
        elif s.kind == MULTICLASS:
            pred = row.get(f"{s.name}_pred", "")
            p = row.get(f"{s.name}_prob_{pred}", float("nan"))
            cells.append(Cell(f"{badge(pred)} <span class='note'>{fmt_num(p, 2)}</span>"))
        elif s.kind == REGRESSION:
            cells.append(Cell(fmt_num(row.get(f"{s.name}_pred")), "num"))
        else:
            cells.append(Cell(fmt_num(row.get(f"{s.name}_risk")), "num"))
    return cells


def _spec_headers(specs: Sequence[TargetSpec]) -> list[str]:
    names = {BINARY: "P({})", MULTICLASS: "{}", REGRESSION: "{} (pred.)", SURVIVAL: "{} risk"}
    return [names[s.kind].format(s.name) for s in specs]


def _heatmap_links(data: ReportData, slide_id: str, out_dir: Path) -> Cell:
    layout = data.layout
    index = layout.heatmap_index_json(slide_id)
    if index.exists():
        try:
            channels = json.loads(index.read_text()).get("channels", [])
        except json.JSONDecodeError:
            channels = []
        links = [f"<a class='hm' href='{esc(_rel(layout.heatmap_dir(slide_id) / ch['png'], out_dir))}'>"
                 f"{esc(ch.get('label', ch['png']))}</a>" for ch in channels if ch.get("png")]
        if links:
            return Cell("".join(links), "wrap")
    folder = layout.heatmap_dir(slide_id)
    if folder.is_dir():
        return Cell(f"<a class='hm' href='{esc(_rel(folder, out_dir))}/'>heatmaps/</a>")
    return Cell("<span class='note'>–</span>")


def _thumb(data: ReportData, slide_id: str) -> Cell:
    path = data.layout.thumbnail_png(slide_id)
    png = F.thumbnail_png(path, data.cfg.thumb_px) if path.exists() else None
    if png is None:
        return Cell("<span class='note'>no thumbnail</span>")
    from wsi_pipeline.report.html import png_data_uri

    return Cell(f"<img src='{png_data_uri(png)}' alt='{esc(slide_id)}'>", "thumb")


def cohort_section(data: ReportData) -> Section | None:
    preds = data.predictions
    if preds is None and not data.status:
        return None
    out_dir = data.out_path.parent
    specs = [s for s in data.specs if any(c.startswith(s.name + "_") for c in (preds.columns if preds is not None
                                                                                else []))]
    tme = data.tme.set_index(SLIDE_ID) if data.tme is not None else None
    pheno_col = next((c for c in ("immune_phenotype",) if tme is not None and c in tme.columns), None)
    til_col = "til_fraction" if tme is not None and "til_fraction" in tme.columns else None
    if preds is not None:
        slide_ids = preds[SLIDE_ID].tolist()
        rows_by_id = preds.set_index(SLIDE_ID)
    else:
        slide_ids = sorted({s.slide_id for s in data.status})
        rows_by_id = pd.DataFrame(index=slide_ids)
    patient_of = {}
    if data.labels is not None:
        patient_of = data.labels[PATIENT_ID].to_dict()
    headers = ["", "slide", "patient", *_spec_headers(specs)]
    if pheno_col:
        headers.append("TME phenotype")
    if til_col:
        headers.append("TIL fraction")
    headers.append("heatmaps")
    rows = []
    shown = slide_ids[: data.cfg.max_slides]
    for sid in shown:
        row = rows_by_id.loc[sid] if sid in rows_by_id.index else pd.Series(dtype=object)
        pid = patient_of.get(sid, row.get(PATIENT_ID, sid))
        cells: list[Any] = [_thumb(data, sid), Cell(f"<b>{esc(sid)}</b>"), pid, *_prediction_cells(row, specs)]
        if pheno_col:
            v = tme[pheno_col].get(sid) if sid in tme.index else None
            cells.append(Cell(badge(v)) if isinstance(v, str) else "–")
        if til_col:
            cells.append(Cell(fmt_num(tme[til_col].get(sid)) if sid in tme.index else "–", "num"))
        cells.append(_heatmap_links(data, sid, out_dir))
        rows.append(cells)
    body = "<h3>Slides</h3>" + table(headers, rows)
    if len(slide_ids) > len(shown):
        body += f"<p class='note'>First {len(shown)} of {len(slide_ids)} slides shown (--max-slides).</p>"
    pp = _patient_table(data, specs)
    if pp is not None:
        body += "<h3>Patients</h3><p class='note'>Patient prediction = mean of the patient's slide predictions.</p>"
        body += pp
    n_pat = len(set(patient_of.get(s, s) for s in slide_ids)) if patient_of else None
    lead = f"{len(slide_ids)} slides" + (f" of {n_pat} patients" if n_pat else "")
    return Section("cohort", "Cohort", body, lead=lead + "; thumbnails from RUN/thumbnails, heatmap links are "
                                                            "relative to this file.")


def _patient_table(data: ReportData, specs: Sequence[TargetSpec]) -> str | None:
    pp = data.patient_predictions
    if data.labels is not None and data.predictions is not None and specs:
        from wsi_pipeline.mil.tables import patient_frame

        slides = data.predictions.copy()
        known = slides[SLIDE_ID].isin(data.labels.index)
        slides.loc[known, PATIENT_ID] = data.labels.loc[slides.loc[known, SLIDE_ID], PATIENT_ID].to_numpy()
        pp = patient_frame(slides, specs)
    if pp is None or PATIENT_ID not in pp.columns:
        return None
    if "n_slides" not in pp.columns:
        pp = pp.assign(n_slides="")
    rows = [[Cell(f"<b>{esc(r[PATIENT_ID])}</b>"), r["n_slides"], *_prediction_cells(r, specs)]
            for _, r in pp.iterrows()]
    return table(["patient", "slides", *_spec_headers(specs)], rows)


def distributions_section(data: ReportData) -> Section | None:
    preds = data.predictions
    if preds is None:
        return None
    panels: list[tuple[str, str, Any]] = []
    for s in data.specs:
        if s.kind == BINARY and f"{s.name}_prob" in preds:
            panels.append((f"P({s.name}) per slide", "hist", preds[f"{s.name}_prob"]))
        elif s.kind == MULTICLASS and f"{s.name}_pred" in preds:
            counts = preds[f"{s.name}_pred"].astype(str).value_counts()
            order = [c for c in s.classes if c in counts.index] or list(counts.index)
            panels.append((f"predicted {s.name}", "bar", counts.reindex(order)))
        elif s.kind == REGRESSION and f"{s.name}_pred" in preds:
            panels.append((f"predicted {s.name}", "hist", preds[f"{s.name}_pred"]))
        elif s.kind == SURVIVAL and f"{s.name}_risk" in preds:
            panels.append((f"{s.name} risk score", "hist", preds[f"{s.name}_risk"]))
    if not panels:
        return None
    return Section("distributions", "Predicted phenotypes and scores",
                   figures([figure(F.distributions(panels), "Distributions over slides.")], wide=True),
                   lead="What the model predicts across the cohort, before any labels are looked at.")


def _card_thresholds(data: ReportData) -> dict[str, float]:
    """The main variant's recorded ``t_pred`` cut-offs (binary targets; absent for older models → 0.5)."""
    card = data.card or {}
    variant = (card.get("variants") or {}).get(card.get("main_variant"), {})
    return {str(k): float(v) for k, v in (variant.get("thresholds") or {}).items()}


# ---------------------------------------------------------------- performance (labels)
def performance_section(data: ReportData, ev: Evaluation | None) -> Section | None:
    if ev is None or not ev.specs:
        return None
    from wsi_pipeline.evaluate.bootstrap import Truth, bootstrap_metrics, bootstrap_weights
    from wsi_pipeline.evaluate.metrics import auroc

    n = len(ev.truth)
    weights = bootstrap_weights(n, data.cfg.n_boot, data.cfg.seed)
    thresholds = _card_thresholds(data)
    parts = []
    in_sample = _is_training_run(data)
    if in_sample:
        parts.append("<div class='callout warn'>This RUN is the model's training cohort: these predictions are "
                     "in-sample (the fold ensemble saw every patient). Honest figures are the model's "
                     "out-of-fold metrics (Model section).</div>")
    for s in ev.specs:
        y, event, mask = truth_arrays(s, ev)
        if mask.sum() < 3:
            continue
        from wsi_pipeline.mil.tables import prediction_array

        pred = prediction_array(ev.predictions, s)[mask]
        w = weights[:, mask]
        yy = y[mask]
        thr = thresholds.get(s.name, 0.5)
        truth = Truth(s.kind, yy, event=None if event is None else event[mask].astype(int),
                      n_classes=len(s.classes) if s.kind == MULTICLASS else 2, threshold=thr)
        metrics = bootstrap_metrics(truth, pred, w)
        mrows = [[METRIC_TITLES.get(k, k), _ci_cell(v)] for k, v in metrics.items()]
        figs = []
        if s.kind == BINARY:
            auc = _ci_text(metrics["auroc"])
            figs.append(figure(F.roc_binary(yy, pred, w[:200], auc, f"{s.name}: ROC"),
                               "ROC curve; band: 95% patient-level bootstrap."))
            figs.append(figure(F.calibration(yy, pred, f"ECE {_ci_text(metrics['ece'])}\n"
                                                       f"slope {_ci_text(metrics['calibration_slope'])}\n"
                                                       f"intercept {_ci_text(metrics['calibration_intercept'])}",
                                             f"{s.name}: calibration"), "Reliability diagram."))
            classes = s.classes if len(s.classes) == 2 else ["0", "1"]
            source = "the model's recorded cut-off" if s.name in thresholds else "default"
            figs.append(figure(F.confusion(yy, (pred >= thr).astype(int), classes, f"{s.name}: confusion "
                                           f"(threshold {thr:.3f})"),
                               f"Counts and row-normalised fractions; threshold: {source}."))
        elif s.kind == MULTICLASS:
            per_class = [fmt_num(float(auroc((yy == k).astype(float), pred[:, k])[0]), 2)
                         for k in range(len(s.classes))]
            figs.append(figure(F.roc_multiclass(yy, pred, s.classes, per_class, f"{s.name}: ROC (one-vs-rest)"),
                               "One-vs-rest ROC curves."))
            figs.append(figure(F.confusion(yy, np.argmax(pred, axis=1), s.classes, f"{s.name}: confusion"),
                               "Counts and row-normalised fractions."))
        elif s.kind == REGRESSION:
            figs.append(figure(F.scatter(yy, pred, f"Spearman {_ci_text(metrics['spearman'])}\nMAE "
                                                   f"{_ci_text(metrics['mae'])}", f"{s.name}: predicted vs true",
                                         s.name), "Each point is a patient; dashed: identity."))
        else:
            figs.append(_km_by_risk(s, yy, event[mask], pred))
        kind = {BINARY: "binary", MULTICLASS: "multiclass", REGRESSION: "regression", SURVIVAL: "survival"}[s.kind]
        parts.append(f"<h3>{esc(s.name)} <span class='note'>({kind}, {int(mask.sum())} patients)</span></h3>")
        parts.append(table(["metric", "estimate (95% CI)"], mrows, scroll=False, compact=True))
        parts.append(figures(figs))
    for name, why in ev.skipped.items():
        parts.append(f"<p class='note'>{esc(name)}: not evaluated — {esc(why)}</p>")
    return Section("performance", "Performance against the labels", "".join(parts),
                   lead=f"Patient level ({n} labelled patients; prediction = mean of slide predictions); 95% CIs "
                        f"from {data.cfg.n_boot} patient-level bootstrap resamples (wsi_pipeline.evaluate).")


def _km_by_risk(s: TargetSpec, time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> str:
    from wsi_pipeline.evaluate.subgroups import assign_subgroups, logrank, plot_km

    cuts = np.quantile(risk, [1 / 3, 2 / 3]).tolist()
    labels = ["low risk", "intermediate", "high risk"]
    groups = assign_subgroups(risk, cuts, labels)
    lr = logrank(time, event, groups)
    png = F.via_file(lambda p: plot_km(time, event, groups, labels, p,
                                       f"{s.name} by predicted-risk tertile (log-rank p = {fmt_p(lr['p'])})",
                                       time_label=s.time or "time"))
    return figure(png, "Kaplan–Meier by tertiles of the predicted risk in this cohort (descriptive cut-offs); "
                       f"log-rank p = {fmt_p(lr['p'])}.")


def _is_training_run(data: ReportData) -> bool:
    train_run = (data.card or {}).get("train_run")
    if not train_run:
        return False
    try:
        return Path(train_run).resolve() == data.layout.root.resolve()
    except OSError:
        return False


# ---------------------------------------------------------------- responder subgroups (labels)
def subgroups_section(data: ReportData, ev: Evaluation | None) -> Section | None:
    if ev is None:
        return None
    from wsi_pipeline.evaluate.subgroups import (
        assign_subgroups,
        association_test,
        logrank,
        plot_km,
        plot_responder_rates,
        responder_table,
    )

    card_sg = (data.card or {}).get("subgroups") or {}
    binaries = [s for s in ev.specs if s.kind == BINARY]
    target = next((s for s in binaries if s.name == card_sg.get("target")), binaries[0] if binaries else None)
    if target is None:
        return None
    y, _, mask = truth_arrays(target, ev)
    prob = ev.predictions[f"{target.name}_prob"].to_numpy(dtype=np.float64)
    if card_sg.get("target") == target.name and card_sg.get("cutoffs"):
        cuts, order = list(card_sg["cutoffs"]), list(card_sg.get("labels") or SUBGROUP_LABELS)
        source = f"fixed at training: {card_sg.get('source', 'model card')}"
    else:
        cuts, order = np.quantile(prob, [1 / 3, 2 / 3]).tolist(), SUBGROUP_LABELS
        source = "tertiles of this cohort's predictions (descriptive; no model card with fixed cut-offs)"
    groups = assign_subgroups(prob, cuts, order)
    multi = next((s for s in ev.specs if s.kind == MULTICLASS), None)
    cross = ev.predictions[f"{multi.name}_pred"].astype(str).to_numpy() if multi else None
    cross_name = f"predicted {multi.name}" if multi else "phenotype"
    tab = responder_table(groups[mask], y[mask], order, None if cross is None else cross[mask],
                          multi.classes if multi else (), cross_name)
    test = association_test(groups[mask], y[mask])
    rows = [[r["subgroup"], Cell(badge(r[cross_name]) if r[cross_name] != "all" else "all"), r["n"],
             r["responders"], Cell(fmt_ci(r["responder_rate"], r["ci_low"], r["ci_high"], 2), "num")]
            for _, r in tab.iterrows() if r["n"] > 0]
    body = kv([("response target", f"<code>{esc(target.name)}</code>"),
               ("predicted-response cut-offs", ", ".join(f"{c:.3f}" for c in cuts) + f" — {esc(source)}"),
               ("χ² test across subgroups", f"p = {fmt_p(test['p'])}")])
    body += table(["subgroup", cross_name, "patients", "responders", "responder rate (95% Wilson CI)"], rows)
    figs = [figure(F.via_file(lambda p: plot_responder_rates(tab, order, p, f"{target.name}: responder rate by "
                                                             "predicted subgroup", cross_name=cross_name)),
                   "Observed responder rate per predicted-response subgroup.")]
    for s in ev.specs:
        if s.kind != SURVIVAL:
            continue
        t, e, m = truth_arrays(s, ev)
        if m.sum() < 5:
            continue
        lr = logrank(t[m], e[m], groups[m])
        figs.append(figure(F.via_file(lambda p, s=s, t=t, e=e, m=m, lr=lr: plot_km(
            t[m], e[m], groups[m], order, p, f"{s.name} by predicted {target.name} (log-rank p = {fmt_p(lr['p'])})",
            time_label=s.time)), "Kaplan–Meier by predicted-response subgroup."))
    body += figures(figs)
    return Section("subgroups", "Responder subgroups", body,
                   lead="Which patients are most likely to respond: observed response per predicted-response "
                        "subgroup, crossed with the predicted TME phenotype (wsi_pipeline.evaluate.subgroups).")


# ---------------------------------------------------------------- model
def model_section(data: ReportData) -> Section | None:
    if not data.card or data.model_dir is None:
        return None
    card = data.card
    pairs = [("model", f"<code>{esc(card.get('name'))}</code> (main variant <code>{esc(card.get('main_variant'))}"
                       "</code>)"),
             ("targets", ", ".join(f"{esc(t['name'])} <span class='note'>({esc(t['kind'])})</span>"
                                   for t in card.get("targets", []))),
             ("encoder", esc((card.get("encoder") or {}).get("name", "–")))]
    body = kv(pairs)
    metrics_path = data.model_dir / "metrics.json"
    if metrics_path.exists():
        try:
            m = json.loads(metrics_path.read_text())
        except json.JSONDecodeError:
            m = {}
        rows = []
        for variant, targets in (m.get("models") or {}).items():
            for tname, vals in targets.items():
                for metric, v in vals.items():
                    if isinstance(v, dict) and metric in METRIC_TITLES:
                        rows.append([variant, tname, METRIC_TITLES[metric], _ci_cell(v)])
        if rows:
            body += ("<h3>Out-of-fold metrics at training</h3>"
                     + table(["model", "target", "metric", "estimate (95% CI)"], rows))
        body += _head_html(m) + _calibration_html(m, card)
    return Section("model", "Model", body, lead="The MIL model that produced predictions.csv (its model card).")


def _head_html(m: dict[str, Any]) -> str:
    """How the head was chosen (``--head auto``: per-candidate inner-CV scores) and the baseline check."""
    sel = m.get("head_selection") or {}
    check = m.get("baseline_check") or {}
    out = ""
    if sel.get("requested") == "auto":
        rows = [[c, *[Cell(fmt_num(v), "num") for v in sc["per_fold"]], Cell(f"<b>{fmt_num(sc['mean'])}</b>", "num")]
                for c, sc in sel["scores"].items()]
        n = len(sel.get("fold_winners", []))
        out += (f"<h3>Head: <code>{esc(sel['chosen'])}</code> (chosen by <code>--head auto</code>)</h3>"
                f"<p>{esc(sel['reason'])}. <span class='note'>Criterion: {esc(sel['criterion'])}; inner "
                f"{sel['selection_folds']}-fold CV within each outer fold's training patients.</span></p>"
                + table(["candidate", *[f"fold {k + 1}" for k in range(n)], "mean"], rows, scroll=False))
    elif sel:
        out += f"<p>Head <code>{esc(sel.get('chosen'))}</code>: {esc(sel.get('reason', ''))}.</p>"
    if check.get("loses_to_baseline"):
        out += (f"<div class='callout warn'>The main model <code>{esc(check['main'])}</code> scores below its own "
                f"baseline <code>{esc(check['baseline'])}</code> out of fold (mean primary metric "
                f"{fmt_num(check['main_score'])} vs {fmt_num(check['baseline_score'])}).</div>")
    return out


def _calibration_html(m: dict[str, Any], card: dict[str, Any]) -> str:
    """Reliability diagrams of the main model's out-of-fold predictions before and after calibration
    (after = cross-fitted), with ECE, slope, intercept and Brier (95% CIs) from metrics.json."""
    from wsi_pipeline.evaluate.bootstrap import MetricCI

    cal = m.get("calibration") or {}
    main = card.get("main_variant")
    figs = []
    for tname, c in ((cal.get("models") or {}).get(main) or {}).items():
        rel = c.get("reliability")
        if not rel:
            continue
        lines = []
        for key, title in (("ece", "ECE"), ("calibration_slope", "slope"), ("calibration_intercept", "intercept"),
                           ("brier", "Brier")):
            b, a = (MetricCI(*(np.nan if c[w][key][k] is None else c[w][key][k]
                               for k in ("estimate", "ci_low", "ci_high"))) for w in ("before", "after"))
            lines.append(f"{title:<9} {_ci_text(b)} → {_ci_text(a)}")
        curves = [(f"{w} ({c['method'] if w == 'after' else 'raw'})", rel[w]["mean_prob"], rel[w]["observed"],
                   rel[w]["n"]) for w in ("before", "after")]
        figs.append(figure(F.reliability(curves, "\n".join(lines), f"{main}: {tname}, out of fold"),
                           f"Reliability before → after {esc(c['method'])} calibration (after: cross-fitted, "
                           "each fold recalibrated by a calibrator fitted on the other folds)."))
    if not figs:
        return ""
    return "<h3>Calibration of the out-of-fold predictions</h3>" + figures(figs)


# ---------------------------------------------------------------- TME
def tme_section(data: ReportData) -> Section | None:
    tme = data.tme
    if tme is None or tme.empty:
        return None
    pheno = "immune_phenotype" if "immune_phenotype" in tme.columns else None
    til = "til_fraction" if "til_fraction" in tme.columns else None
    fracs = [c for c in tme.columns if c.startswith("area_frac_") and pd.api.types.is_numeric_dtype(tme[c])]
    keys = [c for c in TME_KEY_COLUMNS if c in tme.columns]
    headers = ["slide", *(["immune phenotype"] if pheno else []), *keys, *[c.replace("area_frac_", "")
                                                                          for c in fracs]]
    rows = []
    for _, r in tme.iterrows():
        rows.append([Cell(f"<b>{esc(r[SLIDE_ID])}</b>"), *([_phenotype_cell(r, pheno)] if pheno else []),
                     *[Cell(fmt_num(r[c]), "num") for c in [*keys, *fracs]]])
    body = figures([figure(F.tme_overview(tme, pheno, til, fracs), "Immune phenotype, TIL fraction and mean "
                                                                   "tissue composition over slides.")], wide=True)
    body += ("<p class='note'>Area fractions (tiles of the class / all tiles) per tissue class; densities are "
             "lymphocyte tiles over compartment tiles (see wsi tme).")
    if pheno and "phenotype_margin" in tme.columns:
        from wsi_pipeline.tme.rules import BORDERLINE_MARGIN, is_borderline

        n = sum(is_borderline(v) for v in tme["phenotype_margin"])
        body += (f" A phenotype marked <i>borderline</i> lies within {100 * BORDERLINE_MARGIN:g} % of a rule's "
                 f"threshold (tme.csv <code>phenotype_margin</code>): a small change of the map can turn it "
                 f"({n} of {len(tme)} slides).")
    body += "</p>"
    body += table(headers, rows)
    return Section("tme", "Tumour microenvironment", body,
                   lead=f"The interpretable TME read-out of {len(tme)} slides (RUN/tme.csv).")


def _phenotype_cell(row: pd.Series, pheno: str) -> Cell:
    """The phenotype badge; a borderline call says so, with its margin and reason as the tooltip."""
    from wsi_pipeline.tme.rules import is_borderline

    margin = row.get("phenotype_margin")
    if not is_borderline(margin):
        return Cell(badge(row[pheno]))
    pct = f"{100 * float(margin):.1f} %"
    why = esc(f"{pct} from its threshold: {row.get('phenotype_reason', '')}")
    return Cell(f"{badge(row[pheno])} <span class='note' title='{why}'>borderline ({pct})</span>")


# ---------------------------------------------------------------- analyses
def predictive_section(data: ReportData) -> Section | None:
    layout = data.layout
    if not layout.predictive_json.exists():
        return None
    try:
        doc = json.loads(layout.predictive_json.read_text())
    except json.JSONDecodeError:
        return None
    short = "HR" if doc.get("model") == "cox" else "OR"
    p = doc.get("interaction_p")
    est = fmt_ci(doc.get("interaction_estimate"), doc.get("interaction_ci_low"), doc.get("interaction_ci_high"))
    verdict = ("the treatment effect differs with the biomarker" if isinstance(p, (int, float)) and p < 0.05
               else "no evidence that the treatment effect differs with the biomarker")
    bm = doc.get("biomarker") or {}
    tr = doc.get("treatment") or {}
    body = f"<div class='callout'><b>Interaction {short} {est}, p = {fmt_p(p)}</b> — {esc(verdict)}.</div>"
    for w in doc.get("warnings") or []:
        body += f"<div class='callout warn'>{esc(w)}</div>"
    cut = (f"; cut-off {fmt_num(bm.get('cutoff'), 4)} fixed from {esc(bm.get('cutoff_source'))}"
           if bm.get("cutoff") is not None else "")
    body += kv([
        ("treatment", f"<code>{esc(tr.get('column'))}</code>: {esc(tr.get('treated'))} vs {esc(tr.get('control'))}"),
        ("outcome", ", ".join((f"{esc(k)} " if k != "outcome" else "") + f"<code>{esc(v)}</code>"
                              for k, v in (doc.get("outcome") or {}).items())),
        ("biomarker", f"<code>{esc(bm.get('name'))}</code> — {esc(bm.get('kind'))}, {esc(bm.get('scale'))}{cut}"),
        ("model", f"<code>{esc(doc.get('formula'))}</code> ({esc(doc.get('model'))}, "
                  f"{doc.get('n_patients')} patients, {doc.get('n_events')} events)"),
    ])
    rows = []
    for g in [*(doc.get("subgroup_effects") or []), *([doc["overall_effect"]] if doc.get("overall_effect") else [])]:
        if doc.get("model") == "cox":
            rows.append([g["group"], g["n"], f"{g['events_control']}/{g['n_control']}",
                         f"{g['events_treated']}/{g['n_treated']}",
                         Cell(fmt_ci(g.get("effect"), g.get("effect_ci_low"), g.get("effect_ci_high")), "num"),
                         Cell(fmt_p(g.get("logrank_p")), "num")])
        else:
            rows.append([g["group"], g["n"],
                         Cell(fmt_ci(g.get("rate_control"), g.get("rate_control_ci_low"),
                                     g.get("rate_control_ci_high"), 2), "num"),
                         Cell(fmt_ci(g.get("rate_treated"), g.get("rate_treated_ci_low"),
                                     g.get("rate_treated_ci_high"), 2), "num"),
                         Cell(fmt_ci(g.get("risk_difference"), g.get("risk_difference_ci_low"),
                                     g.get("risk_difference_ci_high"), 2), "num"),
                         Cell(fmt_ci(g.get("effect"), g.get("effect_ci_low"), g.get("effect_ci_high"), 2), "num")])
    if doc.get("model") == "cox":
        headers = ["subgroup", "n", "events control", "events treated", "HR (95% CI)", "log-rank p"]
    else:
        headers = ["subgroup", "n", f"responders {tr.get('control')}", f"responders {tr.get('treated')}",
                   "risk difference", "OR (95% CI)"]
    body += "<h3>Treatment effect by biomarker subgroup</h3>" + table(headers, rows, scroll=False)
    figs = [figure(path.read_bytes(), cap) for path, cap in (
        (layout.predictive_forest_png, "Forest plot: treatment effect per biomarker subgroup."),
        (layout.predictive_effects_png, "Responder rates / Kaplan–Meier curves per arm within subgroups."))
        if path.exists()]
    body += figures(figs)
    return Section("predictive", "Predictive biomarker", body,
                   lead="Treatment × biomarker interaction (wsi predictive): is the biomarker predictive of "
                        "benefit from the treatment, not merely prognostic?")


def evolution_section(data: ReportData) -> Section | None:
    layout = data.layout
    if not layout.evolution_json.exists():
        return None
    try:
        doc = json.loads(layout.evolution_json.read_text())
    except json.JSONDecodeError:
        return None
    body = kv([("timepoints", " → ".join(esc(t) for t in doc.get("order", []))),
               ("patients", f"{doc.get('n_patients')} ({doc.get('n_longitudinal')} with two or more timepoints)"),
               ("response groups", f"<code>{esc(doc.get('response'))}</code>" if doc.get("response") else "–")])
    tests = pd.read_csv(layout.evolution_tests_csv) if layout.evolution_tests_csv.exists() else pd.DataFrame()
    metrics = list(doc.get("metrics") or {})
    if len(tests):
        tests = tests.sort_values("p")
        rows = [[r.metric, r.interval, f"{r.n_responders} / {r.n_non_responders}",
                 Cell(fmt_num(r.median_delta_responders), "num"), Cell(fmt_num(r.median_delta_non_responders), "num"),
                 Cell(fmt_ci(r.cliffs_delta, r.cliffs_delta_ci_low, r.cliffs_delta_ci_high, 2), "num"),
                 Cell(fmt_p(r.p), "num"), Cell(fmt_p(r.q_bh), "num")] for r in tests.itertuples()]
        body += ("<h3>Change scores: responders vs non-responders</h3><p class='note'>Δ = later − earlier; "
                 "Mann–Whitney U; Cliff's δ &gt; 0: responders' Δ larger (bootstrap 95% CI); q: "
                 "Benjamini–Hochberg.</p>")
        body += table(["read-out", "interval", "n (R / NR)", "median Δ R", "median Δ NR", "Cliff's δ", "p", "q"],
                      rows, scroll=False)
        metrics = list(dict.fromkeys([*tests["metric"].tolist(), *metrics]))
    figs = []
    if layout.evolution_transitions_png.exists():
        figs.append(figure(layout.evolution_transitions_png.read_bytes(), "Phenotype transitions between "
                                                                          "consecutive timepoints (all patients)."))
    for m in metrics[:5]:
        path = layout.evolution_metric_png(m)
        if path.exists():
            figs.append(figure(path.read_bytes(), f"{esc(m)}: per patient and group mean ± 95% CI."))
    body += figures(figs)
    if len(metrics) > 5:
        body += (f"<p class='note'>{len(metrics) - 5} more trajectory plots in "
                 f"{esc(_rel(layout.evolution_dir, data.out_path.parent))}/.</p>")
    return Section("evolution", "Tumour evolution", body,
                   lead="How the TME read-out and model scores change between timepoints (wsi evolution).")


# ---------------------------------------------------------------- failures
def failed_section(data: ReportData) -> Section | None:
    failed = [s for s in data.status if s.status == STATUS_FAILED]
    if not failed:
        return None
    rows = [[Cell(f"<b>{esc(s.slide_id)}</b>"), s.stage, Cell(badge(s.error_type or "error", "failed")),
             Cell(f"<span class='err'>{esc(s.error)}</span>", "wrap"), Cell(esc(s.path), "wrap")]
            for s in sorted(failed, key=lambda s: (s.slide_id, s.stage))]
    return Section("failed", "Failed slides", table(["slide", "stage", "error type", "error", "path"], rows),
                   lead=f"{len({s.slide_id for s in failed})} slide(s) failed (RUN/slides.csv); the others went on.")


def notes_html(notes: Sequence[str]) -> str:
    return "".join(f"<p class='note'>{esc(n)}</p>" for n in notes)
