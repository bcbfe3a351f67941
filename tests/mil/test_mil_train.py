"""End to end on a generated feature cohort with planted signals: `wsi train` → `wsi predict` →
`wsi subgroups`, covariates, encoder / µm/px checks, and the 2-rank gloo DDP run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from wsi_pipeline.cli import build_app
from wsi_pipeline.errors import ConfigError, LabelsError, ScaleMismatchError
from wsi_pipeline.formats.h5 import read_features_h5, read_scores_h5, write_features_h5
from wsi_pipeline.mil.config import EvaluateConfig, PredictConfig
from wsi_pipeline.mil.predict import predict_run, run_evaluate
from wsi_pipeline.mil.simulate import SimSpec, simulate_feature_cohort

TARGETS = "response:binary,immune_phenotype:multiclass,til_fraction:regression,os:survival(os_months,os_event)"


def _invoke(*args: str) -> str:
    res = CliRunner().invoke(build_app(), [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("milcohort")
    spec = SimSpec(n_patients=36, embed_dim=16, grid=8, amplitude=4.0, signal_fraction=0.1, seed=8)
    labels = simulate_feature_cohort(root / "run", root / "labels.csv", spec)
    return root / "run", labels


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> Path:
    run, labels = cohort
    model = tmp_path_factory.mktemp("models") / "abmil-demo"
    _invoke("train", run, "--labels", labels, "--targets", TARGETS, "--model-out", model, "--folds", "3",
            "--epochs", "25", "--seed", "1", "--threads", "1", "--n-bootstrap", "300", "--head", "abmil")
    return model


def test_training_outputs_and_learned_signal(trained, cohort):
    _, labels = cohort
    for name in ("config.yaml", "model.json", "metrics.json", "metrics.md", "oof_predictions.csv", "history.json"):
        assert (trained / name).is_file(), name
    card = json.loads((trained / "model.json").read_text())
    assert card["main_variant"] == "abmil" and set(card["variants"]) == {"abmil", "meanpool-baseline"}
    assert card["encoder"] == {"name": "sim", "embed_dim": 16, "target_mpp": 0.5}
    from safetensors.torch import load_file

    run, _ = cohort
    lab = pd.read_csv(labels, dtype={"slide_id": str, "patient_id": str})
    tiles = {s: read_features_h5(run / "features" / "sim" / f"{s}.h5").features.astype(np.float64)
             for s in lab["slide_id"]}
    for v in card["variants"].values():
        assert [f["fold"] for f in v["folds"]] == [0, 1, 2]
        for f in v["folds"]:
            assert (trained / f["weights"]).is_file() and f["weights"].endswith(".safetensors")
            assert f["lr"] == pytest.approx(1e-3)  # the heads' default learning rate
            # embeddings are standardised with statistics of the fold's training patients' tiles only
            state = load_file(trained / f["weights"])
            train = np.concatenate([tiles[s] for s, p in zip(lab["slide_id"], lab["patient_id"], strict=True)
                                    if card["patient_folds"][p] != f["fold"]])
            np.testing.assert_allclose(state["feat_mean"].numpy(), train.mean(0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(state["feat_std"].numpy(), train.std(0), rtol=1e-4, atol=1e-5)
    assert len(card["subgroups"]["cutoffs"]) == 2
    classes = {t["name"]: t.get("classes") for t in card["targets"]}
    assert classes["immune_phenotype"] == ["desert", "excluded", "inflamed"]

    # no patient in two folds; OOF covers every labelled patient once per model
    folds = card["patient_folds"]
    assert set(folds) == set(lab["patient_id"])
    oof = pd.read_csv(trained / "oof_predictions.csv")
    for _, grp in oof.groupby("model"):
        assert sorted(grp["patient_id"]) == sorted(set(lab["patient_id"]))
        assert all(folds[p] == f for p, f in zip(grp["patient_id"], grp["fold"], strict=True))

    m = json.loads((trained / "metrics.json").read_text())
    resp = m["models"]["abmil"]["response"]["auroc"]
    assert resp["estimate"] > 0.8, m["models"]["abmil"]["response"]  # the planted response tiles are found
    assert resp["ci_low"] <= resp["estimate"] <= resp["ci_high"]
    assert m["models"]["abmil"]["til_fraction"]["spearman"]["estimate"] > 0.5
    assert {"brier", "balanced_accuracy", "calibration_slope", "calibration_intercept"} <= set(
        m["models"]["abmil"]["response"])
    assert "c_index" in m["models"]["abmil"]["os"]
    assert {(c["model_a"], c["model_b"]) for c in m["comparisons"]} == {("abmil", "meanpool-baseline")}
    md = (trained / "metrics.md").read_text()
    assert "| abmil |" in md and "| meanpool-baseline |" in md


def test_predict_writes_tables_and_tile_scores(trained, cohort):
    run, labels = cohort
    out = _invoke("predict", run, "--model", trained, "--labels", labels)
    assert "predictions.csv" in out
    slides = pd.read_csv(run / "predictions.csv")
    n_slides = len(list((run / "features" / "sim").glob("*.h5")))
    assert len(slides) == n_slides
    expected = ["slide_id", "patient_id", "response_prob", "response_pred", "immune_phenotype_prob_desert",
                "immune_phenotype_prob_excluded", "immune_phenotype_prob_inflamed", "immune_phenotype_pred",
                "til_fraction_pred", "os_risk"]
    assert list(slides.columns) == expected
    probs = slides[[c for c in expected if c.startswith("immune_phenotype_prob")]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    patients = pd.read_csv(run / "patient_predictions.csv")
    assert len(patients) == slides["patient_id"].nunique() and "n_slides" in patients.columns

    sid = slides["slide_id"].iloc[0]
    sc = read_scores_h5(run / "scores" / "abmil-demo" / f"{sid}.h5")
    fs = read_features_h5(run / "features" / "sim" / f"{sid}.h5")
    np.testing.assert_array_equal(sc.l0_xy, fs.l0_xy)
    n = len(fs.l0_xy)
    assert sc.scores["response"].shape == (n,) and sc.scores["immune_phenotype"].shape == (n, 3)
    assert sc.attrs["class_names_immune_phenotype"] == ["desert", "excluded", "inflamed"]
    assert sc.attention["response"].sum() == pytest.approx(1, abs=1e-4)
    # without labels, patient_id defaults to slide_id
    predict_run(PredictConfig(run=str(run), model=str(trained), write_scores=False))
    slides2 = pd.read_csv(run / "predictions.csv")
    assert (slides2["patient_id"] == slides2["slide_id"]).all()
    np.testing.assert_allclose(slides2["response_prob"], slides["response_prob"], rtol=1e-6)


def test_heldout_cohort_evaluate_and_subgroups(trained, tmp_path):
    """A second cohort from the same generator (new patients): predict, `wsi evaluate`, `wsi subgroups`
    on predictions (not OOF) with the cut-offs fixed at training."""
    spec = SimSpec(n_patients=30, embed_dim=16, grid=8, amplitude=4.0, signal_fraction=0.1, seed=99,
                   id_prefix="T")
    labels = simulate_feature_cohort(tmp_path / "test", tmp_path / "test_labels.csv", spec)
    run = tmp_path / "test"
    with pytest.raises(ConfigError, match="wsi predict"):
        run_evaluate(EvaluateConfig(run=str(run), model=str(trained), labels=str(labels)))
    _invoke("predict", run, "--model", trained, "--labels", labels)
    out = _invoke("evaluate", run, "--model", trained, "--labels", labels, "--n-bootstrap", "300")
    assert "Held-out metrics" in out
    m = json.loads((run / "evaluation" / "abmil-demo" / "metrics.json").read_text())
    assert m["cohort"]["n_patients"] == 30
    assert m["models"]["abmil-demo"]["response"]["auroc"]["estimate"] > 0.75
    as_files = tmp_path / "as_files.csv"  # slide ids written as file names: the message says what to write
    table = pd.read_csv(labels, dtype=str)
    table.assign(slide_id=table["slide_id"] + ".svs").to_csv(as_files, index=False)
    with pytest.raises(LabelsError, match=r"as_files\.csv: no slide_id matches a slide of the predictions.*so write"):
        run_evaluate(EvaluateConfig(run=str(run), model=str(trained), labels=str(as_files)))
    _invoke("subgroups", run, "--model", trained, "--labels", labels)
    summary = json.loads((run / "subgroups" / "abmil-demo" / "subgroups.json").read_text())
    card = json.loads((trained / "model.json").read_text())
    assert summary["source"] == "predictions" and summary["cutoffs"] == card["subgroups"]["cutoffs"]


def test_subgroups_on_training_run_use_oof(trained, cohort):
    run, labels = cohort
    out = _invoke("subgroups", run, "--model", trained, "--labels", labels)
    assert "Responder subgroups" in out
    d = run / "subgroups" / "abmil-demo"
    table = pd.read_csv(d / "subgroups.csv")
    summary = json.loads((d / "subgroups.json").read_text())
    assert summary["source"] == "oof" and "os" in summary["logrank"]
    overall = table[table["immune_phenotype"] == "all"]
    assert list(overall["subgroup"]) == ["low", "intermediate", "high"]
    assert overall["n"].sum() == summary["n_with_response"] <= summary["n_patients"]
    high, low = overall.iloc[2], overall.iloc[0]
    assert high["responder_rate"] > low["responder_rate"]
    assert (table["ci_low"].fillna(0) <= table["responder_rate"].fillna(0)).all()
    assert set(table["immune_phenotype"]) == {"all", "desert", "excluded", "inflamed"}
    for png in ("response_by_subgroup.png", "km_os.png"):
        assert (d / png).read_bytes()[:4] == b"\x89PNG"


def test_predict_refuses_other_encoder_or_scale(trained, cohort, tmp_path):
    run, _ = cohort
    src = next((run / "features" / "sim").glob("*.h5"))
    fs = read_features_h5(src)
    other = tmp_path / "other"
    write_features_h5(other / "features" / "sim" / src.name, fs.features, fs.l0_xy,
                      {**fs.attrs, "target_mpp": 1.0})
    with pytest.raises(ScaleMismatchError, match="1 µm/px"):
        predict_run(PredictConfig(run=str(other), model=str(trained)))
    shutil.rmtree(other)
    write_features_h5(other / "features" / "sim" / src.name, np.zeros((len(fs.l0_xy), 8), np.float32), fs.l0_xy,
                      fs.attrs)
    with pytest.raises(ConfigError, match="embedding size 8"):
        predict_run(PredictConfig(run=str(other), model=str(trained)))


def _shifted_copy(run: Path, out: Path, n: int | None = None) -> Path:
    """The RUN's features (the first ``n`` slides) as another site would give them: every dimension scaled
    and shifted (a stain / scanner shift of the whole cohort)."""
    rng = np.random.default_rng(3)
    files = sorted((run / "features" / "sim").glob("*.h5"))[:n]
    dim = read_features_h5(files[0]).features.shape[1]
    scale, shift = rng.uniform(0.5, 2.0, dim), rng.normal(0.0, 2.0, dim)
    for src in files:
        fs = read_features_h5(src)
        write_features_h5(out / "features" / "sim" / src.name, (fs.features * scale + shift).astype(np.float32),
                          fs.l0_xy, fs.attrs)
    return out


def _probs(run: Path, model: Path, **kw) -> np.ndarray:
    predict_run(PredictConfig(run=str(run), model=str(model), write_scores=False, **kw))
    return pd.read_csv(run / "predictions.csv").sort_values("slide_id")["response_prob"].to_numpy()


def test_align_features_undoes_a_cohort_shift(trained, cohort, tmp_path):
    run, labels = cohort
    shifted = _shifted_copy(run, tmp_path / "site2")
    plain, moved = _probs(run, trained), _probs(shifted, trained)
    assert np.abs(moved - plain).max() > 0.05  # the shift moves the predictions
    aligned, moved_aligned = _probs(run, trained, align_features=True), _probs(shifted, trained, align_features=True)
    # aligned to its own statistics, a cohort predicts the same whatever per-dimension shift its site adds
    np.testing.assert_allclose(moved_aligned, aligned, atol=2e-4)
    # and on the training cohort itself (its statistics are the training folds') it changes little
    assert np.abs(aligned - plain).mean() < 0.05
    out = _invoke("predict", shifted, "--model", trained, "--labels", labels, "--align-features", "--force")
    assert "predictions.csv" in out
    np.testing.assert_allclose(pd.read_csv(shifted / "predictions.csv").sort_values("slide_id")["response_prob"],
                               aligned, atol=2e-4)
    resolved = yaml.safe_load((shifted / "configs" / "predict.yaml").read_text())
    assert resolved["predict"]["align_features"] is True and len(resolved["model"]["features_aligned"]) == 16
    # `wsi run --align-features` hands the flag to its predict stage
    from wsi_pipeline.pipeline import RunConfig, _predict

    _predict(RunConfig(out=str(shifted), align_features=True, force=True), "sim", trained, None)
    np.testing.assert_allclose(pd.read_csv(shifted / "predictions.csv").sort_values("slide_id")["response_prob"],
                               aligned, atol=2e-4)


def test_align_features_needs_a_cohort(trained, cohort, tmp_path):
    few = _shifted_copy(cohort[0], tmp_path / "few", n=4)
    with pytest.raises(ConfigError, match="at least 10 slides; this RUN has 4"):
        predict_run(PredictConfig(run=str(few), model=str(trained), align_features=True))


def test_covariates_comparison(cohort, tmp_path):
    run, labels = cohort
    model = tmp_path / "cov"
    cfg = tmp_path / "train.yaml"  # targets and covariates from YAML, the rest from the command line
    cfg.write_text("targets:\n  - {name: response, kind: binary}\ncovariates: [age, stage]\nhead: meanpool\n")
    _invoke("train", run, "--config", cfg, "--labels", labels, "--model-out", model, "--folds", "2", "--epochs", "6",
            "--no-baseline", "--threads", "1", "--n-bootstrap", "200")
    m = json.loads((model / "metrics.json").read_text())
    assert set(m["models"]) == {"meanpool+cov", "meanpool", "covariates"}
    pairs = {(c["model_a"], c["model_b"]) for c in m["comparisons"]}
    assert pairs == {("meanpool+cov", "meanpool"), ("meanpool+cov", "covariates"), ("meanpool", "covariates")}
    for c in m["comparisons"]:
        assert c["ci_low"] <= c["estimate"] <= c["ci_high"]
    card = json.loads((model / "model.json").read_text())
    enc = card["variants"]["meanpool+cov"]["folds"][0]["covariates"]
    assert set(enc["numeric"]) == {"age"} and set(enc["categorical"]["stage"]) <= {"I", "II", "III", "IV"}
    with pytest.raises(LabelsError, match="covariates"):
        predict_run(PredictConfig(run=str(run), model=str(model)))
    predict_run(PredictConfig(run=str(run), model=str(model), labels=str(labels), write_scores=False))


def _single_and_two_ranks(cohort, tmp_path, *extra: str, ranks_only: tuple[str, ...] = ()
                          ) -> tuple[Path, Path, pd.DataFrame, pd.DataFrame]:
    """`wsi train` in this process and under `torchrun` with 2 gloo ranks (plus ``ranks_only`` options):
    the two model folders and their out-of-fold tables."""
    run, labels = cohort
    common = ["train", str(run), "--labels", str(labels), "--targets", "response:binary,til_fraction:regression",
              "--folds", "2", "--epochs", "3", "--head", "abmil", "--threads", "1", "--n-bootstrap", "50", *extra]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _invoke(*common, "--model-out", single)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "wsi_pipeline", *common, *ranks_only, "--model-out", str(ddp)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = pd.read_csv(single / "oof_predictions.csv"), pd.read_csv(ddp / "oof_predictions.csv")
    assert list(a.columns) == list(b.columns) and len(a) == len(b) and not b.iloc[:, :2].duplicated().any()
    return single, ddp, a, b


def test_ddp_two_ranks_match_single_process(cohort, tmp_path):
    """torchrun with 2 gloo ranks deals the (model, fold) trainings across ranks; every fold is seeded on
    its own, so the out-of-fold predictions equal those of a single process."""
    _, ddp, a, b = _single_and_two_ranks(cohort, tmp_path)
    for col in ("response_prob", "til_fraction_pred"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-4, atol=1e-5)
    card = json.loads((ddp / "model.json").read_text())
    assert all(len(v["folds"]) == 2 for v in card["variants"].values())


def test_ddp_sharded_bags_match_single_process(cohort, tmp_path):
    """torchrun with 2 gloo ranks and ``--distribute bags``: every rank takes part in every training on half
    of each step's slides, and the count-weighted gradient average is the single-process gradient. Without
    dropout or tile subsampling (the only per-rank randomness) the training follows a single process."""
    cfg = tmp_path / "train.yaml"
    cfg.write_text("dropout: 0.0\nmax_tiles: 0\n")
    single, ddp, a, b = _single_and_two_ranks(cohort, tmp_path, "--config", str(cfg), "--batch-bags", "4",
                                              ranks_only=("--distribute", "bags"))
    # float sums in another order: Adam turns the ~1e-7 differences of near-zero gradients into steps, so the
    # barely trained response head drifts a little (measured: mean |Δ| 0.006, r 0.998); TIL stays at 1e-4
    np.testing.assert_allclose(a["til_fraction_pred"], b["til_fraction_pred"], atol=2e-3)
    assert np.abs(a["response_prob"] - b["response_prob"]).mean() < 0.02
    assert np.corrcoef(a["response_prob"], b["response_prob"])[0, 1] > 0.98
    h1, h2 = (json.loads((d / "history.json").read_text())["abmil"]["0"][0] for d in (single, ddp))
    assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-3)  # the first epoch: the same gradients
    assert yaml.safe_load((ddp / "config.yaml").read_text())["distribute"] == "bags"


def test_train_config_errors(cohort, tmp_path):
    from wsi_pipeline.mil.config import TrainConfig
    from wsi_pipeline.mil.train import run_train

    run, labels = cohort
    base = {"run": str(run), "labels": str(labels), "targets": "response:binary", "model_out": str(tmp_path / "m")}
    with pytest.raises(ConfigError, match="available: abmil"):
        run_train(TrainConfig(**base, head="nope"))
    with pytest.raises(ConfigError, match="--folds"):
        run_train(TrainConfig(**base, folds=1))
    # the flag the message names exists on the CLI and reaches the config
    res = CliRunner().invoke(build_app(), ["train", str(run), "--labels", str(labels), "--targets", "response:binary",
                                           "--model-out", str(tmp_path / "m"), "--batch-bags", "0"])
    assert res.exit_code != 0 and "--batch-bags must be >= 1" in str(res.exception or res.output)
    other = tmp_path / "other.csv"
    other.write_text("slide_id,response\nX1,1\nX2,0\n")
    with pytest.raises(LabelsError, match=r"no slide_id matches.*slide_id must be the slide file's name"):
        run_train(TrainConfig(**{**base, "labels": str(other)}))
    table = pd.read_csv(labels, dtype=str)
    first = str(table["slide_id"].iloc[0])
    for ids, said in ((table["slide_id"] + ".svs", re.escape(f"so write {first!r}")),
                      (table["slide_id"].str.swapcase(), "differ only in upper/lower case")):
        typo = tmp_path / "typo.csv"  # ids as file names, or in another case: the difference is named
        table.assign(slide_id=ids).to_csv(typo, index=False)
        with pytest.raises(LabelsError, match=said):
            run_train(TrainConfig(**{**base, "labels": str(typo)}))
    with pytest.raises(LabelsError, match="needs column"):
        run_train(TrainConfig(**{**base, "targets": "nothere:binary"}))


def test_encoder_weights_checksum_is_recorded_and_checked():
    """Features of the same encoder name but other weights (e.g. a re-trained demo encoder) are refused; an
    older card without a checksum still accepts them."""
    from wsi_pipeline.mil.data import EncoderInfo
    from wsi_pipeline.mil.predict import check_encoder

    trained = EncoderInfo("wsip-dino-r10", 512, 0.5, "a" * 64)
    assert EncoderInfo.from_dict(trained.to_dict()) == trained
    check_encoder(trained, EncoderInfo("wsip-dino-r10", 512, 0.5, "a" * 64), Path("run/features"))
    with pytest.raises(ConfigError, match="other weights"):
        check_encoder(trained, EncoderInfo("wsip-dino-r10", 512, 0.5, "b" * 64), Path("run/features"))
    legacy = EncoderInfo.from_dict({"name": "wsip-dino-r10", "embed_dim": 512, "target_mpp": 0.5})
    assert legacy.weights_sha256 == "" and "weights_sha256" not in legacy.to_dict()
    check_encoder(legacy, EncoderInfo("wsip-dino-r10", 512, 0.5, "b" * 64), Path("run/features"))


def _stacked_by_hand(cal: dict, member: int, out: dict[str, np.ndarray]) -> np.ndarray:
    """The recorded stacked calibrator of model.json applied by hand to fold model ``member``'s raw outputs."""
    def logit(p: np.ndarray) -> np.ndarray:
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return np.log(p / (1 - p))

    par, m = cal["params"], cal["members"]
    own = (logit(out["response"]) - m["center"][member]) / m["scale"][member]
    bound = float(logit(np.array(1.0)))  # the standardised own score passes as a probability: |logit| ≤ 13.8
    z = par["a"] + par["b"] * np.clip(own, -bound, bound)
    w = iter(par["w"])
    for f in cal["context"]:
        v = np.asarray(out[f["target"]], dtype=np.float64)
        if f["kind"] == "multiclass":
            v = np.log(np.clip(v, 1e-6, 1))
            v = v - v.mean(-1, keepdims=True)
        scaled = (v - f["center"][member]) / f["scale"][member]
        for j in f["columns"]:
            z = z + next(w) * (scaled[..., j] if f["kind"] == "multiclass" else scaled)
    return 1 / (1 + np.exp(-z))


def test_stacked_calibration_end_to_end(cohort, tmp_path):
    """`wsi train --calibration stacked` records the stacked calibrator with its feature layout; `wsi predict`
    gives every slide the fold-averaged stacked probability of each fold model's own outputs (per-tile scores:
    each tile's own scores of the other targets; the slide's values when a target's tile scores are absent)."""
    import torch

    from wsi_pipeline.mil.data import BagStore
    from wsi_pipeline.mil.ensemble import Ensemble, SlidePrediction, calibrate, forward_bag, output_to_prediction
    from wsi_pipeline.mil.model_io import ModelDir

    src, labels = cohort
    run = tmp_path / "run"
    shutil.copytree(src / "features", run / "features")
    model = tmp_path / "stacked"
    _invoke("train", run, "--labels", labels, "--targets", TARGETS, "--model-out", model, "--folds", "3",
            "--epochs", "6", "--seed", "2", "--threads", "1", "--n-bootstrap", "50", "--head", "meanpool",
            "--no-baseline", "--calibration", "stacked")
    card = json.loads((model / "model.json").read_text())
    assert card["format_version"] == 3
    cals = card["variants"]["meanpool"]["calibration"]
    cal = cals["response"]
    assert cal["method"] == "stacked" and cals["immune_phenotype"]["method"] == "temperature"
    assert [(f["target"], f["kind"], f["columns"]) for f in cal["context"]] == [
        ("immune_phenotype", "multiclass", [0, 1]), ("til_fraction", "regression", [0]), ("os", "survival", [0])]
    assert all(len(f["center"]) == len(f["scale"]) == 3 for f in cal["context"]) and len(cal["params"]["w"]) == 4
    assert "fallback" not in cal["params"] and max(map(abs, cal["params"]["w"])) > 0.1  # the others are read
    metrics = json.loads((model / "metrics.json").read_text())["calibration"]["models"]["meanpool"]["response"]
    assert metrics["method"] == "stacked" and metrics["features"][0] == "own logit" and len(metrics["features"]) == 5
    assert metrics["after"]["brier"]["estimate"] is not None
    mdir = ModelDir(model)
    copy = ModelDir(tmp_path / "copy")
    copy.write_card(mdir.read_card())
    assert copy.read_card() == mdir.read_card()

    predict_run(PredictConfig(run=str(run), model=str(model), labels=str(labels)))
    slides = pd.read_csv(run / "predictions.csv", dtype={"slide_id": str}).set_index("slide_id")
    ens = Ensemble(model)
    store = BagStore(run, "sim", ens.variant.context_rings)
    for sid in slides.index[:4]:
        bag = store.get(sid)
        raw = []
        with torch.no_grad():
            for fc, net, _ in ens.members:
                out = forward_bag(net, bag, ens.variant.in_dim, None, ens.device)
                raw.append((fc.fold, output_to_prediction(out, ens.specs, fc.regression_scalers)))
        slide_p = np.mean([_stacked_by_hand(cal, k, p.values) for k, p in raw], axis=0)
        assert slides.loc[sid, "response_prob"] == pytest.approx(float(slide_p[0]), rel=1e-6)
        uncal = np.mean([p.values["response"] for _, p in raw])
        assert abs(slides.loc[sid, "response_prob"] - uncal) > 1e-4  # the calibrator did something
        tiles = read_scores_h5(run / "scores" / "stacked" / f"{sid}.h5").scores["response"]
        tile_p = np.mean([_stacked_by_hand(cal, k, p.tile_scores) for k, p in raw], axis=0)
        np.testing.assert_allclose(tiles, tile_p, rtol=1e-5, atol=1e-6)
        assert np.std(tiles) > 0
    # a fold model without per-tile scores of a needed target: the tiles' own score with the slide's values
    k, p = raw[0]
    partial = SlidePrediction(p.values, {t: v for t, v in p.tile_scores.items() if t != "til_fraction"})
    got = calibrate(partial, ens.calibrators, k).tile_scores["response"]
    expected = _stacked_by_hand(cal, k, {**{t: v for t, v in p.values.items() if t != "response"},
                                         "response": p.tile_scores["response"]})
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert not np.allclose(got, calibrate(p, ens.calibrators, k).tile_scores["response"])


def test_stacked_calibration_needs_another_target(cohort, tmp_path):
    from wsi_pipeline.mil.config import TrainConfig
    from wsi_pipeline.mil.train import run_train

    run, labels = cohort
    cfg = TrainConfig(run=str(run), labels=str(labels), targets="response:binary", model_out=str(tmp_path / "m"),
                      calibration="stacked")
    with pytest.raises(ConfigError, match=r"--calibration stacked needs a binary target and at least one other "
                                          r"target \(have response:binary\); use --calibration auto or platt"):
        run_train(cfg)
    assert not (tmp_path / "m").exists()  # refused before training
