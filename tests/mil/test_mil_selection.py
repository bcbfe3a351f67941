"""`wsi train --head auto` (wsi_pipeline.mil.selection) on bags where attention cannot help, and what a
calibrated model records and applies: cross-fitted OOF calibration, cut-offs, `wsi predict`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.formats.h5 import A_EMBED_DIM, A_ENCODER, A_TARGET_MPP, write_features_h5
from wsi_pipeline.formats.tables import write_labels_csv
from wsi_pipeline.mil.calibration import calibrator_from_dict, fit_calibrator, member_stats, standardize
from wsi_pipeline.mil.config import PredictConfig, TrainConfig
from wsi_pipeline.mil.predict import predict_run
from wsi_pipeline.mil.selection import choose_head, selection_markdown
from wsi_pipeline.mil.targets import TargetSpec
from wsi_pipeline.mil.train import run_train
from wsi_pipeline.runfolder.layout import RunLayout

DIM = 8


def mean_signal_cohort(root: Path, n_patients: int = 48, seed: int = 1) -> Path:
    """One slide per patient, 48 tiles; every tile of a patient is shifted along one direction by the same
    latent z, and the response is Bernoulli(σ(3z)). Each tile alone says little (noise 1 vs shift 0.5·z);
    the mean over the bag says it all: attention has nothing to find."""
    rng = np.random.default_rng(seed)
    u = np.zeros(DIM, np.float32)
    u[0] = 1.0
    layout = RunLayout(root / "run")
    rows = []
    for p in range(n_patients):
        z = rng.normal()
        x = rng.normal(0, 1, (48, DIM)).astype(np.float32) + np.float32(0.5 * z) * u
        xy = np.stack(np.meshgrid(np.arange(8), np.arange(6)), -1).reshape(-1, 2).astype(np.int64) * 224
        sid = f"M{p:03d}"
        write_features_h5(layout.features_h5("sim", sid), x, xy, {A_ENCODER: "sim", A_EMBED_DIM: DIM,
                                                                 A_TARGET_MPP: 0.5})
        rows.append({"slide_id": sid, "patient_id": sid, "response": int(rng.random() < 1 / (1 + np.exp(-3 * z)))})
    return write_labels_csv(root / "labels.csv", pd.DataFrame(rows))


@pytest.fixture(scope="module")
def auto_model(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("meansignal")
    labels = mean_signal_cohort(root, seed=1)
    model = root / "auto"
    # small and quick (≈10 s); lr 0.01: the mean-pool head learns this weak per-tile shift slowly at 1e-3.
    # meanpool won on 4 of 4 cohort seeds tried (inner scores ≈ 0.9 vs 0.7 for abmil)
    run_train(TrainConfig(run=str(root / "run"), labels=str(labels), targets="response:binary", model_out=str(model),
                          folds=3, epochs=15, selection_folds=2, selection_epochs=15, context_rings=0, seed=0,
                          threads=1, n_bootstrap=200, hidden=32, lr=0.01))
    return root / "run", labels, model


def test_auto_picks_meanpool_where_attention_cannot_help_and_records_why(auto_model):
    _, _, model = auto_model
    card = json.loads((model / "model.json").read_text())
    sel = card["head_selection"]
    assert sel["requested"] == "auto" and sel["chosen"] == "meanpool" and card["main_variant"] == "meanpool"
    assert sel["candidates"] == ["meanpool", "abmil"] and len(sel["fold_winners"]) == 3
    for c in sel["candidates"]:  # per-candidate inner scores: one per outer fold, their mean, per target
        sc = sel["scores"][c]
        assert len(sc["per_fold"]) == 3 and sc["mean"] == pytest.approx(np.mean(sc["per_fold"]))
        assert set(sc["per_target"]) == {"response"}
    assert sel["scores"]["meanpool"]["mean"] > 0.8  # the inner CV sees the signal
    assert sel["scores"]["meanpool"]["mean"] > sel["scores"]["abmil"]["mean"] + sel["margin"]  # won outright
    assert "meanpool" in sel["reason"] and "primary metric" in sel["criterion"]
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["head_selection"] == sel
    md = (model / "metrics.md").read_text()
    assert "`--head auto` chose **meanpool**" in md and "| abmil |" in md
    # meanpool without context is its own baseline: no second model, nothing to flag
    assert set(card["variants"]) == {"meanpool"} and metrics["baseline_check"] == {}


def test_selection_never_uses_the_out_of_fold_patients():
    """The choice is a function of the inner scores only, and a more complex head must beat a simpler one
    by more than the margin."""
    per_fold = {"meanpool": [{"r": 0.80}, {"r": 0.70}], "abmil": [{"r": 0.81}, {"r": 0.705}]}
    sel = choose_head(["meanpool", "abmil"], per_fold, margin=0.01, folds=3, epochs=5)
    assert sel.chosen == "meanpool" and sel.fold_winners == ["abmil", "abmil"] and "margin" in sel.reason
    sel = choose_head(["meanpool", "abmil"], per_fold, margin=0.0, folds=3, epochs=5)
    assert sel.chosen == "abmil" and "highest" in sel.reason


def test_oof_calibration_is_cross_fitted_and_cut_offs_are_recorded(auto_model):
    """OOF probabilities of fold k = the recorded method fitted on the other folds' uncalibrated OOF
    probabilities, each fold model's standardised by its own OOF statistics (single-slide patients), not
    the recorded all-folds calibrator (in-sample)."""
    _, _, model = auto_model
    card = json.loads((model / "model.json").read_text())
    v = card["variants"]["meanpool"]
    assert v["calibration"]["response"]["method"] == "platt"
    oof = pd.read_csv(model / "oof_predictions.csv", dtype={"patient_id": str})
    y = oof["response_true"].astype(int).to_numpy()
    raw, cal = oof["response_prob_uncalibrated"].to_numpy(), oof["response_prob"].to_numpy()
    spec = TargetSpec("response", "binary", classes=["0", "1"])
    fold = oof["fold"].to_numpy()
    recorded = calibrator_from_dict(v["calibration"]["response"])
    z = np.empty_like(raw)
    for k in range(3):
        stats = member_stats(raw[fold == k], multiclass=False)
        assert (recorded.center[k], recorded.scale[k]) == pytest.approx(stats, rel=1e-5)
        z[fold == k] = standardize(raw[fold == k], *stats, multiclass=False)
    for k in range(3):
        other = fit_calibrator("platt", spec, z[fold != k], y[fold != k])
        np.testing.assert_allclose(cal[fold == k], other(z[fold == k]), rtol=1e-5, atol=1e-8)
    in_sample = np.concatenate([recorded(raw[fold == k], member=k) for k in range(3)])
    assert np.abs(in_sample - np.concatenate([cal[fold == k] for k in range(3)])).max() > 1e-3
    # the t_pred cut-off: the mean calibrated OOF probability, recorded and used in the OOF table
    thr = v["thresholds"]["response"]
    assert thr == pytest.approx(cal.mean())
    assert (oof["response_pred"].astype(str) == np.where(cal >= thr, "1", "0")).all()
    assert card["subgroups"]["cutoffs"] == pytest.approx(np.quantile(cal, [1 / 3, 2 / 3]).tolist())
    m = json.loads((model / "metrics.json").read_text())
    c = m["calibration"]["models"]["meanpool"]["response"]
    for when in ("before", "after"):
        assert set(c[when]) == {"ece", "calibration_slope", "calibration_intercept", "brier"}
        for d in c[when].values():
            assert d["ci_low"] <= d["estimate"] <= d["ci_high"]
    assert m["models"]["meanpool"]["response"]["ece"]["estimate"] == pytest.approx(c["after"]["ece"]["estimate"])
    assert sum(c["reliability"]["after"]["n"]) == len(oof)


def test_predict_applies_the_recorded_calibrator_and_cut_off(auto_model):
    """`wsi predict`'s probability = the mean over fold models of the recorded calibrator applied to each
    fold model's raw probability (as its OOF predictions were calibrated); per-tile scores likewise."""
    import torch

    from wsi_pipeline.formats.h5 import read_scores_h5
    from wsi_pipeline.mil.data import BagStore
    from wsi_pipeline.mil.ensemble import Ensemble, forward_bag, output_to_prediction

    run, _, model = auto_model
    predict_run(PredictConfig(run=str(run), model=str(model), write_scores=False, calibrated=False))
    raw = pd.read_csv(run / "predictions.csv", dtype={"slide_id": str})
    predict_run(PredictConfig(run=str(run), model=str(model), write_scores=True))
    out = pd.read_csv(run / "predictions.csv", dtype={"slide_id": str})
    card = json.loads((model / "model.json").read_text())
    v = card["variants"]["meanpool"]
    recorded = calibrator_from_dict(v["calibration"]["response"])
    ens = Ensemble(model, calibrated=False)
    store = BagStore(run, "sim", 0, cache_mb=0)
    for sid in out["slide_id"][:6]:
        bag = store.get(sid)
        members, tiles = [], []
        with torch.no_grad():
            for fc, m, _ in ens.members:
                p = output_to_prediction(forward_bag(m, bag, ens.variant.in_dim, None, ens.device), ens.specs, {})
                members.append(recorded(p.values["response"], member=fc.fold))
                tiles.append(recorded(p.tile_scores["response"], member=fc.fold))
        got = out.set_index("slide_id").loc[sid, "response_prob"]
        assert got == pytest.approx(float(np.mean(members)), rel=1e-6)
        assert raw.set_index("slide_id").loc[sid, "response_prob"] != pytest.approx(got, rel=1e-3)
        sc = read_scores_h5(run / "scores" / model.name / f"{sid}.h5")
        np.testing.assert_allclose(sc.scores["response"], np.mean(tiles, axis=0), rtol=1e-5)
    thr = v["thresholds"]["response"]
    assert (out["response_pred"].astype(str) == np.where(out["response_prob"] >= thr, "1", "0")).all()
    assert (raw["response_pred"].astype(str) == np.where(raw["response_prob"] >= 0.5, "1", "0")).all()


def test_models_without_calibrators_still_load_and_predict(auto_model, tmp_path):
    """A model folder written before calibrators existed (model.json version 1: no calibration, no
    thresholds) predicts its raw probabilities, cut at 0.5; the shipped demo MIL carries its calibrators."""
    import shutil

    from wsi_pipeline.mil.data import Bag
    from wsi_pipeline.mil.ensemble import Ensemble

    run, _, model = auto_model
    old = tmp_path / "old-model"
    shutil.copytree(model, old)
    card = json.loads((old / "model.json").read_text())
    for v in card["variants"].values():
        v.pop("calibration"), v.pop("thresholds")
    card.pop("head_selection")
    card["format_version"] = 1
    (old / "model.json").write_text(json.dumps(card))
    ens = Ensemble(old)
    assert ens.calibrators == {} and ens.thresholds == {}
    predict_run(PredictConfig(run=str(run), model=str(model), write_scores=False, calibrated=False))
    raw = pd.read_csv(run / "predictions.csv")
    predict_run(PredictConfig(run=str(run), model=str(old), write_scores=False))
    out = pd.read_csv(run / "predictions.csv")
    np.testing.assert_allclose(out["response_prob"], raw["response_prob"], rtol=1e-6)
    assert (out["response_pred"] == raw["response_pred"]).all()
    demo = Ensemble(Path(__file__).resolve().parents[2] / "models" / "wsip-demo-mil")  # retrained: calibrated
    assert set(demo.calibrators) == {"response", "immune_phenotype"} and set(demo.thresholds) == {"response"}
    rng = np.random.default_rng(0)
    xy = np.stack(np.meshgrid(np.arange(4), np.arange(3)), -1).reshape(-1, 2).astype(np.int64) * 224
    bag = Bag("x", rng.normal(size=(12, demo.variant.in_dim)).astype(np.float32), xy)
    p = demo.predict(bag)
    assert 0 < float(p.values["response"][0]) < 1 and p.values["immune_phenotype"].sum() == pytest.approx(1)


def test_baseline_warning_says_what_differs_from_the_baseline():
    """A main model below its baseline is flagged; when it is the baseline's own head (mean pooling with context
    rings vs without), the advice is about the context, not about switching to the head it already uses."""
    check = {"main": "meanpool", "baseline": "meanpool-baseline", "main_score": 0.947, "baseline_score": 0.948,
             "loses_to_baseline": True, "targets_below_baseline": ["til_fraction"]}
    text = "\n".join(selection_markdown({}, check))
    assert "**Warning" in text and "0.947 vs 0.948" in text and "til_fraction" in text
    assert "--context-rings 0" in text and "--head meanpool" not in text
    text = "\n".join(selection_markdown({}, {**check, "main": "abmil"}))
    assert "**Warning" in text and "--head meanpool" in text and "--context-rings 0" not in text
    text = "\n".join(selection_markdown({}, {**check, "loses_to_baseline": False}))
    assert "Warning" not in text and "at least as well" in text


def _with_sites(labels: Path, n_sites: int) -> Path:
    df = pd.read_csv(labels, dtype=str)
    df["site"] = [f"site-{i % n_sites + 1}" for i in range(len(df))]
    return write_labels_csv(labels.with_name("labels_sites.csv"), df)


def test_group_by_site_keeps_each_site_out_of_its_own_models(tmp_path):
    """`wsi train --group-by site`: every site's patients in one outer fold (so the OOF predictions, and the
    calibrator fitted on them, come from models that never saw the site), and the head selection's inner
    folds grouped by site as well."""
    from wsi_pipeline.mil.cv import Variant
    from wsi_pipeline.mil.train import FoldTask, _patients, build_cohort

    labels = _with_sites(mean_signal_cohort(tmp_path, n_patients=36, seed=2), 6)
    cfg = TrainConfig(run=str(tmp_path / "run"), labels=str(labels), targets="response:binary",
                      model_out=str(tmp_path / "m"), head="meanpool", folds=3, group_by="site", epochs=4,
                      context_rings=0, baseline=False, seed=0, threads=1, n_bootstrap=200, hidden=16,
                      selection_folds=2).validate()
    site = pd.read_csv(labels, dtype=str).set_index("patient_id")["site"]
    cohort = build_cohort(cfg)
    assert cohort.groups == site.to_dict()
    v = Variant("meanpool", "meanpool", {})
    for fold in range(3):
        held, pool = _patients(cohort, cfg, FoldTask(v, fold))
        assert not set(site[sorted(held)]) & set(site[sorted(pool)])
        for inner in range(2):  # inner folds of the head selection: grouped too (4 sites left for 2 folds)
            test, train = _patients(cohort, cfg, FoldTask(v, fold, inner))
            assert test and train and not set(site[sorted(test)]) & set(site[sorted(train)])
            assert not (test | set(train)) & held
    run_train(cfg)
    oof = pd.read_csv(tmp_path / "m" / "oof_predictions.csv", dtype={"patient_id": str})
    assert (oof.assign(site=site[oof.patient_id].to_numpy()).groupby("site").fold.nunique() == 1).all()
    assert oof.fold.nunique() == 3
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["cohort"]["group_by"] == "site"
    assert "every 'site' value in one fold" in (tmp_path / "m" / "metrics.md").read_text()


def test_group_by_errors_name_the_file_the_cause_and_the_fix(tmp_path):
    from wsi_pipeline.errors import LabelsError
    from wsi_pipeline.mil.train import build_cohort

    labels = _with_sites(mean_signal_cohort(tmp_path, n_patients=12, seed=3), 4)
    cfg = TrainConfig(run=str(tmp_path / "run"), labels=str(labels), targets="response:binary",
                      model_out=str(tmp_path / "m"), folds=3, group_by="hospital")
    with pytest.raises(LabelsError, match=r"labels_sites.csv: --group-by 'hospital': no such column.*site"):
        build_cohort(cfg)
    df = pd.read_csv(labels, dtype=str)
    df.loc[1, "patient_id"] = df.loc[0, "patient_id"]  # one patient, two slides, two sites
    two = write_labels_csv(tmp_path / "two.csv", df)
    with pytest.raises(LabelsError, match=r"two.csv: patient 'M000' has slides in 'site' groups"):
        build_cohort(TrainConfig(**{**cfg.__dict__, "labels": str(two), "group_by": "site"}))
    few = TrainConfig(**{**cfg.__dict__, "group_by": "site", "folds": 5})
    with pytest.raises(ConfigError, match=r"--group-by site: 4 group\(s\).*use --folds 4"):
        build_cohort(few)
