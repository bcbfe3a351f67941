"""The server's side of federated training: the protocol from the sites' join to the model folder, on any
:class:`Link` to the sites (Flower's grid in :mod:`wsi_pipeline.federated.apps`).

1. **Join.** Wait for ``--min-sites`` sites; each reports its name, encoder (name, embedding size, µm/px,
   weights checksum), counts, label vocabularies and sums. A site whose features were made with another
   encoder or µm/px than the federation's (``--encoder``, else the majority's) is refused, told why, and
   left out; fewer than ``--min-sites`` usable sites is an error naming them.
2. **Setup.** Class names from the union of the vocabularies, regression scalers and the per-dimension
   feature standardisation from the summed sums and counts; the model is built and initialised here.
3. **Rounds.** Flower's FedAvg / FedProx strategy configures each round and averages the sites' models
   (weighted by their training slides). Each site first scores the model it received on its validation
   patients, so round r measures the model after round r − 1; the best model by federated validation loss
   (relative to the initial model's, averaged over targets, as ``wsi train`` does) is kept, with early
   stopping after ``patience`` rounds without improvement. A site that does not answer within
   ``--round-timeout`` (e.g. it died) is left out of the round; with fewer than ``--min-sites`` answers the
   run stops with an error naming the missing sites. Every round is checkpointed.
4. **Calibration** by federated optimisation (:mod:`wsi_pipeline.federated.calibrate`) and **cut-offs**
   from aggregated histograms of the calibrated validation probabilities (``t_pred``: their mean, the
   ``wsi train`` rule; responder subgroups: tertiles).
5. The model folder and ``federated.json`` (:mod:`wsi_pipeline.federated.record`); the sites are told
   the run is over.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from wsi_pipeline.errors import FederatedError
from wsi_pipeline.federated import protocol as P
from wsi_pipeline.federated.calibrate import FederatedCalibration
from wsi_pipeline.federated.config import FederatedConfig
from wsi_pipeline.federated.record import Record
from wsi_pipeline.federated.spec import RunSpec
from wsi_pipeline.federated.sums import class_names, histogram_auroc, histogram_quantiles
from wsi_pipeline.mil.data import EncoderInfo
from wsi_pipeline.mil.targets import BINARY, MULTICLASS, REGRESSION

log = logging.getLogger(__name__)

SETTLE_S = 3.0  # after --min-sites sites connected, wait this long for the others to connect too
NOTIFY_TIMEOUT_S = 30.0


class Link(Protocol):
    """How the coordinator reaches the sites (node ids are the engine's)."""

    def online(self) -> list[int]: ...

    def exchange(self, kind: str, payloads: Mapping[int, P.Payload], timeout: float) -> dict[int, P.Payload | str]: ...

    def train_round(self, rnd: int, arrays: Mapping[str, np.ndarray], settings: Mapping[str, Any],
                    nodes: Sequence[int], timeout: float
                    ) -> tuple[dict[str, np.ndarray] | None, dict[int, P.Payload | str]]: ...


@dataclass
class Site:
    node: int
    name: str
    encoder: EncoderInfo
    metrics: dict[str, Any]
    vocab: dict[str, list[str]]


def _add(payloads: Sequence[P.Payload], key: str) -> Any:
    vals = [p.metrics[key] for p in payloads if key in p.metrics]
    if not vals:
        return None
    return np.sum([np.asarray(v, dtype=np.float64) for v in vals], axis=0)


def _encoder_text(e: EncoderInfo) -> str:
    return f"{e.name} (dim {e.embed_dim}, {e.target_mpp} µm/px, weights {e.weights_sha256[:12] or '?'})"


class Coordinator:
    def __init__(self, link: Link, cfg: FederatedConfig) -> None:
        self.link, self.cfg = link, cfg
        self.record = Record(cfg)
        self.sites: dict[int, Site] = {}
        self.spec: RunSpec | None = None

    # ------------------------------------------------------------ run
    def run(self) -> Record:
        self.record.save()
        try:
            self._join()
            arrays, lr = self._setup()
            best = self._train(arrays, lr)
            self._finish(best, lr)
        except FederatedError as e:
            log.error("federated run failed: %s", e)
            self.record.fail(str(e))
            self._tell_sites(P.DONE, f"the federated run failed: {e}", self._active(), failed=True)
            raise
        except Exception as e:  # a bug, not a site's fault: recorded so that the waiting command stops
            import traceback

            self.record.doc["traceback"] = traceback.format_exc()
            self.record.fail(f"{type(e).__name__}: {e} (an internal error; traceback in federated.json)")
            raise
        self._tell_sites(P.DONE, "the federated run is complete")
        self.record.complete()  # last: `wsi federated simulate` stops the sites once it reads this
        return self.record

    def _names(self, replies: Mapping[int, P.Payload | str]) -> dict[int, str]:
        return {n: self.sites[n].name if n in self.sites else f"node {n}" for n in replies}

    def _ask(self, kind: str, payload: P.Payload, what: str) -> list[P.Payload]:
        """Send ``payload`` to every joined site; the answers, or an error naming the missing sites when fewer
        than --min-sites answered."""
        nodes = self._active()
        replies = self.link.exchange(kind, {n: payload for n in nodes}, self.cfg.round_timeout)
        return self._answers(replies, what, missing_offline=[n for n in self.sites if n not in nodes])

    def _answers(self, replies: Mapping[int, P.Payload | str], what: str, missing_offline: Sequence[int] = ()
                 ) -> list[P.Payload]:
        ok, failed = [], {}
        for node, r in replies.items():
            if isinstance(r, P.Payload) and not r.error:
                ok.append(r)
            else:
                failed[self.sites[node].name] = r if isinstance(r, str) else r.error
        failed.update({self.sites[n].name: "not connected" for n in missing_offline})
        self._missing = failed
        if len(ok) < self.cfg.min_sites:
            why = "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())) or "none"
            raise FederatedError(f"{what}: {len(ok)} of {len(self.sites)} sites answered, fewer than --min-sites "
                                 f"{self.cfg.min_sites}; missing: {why}. Restart the missing sites' `wsi federated "
                                 "client` and this server (same --model-out): it resumes after the last completed "
                                 "round")
        return ok

    def _active(self) -> list[int]:
        online = set(self.link.online())
        return [n for n in self.sites if n in online]

    def _tell_sites(self, kind: str, message: str, nodes: Sequence[int] | None = None, failed: bool = False) -> None:
        nodes = list(self.sites) if nodes is None else list(nodes)
        if nodes:
            self.link.exchange(kind, {n: P.Payload(config={"message": message, "failed": failed}) for n in nodes},
                               NOTIFY_TIMEOUT_S)

    # ------------------------------------------------------------ 1. join
    def _wait_for_sites(self) -> list[int]:
        deadline = time.monotonic() + self.cfg.join_timeout
        while len(self.link.online()) < self.cfg.min_sites:
            if time.monotonic() > deadline:
                raise FederatedError(f"only {len(self.link.online())} site(s) connected to {self.cfg.address} within "
                                     f"{self.cfg.join_timeout:.0f} s; --min-sites is {self.cfg.min_sites}")
            time.sleep(0.5)
        time.sleep(SETTLE_S)
        return self.link.online()

    def _join(self) -> None:
        nodes = self._wait_for_sites()
        cfg, old = self.cfg, self.record.spec
        spec = old or RunSpec(targets=[s.to_dict() for s in _targets(cfg)], val_fraction=cfg.val_fraction,
                              seed=cfg.seed, context_rings=cfg.context_rings, max_tiles=cfg.max_tiles,
                              batch_bags=cfg.batch_bags, histogram_bins=cfg.histogram_bins, folds=cfg.folds)
        replies = self.link.exchange(P.JOIN, {n: P.Payload(config={"spec": spec.to_json()}) for n in nodes},
                                     cfg.round_timeout)
        refused: dict[int, tuple[str, str]] = {}
        for node, r in replies.items():
            if isinstance(r, str) or r.error:
                name = r.config.get("site", f"node {node}") if isinstance(r, P.Payload) else f"node {node}"
                refused[node] = (str(name), r if isinstance(r, str) else r.error)
                continue
            name = str(r.config["site"])
            if any(s.name == name for s in self.sites.values()):
                refused[node] = (name, f"another site already joined as {name!r}; give each site its own --name")
                continue
            vocab = {k.split("/", 1)[1]: P.loads(v, "vocabulary") for k, v in r.config.items() if k.startswith("vocab/")}
            self.sites[node] = Site(node, name, EncoderInfo.from_dict(P.loads(r.config["encoder"], "encoder")),
                                    dict(r.metrics), vocab)
        reference = None
        if self.sites:  # else every site was refused already
            reference = self._reference_encoder(EncoderInfo.from_dict(old.encoder) if old else None)
            for node, site in list(self.sites.items()):
                why = _mismatch(site.encoder, reference)
                if why:
                    refused[node] = (site.name, why)
                    del self.sites[node]
        self.record.doc["refused"] = {name: why for name, why in refused.values()}
        for name, why in refused.values():
            log.warning("site %s refused: %s", name, why)
        if refused:
            self.link.exchange(P.REFUSE, {n: P.Payload(config={"message": why}) for n, (_, why) in refused.items()},
                               NOTIFY_TIMEOUT_S)
        if len(self.sites) < cfg.min_sites or reference is None:
            self._too_few(refused)
        self.encoder = reference
        self.record.doc["sites"] = {s.name: _site_counts(s) for s in self.sites.values()}
        self.record.doc["encoder"] = reference.to_dict()
        log.info("joined: %s", ", ".join(sorted(s.name for s in self.sites.values())))

    def _too_few(self, refused: Mapping[int, tuple[str, str]]) -> None:
        who = "; ".join(f"{name}: {why}" for name, why in refused.values()) or "none"
        raise FederatedError(f"{len(self.sites)} usable site(s), fewer than --min-sites {self.cfg.min_sites} "
                             f"(joined: {sorted(s.name for s in self.sites.values()) or 'none'}; refused: {who})")

    def _reference_encoder(self, old: EncoderInfo | None) -> EncoderInfo:
        """The federation's encoder: the checkpoint's, else --encoder's, else the majority's."""
        if old is not None:
            return old
        infos = [s.encoder for s in self.sites.values()]
        if not infos:
            raise FederatedError("no site could join (see the refused sites in federated.json)")
        pool = [e for e in infos if not self.cfg.encoder or e.name == self.cfg.encoder]
        if not pool:
            raise FederatedError(f"--encoder {self.cfg.encoder}: no site has features of it (sites: "
                                 f"{sorted({_encoder_text(e) for e in infos})})")
        counts = Counter((e.name, e.embed_dim, e.target_mpp, e.weights_sha256) for e in pool)
        ranked = counts.most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            raise FederatedError("the sites' features disagree and no encoder has a majority: "
                                 f"{sorted({_encoder_text(e) for e in infos})}; pass --encoder NAME")
        name, dim, mpp, sha = ranked[0][0]
        return EncoderInfo(name, dim, mpp, sha)

    # ------------------------------------------------------------ 2. setup
    def _setup(self) -> tuple[dict[str, np.ndarray], float]:
        import torch

        from wsi_pipeline.mil.cv import stats_from_sums
        from wsi_pipeline.mil.model_io import VariantCard
        from wsi_pipeline.mil.train import plan_variants, scaler_from_sums, seed_of

        if self.record.spec is not None:  # resuming: the checkpoint's classes, scalers, statistics, model
            self.spec = self.record.spec
            ck = self.record.checkpoint
            return self.record.load_arrays("last"), float(ck["lr"])
        cfg, sites = self.cfg, list(self.sites.values())
        specs = _targets(cfg)
        for s in specs:
            if s.is_classification:
                s.classes = class_names(s, [site.vocab.get(s.name, []) for site in sites])
        payloads = [P.Payload(metrics=s.metrics) for s in sites]
        scalers = {s.name: scaler_from_sums(int(_add(payloads, f"reg/{s.name}/n")),
                                            float(_add(payloads, f"reg/{s.name}/sum")),
                                            float(_add(payloads, f"reg/{s.name}/sumsq")))
                   for s in specs if s.kind == REGRESSION}
        mean, std = stats_from_sums(_add(payloads, "features/sum"), _add(payloads, "features/sumsq"),
                                    int(_add(payloads, "features/n")))
        v = plan_variants(cfg.train_config(), self.encoder.embed_dim)[0]
        vc = VariantCard(v.name, v.head, v.head_kwargs, self.encoder.embed_dim * (1 + v.context_rings), True, False,
                         v.context_rings)
        variant = {k: getattr(vc, k) for k in ("name", "head", "head_kwargs", "in_dim", "image", "covariates",
                                               "context_rings")}
        self.spec = RunSpec(targets=[s.to_dict() for s in specs], val_fraction=cfg.val_fraction, seed=cfg.seed,
                            context_rings=cfg.context_rings, max_tiles=cfg.max_tiles, batch_bags=cfg.batch_bags,
                            variant=variant, scalers=scalers, encoder=self.encoder.to_dict(),
                            histogram_bins=cfg.histogram_bins, folds=cfg.folds)
        states = []
        for member in range(self.spec.members):  # a fold ensemble: each member its own initialisation
            torch.manual_seed(seed_of(cfg.seed, "federated-init", *((member,) if self.spec.members > 1 else ())))
            model = self.spec.build_model()
            model.set_feature_stats(torch.from_numpy(mean), torch.from_numpy(std))
            states.append({k: t.detach().cpu().numpy() for k, t in model.state_dict().items()})
        lr = float(cfg.lr) if cfg.lr else float(getattr(model, "default_lr", 1e-3))
        arrays = self.spec.join_states(states)
        from dataclasses import asdict

        self.record.doc["checkpoint"] = {"completed_rounds": 0, "best_round": 0, "best_score": float("inf"),
                                         "ref": {}, "bad_rounds": 0, "trained": False, "lr": lr,
                                         "spec": asdict(self.spec)}
        self.record.save_arrays("last", arrays)
        self.record.save_arrays("best", arrays)
        self.record.save()
        return arrays, lr

    # ------------------------------------------------------------ 3. rounds
    def _val_losses(self, answers: Sequence[P.Payload]) -> dict[str, float]:
        out = {}
        for t in self.spec.target_names:
            n = _add(answers, f"val/{t}/n")
            if n:
                out[t] = float(_add(answers, f"val/{t}/sum")) / float(n)
        return out

    def _score(self, val: Mapping[str, float], ck: dict[str, Any]) -> float:
        if not ck["ref"]:
            ck["ref"] = dict(val)
        rel = [val[t] / max(ck["ref"][t], 1e-6) for t in val if t in ck["ref"]]
        return float(np.mean(rel)) if rel else float("nan")

    def _consider(self, ck: dict[str, Any], score: float, model_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Early stopping's bookkeeping for the model after round ``model_round``. Patience counts only once a
        model has improved on the untrained one: MIL heads' validation loss often rises for the first rounds
        before it falls (measured: 8 rounds of a 3-fold ensemble on sites of 42 patients), and stopping there
        would keep the untrained model."""
        if score < ck["best_score"] - 1e-4:
            ck.update(best_score=score, best_round=model_round, bad_rounds=0)
            self.record.save_arrays("best", arrays)
        elif ck["best_round"] > 0:
            ck["bad_rounds"] += 1

    def _train(self, arrays: dict[str, np.ndarray], lr: float) -> dict[str, np.ndarray]:
        cfg, ck = self.cfg, self.record.checkpoint
        settings = {"lr": lr, "weight-decay": cfg.weight_decay, "local-epochs": cfg.local_epochs,
                    "spec": self.spec.to_json()}
        start = int(ck["completed_rounds"]) + 1
        for rnd in range(start, cfg.rounds + 1):
            if ck["trained"] or ck["bad_rounds"] >= cfg.patience:
                break
            t0 = time.perf_counter()
            nodes = self._active()
            agg, replies = self.link.train_round(rnd, arrays, settings, nodes, cfg.round_timeout)
            answers = self._answers(replies, f"round {rnd}", [n for n in self.sites if n not in nodes])
            if agg is None:
                raise FederatedError(f"round {rnd}: the strategy could not average the sites' models")
            val = self._val_losses(answers)
            score = self._score(val, ck)
            self._consider(ck, score, rnd - 1, arrays)
            arrays = agg
            names = self._names(replies)
            ok = {names[n]: r for n, r in replies.items() if isinstance(r, P.Payload) and not r.error}
            n_train = {k: int(r.metrics[P.NUM_EXAMPLES]) for k, r in ok.items()}
            self.record.doc["rounds"].append({
                "round": rnd, "sites": sorted(ok), "missing": dict(self._missing), "n_train_slides": n_train,
                "train_loss": float(np.average([r.metrics["train_loss"] for r in ok.values()],
                                               weights=[max(n_train[k], 1) for k in ok])),
                "train_loss_by_site": {k: float(r.metrics["train_loss"]) for k, r in ok.items()},
                "val_loss": val, "val_score": score, "val_of_model_after_round": rnd - 1,
                "seconds": round(time.perf_counter() - t0, 1)})
            ck["completed_rounds"] = rnd
            self.record.save_arrays("last", arrays)
            self.record.doc["checkpoint"] = ck
            self.record.save()
            log.info("round %d/%d: %d sites, train loss %.4f, validation score %.4f (model after round %d)", rnd,
                     cfg.rounds, len(ok), self.record.doc["rounds"][-1]["train_loss"], score, rnd - 1)
        if not ck["trained"]:  # the last model's validation loss, then the best model
            answers = self._ask(P.EVALUATE, P.Payload(arrays=arrays, config={"spec": self.spec.to_json()}),
                                "final evaluation")
            val = self._val_losses(answers)
            score = self._score(val, ck)
            self._consider(ck, score, int(ck["completed_rounds"]), arrays)
            ck.update(trained=True, final_val_loss=val, final_val_score=score,
                      stopped_early=int(ck["completed_rounds"]) < cfg.rounds)
            self.record.doc["checkpoint"] = ck
            self.record.save()
        if int(ck["best_round"]) == 0:
            log.warning("the federated validation loss never improved on the untrained model in %d rounds: the "
                        "model written is the untrained one; pass more --rounds (or another --lr)",
                        int(ck["completed_rounds"]))
        return self.record.load_arrays("best")

    # ------------------------------------------------------------ 4-5. calibration, cut-offs, model folder
    def _finish(self, best: dict[str, np.ndarray], lr: float) -> None:
        from wsi_pipeline.mil.report import SUBGROUP_LABELS

        spec_json = self.spec.to_json()
        ev = self._ask(P.EVALUATE, P.Payload(arrays=best, config={"spec": spec_json}), "evaluation of the best model")
        counts = {t: list(_add(ev, f"count/{t}")) for t in self.spec.target_names if _add(ev, f"count/{t}") is not None}
        fc = FederatedCalibration(self.spec.specs, self.cfg.calibration, counts)
        while not fc.done:
            answers = self._ask(P.CALIBRATE, P.Payload(arrays=best, config={"spec": spec_json,
                                                                             "requests": P.dumps(fc.requests())}),
                                "calibration")
            keys = {k for a in answers for k in a.metrics}
            fc.update({k: list(_add(answers, k)) for k in keys})
        calibrators = fc.calibrators()
        cal_json = P.dumps({t: c.to_dict() for t, c in calibrators.items()})
        answers = self._ask(P.SUMMARY, P.Payload(arrays=best, config={"spec": spec_json, "calibrators": cal_json}),
                            "summary")
        thresholds, validation, subgroups = {}, {}, {}
        for s in self.spec.specs:
            if s.kind == BINARY:
                n = float(_add(answers, f"prob/{s.name}/n"))
                thresholds[s.name] = float(_add(answers, f"prob/{s.name}/sum")) / n if n else 0.5
                pos, neg = _add(answers, f"hist/{s.name}/pos"), _add(answers, f"hist/{s.name}/neg")
                validation[s.name] = {"auroc": histogram_auroc(pos, neg), "n_pos": int(pos.sum()),
                                      "n_neg": int(neg.sum()), "n_patients": int(n)}
                if not subgroups and n >= 3:
                    subgroups = {"target": s.name, "labels": SUBGROUP_LABELS,
                                 "cutoffs": histogram_quantiles(_add(answers, f"hist/{s.name}/all"), [1 / 3, 2 / 3]),
                                 "source": "tertiles of the aggregated histogram (bin width "
                                           f"1/{self.spec.histogram_bins}) of the sites' calibrated validation "
                                           "patient-level probabilities"}
            elif s.kind == MULTICLASS:
                conf = _add(answers, f"confusion/{s.name}").reshape(len(s.classes), len(s.classes))
                rows = conf.sum(1)
                recall = np.diag(conf)[rows > 0] / rows[rows > 0]
                validation[s.name] = {"accuracy": float(np.trace(conf) / max(conf.sum(), 1)),
                                      "balanced_accuracy": float(recall.mean()) if len(recall) else float("nan"),
                                      "n_patients": int(conf.sum())}
            elif s.kind == REGRESSION:
                n = float(_add(answers, f"abs_err/{s.name}/n"))
                validation[s.name] = {"mae": float(_add(answers, f"abs_err/{s.name}/sum")) / n if n else float("nan"),
                                      "n_patients": int(n)}
        self.record.doc.update(
            calibration={t: {**c.to_dict(), "iterations": fc.iterations.get(t, 0), "val_counts": counts.get(t)}
                         for t, c in calibrators.items()},
            cutoffs={"thresholds": thresholds, "subgroups": subgroups, "histogram_bins": self.spec.histogram_bins},
            validation={"protocol": "the sites' validation patients (each site's --val-fraction), pooled through "
                                    "aggregated counts and histograms; calibrated probabilities", "targets": validation})
        self.record.write_model(self.cfg, self.spec, best, calibrators, thresholds, subgroups, lr)


def _targets(cfg: FederatedConfig) -> list[Any]:
    from wsi_pipeline.mil.targets import targets_from_config

    return targets_from_config(cfg.targets)


def _mismatch(have: EncoderInfo, ref: EncoderInfo) -> str:
    """Why a site's features cannot join the federation's ('' if they can)."""
    diffs = []
    if have.name != ref.name:
        diffs.append(f"encoder {have.name!r}, the federation uses {ref.name!r}")
    if have.embed_dim != ref.embed_dim:
        diffs.append(f"embedding size {have.embed_dim}, the federation's is {ref.embed_dim}")
    if (have.target_mpp is None) != (ref.target_mpp is None) or (
            have.target_mpp is not None and abs(have.target_mpp - ref.target_mpp) > 1e-3):
        diffs.append(f"tiles at {have.target_mpp} µm/px, the federation's are at {ref.target_mpp} µm/px")
    if have.weights_sha256 and ref.weights_sha256 and have.weights_sha256 != ref.weights_sha256:
        diffs.append(f"encoder weights {have.weights_sha256[:12]}, the federation's are {ref.weights_sha256[:12]}")
    if not diffs:
        return ""
    return ("features made with " + "; ".join(diffs) + f". Re-extract the site's features with `wsi extract RUN "
            f"--encoder {ref.name}` at {ref.target_mpp} µm/px")


def _site_counts(s: Site) -> dict[str, Any]:
    m = s.metrics
    keys = ("slides", "patients", "tiles", "train_slides", "val_slides", "train_patients", "val_patients")
    out: dict[str, Any] = {f"n_{k}": int(m[f"n/{k}"]) for k in keys}
    out["labelled"] = {k.split("/", 1)[1]: int(v) for k, v in m.items() if k.startswith("labelled/")}
    return out
