"""Flower's side: the ``ServerApp`` (the :class:`~wsi_pipeline.federated.coordinator.Coordinator` on Flower's
``Grid``, with Flower's FedAvg / FedProx strategy averaging the models) and the ``ClientApp`` (a
:class:`~wsi_pipeline.federated.site.Site` answering the server's messages).

Both are Flower App components (``wsi_pipeline.federated.apps:server_app`` / ``:client_app``) run by Flower's
deployment runtime: a SuperLink runs the ServerApp, one SuperNode per site runs the ClientApp
(:mod:`wsi_pipeline.federated.launch` starts them). This module imports ``flwr`` at import time; only those
processes import it.

The ClientApp keeps no state between messages: every message carries the run specification, the site's
settings come from the SuperNode's ``--node-config``. Every reply passes
:func:`~wsi_pipeline.federated.protocol.check_site_reply` before it leaves the site, and is written to the
site's audit log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from wsi_pipeline.errors import FederatedError, WSIPipelineError
from wsi_pipeline.federated import protocol as P
from wsi_pipeline.federated.record import STATE_DIR

log = logging.getLogger(__name__)

ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"  # the record names (Flower's strategies' defaults)
RUN_CONFIG_KEY = "wsi-config"  # the server configuration (JSON) in the app's run config
PULL_INTERVAL_S = 0.5  # how often the server asks the SuperLink for replies


# ---------------------------------------------------------------- Payload ⇄ RecordDict
def to_records(payload: P.Payload) -> RecordDict:
    rd = RecordDict()
    if payload.arrays:
        rec = ArrayRecord()
        for k, v in payload.arrays.items():
            rec[k] = Array(np.ascontiguousarray(v))
        rd[ARRAYS] = rec
    if payload.metrics:
        rd[METRICS] = MetricRecord({k: (list(v) if isinstance(v, list) else v) for k, v in payload.metrics.items()})
    if payload.config:
        rd[CONFIG] = ConfigRecord(dict(payload.config))
    return rd


def from_records(rd: RecordDict) -> P.Payload:
    arrays = {k: a.numpy() for k, a in rd.array_records[ARRAYS].items()} if ARRAYS in rd.array_records else {}
    metrics = dict(rd.metric_records[METRICS]) if METRICS in rd.metric_records else {}
    config = dict(rd.config_records[CONFIG]) if CONFIG in rd.config_records else {}
    return P.Payload(arrays=arrays, metrics=metrics, config=config)


# ---------------------------------------------------------------- server
class FlowerLink:
    """:class:`~wsi_pipeline.federated.coordinator.Link` on Flower's ``Grid``."""

    def __init__(self, grid: Grid, strategy: FedAvg) -> None:
        self.grid, self.strategy = grid, strategy

    def online(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def _send_and_receive(self, messages: Sequence[Message], timeout: float) -> dict[int, Message | None]:
        """Push the messages, pull the replies until all are in or ``timeout`` seconds passed: per destination
        node, its reply (an error reply when the SuperLink could not deliver) or None. Replies are matched by
        the message they answer, as the SuperLink's own error replies come from the SuperLink's node id."""
        dst = [int(m.metadata.dst_node_id) for m in messages]
        ids = list(self.grid.push_messages(messages))  # in order; None (or none at all): not pushed
        node_of = {i: d for i, d in zip(ids, dst, strict=False) if i is not None}
        out: dict[int, Message | None] = dict.fromkeys(dst)
        pending = set(node_of)
        deadline = time.monotonic() + timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    out[node_of[mid]] = reply
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(PULL_INTERVAL_S)
        return out

    @staticmethod
    def _outcome(reply: Message | None, waited: str) -> P.Payload | str:
        """A site's payload, or why there is none."""
        if reply is None:
            return f"no answer within {waited} (the site stopped or disconnected)"
        if reply.has_error():
            return f"the site's ClientApp failed: {reply.error.reason}"
        return from_records(reply.content)

    def _send(self, messages: Sequence[Message], timeout: float) -> dict[int, P.Payload | str]:
        return {node: self._outcome(reply, "the timeout")
                for node, reply in self._send_and_receive(messages, timeout).items()}

    def exchange(self, kind: str, payloads: Mapping[int, P.Payload], timeout: float) -> dict[int, P.Payload | str]:
        msgs = [Message(to_records(p), dst_node_id=n, message_type=kind) for n, p in payloads.items()]
        return self._send(msgs, timeout) if msgs else {}

    def train_round(self, rnd: int, arrays: Mapping[str, np.ndarray], settings: Mapping[str, Any],
                    nodes: Sequence[int], timeout: float
                    ) -> tuple[dict[str, np.ndarray] | None, dict[int, P.Payload | str]]:
        """One round of the strategy: its configure_train (round number, FedProx's ``proximal-mu``) to the
        joined ``nodes``, and its aggregate_train (the average weighted by ``num-examples``) of the answers."""
        rec = ArrayRecord()
        for k, v in arrays.items():
            rec[k] = Array(np.ascontiguousarray(v))
        msgs = [m for m in self.strategy.configure_train(rnd, rec, ConfigRecord(dict(settings)), self.grid)
                if int(m.metadata.dst_node_id) in set(nodes)]
        out: dict[int, P.Payload | str] = {}
        good = []
        for node, r in self._send_and_receive(msgs, timeout).items():
            out[node] = payload = self._outcome(r, "--round-timeout")
            if isinstance(payload, P.Payload) and not payload.error:
                good.append(r)
        if not good:
            return None, out
        agg, _ = self.strategy.aggregate_train(rnd, good)
        return ({k: a.numpy() for k, a in agg.items()} if agg is not None else None), out


def _log_to(path: Path) -> None:
    """This process's ``wsi_pipeline`` log records (INFO and up) into ``path``: the rounds as they go."""
    pkg = logging.getLogger("wsi_pipeline")
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path.resolve()) for h in pkg.handlers):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)


def _no_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    return MetricRecord()  # the coordinator reads the sites' sums itself (losses weighted by their counts)


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    import torch

    from wsi_pipeline.federated.config import FederatedConfig
    from wsi_pipeline.federated.coordinator import Coordinator

    cfg = FederatedConfig(**P.loads(context.run_config[RUN_CONFIG_KEY], "server configuration")).validate()
    torch.set_num_threads(max(cfg.threads, 1))
    _log_to(Path(cfg.model_out) / STATE_DIR / "logs" / "server.log")
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1,
              weighted_by_key=P.NUM_EXAMPLES, train_metrics_aggr_fn=_no_metrics)
    strategy = FedProx(proximal_mu=cfg.proximal_mu, **kw) if cfg.strategy == "fedprox" else FedAvg(**kw)
    Coordinator(FlowerLink(grid, strategy), cfg).run()


# ---------------------------------------------------------------- client
def _site_config(context: Context) -> Any:
    from wsi_pipeline.federated.config import SiteConfig

    nc = dict(context.node_config)  # written by launch.start_site; the SuperNode holds the connection
    return SiteConfig(run=str(nc["run"]), labels=str(nc["labels"]), name=str(nc["name"]),
                      encoder=str(nc.get("encoder") or "") or None, audit=str(nc.get("audit", "")),
                      threads=int(nc.get("threads", 1)), cache_mb=int(nc.get("cache-mb", 512)))


def _answer(msg: Message, context: Context) -> Message:
    """Run the site's side of one message; the reply, checked against what may leave the site."""
    import torch

    from wsi_pipeline.federated.site import Site
    from wsi_pipeline.federated.spec import RunSpec
    from wsi_pipeline.formats import api as F

    sc = _site_config(context)
    torch.set_num_threads(max(sc.threads, 1))
    kind = msg.metadata.message_type
    received = from_records(msg.content)
    status = str(dict(context.node_config).get("status", ""))
    if status:
        _log_to(Path(status).with_name("site.log"))
    if sc.audit:
        F.append_audit_record(sc.audit, {"direction": "received", **P.describe(kind, received)})
    shapes, targets, ids = None, [], []
    try:
        if kind in (P.REFUSE, P.DONE):
            if status:
                state = "refused" if kind == P.REFUSE else "stopped" if received.config.get("failed") else "done"
                F.write_site_status(status, state, str(received.config.get("message", "")))
            payload = P.Payload()
        else:
            spec = RunSpec.from_json(received.config["spec"])
            site = Site(sc, spec)
            targets, ids = spec.target_names, site.identifiers
            payload = _dispatch(kind, site, received)
            if kind == P.TRAIN:
                shapes = {k: tuple(np.shape(v)) for k, v in received.arrays.items()}
            if kind == P.JOIN and status:
                F.write_site_status(status, "joined", "")
        P.check_site_reply(kind, payload, shapes, targets, ids)
    except WSIPipelineError as e:
        log.error("site %s, %s: %s", sc.name, kind, e)
        payload = P.Payload(config={P.ERROR: str(e)[: P.MAX_TEXT]}, metrics={})
        if kind == P.JOIN:
            payload.config["site"] = sc.name
        if status:
            F.write_site_status(status, "failed", str(e))
    if sc.audit:
        F.append_audit_record(sc.audit, {"direction": "sent", **P.describe(kind, payload)})
    return Message(to_records(payload), reply_to=msg)


def _dispatch(kind: str, site: Any, received: P.Payload) -> P.Payload:
    if kind == P.JOIN:
        return site.describe()
    if kind == P.TRAIN:
        return site.train(received.arrays, received.config)
    if kind == P.EVALUATE:
        return site.evaluate(received.arrays)
    if kind == P.CALIBRATE:
        return site.calibrate(received.arrays, P.loads(received.config["requests"], "calibration requests"))
    if kind == P.SUMMARY:
        from wsi_pipeline.mil.calibration import calibrator_from_dict

        cal = {t: calibrator_from_dict(d, "the server's calibrators")
               for t, d in P.loads(received.config["calibrators"], "calibrators").items()}
        return site.summary(received.arrays, cal)
    raise FederatedError(f"unknown message type {kind!r}")


def _client_app() -> ClientApp:
    """The ClientApp: every message type of the protocol (:data:`protocol.MESSAGE_TYPES`, ``category`` or
    ``category.action``) is answered by :func:`_answer`, which dispatches on the type."""
    app = ClientApp()
    for message_type in P.MESSAGE_TYPES:
        category, _, action = message_type.partition(".")
        register = getattr(app, category)  # ClientApp.train / .evaluate / .query
        (register(action) if action else register())(_answer)
    return app


client_app = _client_app()
