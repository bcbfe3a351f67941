"""The server's record of a federated run (``--model-out/federated.json``, see
:mod:`wsi_pipeline.formats.federated`), its checkpoint, and the model folder it ends with.

The record is rewritten after every round: the rounds so far (sites, losses, sample counts) and the
checkpoint (``completed_rounds``, early-stopping state, the run specification; weights of the last and of
the best model under ``--model-out/.federated/checkpoint/``). A server started again on the same
``--model-out`` with the same model settings resumes after the last completed round.

The model folder is the one ``wsi train`` writes (:class:`~wsi_pipeline.mil.model_io.ModelDir`): one
variant with one member (the federated model; ``fold0``), or the K members of a fold ensemble (``--folds K``;
``fold0`` … ``fold<K-1>``, averaged by ``wsi predict`` as ``wsi train``'s fold models are), its calibrators
and cut-offs, so ``wsi predict``,
``wsi heatmap``, ``wsi report`` and ``wsi subgroups`` use it unchanged. It has no out-of-fold predictions
(no site sends predictions): ``federated.json`` holds the federated validation figures instead.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.federated.config import RESUME_KEYS, FederatedConfig
from wsi_pipeline.federated.spec import RunSpec
from wsi_pipeline.formats import api as F

STATE_DIR = ".federated"  # inside --model-out: checkpoint, SuperLink state, logs of the engine


LEGACY = {"folds": 1}  # what a record written before a setting existed was trained with


def _fingerprint(config: Mapping[str, Any]) -> dict[str, Any]:
    from wsi_pipeline.config import plain

    return {k: plain(config.get(k, LEGACY.get(k))) for k in RESUME_KEYS}


class Record:
    """``federated.json`` of one ``--model-out``, loaded (resume) or new."""

    def __init__(self, cfg: FederatedConfig) -> None:
        from wsi_pipeline.config import to_dict

        self.root = Path(cfg.model_out)
        self.state = self.root / STATE_DIR
        self.path = self.root / F.FEDERATED_JSON
        config = to_dict(cfg)
        self.doc: dict[str, Any] = {"status": "running", "config": config, "sites": {}, "rounds": []}
        if self.path.exists():
            old = F.read_federated_json(self.path)
            if old["status"] == "complete":
                raise ConfigError(f"{self.root} holds a finished federated model; choose another --model-out (or "
                                  "delete this one to train again)")
            if _fingerprint(old["config"]) != _fingerprint(config):
                diff = {k: (old["config"].get(k, LEGACY.get(k)), config.get(k)) for k in RESUME_KEYS
                        if _fingerprint(old["config"])[k] != _fingerprint(config)[k]}
                raise ConfigError(f"{self.path}: a federated run with other settings (checkpoint, now): {diff}; "
                                  "restart with the same settings to resume, or choose another --model-out")
            self.doc = {**old, "status": "running", "config": config, "error": ""}
            if self.checkpoint:
                self.doc.setdefault("resumed", []).append(
                    {"after_round": self.checkpoint.get("completed_rounds", 0), "at": time.strftime("%Y-%m-%dT%H:%M:%S")})

    # ------------------------------------------------------------ state
    @property
    def checkpoint(self) -> dict[str, Any]:
        return dict(self.doc.get("checkpoint") or {})

    @property
    def spec(self) -> RunSpec | None:
        s = self.checkpoint.get("spec")
        return RunSpec(**s) if s else None

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        F.write_federated_json(self.path, self.doc)

    def save_arrays(self, name: str, arrays: Mapping[str, np.ndarray]) -> str:
        from safetensors.numpy import save_file

        path = self.state / "checkpoint" / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        with F.atomic_path(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        return str(path.relative_to(self.root))

    def load_arrays(self, name: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        path = self.state / "checkpoint" / f"{name}.safetensors"
        if not path.exists():
            raise ConfigError(f"{path}: checkpoint weights missing; delete {self.root} and start again")
        return dict(load_file(str(path)))

    def fail(self, message: str) -> None:
        self.doc.update(status="failed", error=message)
        self.save()

    # ------------------------------------------------------------ the model folder
    def write_model(self, cfg: FederatedConfig, spec: RunSpec, arrays: Mapping[str, np.ndarray],
                    calibrators: Mapping[str, Any], thresholds: Mapping[str, float], subgroups: Mapping[str, Any],
                    lr: float) -> Path:
        """The model folder of ``wsi train`` (module docstring); :meth:`complete` marks the run over."""
        import torch
        import yaml

        from wsi_pipeline.config import to_dict
        from wsi_pipeline.mil.model_io import FoldCard, ModelCard, ModelDir, VariantCard, save_weights
        from wsi_pipeline.mil.selection import fixed_head

        mdir = ModelDir(self.root)
        vc: VariantCard = spec.variant_card()
        ck = self.checkpoint
        sites = self.doc["sites"].values()
        vc.folds = []
        for member, state in enumerate(spec.member_states(arrays)):  # one model, or the fold ensemble's members
            model = spec.build_model()
            model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()})
            rel = mdir.weights_rel(vc.name, member)
            save_weights(mdir.root / rel, model)
            vc.folds.append(FoldCard(member, rel, dict(spec.scalers), None, int(ck.get("best_round", 0)),
                                     float(ck.get("best_score", float("nan"))),
                                     sum(int(s["n_train_slides"]) for s in sites),
                                     sum(int(s["n_val_slides"]) for s in sites), float(lr)))
        vc.calibration = {t: c.to_dict() for t, c in calibrators.items()}
        vc.thresholds = dict(thresholds)
        card = ModelCard(name=mdir.root.resolve().name, main_variant=vc.name, targets=list(spec.targets),
                         encoder=dict(spec.encoder), variants={vc.name: vc}, subgroups=dict(subgroups),
                         head_selection=fixed_head(vc.head).to_dict(), seed=cfg.seed)
        F.write_text_atomic(mdir.config_yaml, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        mdir.write_card(card)
        self.save()
        return mdir.root

    def complete(self) -> None:
        """The run is over: the model folder is written and the sites were told."""
        self.doc["status"] = "complete"
        self.save()
