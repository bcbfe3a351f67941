"""``wsi subgroups``: which patients are most likely to respond.

Patients are stratified by their predicted response probability with the cut-offs fixed at training time
(tertiles of the out-of-fold predictions, stored in ``DIR/model.json``), so the subgroups of a new cohort
are defined before its outcomes are looked at. For every subgroup: the observed responder rate with a
Wilson 95% CI, overall and per predicted TME phenotype (a multiclass target of the model); a chi-square
test across subgroups; for a survival target, Kaplan–Meier curves and a log-rank test per subgroup.

Predictions: on the training RUN itself the fold-ensemble is not honest (every patient was seen in
training), so by default (``source = auto``) the out-of-fold predictions of ``DIR/oof_predictions.csv``
are used there; on any other RUN, ``RUN/predictions.csv`` from ``wsi predict`` aggregated per patient.

Outputs in ``RUN/subgroups/<model>/``: ``subgroups.csv`` (table), ``subgroups.md``, ``subgroups.json``,
``patients.csv`` (patient → subgroup), ``response_by_subgroup.png`` and ``km_<target>.png``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import ConfigError, LabelsError
from wsi_pipeline.evaluate.subgroups import (
    assign_subgroups,
    association_test,
    logrank,
    plot_km,
    plot_responder_rates,
    responder_table,
)
from wsi_pipeline.formats.atomic import write_text_atomic
from wsi_pipeline.formats.tables import read_oof_predictions_csv, read_predictions_csv
from wsi_pipeline.mil.config import SubgroupsConfig
from wsi_pipeline.mil.model_io import ModelCard, ModelDir
from wsi_pipeline.mil.report import SUBGROUP_LABELS
from wsi_pipeline.mil.tables import patient_frame, patient_truth
from wsi_pipeline.mil.targets import BINARY, MULTICLASS, PATIENT_ID, SLIDE_ID, SURVIVAL, encode_labels
from wsi_pipeline.mil.targets import read_labels_table as _read_labels
from wsi_pipeline.runfolder.layout import RunLayout

log = logging.getLogger(__name__)


@dataclass
class SubgroupsResult:
    out_dir: Path
    table: Any
    summary: dict[str, Any]


def _patient_predictions(cfg: SubgroupsConfig, card: ModelCard, mdir: ModelDir, labels_df: Any) -> tuple[Any, str]:
    layout = RunLayout(cfg.run)
    source = cfg.source
    if source == "auto":
        same = card.train_run and Path(card.train_run).resolve() == layout.root.resolve()
        source = "oof" if same else "predictions"
    specs = card.target_specs
    if source == "oof":
        if not mdir.oof_csv.exists():
            raise ConfigError(f"{mdir.oof_csv}: missing; re-run `wsi train`")
        oof = read_oof_predictions_csv(mdir.oof_csv)
        return oof[oof["model"] == card.main_variant].reset_index(drop=True), source
    if source != "predictions":
        raise ConfigError(f"--source {cfg.source!r}: use auto, oof or predictions")
    if not layout.predictions_csv.exists():
        raise ConfigError(f"{layout.predictions_csv}: no predictions; run `wsi predict {cfg.run} --model {cfg.model}`")
    slides = read_predictions_csv(layout.predictions_csv)
    pmap = dict(zip(labels_df.index.astype(str), labels_df[PATIENT_ID].astype(str), strict=True))
    slides[PATIENT_ID] = [pmap.get(s, p) for s, p in zip(slides[SLIDE_ID], slides[PATIENT_ID], strict=True)]
    return patient_frame(slides, specs), source


def _pick(specs: list, name: str | None, kind: str, what: str) -> Any:
    if name:
        s = next((t for t in specs if t.name == name), None)
        if s is None or s.kind != kind:
            raise ConfigError(f"--{what} {name!r}: the model has no {kind} target of that name "
                              f"({[t.name for t in specs if t.kind == kind]})")
        return s
    return next((t for t in specs if t.kind == kind), None)


def run_subgroups(cfg: SubgroupsConfig) -> SubgroupsResult:
    from dataclasses import replace

    from wsi_pipeline.mil.config import resolve_model_dir

    cfg = replace(cfg, model=str(resolve_model_dir(cfg.model)))
    mdir = ModelDir(cfg.model)
    card = mdir.read_card()
    specs = card.target_specs
    resp = _pick(specs, cfg.target or card.subgroups.get("target"), BINARY, "target")
    if resp is None:
        raise ConfigError(f"{cfg.model}: the model has no binary (response) target to form subgroups")
    phen = _pick(specs, cfg.phenotype, MULTICLASS, "phenotype")
    surv = _pick(specs, cfg.survival, SURVIVAL, "survival")
    labels_df = _read_labels(cfg.labels)
    pats, source = _patient_predictions(cfg, card, mdir, labels_df)
    if card.subgroups.get("target") == resp.name:
        cutoffs = list(card.subgroups["cutoffs"])
    else:  # another binary target: tertiles of its OOF predictions (still fixed on the training folds)
        oof = read_oof_predictions_csv(mdir.oof_csv)
        p = oof.loc[oof["model"] == card.main_variant, f"{resp.name}_prob"].dropna().to_numpy()
        cutoffs = np.quantile(p, [1 / 3, 2 / 3]).tolist()
    order = list(card.subgroups.get("labels", SUBGROUP_LABELS))
    needed = [t for t in (resp, surv) if t is not None]
    cols_ok = [t for t in needed if (t.kind != SURVIVAL and t.column in labels_df.columns)
               or (t.kind == SURVIVAL and {t.time, t.event} <= set(labels_df.columns))]
    if resp not in cols_ok:
        raise LabelsError(f"{cfg.labels}: no column {resp.column!r} with the observed response")
    truth = patient_truth(encode_labels(labels_df, cols_ok, fit_classes=False))
    pats = pats.set_index(PATIENT_ID)
    common = [p for p in pats.index.astype(str) if p in truth.index]
    if not common:
        raise LabelsError(f"{cfg.labels}: no patient_id in common with the predictions ({source})")
    pats = pats.loc[common]
    truth = truth.loc[common]
    groups = assign_subgroups(pats[f"{resp.name}_prob"].to_numpy(), cutoffs, order)
    responders = truth[resp.name].to_numpy(dtype=np.float64)
    cross = pats[f"{phen.name}_pred"].astype(str).to_numpy() if phen is not None else None
    table = responder_table(groups, responders, order, cross, phen.classes if phen else (),
                            cross_name=phen.name if phen else "phenotype")
    test = association_test(groups, responders)
    layout = RunLayout(cfg.run)
    out = layout.subgroups_dir(mdir.root.resolve().name)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "model": mdir.root.resolve().name, "source": source, "target": resp.name, "cutoffs": cutoffs,
        "subgroups": order, "n_patients": len(common),
        "n_with_response": int((~np.isnan(responders)).sum()), "chi2_test": test,
        "phenotype": phen.name if phen else None,
    }
    cross_name = phen.name if phen else "phenotype"
    plot_responder_rates(table, order, out / "response_by_subgroup.png",
                         f"{resp.name}: observed responder rate by predicted subgroup ({source})", cross_name)
    if surv is not None and surv in cols_ok:
        lr = logrank(truth[surv.name].to_numpy(), truth[f"{surv.name}_event"].to_numpy(), groups)
        summary["logrank"] = {surv.name: lr}
        plot_km(truth[surv.name].to_numpy(), truth[f"{surv.name}_event"].to_numpy(), groups, order,
                out / f"km_{surv.name}.png", f"{surv.name} by predicted {resp.name} subgroup "
                f"(log-rank p = {lr['p']:.3g})", time_label=surv.time)
    pt = pats.reset_index()[[PATIENT_ID]].copy()
    pt["subgroup"] = groups
    pt[f"{resp.name}_prob"] = pats[f"{resp.name}_prob"].to_numpy()
    pt[f"{resp.name}_observed"] = responders
    if cross is not None:
        pt[f"{cross_name}_pred"] = cross
    write_text_atomic(out / "patients.csv", pt.to_csv(index=False))
    write_text_atomic(out / "subgroups.csv", table.to_csv(index=False))
    write_text_atomic(out / "subgroups.json", json.dumps(summary, indent=2, default=float))
    write_text_atomic(out / "subgroups.md", _markdown(table, summary, cross_name))
    return SubgroupsResult(out, table, summary)


def _markdown(table: Any, summary: dict[str, Any], cross_name: str) -> str:
    c = summary["cutoffs"]
    lines = [
        f"# Responder subgroups — {summary['model']}", "",
        f"Patients: {summary['n_patients']} ({summary['n_with_response']} with an observed response); predictions: {summary['source']}; subgroups by predicted "
        f"P({summary['target']}) with cut-offs fixed on the training folds: low < {c[0]:.3f} ≤ intermediate "
        f"< {c[1]:.3f} ≤ high. Responder rates with Wilson 95% CIs.", "",
        f"| subgroup | {cross_name} | n | responders | rate (95% CI) |", "|---|---|---|---|---|",
    ]
    for d in table.to_dict("records"):
        rate = "n/a" if d["n"] == 0 else f"{d['responder_rate']:.2f} ({d['ci_low']:.2f}–{d['ci_high']:.2f})"
        lines.append(f"| {d['subgroup']} | {d[cross_name]} | {d['n']} | {d['responders']} | {rate} |")
    t = summary["chi2_test"]
    lines += ["", f"Chi-square test across subgroups: χ² = {t['chi2']:.2f}, p = {t['p']:.3g}."]
    for name, lr in summary.get("logrank", {}).items():
        lines.append(f"Log-rank test of {name} across subgroups: statistic {lr['statistic']:.2f}, p = {lr['p']:.3g}.")
        for pair, p in lr.get("pairwise", {}).items():
            lines.append(f"- {pair}: log-rank p = {p:.3g} (unadjusted)")
    return "\n".join(lines) + "\n"
