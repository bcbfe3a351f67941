"""Configuration of ``wsi federated``: the server's (what is trained, how, with how many sites) and a site's
(its RUN folder and labels, where the server is). The server's resolved configuration is written to
``federated.json`` and ``config.yaml`` in ``--model-out``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wsi_pipeline.errors import ConfigError

STRATEGIES = ("fedavg", "fedprox")
CALIBRATIONS = ("auto", "platt", "temperature", "none")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
DEFAULT_ADDRESS = "127.0.0.1:9092"
CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"  # --certificates DIR (Flower's names)

# settings a restarted server must share with the checkpoint it resumes from (the rest may change, e.g. rounds)
RESUME_KEYS = ("targets", "head", "head_kwargs", "hidden", "dropout", "context_rings", "instance_encoder",
               "val_fraction", "seed", "strategy", "proximal_mu", "folds")


@dataclass
class FederatedConfig:
    """``wsi federated server`` (and ``simulate``). Model settings mean what they mean in ``wsi train``
    (:class:`wsi_pipeline.mil.config.TrainConfig`); a round is ``local_epochs`` epochs at every site, then
    the weighted average of the sites' models (``fedavg``; ``fedprox`` adds the proximal term
    ``proximal_mu/2·‖w − w_global‖²`` to the sites' losses). Early stopping on the federated validation loss
    (``patience`` rounds); the best round's model is the one kept.

    ``folds`` K ≥ 2 trains a fold ensemble, as ``wsi train`` ensembles its fold models: every site splits
    its patients into K stratified folds; member k trains on the other folds and is validated on fold k, all
    K members in the same rounds (one message per site a round, the members' states side by side). Each
    patient is then validated exactly once, by the member that never trained on it: early stopping, the
    calibration and the cut-offs use these out-of-fold predictions of every patient, not a held-out
    ``val_fraction``."""

    address: str = DEFAULT_ADDRESS  # where sites connect (the Fleet API of the SuperLink)
    targets: Any = ""
    model_out: str = ""
    min_sites: int = 2
    rounds: int = 40
    head: str = "abmil"
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    local_epochs: int = 2
    round_timeout: float = 600.0  # seconds a round waits for the sites' answers
    join_timeout: float = 600.0  # seconds the server waits for --min-sites sites to connect
    certificates: str = ""  # folder with ca.crt, server.pem, server.key: TLS
    insecure: bool = False  # accept a non-loopback --address without TLS
    encoder: str = ""  # features every site must have (default: those of the majority of the sites)
    calibration: str = "auto"
    val_fraction: float = 0.2
    folds: int = 3  # K >= 2: a K-member fold ensemble (class docstring); 1: one model, val_fraction held out
    patience: int = 8
    seed: int = 0
    lr: float | None = None
    weight_decay: float = 1e-4
    hidden: int = 256
    dropout: float = 0.25
    context_rings: int = 1
    instance_encoder: str = "mlp"
    max_tiles: int = 4096
    batch_bags: int = 4
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    histogram_bins: int = 100  # resolution of the aggregated histograms the cut-offs come from
    threads: int = 1  # torch threads of the server process

    def validate(self) -> FederatedConfig:
        from wsi_pipeline.mil.heads import list_heads

        if not self.targets:
            raise ConfigError("federated: --targets is required, e.g. --targets response:binary")
        if not self.model_out:
            raise ConfigError("federated: --model-out DIR is required")
        if self.head == "auto":
            raise ConfigError("--head auto chooses the head by an inner cross-validation over the pooled "
                              "patients, which federated training never has; pass a head: --head "
                              f"{' | '.join(list_heads())}")
        if self.head not in list_heads():
            raise ConfigError(f"--head {self.head!r}: unknown; available: {', '.join(list_heads())}")
        if self.calibration == "stacked":
            raise ConfigError("--calibration stacked is not available in federated training: it is fitted on every "
                              "patient's out-of-fold outputs of the model's other targets, which no site may send; "
                              "use --calibration auto (binary platt, multiclass temperature), platt, temperature "
                              "or none, fitted by federated optimisation")
        if self.calibration == "isotonic":
            raise ConfigError("--calibration isotonic is not available in federated training: an isotonic map "
                              "is fitted through every pooled validation prediction, which no site may send; "
                              "use --calibration auto (binary platt, multiclass temperature), platt, "
                              "temperature or none, fitted by federated optimisation")
        checks = [
            (self.calibration in CALIBRATIONS, f"--calibration {self.calibration!r}: use {', '.join(CALIBRATIONS)}"),
            (self.strategy in STRATEGIES, f"--strategy {self.strategy!r}: use {' or '.join(STRATEGIES)}"),
            (self.min_sites >= 1, f"--min-sites must be >= 1 (got {self.min_sites})"),
            (self.rounds >= 1, f"--rounds must be >= 1 (got {self.rounds})"),
            (self.local_epochs >= 1, f"--local-epochs must be >= 1 (got {self.local_epochs})"),
            (self.round_timeout > 0, f"--round-timeout must be > 0 seconds (got {self.round_timeout})"),
            (self.join_timeout > 0, f"join_timeout must be > 0 seconds (got {self.join_timeout})"),
            (self.proximal_mu >= 0, f"--proximal-mu must be >= 0 (got {self.proximal_mu})"),
            (0 < self.val_fraction < 1, f"--val-fraction must be in (0, 1) (got {self.val_fraction})"),
            (self.folds >= 1, f"--folds must be 1 (one model) or >= 2 (a fold ensemble) (got {self.folds})"),
            (self.patience >= 1, f"patience must be >= 1 (got {self.patience})"),
            (self.lr is None or self.lr > 0, f"--lr must be > 0 (got {self.lr})"),
            (self.histogram_bins >= 10, f"histogram_bins must be >= 10 (got {self.histogram_bins})"),
            (self.context_rings >= 0, f"--context-rings must be >= 0 (got {self.context_rings})"),
            (self.batch_bags >= 1, f"batch_bags must be >= 1 (got {self.batch_bags})"),
            (self.max_tiles >= 0, f"max_tiles must be >= 0 (got {self.max_tiles})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        check_address(self.address, "--address")
        if not self.certificates and not self.insecure and not is_loopback(self.address):
            raise ConfigError(f"--address {self.address}: sites would connect without TLS; pass --certificates DIR "
                              f"({CA_CERT}, {SERVER_CERT}, {SERVER_KEY}) or, on a trusted network, --insecure")
        from wsi_pipeline.mil.targets import targets_from_config

        targets_from_config(self.targets)  # parses, or says what is wrong
        return self

    def train_config(self) -> Any:
        """The ``wsi train`` configuration of the same model, for the one rule that builds it
        (:func:`wsi_pipeline.mil.train.plan_variants`)."""
        from wsi_pipeline.mil.config import TrainConfig

        return TrainConfig(run="-", labels="-", targets=self.targets, model_out=self.model_out, head=self.head,
                           calibration=self.calibration, seed=self.seed, lr=self.lr, weight_decay=self.weight_decay,
                           hidden=self.hidden, dropout=self.dropout, context_rings=self.context_rings,
                           instance_encoder=self.instance_encoder, max_tiles=self.max_tiles,
                           batch_bags=self.batch_bags, val_fraction=self.val_fraction, baseline=False,
                           head_kwargs=dict(self.head_kwargs))


@dataclass
class SiteConfig:
    """``wsi federated client``: one site's data (never sent) and how to reach the server."""

    server: str = DEFAULT_ADDRESS
    run: str = ""
    labels: str = ""
    name: str = ""
    encoder: str | None = None
    certificates: str = ""  # folder with ca.crt (the CA that signed the server's certificate)
    insecure: bool = False
    audit: str = ""  # JSON-lines log of every message this site received and sent
    threads: int = 1
    device: str = "cpu"
    cache_mb: int = 2048
    timeout: float = 0.0  # seconds to wait for the federated run to finish (0: no limit)

    def validate(self) -> SiteConfig:
        if not self.run:
            raise ConfigError("federated client: --run RUN folder is required")
        if not self.labels:
            raise ConfigError("federated client: --labels CSV is required")
        if not self.name or not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"--name {self.name!r}: give the site a name of letters, digits, '-', '_' or '.'")
        check_address(self.server, "--server")
        if not self.certificates and not self.insecure and not is_loopback(self.server):
            raise ConfigError(f"--server {self.server}: the connection would not be encrypted; pass --certificates "
                              f"DIR (with {CA_CERT}) or, on a trusted network, --insecure")
        return self


def check_address(address: str, option: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {address!r}: expected HOST:PORT, e.g. {DEFAULT_ADDRESS}")


def is_loopback(address: str) -> bool:
    return address.rpartition(":")[0] in LOOPBACK_HOSTS
