"""`wsi report` builds one self-contained HTML file whose sections follow the RUN folder's contents."""

from __future__ import annotations

import base64
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from wsi_pipeline.cli import build_app
from wsi_pipeline.report.build import build_report
from wsi_pipeline.report.config import ReportConfig
from wsi_pipeline.runfolder.layout import RunLayout

ALL_SECTIONS = {"cohort", "distributions", "performance", "subgroups", "tme", "predictive", "evolution", "failed"}


class _Refs(HTMLParser):
    """Collects every URL-bearing attribute, tag names and section ids."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []  # (tag, attr, value)
        self.tags: set[str] = set()
        self.sections: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        d = dict(attrs)
        for a in ("src", "href", "srcset", "data", "poster", "action"):
            if d.get(a):
                self.urls.append((tag, a, d[a] or ""))
        if tag == "section" and d.get("id"):
            self.sections.append(d["id"] or "")


def _parse(path: Path) -> _Refs:
    p = _Refs()
    p.feed(path.read_text())
    return p


def _assert_self_contained(path: Path) -> _Refs:
    refs = _parse(path)
    assert "script" not in refs.tags and "link" not in refs.tags and "iframe" not in refs.tags
    text = path.read_text()
    assert "@import" not in text and "url(" not in text.split("</style>")[0]  # no external CSS resources
    imgs = [v for t, a, v in refs.urls if t == "img"]
    assert imgs, "expected inlined images"
    for src in imgs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for _, _, v in refs.urls:
        assert not v.lower().startswith(("http:", "https:", "//")), v  # nothing from another host
    return refs


def test_report_with_labels_has_every_section(fake_run: Any, tmp_path: Path) -> None:
    run, labels = fake_run.run, fake_run.labels
    res = build_report(ReportConfig(run=str(run), labels=str(labels), n_boot=200))
    assert res.path == RunLayout(run).report_html and res.path.exists()
    refs = _assert_self_contained(res.path)
    assert set(refs.sections) >= ALL_SECTIONS
    html = res.path.read_text()
    for needle in ("AUROC", "calibration slope", "C-index", "Spearman", "responder rate", "Interaction OR",
                   "Change scores", fake_run.failed_slide, "truncated JPEG tile", "CorruptSlideError",
                   "Kaplan–Meier by tertiles of the predicted risk"):
        assert needle in html, needle
    assert re.search(r"predicted risk in this cohort \(descriptive cut-offs\); log-rank p = [0-9.e<-]+", html)
    # every slide's thumbnail is inlined (plus figures)
    n_slides = len((run / "predictions.csv").read_text().splitlines()) - 1
    assert html.count("class='thumb'") == n_slides
    # heatmap links are relative and point at existing files
    hrefs = [v for t, a, v in refs.urls if t == "a" and not v.startswith("#")]
    assert hrefs and all(not Path(h).is_absolute() for h in hrefs)
    assert all((res.path.parent / h).exists() for h in hrefs)


def test_labels_that_match_no_prediction_say_why_in_the_notes(fake_run: Any, tmp_path: Path) -> None:
    import pandas as pd

    table = pd.read_csv(fake_run.labels, dtype=str)
    as_files = tmp_path / "as_files.csv"
    table.assign(slide_id=table["slide_id"] + ".svs").to_csv(as_files, index=False)
    run = tmp_path / "RUN"
    shutil.copytree(fake_run.run, run)
    res = build_report(ReportConfig(run=str(run), labels=str(as_files), n_boot=200))
    assert "performance" not in res.sections
    html = res.path.read_text().replace("&#x27;", "'")
    assert "performance sections skipped" in html and "a slide id is the file name without its extension" in html


def test_report_out_elsewhere_keeps_links_working(fake_run: Any, tmp_path: Path) -> None:
    run = fake_run.run
    out = tmp_path / "deep" / "dir" / "cohort.html"
    res = build_report(ReportConfig(run=str(run), out=str(out), n_boot=200))
    refs = _assert_self_contained(out)
    hrefs = [v for t, a, v in refs.urls if t == "a" and not v.startswith("#")]
    assert hrefs and all((out.parent / h).resolve().exists() for h in hrefs)
    # no labels: the label-dependent sections are absent, and a note says why
    assert "performance" not in res.sections and "subgroups" not in res.sections
    assert "--labels" in out.read_text()


def test_sections_follow_the_inputs(fake_run: Any, tmp_path: Path) -> None:
    run = fake_run.run
    minimal = tmp_path / "RUN"
    minimal.mkdir()
    shutil.copy(run / "predictions.csv", minimal / "predictions.csv")
    res = build_report(ReportConfig(run=str(minimal), n_boot=200))
    assert set(res.sections) == {"cohort", "distributions", "notes"}
    html = res.path.read_text()
    assert "no thumbnail" in html and "Failed slides" not in html
    shutil.copy(run / "tme.csv", minimal / "tme.csv")
    assert "tme" in build_report(ReportConfig(run=str(minimal), n_boot=200)).sections


def test_tme_table_marks_borderline_phenotypes(fake_run: Any, tmp_path: Path) -> None:
    """A phenotype within 10 % of a rule's threshold (tme.csv phenotype_margin) is marked in the TME table."""
    import pandas as pd

    minimal = tmp_path / "RUN"
    minimal.mkdir()
    shutil.copy(fake_run.run / "predictions.csv", minimal / "predictions.csv")
    tme = pd.read_csv(fake_run.run / "tme.csv")
    assert len(tme) >= 2
    tme["phenotype_margin"] = [0.013] + [0.5] * (len(tme) - 1)
    tme.to_csv(minimal / "tme.csv", index=False)
    html = build_report(ReportConfig(run=str(minimal), n_boot=200)).path.read_text()
    assert html.count("borderline (1.3 %)") == 1 and "borderline (50.0 %)" not in html
    assert f"(1 of {len(tme)} slides)" in html


def test_report_cli(fake_run: Any, tmp_path: Path) -> None:
    run, labels = fake_run.run, fake_run.labels
    out = tmp_path / "r.html"
    res = CliRunner().invoke(build_app(), ["report", str(run), "--labels", str(labels), "--out", str(out),
                                           "--n-boot", "200"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert out.exists() and "sections" in res.output


def test_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    from wsi_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="RUN folder not found"):
        build_report(ReportConfig(run=str(tmp_path / "nope")))


def test_model_card_supplies_targets_and_fixed_subgroup_cutoffs(fake_run: Any, tmp_path: Path) -> None:
    """With the model `wsi predict` used (found through RUN/configs/predict.yaml), targets and classes come
    from its card and the responder subgroups use the cut-offs fixed at training."""
    import json

    import yaml

    run = tmp_path / "RUN"
    shutil.copytree(fake_run.run, run)
    model = tmp_path / "demo_model"
    model.mkdir()
    card = {
        "name": "demo_model", "main_variant": "abmil", "encoder": {"name": "demo-encoder"}, "variants": {},
        "targets": [{"name": "response", "kind": "binary", "column": "response", "classes": ["0", "1"]},
                    {"name": "immune_phenotype", "kind": "multiclass", "column": "immune_phenotype",
                     "classes": ["desert", "excluded", "inflamed"]},
                    {"name": "os", "kind": "survival", "time": "os_months", "event": "os_event"}],
        "subgroups": {"target": "response", "cutoffs": [0.42, 0.61], "labels": ["low", "intermediate", "high"],
                      "source": "tertiles of the out-of-fold patient-level probabilities of the main model"},
        "train_run": str(tmp_path / "elsewhere"),
    }
    (model / "model.json").write_text(json.dumps(card))
    (model / "metrics.json").write_text(json.dumps({"models": {"abmil": {"response": {
        "n": 40, "auroc": {"estimate": 0.81, "ci_low": 0.7, "ci_high": 0.9, "n_valid": 1000}}}}}))
    layout = RunLayout(run)
    layout.command_config_yaml("predict").parent.mkdir(parents=True, exist_ok=True)
    layout.command_config_yaml("predict").write_text(yaml.safe_dump({"predict": {"model": str(model)}}))
    res = build_report(ReportConfig(run=str(run), labels=str(fake_run.labels), n_boot=200))
    assert {"model", "performance", "subgroups"} <= set(res.sections)
    html = res.path.read_text()
    assert "0.420, 0.610" in html and "fixed at training" in html
    assert "Out-of-fold metrics at training" in html and "0.81" in html
    assert "til_fraction (regression" not in html  # not a target of this model
    assert "in-sample" not in html  # this RUN is not the model's training run


def test_model_section_shows_calibration_head_choice_and_recorded_cut_off(fake_run: Any, tmp_path: Path) -> None:
    """A calibrated model: reliability diagrams of its out-of-fold predictions before → after calibration
    with ECE, slope, intercept and Brier; how --head auto chose the head; the main model flagged when it
    loses to its baseline; the confusion matrix at the recorded t_pred cut-off."""
    import json

    import numpy as np
    import yaml

    from wsi_pipeline.evaluate.bootstrap import Truth, bootstrap_weights
    from wsi_pipeline.mil.calibration import TargetCalibrator, fit_calibrator
    from wsi_pipeline.mil.oof import before_after
    from wsi_pipeline.mil.selection import choose_head
    from wsi_pipeline.mil.targets import TargetSpec

    run = tmp_path / "RUN"
    shutil.copytree(fake_run.run, run)
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 60)
    y = (rng.random(60) < 1 / (1 + np.exp(-z))).astype(int)
    raw = 1 / (1 + np.exp(-(3 * z + 1.5)))
    cal = TargetCalibrator(fit_calibrator("platt", TargetSpec("response", "binary", classes=["0", "1"]), raw, y))
    fig = before_after(Truth("binary", y.astype(float)), raw, cal(raw), bootstrap_weights(60, 200, 0), cal)
    sel = choose_head(["meanpool", "abmil"], {"meanpool": [{"response": 0.8}], "abmil": [{"response": 0.7}]},
                      0.01, 3, 20)
    model = tmp_path / "cal_model"
    model.mkdir()
    card = {"name": "cal_model", "main_variant": "meanpool", "encoder": {"name": "demo-encoder"},
            "variants": {"meanpool": {"folds": [], "thresholds": {"response": 0.437},
                                      "calibration": {"response": cal.to_dict()}}},
            "targets": [{"name": "response", "kind": "binary", "column": "response", "classes": ["0", "1"]}],
            "head_selection": sel.to_dict()}
    (model / "model.json").write_text(json.dumps(card))
    (model / "metrics.json").write_text(json.dumps({
        "models": {}, "calibration": {"models": {"meanpool": {"response": fig}}}, "head_selection": sel.to_dict(),
        "baseline_check": {"main": "meanpool", "baseline": "meanpool-baseline", "main_score": 0.7,
                           "baseline_score": 0.8, "loses_to_baseline": True}}))
    layout = RunLayout(run)
    layout.command_config_yaml("predict").parent.mkdir(parents=True, exist_ok=True)
    layout.command_config_yaml("predict").write_text(yaml.safe_dump({"predict": {"model": str(model)}}))
    res = build_report(ReportConfig(run=str(run), labels=str(fake_run.labels), n_boot=200))
    html = res.path.read_text()
    model_html = html[html.index("id='model'"):]
    assert "Calibration of the out-of-fold predictions" in model_html and "before → after platt" in model_html
    assert "chosen by <code>--head auto</code>" in model_html and "highest mean inner-CV score" in model_html
    assert "scores below its own baseline" in model_html
    assert "threshold 0.437" not in html  # figure titles are drawn, not text; the caption names the source
    assert "threshold: the model&#x27;s recorded cut-off" in html or "threshold: the model's recorded cut-off" in html
