"""The parts of federated training that need no engine: what a site may send, figures from aggregated sums
and histograms (equal to the pooled ones), calibration by federated optimisation (the pooled fit), refused
options, and the typed error when the extra is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from fedtools import subcommand_options, wsi_main

from wsi_pipeline.errors import ConfigError, FederatedError, MissingExtraError
from wsi_pipeline.federated import protocol as P
from wsi_pipeline.federated.calibrate import FederatedCalibration, site_terms
from wsi_pipeline.federated.config import FederatedConfig, SiteConfig
from wsi_pipeline.federated.sums import histogram, histogram_auroc, histogram_quantiles
from wsi_pipeline.mil.calibration import create_calibrator
from wsi_pipeline.mil.cv import feature_sums, stats_from_sums
from wsi_pipeline.mil.targets import TargetSpec

TARGETS = ["response", "immune_phenotype"]


# ---------------------------------------------------------------- what may leave a site
def test_check_site_reply_accepts_aggregates_and_the_model():
    P.check_site_reply(P.JOIN, P.Payload(metrics={"n/slides": 12, "features/sum": [1.0, 2.0], "features/n": 40,
                                                  "labelled/response": 11},
                                         config={"site": "A", "vocab/response": '["0","1"]'}),
                       None, TARGETS, ["A000_S0", "A000"])
    P.check_site_reply(P.TRAIN, P.Payload(arrays={"w": np.zeros((2, 3))}, metrics={P.NUM_EXAMPLES: 9}),
                       {"w": (2, 3)}, TARGETS)


@pytest.mark.parametrize(("kind", "payload", "shapes", "match"), [
    (P.EVALUATE, P.Payload(arrays={"features": np.zeros((40, 8))}), None, "must not carry arrays"),
    (P.TRAIN, P.Payload(arrays={"w": np.zeros((2, 3)), "coords": np.zeros((40, 2))}), {"w": (2, 3)},
     "exactly the model's"),
    (P.SUMMARY, P.Payload(metrics={"pred/A000_S0": 0.7}), None, "not one a site sends"),
    (P.SUMMARY, P.Payload(metrics={"hist/secret_target/all": [1.0]}), None, "not one a site sends"),
    (P.JOIN, P.Payload(metrics={"n/slides": 3}, config={"site": "A", "vocab/response": '["A000_S0"]'}), None,
     "name the site's slides or patients"),
    (P.JOIN, P.Payload(config={"site": "x" * (P.MAX_TEXT + 1)}), None, "at most"),
    (P.TRAIN, P.Payload(metrics={"train_loss": "0.3"}), None, "numbers only"),
])
def test_check_site_reply_refuses_rows_identifiers_and_features(kind, payload, shapes, match):
    with pytest.raises(FederatedError, match=match):
        P.check_site_reply(kind, payload, shapes, TARGETS, ["A000_S0", "A000"])


# ---------------------------------------------------------------- sums, histograms
def test_feature_statistics_from_site_sums_equal_the_pooled_ones(tmp_path):
    from fedtools import make_site

    from wsi_pipeline.mil.data import BagStore

    stores, slides = [], []
    for i, name in enumerate("AB"):
        run, _ = make_site(tmp_path, name, 40 + i, n_patients=4)
        store = BagStore(str(run), None, 0, 64)
        stores.append(store)
        slides.append(store.slide_ids())
    parts = [feature_sums(s, ids, 8) for s, ids in zip(stores, slides, strict=True)]
    mean, std = stats_from_sums(sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts))
    pooled = np.concatenate([s.get(i).features[:, :8] for s, ids in zip(stores, slides, strict=True) for i in ids])
    np.testing.assert_allclose(mean, pooled.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, pooled.std(0), rtol=1e-4, atol=1e-5)


def test_histogram_auroc_and_quantiles_match_the_exact_figures():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.4
    p = np.clip(0.5 + 0.25 * (y - 0.4) + rng.normal(0, 0.2, 400), 0, 1)
    sites = np.array_split(np.arange(400), 3)
    pos = np.sum([histogram(p[i][y[i]], 1000) for i in sites], axis=0)
    neg = np.sum([histogram(p[i][~y[i]], 1000) for i in sites], axis=0)
    assert histogram_auroc(pos, neg) == pytest.approx(roc_auc_score(y, p), abs=2e-3)
    q = histogram_quantiles(pos + neg, [1 / 3, 2 / 3])
    np.testing.assert_allclose(q, np.quantile(p, [1 / 3, 2 / 3]), atol=5e-3)


# ---------------------------------------------------------------- calibration by federated optimisation
def _federated_fit(spec: TargetSpec, method: str, prob: np.ndarray, y: np.ndarray, k: int = 3):
    parts = np.array_split(np.arange(len(y)), k)
    counts = {spec.name: np.bincount(y, minlength=len(spec.classes)).astype(float).tolist()}
    fc = FederatedCalibration([spec], method, counts)
    while not fc.done:
        req = fc.requests()
        answers = [site_terms(spec, prob[i], y[i].astype(float), req[spec.name]) for i in parts]
        fc.update({key: list(np.sum([np.asarray(a[key]) for a in answers], axis=0)) for key in answers[0]})
    return fc.calibrators()[spec.name], fc.iterations[spec.name]


def test_federated_platt_equals_the_pooled_fit():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.3).astype(int)
    prob = 1 / (1 + np.exp(-(2.5 * (y - 0.3) + rng.normal(0, 1.2, 300))))
    spec = TargetSpec("response", "binary", "response", classes=["0", "1"])
    cal, iterations = _federated_fit(spec, "platt", prob, y)
    pooled = create_calibrator("platt").fit(prob, y)
    assert cal.method == "platt" and 1 < iterations < 30
    assert cal.params["a"] == pytest.approx(pooled.params["a"], abs=1e-6)
    assert cal.params["b"] == pytest.approx(pooled.params["b"], abs=1e-6)


def test_federated_auto_is_platt_or_temperature_and_stacked_is_refused():
    """Federated ``auto`` never means stacked (it would need every patient's other-target outputs)."""
    binary = TargetSpec("response", "binary", "response", classes=["0", "1"])
    multi = TargetSpec("immune_phenotype", "multiclass", "immune_phenotype", classes=["a", "b", "c"])
    fc = FederatedCalibration([binary, multi], "auto", {"response": [30, 20], "immune_phenotype": [10, 20, 20]})
    assert fc.methods == {"response": "platt", "immune_phenotype": "temperature"}
    with pytest.raises(ConfigError, match=r"--calibration stacked: not available in federated training; use auto"):
        FederatedCalibration([binary, multi], "stacked", {"response": [30, 20]})


def test_federated_temperature_equals_the_pooled_fit():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 240)
    logits = 3.0 * np.eye(3)[y] + rng.normal(0, 1.5, (240, 3))
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    spec = TargetSpec("immune_phenotype", "multiclass", "immune_phenotype", classes=["a", "b", "c"])
    cal, _ = _federated_fit(spec, "temperature", prob, y)
    pooled = create_calibrator("temperature", multiclass=True).fit(prob, y)
    assert cal.params["temperature"] == pytest.approx(pooled.params["temperature"], rel=1e-5)


# ---------------------------------------------------------------- refused options, missing extra
@pytest.mark.parametrize(("changes", "match"), [
    ({"calibration": "isotonic"}, "isotonic is not available in federated training"),
    ({"calibration": "stacked", "targets": "response:binary,til_fraction:regression"},
     r"--calibration stacked is not available in federated training.*use --calibration auto"),
    ({"head": "auto"}, "--head auto chooses the head by an inner cross-validation"),
    ({"address": "10.0.0.5:9092"}, "without TLS"),
    ({"strategy": "fedsgd"}, "fedavg or fedprox"),
])
def test_federated_config_refuses_what_cannot_be_federated(tmp_path, changes, match):
    cfg = FederatedConfig(**{"targets": "response:binary", "model_out": str(tmp_path / "m"), **changes})
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_site_config_needs_tls_off_loopback():
    with pytest.raises(ConfigError, match="--certificates"):
        SiteConfig(server="hospital.example.org:9092", run="r", labels="l.csv", name="A").validate()


def test_missing_extra_is_a_typed_error_naming_it(monkeypatch, capsys, tmp_path):
    from wsi_pipeline.federated.launch import require_flower

    monkeypatch.setitem(sys.modules, "flwr", None)  # as if flwr were not installed
    with pytest.raises(MissingExtraError, match=r"\[federated\].*pip install 'wsi-pipeline\[federated\]'"):
        require_flower()
    for args in (["simulate", "--site", "A=run:labels.csv", "--targets", "response:binary", "--model-out",
                  str(tmp_path / "m")], ["client", "--run", "run", "--labels", "l.csv", "--name", "A"]):
        rc, text = wsi_main(capsys, monkeypatch, "federated", *args)
        assert rc == 2 and "MissingExtraError" in text and "pip install 'wsi-pipeline[federated]'" in text, text


def test_refused_options_name_a_fix_the_command_accepts(monkeypatch, capsys, tmp_path):
    import re

    for args in (["--calibration", "isotonic"], ["--calibration", "stacked"], ["--head", "auto"]):
        rc, text = wsi_main(capsys, monkeypatch, "federated", "simulate", "--site", "A=run:labels.csv", "--targets",
                            "response:binary", "--model-out", str(tmp_path / "m"), *args)
        assert rc == 2 and "ConfigError" in text, text
        assert set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)) <= subcommand_options("simulate"), text


# ---------------------------------------------------------------- fold ensemble (--folds K)
def test_fold_ensemble_validates_every_patient_once_by_a_member_that_never_trained_on_it(tmp_path):
    from fedtools import make_site

    from wsi_pipeline.federated.site import Site
    from wsi_pipeline.federated.spec import RunSpec

    run, labels = make_site(tmp_path, "A", 41, n_patients=12)
    targets = [{"name": "response", "kind": "binary", "column": "response", "classes": ["0", "1"]}]
    site = Site(SiteConfig(run=str(run), labels=str(labels), name="A"),
                RunSpec(targets=targets, val_fraction=0.2, seed=0, context_rings=0, folds=3))
    assert len(site.splits) == 3 and sorted(site.val_slides) == sorted(site.slides)  # every slide once
    for k, (train, val) in enumerate(site.splits):
        assert val and train and not {site.patient_of[s] for s in train} & {site.patient_of[s] for s in val}
        assert [s for s, m in zip(site.val_slides, site.val_member, strict=True) if m == k] == val
    one = Site(SiteConfig(run=str(run), labels=str(labels), name="A"),
               RunSpec(targets=targets, val_fraction=0.25, seed=0, context_rings=0))
    assert len(one.splits) == 1 and 0 < len(one.val_slides) < len(one.slides)  # one model: val_fraction held out
    with pytest.raises(FederatedError, match="names no member"):
        RunSpec(targets=targets, val_fraction=0.2, seed=0, context_rings=0, folds=2).member_states({"m5.w": 0})
    spec = RunSpec(targets=targets, val_fraction=0.2, seed=0, context_rings=0, folds=2)
    states = [{"w": np.zeros(2), "b.c": np.ones(1)}, {"w": np.ones(2), "b.c": np.zeros(1)}]
    joined = spec.join_states(states)
    assert sorted(joined) == ["m0.b.c", "m0.w", "m1.b.c", "m1.w"]
    back = spec.member_states(joined)
    assert all(np.array_equal(back[k][n], states[k][n]) for k in (0, 1) for n in ("w", "b.c"))
