"""The immune-phenotype rule table: each phenotype from constructed metrics, boundaries and order."""

from __future__ import annotations

import math

import pytest

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.tme.config import PhenotypeRules, tme_config_from_dict
from wsi_pipeline.tme.rules import immune_phenotype, is_borderline, phenotype_margin

RULES = PhenotypeRules(min_tumour_tiles=3, inflamed_min_tumour_density=0.10, excluded_min_margin_density=0.20)


@pytest.mark.parametrize(
    ("n_tum", "d_tum", "d_mar", "expected"),
    [
        (50, 0.30, 0.50, "inflamed"),  # inside wins even with a busy margin
        (50, 0.10, 0.00, "inflamed"),  # boundary: ≥
        (50, 0.099, 0.25, "excluded"),
        (50, 0.00, 0.20, "excluded"),  # boundary: ≥
        (50, 0.05, 0.19, "desert"),
        (50, 0.00, float("nan"), "desert"),  # no band at all
        (2, 0.90, 0.90, "not_evaluable"),  # too little tumour
    ],
)
def test_rule_table(n_tum: int, d_tum: float, d_mar: float, expected: str) -> None:
    metrics = {"n_tumour_tiles": n_tum, "lymph_density_tumour": d_tum, "lymph_density_margin": d_mar}
    phenotype, reason = immune_phenotype(metrics, RULES)
    assert phenotype == expected
    assert reason


@pytest.mark.parametrize(
    ("d_tum", "d_mar", "margin"),
    [
        (0.30, 0.50, 2.0),  # inflamed: only the tumour density decides, 3× its threshold
        (0.099, 0.60, 0.01),  # excluded by a hair: 1 % under the inflamed threshold
        (0.00, 0.21, 0.05),  # excluded: the margin density 5 % over its threshold decides
        (0.05, 0.19, 0.05),  # desert: the closer of the two thresholds (margin 5 % under)
    ],
)
def test_phenotype_margin_is_the_closest_deciding_threshold(d_tum: float, d_mar: float, margin: float) -> None:
    """How far a call lies from flipping, relative to the thresholds that decided it: a borderline slide (e.g.
    the demo's P002_1, 0.099 against 0.10) can be told from a clear one."""
    metrics = {"n_tumour_tiles": 50, "lymph_density_tumour": d_tum, "lymph_density_margin": d_mar}
    assert phenotype_margin(metrics, RULES) == pytest.approx(margin)
    assert math.isnan(phenotype_margin({**metrics, "n_tumour_tiles": 2}, RULES))  # not evaluable
    assert is_borderline(margin) == (margin < 0.1)


def test_borderline_reads_missing_and_non_finite_margins_as_not_borderline() -> None:
    """Rows written before phenotype_margin (empty CSV cell, None) and non-evaluable slides (NaN) are not marked."""
    assert [is_borderline(v) for v in (0.013, 0.0999, 0.1, None, "", float("nan"), "0.05")] == [
        True, True, False, False, False, False, True]


def test_thresholds_are_configurable() -> None:
    metrics = {"n_tumour_tiles": 10, "lymph_density_tumour": 0.05, "lymph_density_margin": 0.3}
    assert immune_phenotype(metrics, RULES)[0] == "excluded"
    assert immune_phenotype(metrics, PhenotypeRules(inflamed_min_tumour_density=0.04))[0] == "inflamed"
    assert immune_phenotype(metrics, PhenotypeRules(excluded_min_margin_density=0.5))[0] == "desert"


def test_config_from_yaml_mapping_and_validation() -> None:
    cfg = tme_config_from_dict({"spatial": {"band_um": 300}, "rules": {"min_tumour_tiles": 5},
                                "roles": {"tumour": ["tumour"]}, "batch_size": 8}).validate()
    assert cfg.spatial.band_um == 300 and cfg.rules.min_tumour_tiles == 5 and cfg.roles.tumour == ("tumour",)
    with pytest.raises(ConfigError):
        tme_config_from_dict({"rules": {"inflamed_min_tumour_density": 2.0}}).validate()
    with pytest.raises(ConfigError):
        tme_config_from_dict({"no_such_option": 1})


def _cohort(n: int, seed: int) -> tuple[list[dict[str, float]], list[str]]:
    """Densities that separate the phenotypes at inflamed ≥ 0.15 and excluded ≥ 0.12 (not the defaults)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows, truth = [], []
    for i in range(n):
        ph = ("inflamed", "excluded", "desert")[i % 3]
        d_tum = {"inflamed": rng.uniform(0.16, 0.4), "excluded": rng.uniform(0.0, 0.14),
                 "desert": rng.uniform(0.0, 0.14)}[ph]
        d_mar = {"inflamed": rng.uniform(0.0, 0.5), "excluded": rng.uniform(0.13, 0.4),
                 "desert": rng.uniform(0.0, 0.11)}[ph]
        rows.append({"n_tumour_tiles": 20, "lymph_density_tumour": d_tum, "lymph_density_margin": d_mar})
        truth.append(ph)
    return rows, truth


def test_fit_rules_recovers_the_thresholds_with_cross_validation() -> None:
    from wsi_pipeline.tme.rules import fit_rules

    rows, truth = _cohort(60, 0)
    fitted, report = fit_rules(rows, truth, PhenotypeRules(), folds=5)
    assert 0.14 <= fitted.inflamed_min_tumour_density <= 0.16
    assert 0.11 <= fitted.excluded_min_margin_density <= 0.13
    assert fitted.min_tumour_tiles == PhenotypeRules().min_tumour_tiles
    assert report["accuracy_fitted_rules"] == 1.0 > report["accuracy_base_rules"]
    assert report["cv_accuracy"] >= 0.9 and len(report["per_fold"]) == 5
    # the fitted rules still explain themselves
    test_rows, test_truth = _cohort(30, 1)
    calls = [immune_phenotype(r, fitted) for r in test_rows]
    assert sum(c[0] == t for c, t in zip(calls, test_truth, strict=True)) >= 27
    assert all(f"{fitted.inflamed_min_tumour_density}" in reason for _, reason in calls)
    with pytest.raises(ConfigError):
        fit_rules(rows, ["inflamed", "unknown"] * 30, PhenotypeRules())


def test_fit_rules_on_a_run_never_reports_the_slides_it_was_fitted_on(tmp_path) -> None:
    """`wsi tme TRAIN --fit-rules --labels CSV` writes the thresholds (and the slides they were fitted on) to
    TRAIN/configs/tme-fit-rules.yaml, leaves TRAIN/tme.csv as it was, and `wsi tme` refuses to report those
    slides with them; another RUN's slides are fine (the refusal comes before any work)."""
    import numpy as np
    import pandas as pd

    from wsi_pipeline.config import load_yaml
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.tme.config import TMEConfig
    from wsi_pipeline.tme.run import fit_rules_on_run, run_tme

    rows, truth = _cohort(30, 2)
    ids = [f"train-{i:02d}" for i in range(30)]
    train = RunLayout(tmp_path / "train")
    F.write_tme_csv(train.tme_csv, [{"slide_id": s, "immune_phenotype": "desert", **r}
                                    for s, r in zip(ids, rows, strict=True)], leading=("slide_id",))
    before = train.tme_csv.read_bytes()
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": ids, "immune_phenotype": truth}).to_csv(labels, index=False)
    path, report = fit_rules_on_run(train.root, labels, TMEConfig())
    assert path == train.command_config_yaml("tme-fit-rules") and train.tme_csv.read_bytes() == before
    section = load_yaml(path)["tme"]
    cfg = tme_config_from_dict(section).validate()
    assert cfg.rules.fitted_on == tuple(ids) and cfg.rules.inflamed_min_tumour_density > 0.12
    assert report["n_slides"] == 30 and "cv_accuracy" in load_yaml(path)["fit"]
    # the training RUN's own slides: refused, whatever else is there
    for sid in ids[:2]:
        F.write_tiles_h5(train.tiles_h5(sid), np.zeros((0, 2), np.int64), {})
    with pytest.raises(ConfigError, match="fitted on 2 of these slides"):
        run_tme(train.root, cfg)
    assert train.tme_csv.read_bytes() == before
