"""`wsi federated simulate` end to end on Flower's deployment runtime: a SuperLink and one SuperNode process per
site on loopback. Three sites train all four target kinds; a fourth site with features at another µm/px is
refused at join. The model folder works with `wsi predict` and `wsi subgroups`; the sites' audit logs show that
only model updates and aggregate counts, sums and histograms left them."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("flwr")

from fedtools import ALL_TARGETS, site_args

from wsi_pipeline.cli import build_app
from wsi_pipeline.federated import protocol as P
from wsi_pipeline.formats import api as F

pytestmark = pytest.mark.slow


def _invoke(*args: object) -> str:
    res = CliRunner().invoke(build_app(), [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def simulated(fed_sites, tmp_path_factory) -> tuple[Path, str, float]:
    out = tmp_path_factory.mktemp("federated") / "fed-model"
    t0 = time.monotonic()
    text = _invoke("federated", "simulate", *site_args(fed_sites, "ABCD"), "--targets", ALL_TARGETS,
                   "--model-out", out, "--min-sites", "3", "--rounds", "2", "--patience", "3", "--local-epochs", "1",
                   "--folds", "2", "--hidden", "16", "--round-timeout", "240", "--timeout", "900")
    return out, text, time.monotonic() - t0


def test_simulate_writes_the_model_folder_and_record(simulated):
    out, text, seconds = simulated
    assert "model written to" in text
    assert (out / "model.json").is_file() and (out / "config.yaml").is_file()
    doc = F.read_federated_json(out)
    assert doc["status"] == "complete"
    assert set(doc["sites"]) == {"A", "B", "C"}
    for counts in doc["sites"].values():
        assert counts["n_train_slides"] > 0 and counts["n_val_slides"] > 0 and counts["n_tiles"] > 0
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    for r in doc["rounds"]:
        assert sorted(r["sites"]) == ["A", "B", "C"] and not r["missing"]
        assert math.isfinite(r["train_loss"]) and set(r["n_train_slides"]) == {"A", "B", "C"}
        assert set(r["val_loss"]) == {"response", "immune_phenotype", "til_fraction", "os"}
    assert doc["config"]["min_sites"] == 3 and doc["config"]["strategy"] == "fedavg"
    assert doc["config"]["patience"] == 3 and doc["config"]["rounds"] == 2  # the options reach the server
    # --folds 2: a fold ensemble; every patient of a site is validated (by the member that never trained on it)
    assert doc["config"]["folds"] == 2
    for name, counts in doc["sites"].items():
        assert counts["n_val_slides"] == counts["n_slides"] > counts["n_train_slides"], name
    # calibrated by federated optimisation: binary Platt, multiclass temperature
    assert doc["calibration"]["response"]["method"] == "platt"
    assert doc["calibration"]["immune_phenotype"]["method"] == "temperature"
    assert 0.0 <= doc["cutoffs"]["thresholds"]["response"] <= 1.0
    assert len(doc["cutoffs"]["subgroups"]["cutoffs"]) == 2
    card = json.loads((out / "model.json").read_text())
    assert card["encoder"]["name"] == "sim" and card["encoder"]["target_mpp"] == 0.5
    folds = card["variants"][card["main_variant"]]["folds"]
    assert [f["fold"] for f in folds] == [0, 1] and all((out / f["weights"]).is_file() for f in folds)
    assert seconds < 900


def test_mismatched_site_is_refused_at_join(simulated, fed_sites):
    out, _, _ = simulated
    doc = F.read_federated_json(out)
    assert set(doc["refused"]) == {"D"}
    assert "1.0 µm/px" in doc["refused"]["D"] and "0.5 µm/px" in doc["refused"]["D"]
    status = F.read_site_status(out / ".federated" / "sites" / "D" / "status.json")
    assert status["state"] == "refused" and "µm/px" in status["message"]


def test_model_folder_works_with_predict_and_subgroups(simulated, fed_sites):
    out, _, _ = simulated
    run, labels = fed_sites["A"]
    _invoke("predict", run, "--model", out, "--no-scores")
    pred = F.read_predictions_csv(run / "predictions.csv")
    assert {"response_prob", "immune_phenotype_pred", "til_fraction_pred", "os_risk"} <= set(pred.columns)
    assert pred["response_prob"].between(0, 1).all()
    text = _invoke("subgroups", run, "--model", out, "--labels", labels)
    assert "responder" in text.lower() or "subgroup" in text.lower()


def test_only_model_updates_and_aggregates_leave_a_site(simulated, fed_sites):
    """The sites' audit logs: every message a site sent holds the model's parameters (train replies only, the
    same names and shapes as the model it received) and aggregate metrics of the allowed kinds; no slide or
    patient identifier, no per-slide or per-tile row, no feature matrix."""
    import pandas as pd

    out, _, _ = simulated
    targets = ["response", "immune_phenotype", "til_fraction", "os"]
    for name in "ABC":
        table = pd.read_csv(fed_sites[name][1], dtype=str)
        ids = set(table["slide_id"]) | set(table["patient_id"])
        n_slides = len(table)
        records = F.read_audit_log(out / ".federated" / "sites" / name / "audit.jsonl")
        kinds = [r["message_type"] for r in records if r["direction"] == "sent"]
        assert kinds[0] == P.JOIN and kinds.count(P.TRAIN) == 2 and P.SUMMARY in kinds and kinds[-1] == P.DONE
        received_shapes = None
        for rec in records:
            content = rec["records"]
            if rec["direction"] == "received":
                received_shapes = content["arrays"]
                continue
            text = json.dumps(content)
            assert not ids & set(re.split(r"[^\w.\-]+", text)), f"{name} sent an identifier"
            if rec["message_type"] == P.TRAIN:
                assert content["arrays"] == received_shapes and content["arrays"]
            else:
                assert content["arrays"] == {}
            for key, value in content["metrics"].items():
                m = next((m for p in P.SITE_METRICS[rec["message_type"]] if (m := re.fullmatch(p, key))), None)
                assert m is not None and m.groupdict().get("t", "response") in targets, key
                if isinstance(value, list):  # sums over tiles (one per feature dimension), histograms, candidates
                    assert len(value) != n_slides or key.startswith(("hist/", "cal/", "count/", "confusion/"))
            for key in content["config"]:
                assert key in ("site", "encoder", "error") or key.startswith("vocab/"), key
