"""Starting Flower's deployment runtime for ``wsi federated``: a SuperLink (``flower-superlink``) that runs
the ServerApp, one SuperNode (``flower-supernode``) per site that runs the ClientApp, and the run submitted
with ``flwr run`` (:mod:`wsi_pipeline.federated.apps`). Each is a separate process; they talk through
Flower's gRPC APIs only.

Files under ``--model-out/.federated/``: ``app/`` (the Flower App: its ``pyproject.toml`` names the
components and holds the server configuration), ``flwr/`` (``FLWR_HOME``: the SuperLink connection of
``flwr run``), ``logs/`` (one log per process), ``checkpoint/`` (:mod:`wsi_pipeline.federated.record`).
A site's files (``wsi federated client``) are under ``--work DIR`` (default ``RUN/federated/<name>``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import ConfigError, FederatedError, MissingExtraError
from wsi_pipeline.federated.config import CA_CERT, SERVER_CERT, SERVER_KEY, FederatedConfig, SiteConfig

log = logging.getLogger(__name__)

EXTRA, REQUIREMENT = "federated", "flwr>=1.32,<2"
APP_NAME = "wsi-federated"
CONNECTION = "wsi"  # the SuperLink connection's name in FLWR_HOME/config.toml
POLL_S = 1.0
STOP_GRACE_S = 10.0


def require_flower(what: str = "wsi federated") -> None:
    """Raise :class:`MissingExtraError` unless Flower is installed."""
    if importlib.util.find_spec("flwr") is None:
        raise MissingExtraError(EXTRA, what, REQUIREMENT)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    """A Flower console script of this interpreter's environment."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise MissingExtraError(EXTRA, f"`{name}`", REQUIREMENT)
    return found


def _env(flwr_home: Path | None = None, threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(max(threads, 1))
    env["PYTHONUNBUFFERED"] = "1"
    # Flower's processes start each other by name (flower-superexec, flwr-serverapp, flwr-clientapp)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


@dataclass
class Proc:
    """A started process and its log."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _descendants(self) -> list[Any]:
        import psutil

        try:
            return psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGTERM to the process, its group and every process it started (Flower starts its ServerApp and
        ClientApp processes in sessions of their own), SIGKILL to those left after a grace period."""
        import psutil

        procs = [p for p in self._descendants() if p.is_running()]
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(STOP_GRACE_S)
        _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(STOP_GRACE_S)

    def kill(self) -> None:
        """SIGKILL to the process and every process it started: a site that dies, as in a crash."""
        import psutil

        procs = self._descendants()
        for p in [psutil.Process(self.popen.pid), *procs]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.popen.wait(STOP_GRACE_S)


def start(name: str, cmd: Sequence[str], log_path: Path, env: dict[str, str]) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        popen = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)  # its own group: stop() ends its app processes too
    log.info("started %s (pid %d): %s", name, popen.pid, " ".join(cmd))
    return Proc(name, popen, log_path)


# ---------------------------------------------------------------- the server side
@dataclass
class ServerPaths:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / ".federated"

    @property
    def app(self) -> Path:
        return self.state / "app"

    @property
    def flwr_home(self) -> Path:
        return self.state / "flwr"

    @property
    def logs(self) -> Path:
        return self.state / "logs"


def write_app(paths: ServerPaths, cfg: FederatedConfig) -> Path:
    """The Flower App of this run: ``pyproject.toml`` with the components and the server configuration."""
    import tomli_w

    from wsi_pipeline.config import to_dict

    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": APP_NAME, "version": "1.0.0", "description": "wsi-pipeline federated MIL training",
                    "license": "MIT", "dependencies": []},  # the sites run their own installed wsi-pipeline
        "tool": {"flwr": {"app": {
            "publisher": "wsi-pipeline",
            "components": {"serverapp": "wsi_pipeline.federated.apps:server_app",
                           "clientapp": "wsi_pipeline.federated.apps:client_app"},
            "config": {"wsi-config": json.dumps(to_dict(cfg), sort_keys=True)},
        }}},
    }
    paths.app.mkdir(parents=True, exist_ok=True)
    (paths.app / "pyproject.toml").write_bytes(tomli_w.dumps(doc).encode())
    (paths.app / "README.md").write_text("Generated by `wsi federated`: the Flower App of this run.\n")
    return paths.app


def _write_flwr_config(paths: ServerPaths, control: str, certificates: str) -> None:
    import tomli_w

    conn: dict[str, Any] = {"address": control}
    if certificates:
        conn["root-certificates"] = str(Path(certificates, CA_CERT).resolve())
    else:
        conn["insecure"] = True
    paths.flwr_home.mkdir(parents=True, exist_ok=True)
    (paths.flwr_home / "config.toml").write_bytes(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}).encode())


def _tls_server_args(certificates: str) -> list[str]:
    if not certificates:
        return ["--insecure"]
    d = Path(certificates)
    files = [d / CA_CERT, d / SERVER_CERT, d / SERVER_KEY]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"--certificates {d}: missing {missing}; the folder needs {CA_CERT} (the CA), "
                          f"{SERVER_CERT} and {SERVER_KEY} (the server's certificate, valid for the --address host)")
    return ["--ssl-ca-certfile", str(files[0]), "--ssl-certfile", str(files[1]), "--ssl-keyfile", str(files[2])]


@dataclass
class Server:
    """A SuperLink with this run's app submitted to it."""

    cfg: FederatedConfig
    paths: ServerPaths = field(init=False)
    procs: list[Proc] = field(default_factory=list)
    control: str = ""

    def __post_init__(self) -> None:
        self.paths = ServerPaths(Path(self.cfg.model_out))

    def start(self) -> None:
        cfg = self.cfg
        write_app(self.paths, cfg)
        host = "127.0.0.1"
        self.control = f"{host}:{free_port()}"
        _write_flwr_config(self.paths, self.control, cfg.certificates)
        cmd = [_tool("flower-superlink"), *_tls_server_args(cfg.certificates),
               "--fleet-api-address", cfg.address, "--serverappio-api-address", f"{host}:{free_port()}",
               "--control-api-address", self.control, "--disable-runtime-dependency-installation"]
        self.procs.append(start("superlink", cmd, self.paths.logs / "superlink.log",
                                _env(self.paths.flwr_home, cfg.threads)))
        self._wait_listening(self.control, "the SuperLink")

    def _wait_listening(self, address: str, what: str, timeout: float = 60.0) -> None:
        host, _, port = address.rpartition(":")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.procs[0].alive:
                raise FederatedError(f"{what} exited at start; its log ({self.procs[0].log_path}):\n"
                                     f"{self.procs[0].tail()}")
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((host.strip("[]"), int(port))) == 0:
                    return
            time.sleep(0.3)
        raise FederatedError(f"{what} did not listen on {address} within {timeout:.0f} s (log: {self.procs[0].log_path})")

    def submit(self) -> None:
        """``flwr run`` of the app: the SuperLink starts the ServerApp (the coordinator)."""
        cmd = [_tool("flwr"), "run", str(self.paths.app), CONNECTION, "--format", "json"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=_env(self.paths.flwr_home), timeout=300,
                             check=False)
        (self.paths.logs / "flwr-run.log").write_text(res.stdout + res.stderr)
        if res.returncode != 0 or '"success": false' in res.stdout.replace(" ", " "):
            raise FederatedError(f"`flwr run` failed (exit {res.returncode}): {(res.stdout + res.stderr)[-1500:]}")
        log.info("submitted the federated run: %s", res.stdout.strip()[-300:])

    def wait(self, sites: Sequence[Proc] = (), timeout: float = 0.0) -> dict[str, Any]:
        """Until ``federated.json`` says complete or failed; a failed run raises :class:`FederatedError`."""
        from wsi_pipeline.formats import api as F

        path = self.paths.root / F.FEDERATED_JSON
        deadline = time.monotonic() + timeout if timeout > 0 else float("inf")
        started = time.monotonic()
        while True:
            doc = _read_record(path)
            if doc and doc["status"] == "complete" and (self.paths.root / "model.json").exists():
                return doc
            if doc and doc["status"] == "failed":
                raise FederatedError(f"the federated run failed: {doc.get('error')} (record: {path})")
            if sites and not any(p.alive for p in sites):
                raise FederatedError("every site's SuperNode stopped; their logs: "
                                     + "; ".join(f"{p.name}: {p.log_path}\n{p.tail(5)}" for p in sites))
            if not self.procs[0].alive:
                raise FederatedError(f"the SuperLink stopped; its log ({self.procs[0].log_path}):\n{self.procs[0].tail()}")
            if not doc and time.monotonic() - started > 120:
                raise FederatedError(f"the ServerApp did not start within 120 s; SuperLink log "
                                     f"({self.procs[0].log_path}):\n{self.procs[0].tail(30)}")
            if time.monotonic() > deadline:
                raise FederatedError(f"the federated run did not finish within {timeout:.0f} s (record: {path})")
            time.sleep(POLL_S)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def _read_record(path: Path) -> dict[str, Any]:
    from wsi_pipeline.errors import FormatError
    from wsi_pipeline.formats import api as F

    if not path.exists():
        return {}
    try:
        return F.read_federated_json(path)
    except FormatError:
        return {}  # being replaced


# ---------------------------------------------------------------- the site side
@dataclass
class SitePaths:
    work: Path

    @property
    def node_config(self) -> Path:
        return self.work / "node_config.toml"

    @property
    def status(self) -> Path:
        return self.work / "status.json"

    @property
    def log(self) -> Path:
        return self.work / "supernode.log"


def start_site(sc: SiteConfig, work: Path) -> tuple[Proc, SitePaths]:
    """A SuperNode for this site: ``--node-config`` (a TOML file) tells its ClientApp the RUN folder, the
    labels, the site's name and where its status and audit log go."""
    import tomli_w

    paths = SitePaths(work)
    work.mkdir(parents=True, exist_ok=True)
    paths.status.unlink(missing_ok=True)
    node = {"name": sc.name, "run": str(Path(sc.run).resolve()), "labels": str(Path(sc.labels).resolve()),
            "encoder": sc.encoder or "", "status": str(paths.status.resolve()), "threads": sc.threads,
            "cache-mb": sc.cache_mb, "audit": str(Path(sc.audit).resolve()) if sc.audit else ""}
    paths.node_config.write_bytes(tomli_w.dumps(node).encode())
    if sc.certificates:
        ca = Path(sc.certificates) / CA_CERT
        if not ca.is_file():
            raise ConfigError(f"--certificates {sc.certificates}: no {CA_CERT} (the CA that signed the server's "
                              "certificate) in it")
        tls = ["--root-certificates", str(ca)]
    else:
        tls = ["--insecure"]
    cmd = [_tool("flower-supernode"), *tls, "--superlink", sc.server, "--node-config", str(paths.node_config),
           "--clientappio-api-address", f"127.0.0.1:{free_port()}"]
    return start(f"site {sc.name}", cmd, paths.log, _env(work / "flwr", sc.threads)), paths


def wait_site(proc: Proc, paths: SitePaths, name: str, timeout: float = 0.0) -> dict[str, Any]:
    """Until the site is done or refused (then its SuperNode is stopped); a refusal raises."""
    from wsi_pipeline.formats import api as F

    deadline = time.monotonic() + timeout if timeout > 0 else float("inf")
    try:
        while True:
            st = F.read_site_status(paths.status)
            if st.get("state") == "done":
                return st
            if st.get("state") == "refused":
                raise FederatedError(f"site {name} was refused by the server: {st.get('message')}")
            if st.get("state") == "stopped":
                raise FederatedError(f"site {name}: the server stopped the run: {st.get('message')}")
            if not proc.alive:
                raise FederatedError(f"the SuperNode of site {name} stopped; its log ({proc.log_path}):\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise FederatedError(f"site {name}: the federated run did not finish within {timeout:.0f} s")
            time.sleep(POLL_S)
    finally:
        proc.stop()


# ---------------------------------------------------------------- the commands
@contextlib.contextmanager
def _stop_on_sigterm() -> Any:
    """SIGTERM ends the command like Ctrl-C (the processes it started are stopped), in the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_server(cfg: FederatedConfig, timeout: float = 0.0) -> dict[str, Any]:
    """``wsi federated server``: a SuperLink on ``--address`` running the coordinator until the model folder
    is written; returns ``federated.json``."""
    cfg.validate()
    require_flower("wsi federated server")
    server = Server(cfg)
    with _stop_on_sigterm():
        try:
            server.start()
            server.submit()
            return server.wait(timeout=timeout)
        finally:
            server.stop()


def run_client(sc: SiteConfig, work: str | Path = "") -> dict[str, Any]:
    """``wsi federated client``: this site's SuperNode until the server says the run is over (or refuses the
    site, which raises); returns the site's final status."""
    sc.validate()
    require_flower("wsi federated client")
    work_dir = Path(work) if work else Path(sc.run) / "federated" / sc.name
    with _stop_on_sigterm():
        proc, paths = start_site(sc, work_dir)
        return wait_site(proc, paths, sc.name, sc.timeout)


def run_simulate(cfg: FederatedConfig, sites: Sequence[SiteConfig], timeout: float = 0.0) -> dict[str, Any]:
    """``wsi federated simulate``: on this machine, a SuperLink on a free loopback port and one SuperNode per
    site, each its own process talking through Flower; every site's audit log and SuperNode log under
    ``--model-out/.federated/sites/<name>/``. Returns ``federated.json``."""
    if not sites:
        raise ConfigError("wsi federated simulate: give at least one --site NAME=RUN:LABELS")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"--site names must differ (got {names})")
    cfg.address = f"127.0.0.1:{free_port()}"
    cfg.validate()
    require_flower("wsi federated simulate")
    server = Server(cfg)
    nodes: list[Proc] = []
    with _stop_on_sigterm():
        try:
            server.start()
            for sc in sites:
                sc.server = cfg.address
                work = server.paths.state / "sites" / sc.name
                sc.audit = sc.audit or str(work / "audit.jsonl")
                sc.validate()
                nodes.append(start_site(sc, work)[0])
            server.submit()
            return server.wait(nodes, timeout=timeout)
        finally:  # the server first: an interrupted run stays resumable, not failed for want of sites
            server.stop()
            for p in nodes:
                p.stop()


def parse_site(text: str) -> tuple[str, str, str]:
    """``NAME=RUN:LABELS`` → (name, run, labels)."""
    name, eq, rest = text.partition("=")
    run, colon, labels = rest.rpartition(":")
    if not eq or not colon or not name or not run or not labels:
        raise ConfigError(f"--site {text!r}: expected NAME=RUN:LABELS, e.g. --site A=runs/siteA:siteA/labels.csv")
    return name.strip(), run, labels
