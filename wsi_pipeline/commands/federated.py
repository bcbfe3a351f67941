"""`wsi federated server | client | simulate`: train the MIL heads across sites with Flower, without moving
slides, features or per-patient rows (the optional extra ``wsi-pipeline[federated]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

# Options shared by `server` and `simulate` (one definition each; typer reads them as defaults).
_TARGETS = typer.Option(None, "--targets", "-t", help="As in `wsi train`, e.g. response:binary,"
                        "immune_phenotype:multiclass,til_fraction:regression,os:survival(os_months,os_event).")
_MODEL_OUT = typer.Option(None, "--model-out", "-o", help="Model folder (as `wsi train` writes it) + federated.json; "
                          "a checkpoint under .federated/ lets a restarted server resume.")
_ROUNDS = typer.Option(None, "--rounds", help="Federated rounds at most (default 40; early stopping after "
                       "--patience rounds without improvement of the federated validation loss).")
_PATIENCE = typer.Option(None, "--patience", help="Early stopping: rounds without improvement of the federated "
                         "validation loss (default 8).")
_HEAD = typer.Option(None, "--head", help="MIL head: abmil (default), transmil, chowder or meanpool (not auto).")
_STRATEGY = typer.Option(None, "--strategy", help="fedavg (default) or fedprox (Flower's strategies).")
_MU = typer.Option(None, "--proximal-mu", help="FedProx proximal term weight (default 0.01).")
_LOCAL_EPOCHS = typer.Option(None, "--local-epochs", help="Epochs at every site per round (default 2).")
_ROUND_TIMEOUT = typer.Option(None, "--round-timeout", help="Seconds a round waits for the sites (default 600); "
                              "a site that does not answer is left out of the round.")
_CALIBRATION = typer.Option(None, "--calibration", help="auto (binary platt, multiclass temperature), platt, "
                            "temperature or none, fitted by federated optimisation (isotonic and stacked are refused).")
_VAL_FRACTION = typer.Option(None, "--val-fraction", help="With --folds 1: validation fraction of every site's "
                             "patients (default 0.2): early stopping, calibration, cut-offs.")
_FOLDS = typer.Option(None, "--folds", help="K >= 2 (default 3): a K-member fold ensemble, as `wsi train`: every site "
                      "splits its patients into K folds, member k is validated on fold k; early stopping, calibration "
                      "and cut-offs use every patient's out-of-fold prediction. 1: one model, --val-fraction held "
                      "out at every site.")
_ENCODER = typer.Option(None, "--encoder", "-e", help="Features every site must have (default: the majority's).")
_SEED = typer.Option(None, "--seed", help="Random seed.")
_LR = typer.Option(None, "--lr", help="AdamW learning rate (default: the head's).")
_HIDDEN = typer.Option(None, "--hidden", help="Hidden width of the head (default 256).")
_CONTEXT = typer.Option(None, "--context-rings", help="Neighbour-mean rings appended to each tile (default 1).")
_CONFIG = typer.Option(None, "--config", "-c", help="YAML with any FederatedConfig field; options override.")


def _server_config(config: Path | None, options: dict[str, Any], **overrides: Any) -> Any:
    """The FederatedConfig of a command: ``--config`` YAML, then every given option of the command
    (``options``: its parameters; those that name a FederatedConfig field), then ``overrides``."""
    from dataclasses import fields

    from wsi_pipeline.config import from_dict, load_yaml
    from wsi_pipeline.federated.config import FederatedConfig

    names = {f.name for f in fields(FederatedConfig)}
    base: dict[str, Any] = load_yaml(config) if config else {}
    given = {k: v for k, v in {**options, **overrides}.items() if k in names and v is not None}
    data = {**base, **given}
    if "model_out" in data:
        data["model_out"] = str(data["model_out"])
    return from_dict(FederatedConfig, data)


def _echo_result(doc: dict[str, Any], model_out: Any) -> None:
    rounds = doc.get("rounds", [])
    losses = ", ".join(f"{r['train_loss']:.3f}" for r in rounds)
    sites = ", ".join(f"{k} ({v['n_train_slides']}+{v['n_val_slides']} slides)" for k, v in doc["sites"].items())
    typer.echo(f"sites: {sites}")
    typer.echo(f"{len(rounds)} rounds, training loss per round: {losses}")
    for t, v in (doc.get("validation") or {}).get("targets", {}).items():
        typer.echo(f"  {t}: " + ", ".join(f"{k} {x:.3f}" if isinstance(x, float) else f"{k} {x}" for k, x in v.items()))
    typer.echo(f"model written to {model_out} (federated.json: rounds, sites, config)")


def register(app: typer.Typer) -> None:
    fed = typer.Typer(name="federated", no_args_is_help=True,
                      help="Federated training across sites (Flower): server, client, simulate. Needs the extra "
                           "federated: pip install 'wsi-pipeline\\[federated]'.")
    app.add_typer(fed, name="federated")

    @fed.command("server")
    def server(
        address: str = typer.Option("127.0.0.1:9092", "--address",
                                    help="HOST:PORT the sites connect to (Flower's Fleet API). Default loopback; "
                                         "another host needs --certificates (or --insecure on a trusted network)."),
        targets: str = _TARGETS, model_out: Path = _MODEL_OUT,
        min_sites: int = typer.Option(None, "--min-sites", help="Sites needed to start and in every round "
                                      "(default 2)."),
        rounds: int = _ROUNDS, patience: int = _PATIENCE, head: str = _HEAD, strategy: str = _STRATEGY,
        proximal_mu: float = _MU,
        local_epochs: int = _LOCAL_EPOCHS, round_timeout: float = _ROUND_TIMEOUT, calibration: str = _CALIBRATION,
        val_fraction: float = _VAL_FRACTION, folds: int = _FOLDS, encoder: str = _ENCODER, seed: int = _SEED,
        lr: float = _LR,
        hidden: int = _HIDDEN, context_rings: int = _CONTEXT,
        join_timeout: float = typer.Option(None, "--join-timeout", help="Seconds to wait for --min-sites sites "
                                           "(default 600)."),
        certificates: Path = typer.Option(None, "--certificates",
                                          help="TLS: folder with ca.crt, server.pem and server.key (the server's "
                                               "certificate must name the --address host)."),
        insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --address without TLS."),
        config: Path = _CONFIG,
    ) -> None:
        """Coordinate a federated training: a Flower SuperLink on --address running the ServerApp; the sites
        join with `wsi federated client`. Restarted on the same --model-out, it resumes after the last
        completed round."""
        from wsi_pipeline.federated.launch import run_server

        cfg = _server_config(config, locals(), certificates=str(certificates) if certificates else None,
                             insecure=insecure or None)
        _echo_result(run_server(cfg), cfg.model_out)

    @fed.command("client")
    def client(
        server: str = typer.Option("127.0.0.1:9092", "--server", help="HOST:PORT of `wsi federated server`."),
        run: Path = typer.Option(..., "--run", help="This site's RUN folder with features (never sent)."),
        labels: Path = typer.Option(..., "--labels", "-l", help="This site's labels CSV (never sent)."),
        name: str = typer.Option(..., "--name", help="The site's name (letters, digits, '-', '_', '.')."),
        encoder: str = typer.Option(None, "--encoder", "-e", help="Features folder (default: the only one)."),
        certificates: Path = typer.Option(None, "--certificates", help="TLS: folder with ca.crt, the CA that "
                                          "signed the server's certificate."),
        insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --server without TLS."),
        audit: Path = typer.Option(None, "--audit", help="JSON-lines log of every message received and sent "
                                   "(arrays as names and shapes only)."),
        threads: int = typer.Option(1, "--threads", help="torch CPU threads."),
        work: Path = typer.Option(None, "--work", help="Folder for the SuperNode's files (default "
                                  "RUN/federated/NAME)."),
        timeout: float = typer.Option(0.0, "--timeout", help="Give up after this many seconds (0: never)."),
    ) -> None:
        """Take part in a federated training as one site: a Flower SuperNode running the ClientApp. Only model
        updates and aggregate counts, sums and histograms leave the site."""
        from wsi_pipeline.federated.config import SiteConfig
        from wsi_pipeline.federated.launch import run_client

        sc = SiteConfig(server=server, run=str(run), labels=str(labels), name=name, encoder=encoder,
                        certificates=str(certificates) if certificates else "", insecure=insecure,
                        audit=str(audit) if audit else "", threads=threads, timeout=timeout)
        st = run_client(sc, work or "")
        typer.echo(f"site {name}: {st.get('state')} {st.get('message', '')}".rstrip())

    @fed.command("simulate")
    def simulate(
        site: list[str] = typer.Option(..., "--site", help="NAME=RUN:LABELS, once per site."),
        targets: str = _TARGETS, model_out: Path = _MODEL_OUT,
        min_sites: int = typer.Option(None, "--min-sites", help="Sites needed in every round (default: all)."),
        rounds: int = _ROUNDS, patience: int = _PATIENCE, head: str = _HEAD, strategy: str = _STRATEGY,
        proximal_mu: float = _MU,
        local_epochs: int = _LOCAL_EPOCHS, round_timeout: float = _ROUND_TIMEOUT, calibration: str = _CALIBRATION,
        val_fraction: float = _VAL_FRACTION, folds: int = _FOLDS, encoder: str = _ENCODER, seed: int = _SEED,
        lr: float = _LR,
        hidden: int = _HIDDEN, context_rings: int = _CONTEXT,
        threads: int = typer.Option(1, "--threads", help="torch CPU threads per process."),
        timeout: float = typer.Option(0.0, "--timeout", help="Give up after this many seconds (0: never)."),
        config: Path = _CONFIG,
    ) -> None:
        """Try federated training on one machine: a Flower SuperLink and one SuperNode per --site on loopback,
        each a separate process talking through Flower; logs and audit logs under MODEL_OUT/.federated/."""
        from wsi_pipeline.federated.config import SiteConfig
        from wsi_pipeline.federated.launch import parse_site, run_simulate

        parsed = [parse_site(s) for s in site]
        cfg = _server_config(config, locals(), min_sites=min_sites or len(parsed))
        sites = [SiteConfig(run=r, labels=lab, name=n, encoder=encoder, threads=threads) for n, r, lab in parsed]
        _echo_result(run_simulate(cfg, sites, timeout=timeout), cfg.model_out)
