"""Faults of a federated run on Flower's deployment runtime: a site killed mid-run is left out of the rounds
(at least --min-sites answer) or stops the run with an error naming it; a server stopped after a round
resumes from its checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("flwr")

from fedtools import site_args, subcommand_options, wsi_main

from wsi_pipeline.cli import build_app
from wsi_pipeline.errors import FederatedError
from wsi_pipeline.federated.config import FederatedConfig, SiteConfig
from wsi_pipeline.federated.launch import Proc, Server, free_port, start_site
from wsi_pipeline.formats import api as F

pytestmark = pytest.mark.slow
FAST = ["--targets", "response:binary", "--local-epochs", "1", "--hidden", "16", "--calibration", "none"]


def _record_after(path: Path, rounds: int, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            doc = F.read_federated_json(path)
        except Exception:  # noqa: BLE001 - not written yet, or being replaced
            doc = {}
        if doc and (len(doc["rounds"]) >= rounds or doc["status"] != "running"):
            return doc
        time.sleep(0.5)
    raise AssertionError(f"{path}: fewer than {rounds} rounds after {timeout} s")


def _federation(fed_sites, out: Path, min_sites: int) -> tuple[Server, dict[str, Proc]]:
    cfg = FederatedConfig(address=f"127.0.0.1:{free_port()}", targets="response:binary", model_out=str(out),
                          min_sites=min_sites, rounds=2, local_epochs=1, hidden=16, round_timeout=30, patience=10,
                          calibration="none")
    server = Server(cfg)
    server.start()
    nodes = {}
    for n in "ABC":
        run, labels = fed_sites[n]
        sc = SiteConfig(server=cfg.address, run=str(run), labels=str(labels), name=n)
        nodes[n] = start_site(sc, out.parent / "sites" / n)[0]
    server.submit()
    return server, nodes


def _kill_after_first_round(out: Path, node: Proc) -> None:
    doc = _record_after(out / F.FEDERATED_JSON, 1)
    assert doc["status"] == "running", doc.get("error")
    node.kill()  # SIGKILL to the SuperNode and its ClientApp process


def test_killed_site_is_left_out_when_min_sites_still_answer(fed_sites, tmp_path):
    out = tmp_path / "model"
    server, nodes = _federation(fed_sites, out, min_sites=2)
    try:
        _kill_after_first_round(out, nodes["C"])
        doc = server.wait(timeout=900)
    finally:
        for p in nodes.values():
            p.stop()
        server.stop()
    assert doc["status"] == "complete" and (out / "model.json").is_file()
    without_c = [r for r in doc["rounds"] if "C" not in r["sites"]]
    assert without_c, doc["rounds"]
    assert all(sorted(r["sites"]) == ["A", "B"] for r in without_c)
    assert "C" in without_c[0]["missing"]


def test_killed_site_below_min_sites_fails_naming_it(fed_sites, tmp_path):
    out = tmp_path / "model"
    server, nodes = _federation(fed_sites, out, min_sites=3)
    try:
        _kill_after_first_round(out, nodes["C"])
        with pytest.raises(FederatedError, match=r"fewer than --min-sites 3; missing: C: "):
            server.wait(timeout=900)
    finally:
        for p in nodes.values():
            p.stop()
        server.stop()
    doc = F.read_federated_json(out)
    assert doc["status"] == "failed" and "missing: C" in doc["error"]


def test_restarted_server_resumes_from_its_checkpoint(fed_sites, tmp_path):
    """`wsi federated simulate` stopped (SIGTERM) after round 1, then run again: it resumes at round 2."""
    out = tmp_path / "model"
    args = ["federated", "simulate", *site_args(fed_sites, "AB"), "--model-out", str(out), "--rounds", "2",
            "--strategy", "fedprox", *FAST, "--round-timeout", "120", "--timeout", "900"]
    first = subprocess.Popen([sys.executable, "-m", "wsi_pipeline", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        doc = _record_after(out / F.FEDERATED_JSON, 1)
    finally:
        first.send_signal(signal.SIGTERM)  # the command stops its SuperLink and SuperNodes
        first.wait(60)
    assert doc["status"] == "running"
    stopped = F.read_federated_json(out)
    done_before = stopped["checkpoint"]["completed_rounds"]
    assert stopped["status"] in ("running", "failed") and 1 <= done_before < 2  # interrupted mid-run
    res = CliRunner().invoke(build_app(), args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = F.read_federated_json(out)
    assert doc["status"] == "complete"
    assert doc["resumed"][0]["after_round"] == done_before
    assert [r["round"] for r in doc["rounds"]] == list(range(1, len(doc["rounds"]) + 1))
    assert len(doc["rounds"]) == 2 and doc["config"]["strategy"] == "fedprox"


def test_a_site_that_cannot_join_is_named_with_its_cause(fed_sites, tmp_path, monkeypatch, capsys):
    """FederatedError through `wsi federated simulate`: the only site's labels match none of its slides, so its
    ClientApp answers the join with its LabelsError, and the run stops naming the site and the cause."""
    import re

    run, _ = fed_sites["A"]
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,patient_id,response\nX1,X1,1\nX2,X2,0\n")
    rc, text = wsi_main(capsys, monkeypatch, "federated", "simulate", "--site", f"A={run}:{labels}", "--targets",
                        "response:binary", "--model-out", str(tmp_path / "m"), "--timeout", "300")
    assert rc == 2 and "FederatedError" in text, text
    assert "refused: A:" in text and "no slide_id matches a feature file" in text, text
    assert set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)) <= subcommand_options("simulate"), text
