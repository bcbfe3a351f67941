"""A site's side of federated training: its slides, labels and local computations. Everything it returns is
a :class:`~wsi_pipeline.federated.protocol.Payload` of model state, sums, counts or histograms.

The site splits its patients into training and validation (stratified on the first classification target,
``val_fraction``, seeded by the run's seed and the site's name: the same split for every message) or, for a
fold ensemble (``--folds K``), into K folds (member k trains on the others and is validated on fold k), computes
the statistics the server aggregates at join time, trains the global model locally for a round, and scores
models on its validation patients (losses, calibration objectives, histograms)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wsi_pipeline.errors import FederatedError, LabelsError
from wsi_pipeline.federated.config import SiteConfig
from wsi_pipeline.federated.protocol import NUM_EXAMPLES, Payload, dumps
from wsi_pipeline.federated.spec import RunSpec
from wsi_pipeline.federated.sums import histogram
from wsi_pipeline.mil.cv import Cohort, feature_sums
from wsi_pipeline.mil.data import BagStore, subsample
from wsi_pipeline.mil.targets import BINARY, MULTICLASS, PATIENT_ID, REGRESSION, encode_labels
from wsi_pipeline.mil.train import batch_targets, seed_of

log = logging.getLogger(__name__)


class Site:
    """One site's cohort under a run specification (``spec.targets`` carry their classes after the join)."""

    def __init__(self, sc: SiteConfig, spec: RunSpec) -> None:
        from wsi_pipeline.evaluate.splits import inner_split, patient_folds, patient_strata
        from wsi_pipeline.mil.targets import (
            read_labels_table,
            require_label_columns,
            stratify_target,
            unmatched_slides_error,
        )

        self.sc, self.spec = sc, spec
        self.specs = spec.specs
        self.table = read_labels_table(sc.labels)
        require_label_columns(self.table.columns, self.specs, str(sc.labels))
        self.store = BagStore(sc.run, sc.encoder, spec.context_rings, sc.cache_mb)
        have = set(self.store.slide_ids())
        self.slides = [s for s in self.table.index.astype(str) if s in have]
        if not self.slides:
            raise unmatched_slides_error(sc.labels, [str(s) for s in self.table.index], sorted(have),
                                         f"a feature file in {self.store.layout.features_dir(self.store.encoder)}")
        rows = self.table.loc[self.slides]
        self.patient_of = dict(zip(self.slides, rows[PATIENT_ID].astype(str), strict=True))
        strat = stratify_target(self.specs)
        raw = [_label(v) for v in rows[strat.column]] if strat else None  # raw strings: the same split always
        strata = patient_strata([self.patient_of[s] for s in self.slides], raw)
        seed = seed_of(spec.seed, "site-split", sc.name)
        if spec.members == 1:
            val_sets = [set(inner_split(strata, spec.val_fraction, seed)[1])]
        else:
            if len(strata) < spec.members:
                raise LabelsError(f"{sc.labels}: {len(strata)} patients with features and labels, fewer than "
                                  f"--folds {spec.members}; use fewer folds (or --folds 1)")
            fold_of = patient_folds(strata, spec.members, seed)
            val_sets = [{p for p, f in fold_of.items() if f == k} for k in range(spec.members)]
        # member k: (training slides, validation slides); one model: the val_fraction split
        self.splits = [([s for s in self.slides if self.patient_of[s] not in v],
                        [s for s in self.slides if self.patient_of[s] in v]) for v in val_sets]
        self.train_slides = self.splits[0][0]
        # every member's validation slides, member 0's first; val_member[i]: the member that scores slide i
        self.val_slides = [s for _, val in self.splits for s in val]
        self.val_member = [k for k, (_, val) in enumerate(self.splits) for _ in val]
        n_val0 = len({self.patient_of[s] for s in self.splits[0][1]})  # (training, validation) patients:
        self.n_patients = (len(strata) - n_val0, n_val0 if spec.members == 1 else len(strata))  # of member 0
        self._cohort: Cohort | None = None

    # ------------------------------------------------------------ identities never to send
    @property
    def identifiers(self) -> list[str]:
        return sorted({*self.slides, *self.patient_of.values()})

    @property
    def cohort(self) -> Cohort:
        """The site's labels encoded with the run's classes (known after the join)."""
        if self._cohort is None:
            if any(s.is_classification and not s.classes for s in self.specs):
                raise FederatedError("the run specification has no class names yet (the server sends them after "
                                     "the join)")
            labels = encode_labels(self.table.loc[self.slides], self.specs, fit_classes=False)
            self._cohort = Cohort(labels, self.store, self.specs, self.patient_of, {}, {})
            self._cohort.embed_dim = int(self.spec.encoder.get("embed_dim") or self.store.info(self.slides).embed_dim)
        return self._cohort

    # ------------------------------------------------------------ join
    def describe(self) -> Payload:
        """The join reply: the site's name and encoder, its counts, label vocabularies, the per-dimension sums
        of its tiles' embeddings and the sums of its regression labels (all its slides: training and
        validation, as ``wsi train`` fits them on a fold's training and early-stopping patients)."""
        info = self.store.info(self.slides)
        s1, s2, n = feature_sums(self.store, self.slides, info.embed_dim)
        m: dict[str, float | list[float]] = {
            "n/slides": len(self.slides), "n/patients": sum(self.n_patients), "n/tiles": n,
            "n/train_slides": len(self.train_slides), "n/val_slides": len(self.val_slides),
            "n/train_patients": self.n_patients[0], "n/val_patients": self.n_patients[1],
            "features/sum": s1.tolist(), "features/sumsq": s2.tolist(), "features/n": n,
        }
        c: dict[str, Any] = {"site": self.sc.name, "encoder": dumps(info.to_dict())}
        rows = self.table.loc[self.slides]
        for s in self.specs:
            if s.is_classification:
                vocab = sorted({_label(v) for v in rows[s.column]} - {None})
                c[f"vocab/{s.name}"] = dumps(vocab)
                m[f"labelled/{s.name}"] = int(sum(_label(v) is not None for v in rows[s.column]))
            elif s.kind == REGRESSION:
                v = _numbers(rows[s.column])
                m.update({f"reg/{s.name}/n": len(v), f"reg/{s.name}/sum": float(v.sum()),
                          f"reg/{s.name}/sumsq": float((v * v).sum())})
                m[f"labelled/{s.name}"] = len(v)
            else:
                m[f"labelled/{s.name}"] = int(np.isfinite(_numbers(rows[s.time], drop=False)).sum())
        return Payload(metrics=m, config=c)

    # ------------------------------------------------------------ model helpers
    def model(self, arrays: Mapping[str, np.ndarray]) -> Any:
        import torch

        model = self.spec.build_model()
        state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
        model.load_state_dict(state)
        return model.to(self.sc.device)

    def _logits(self, model: Any, slides: Sequence[str], rng: np.random.Generator | None) -> dict[str, Any]:
        import torch

        from wsi_pipeline.mil.ensemble import forward_bag

        in_dim = int(self.spec.variant["in_dim"])
        outs = []
        for s in slides:
            bag = self.store.get(s)
            if rng is not None:
                bag = subsample(bag, self.spec.max_tiles, rng)
            outs.append(forward_bag(model, bag, in_dim, None, torch.device(self.sc.device)))
        return {t.name: torch.stack([o.logits[t.name] for o in outs]).cpu() for t in self.specs}

    def models(self, arrays: Mapping[str, np.ndarray]) -> list[Any]:
        """The models in ``arrays``: one, or the members of a fold ensemble."""
        return [self.model(st) for st in self.spec.member_states(arrays)]

    def val_losses(self, models: Sequence[Any]) -> dict[str, float | list[float]]:
        """Per target: the sum over the site's validation slides of the loss and the number of slides it is
        over (a Cox loss: the site's own risk set, i.e. stratified by site; a fold ensemble: each member on
        its own fold, so the sum is the out-of-fold loss of every patient)."""
        import torch

        from wsi_pipeline.mil.losses import task_loss

        out: dict[str, float | list[float]] = {}
        for s in self.specs:
            out[f"val/{s.name}/sum"], out[f"val/{s.name}/n"] = 0.0, 0
        if not self.val_slides:
            return out
        with torch.no_grad():
            rng = np.random.default_rng(seed_of(self.spec.seed, "val", self.sc.name))
            for model, (_, val) in zip(models, self.splits, strict=True):
                if not val:
                    continue
                model.eval()
                logits = self._logits(model, val, rng)
                ys, evs = batch_targets(self.cohort, val, self.spec.scalers)
                for s in self.specs:
                    n = int((~torch.isnan(ys[s.name])).sum())
                    loss = task_loss(s, logits[s.name], ys[s.name], evs.get(s.name))
                    if loss is not None:
                        out[f"val/{s.name}/sum"] += float(loss) * n
                        out[f"val/{s.name}/n"] += n
        return out

    # ------------------------------------------------------------ train
    def train(self, arrays: Mapping[str, np.ndarray], settings: Mapping[str, Any]) -> Payload:
        """One round: the validation losses of the model(s) received, then ``local-epochs`` epochs of each
        on its training slides (AdamW; FedProx: plus ``proximal-mu/2·‖w − w_received‖²``)."""
        import torch

        models = self.models(arrays)
        metrics = self.val_losses(models)
        rnd = int(settings["server-round"])
        torch.manual_seed(seed_of(self.spec.seed, "train", self.sc.name, rnd))
        rng = np.random.default_rng(seed_of(self.spec.seed, "order", self.sc.name, rnd))
        tot, nb = 0.0, 0
        for model, (train_slides, _) in zip(models, self.splits, strict=True):
            t, n = self._train_member(model, train_slides, settings, rng)
            tot, nb = tot + t, nb + n
        state = self.spec.join_states([{k: v.detach().cpu().numpy() for k, v in m.state_dict().items()}
                                       for m in models])
        metrics.update({NUM_EXAMPLES: len(self.train_slides), "train_loss": tot / max(nb, 1)})
        return Payload(arrays=state, metrics=metrics)

    def _train_member(self, model: Any, train_slides: Sequence[str], settings: Mapping[str, Any],
                      rng: np.random.Generator) -> tuple[float, int]:
        """``local-epochs`` epochs of one model; the summed batch losses and the number of batches."""
        import torch

        from wsi_pipeline.mil.losses import multitask_loss

        mu = float(settings.get("proximal-mu", 0.0))
        anchor = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.AdamW(model.parameters(), lr=float(settings["lr"]), weight_decay=float(settings["weight-decay"]))
        order, tot, nb = list(train_slides), 0.0, 0
        for _ in range(int(settings["local-epochs"])):
            model.train()
            rng.shuffle(order)
            for b in range(0, len(order), self.spec.batch_bags):
                batch = order[b : b + self.spec.batch_bags]
                logits = self._logits(model, batch, rng)
                ys, evs = batch_targets(self.cohort, batch, self.spec.scalers)
                loss, _ = multitask_loss(self.specs, logits, ys, evs)
                if not loss.requires_grad:
                    continue
                if mu > 0:
                    loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                tot += float(loss.detach())
                nb += 1
        return tot, nb

    # ------------------------------------------------------------ validation predictions
    def val_predictions(self, models: Sequence[Any]) -> dict[str, np.ndarray]:
        """Slide-level predictions of the validation slides (every tile; each slide by the member it
        validates): target → n (or n×C)."""
        import torch

        from wsi_pipeline.mil.ensemble import forward_bag, output_to_prediction

        for m in models:
            m.eval()
        preds = []
        with torch.no_grad():
            for s, k in zip(self.val_slides, self.val_member, strict=True):
                o = forward_bag(models[k], self.store.get(s), int(self.spec.variant["in_dim"]), None,
                                torch.device(self.sc.device))
                preds.append(output_to_prediction(o, self.specs, self.spec.scalers, tiles=False).values)
        return {t.name: np.array([np.asarray(p[t.name], dtype=np.float64).reshape(-1) for p in preds])
                for t in self.specs}

    def evaluate(self, arrays: Mapping[str, np.ndarray]) -> Payload:
        """Validation losses of a model, and the validation class counts (calibration's smoothed targets)."""
        metrics = self.val_losses(self.models(arrays))
        vals = self.cohort.labels.values
        idx = [self.slides.index(s) for s in self.val_slides]
        for s in self.specs:
            if s.is_classification:
                y = vals[s.name][idx]
                y = y[np.isfinite(y)].astype(int)
                metrics[f"count/{s.name}"] = np.bincount(y, minlength=len(s.classes)).astype(float).tolist()
        return Payload(metrics=metrics)

    def val_labels(self, name: str) -> np.ndarray:
        idx = [self.slides.index(s) for s in self.val_slides]
        return self.cohort.labels.values[name][idx]

    def calibrate(self, arrays: Mapping[str, np.ndarray], requests: Mapping[str, Any]) -> Payload:
        """The calibration objective of each requested target at its candidate parameters, summed over the
        site's labelled validation slides (:mod:`wsi_pipeline.federated.calibrate`)."""
        from wsi_pipeline.federated.calibrate import site_terms

        preds = self.val_predictions(self.models(arrays))
        out: dict[str, float | list[float]] = {}
        for spec in self.specs:
            if spec.name in requests:
                out.update(site_terms(spec, preds[spec.name], self.val_labels(spec.name), requests[spec.name]))
        return Payload(metrics=out)

    def summary(self, arrays: Mapping[str, np.ndarray], calibrators: Mapping[str, Any]) -> Payload:
        """Histograms of the calibrated patient-level validation probabilities (all patients, positives,
        negatives) and their sum and count per binary target; confusion counts per multiclass target; absolute
        errors per regression target: what the cut-offs and the validation figures come from."""
        from wsi_pipeline.mil.tables import patient_frame, patient_truth, prob_columns, slide_frame

        preds = self.val_predictions(self.models(arrays))
        cal = {t: np.asarray(calibrators[t](p), dtype=np.float64) if t in calibrators else p
               for t, p in preds.items()}
        rows = [{t: cal[t][i] for t in cal} for i in range(len(self.val_slides))]
        sl = slide_frame(self.val_slides, [self.patient_of[s] for s in self.val_slides], rows, self.specs)
        pf = patient_frame(sl, self.specs).set_index(PATIENT_ID)
        truth = patient_truth(self.cohort.labels.subset(self.val_slides)).loc[pf.index]
        bins, out = self.spec.histogram_bins, {}
        for s in self.specs:
            y = truth[s.name].to_numpy(dtype=np.float64)
            p = pf[prob_columns(s)].to_numpy(dtype=np.float64)
            if s.kind == BINARY:
                p = p[:, 0]
                out.update({f"hist/{s.name}/all": histogram(p, bins), f"hist/{s.name}/pos": histogram(p[y == 1], bins),
                            f"hist/{s.name}/neg": histogram(p[y == 0], bins), f"prob/{s.name}/sum": float(p.sum()),
                            f"prob/{s.name}/n": len(p)})
            elif s.kind == MULTICLASS:
                ok = np.isfinite(y)
                k = len(s.classes)
                conf = np.zeros((k, k))
                np.add.at(conf, (y[ok].astype(int), p[ok].argmax(1)), 1.0)
                out[f"confusion/{s.name}"] = conf.ravel().tolist()
            elif s.kind == REGRESSION:
                ok = np.isfinite(y)
                out.update({f"abs_err/{s.name}/sum": float(np.abs(p[ok, 0] - y[ok]).sum()),
                            f"abs_err/{s.name}/n": int(ok.sum())})
        return Payload(metrics=out)


def _label(v: Any) -> str | None:
    """A label cell as the stripped string ``encode_labels`` reads (None: missing)."""
    return v.strip() if isinstance(v, str) and v.strip() else None


def _numbers(col: Any, drop: bool = True) -> np.ndarray:
    import pandas as pd

    v = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    return v[np.isfinite(v)] if drop else v
