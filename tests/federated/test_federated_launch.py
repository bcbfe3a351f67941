"""The deployment commands as hospitals would run them: `wsi federated server` and one `wsi federated client`
per site, each its own `wsi` process (a SuperLink, SuperNodes), over TLS with given certificates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("flwr")

from wsi_pipeline.federated.launch import free_port
from wsi_pipeline.formats import api as F

pytestmark = pytest.mark.slow


def _certificates(folder):
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it (Flower's file names)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, sign_key, ca, san=None):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(sign_key, hashes.SHA256())

    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wsi test CA")])
    ca = cert(ca_name, ca_name, ca_key, ca_key, True)
    srv = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name, srv_key, ca_key, False,
               [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(srv.public_bytes(pem))
    (folder / "server.key").write_bytes(srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
    return folder


def test_server_and_client_commands_train_a_model_over_tls(fed_sites, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    out = tmp_path / "model"
    certs = _certificates(tmp_path / "certs")
    wsi = [sys.executable, "-m", "wsi_pipeline", "federated"]
    server = subprocess.Popen([*wsi, "server", "--address", address, "--targets", "response:binary", "--model-out",
                               str(out), "--min-sites", "2", "--rounds", "1", "--local-epochs", "1", "--folds", "1", "--hidden", "16",
                               "--calibration", "none", "--join-timeout", "300", "--certificates", str(certs)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients = []
    for name in "AB":
        run, labels = fed_sites[name]
        clients.append(subprocess.Popen([*wsi, "client", "--server", address, "--run", str(run), "--labels",
                                         str(labels), "--name", name, "--work", str(tmp_path / name),
                                         "--audit", str(tmp_path / f"{name}.jsonl"), "--timeout", "600",
                                         "--certificates", str(certs)],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        server_out, _ = server.communicate(timeout=900)
        client_out = [c.communicate(timeout=120)[0] for c in clients]
    finally:
        for p in (server, *clients):
            if p.poll() is None:
                p.terminate()
    assert server.returncode == 0, server_out
    assert "model written to" in server_out and "sites: " in server_out
    for name, c, text in zip("AB", clients, client_out, strict=True):
        assert c.returncode == 0 and f"site {name}: done" in text, text
        sent = [r["message_type"] for r in F.read_audit_log(tmp_path / f"{name}.jsonl") if r["direction"] == "sent"]
        assert sent[0] == "query.join" and "train" in sent and sent[-1] == "query.done"
    doc = F.read_federated_json(out)
    assert doc["status"] == "complete" and set(doc["sites"]) == {"A", "B"} and (out / "model.json").is_file()
    card = json.loads((out / "model.json").read_text())  # --folds 1: one model, a validation fraction held out
    assert doc["config"]["folds"] == 1 and len(card["variants"][card["main_variant"]]["folds"]) == 1
    assert (out / ".federated" / "logs" / "server.log").read_text().count("round 1/1") == 1
    superlink_log = (out / ".federated" / "logs" / "superlink.log").read_text()
    assert "TLS disabled" not in superlink_log  # served with the given certificate (the sites verify it: ca.crt)
