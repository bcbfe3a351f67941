"""Project encoders: a timm backbone trained by this package (``wsi ssl-train``) stored as a folder.

Layout of an encoder folder (e.g. ``models/wsip-dino-r10/``)::

    encoder.json        format_version, name, arch (timm name), timm_kwargs, embed_dim, input_size,
                        mean, std, mpp, licence, description, training summary, weights_dtype
    model.safetensors   the backbone state dict (``num_classes=0``: pooled features out), fp16 or fp32
    README.md           model card (optional)

:func:`save_project_encoder` writes one, :func:`load_project_encoder` reads it back as
``(backbone, meta)``. The extraction registry (``wsi_pipeline.encoders``) resolves a path to such a
folder, or a bare name matching ``models/<name>/encoder.json``, through :func:`resolve_project_encoder`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_pipeline.errors import WeightsError
from wsi_pipeline.formats import api as F

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

ENCODER_JSON = F.ENCODER_JSON
WEIGHTS_FILE = "model.safetensors"
PROJECT_ENCODER_FORMAT_VERSION = F.ENCODER_JSON_VERSION
MODELS_DIR_ENV = "WSI_MODELS_DIR"

REQUIRED_KEYS = F.ENCODER_JSON_REQUIRED
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def models_dir() -> Path:
    """Folder of the shipped models (encoders, tissue classifier, MIL model), in this order:

    1. ``$WSI_MODELS_DIR`` when set;
    2. ``wsi_pipeline/models/`` inside an installed package (a wheel or ``pip install .``), found with
       :mod:`importlib.resources`: the build maps the checkout's top-level ``models/`` there as package data;
    3. the top-level ``models/`` of a source checkout (editable installs, ``PYTHONPATH=<checkout>``).

    When none exists, the installed location is returned, so that error messages name where models belong.
    """
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env)
    installed = Path(str(resources.files("wsi_pipeline") / "models"))
    if installed.is_dir():
        return installed
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "models").is_dir():
        return checkout / "models"
    return installed


def is_project_encoder(path: str | Path) -> bool:
    """True if ``path`` is a folder holding ``encoder.json`` (or is that ``encoder.json`` itself)."""
    p = Path(path)
    return (p.is_dir() and (p / ENCODER_JSON).is_file()) or (p.is_file() and p.name == ENCODER_JSON)


def find_model_folder(name_or_path: str | Path, marker: str) -> Path | None:
    """The folder of a shipped or trained model, recognised by its ``marker`` file (``encoder.json``,
    ``classifier.json``, ``model.json``): ``name_or_path`` is that folder, its marker file, or a bare name
    under :func:`models_dir`. None when it is neither."""
    p = Path(name_or_path)
    if p.is_file() and p.name == marker:
        return p.parent
    if (p / marker).is_file():
        return p
    name = str(name_or_path)
    if name and "/" not in name and os.sep not in name and (models_dir() / name / marker).is_file():
        return models_dir() / name
    return None


def resolve_project_encoder(name_or_path: str | Path) -> Path | None:
    """The encoder folder for a path (folder or its encoder.json) or a bare name under :func:`models_dir`.

    Returns None when ``name_or_path`` is neither (so a registry can try its presets next).
    """
    return find_model_folder(name_or_path, ENCODER_JSON)


def list_project_encoders() -> list[str]:
    """Names of the encoders shipped under :func:`models_dir`."""
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if is_project_encoder(d))


def read_encoder_json(path: str | Path) -> dict[str, Any]:
    """Read and validate ``encoder.json`` of an encoder folder (or the file itself)."""
    p = Path(path)
    jpath = p / ENCODER_JSON if p.is_dir() else p
    if not jpath.is_file():
        raise WeightsError(f"{jpath}: no encoder.json — pass a folder written by `wsi ssl-train` (or its name)")
    meta = F.read_encoder_json(jpath)
    meta.setdefault("weights_source", str(jpath.parent / WEIGHTS_FILE))
    return meta


def build_backbone(arch: str, timm_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A timm backbone at random init with the classifier removed (``num_classes=0``)."""
    import timm

    kwargs = dict(timm_kwargs or {})
    kwargs["num_classes"] = 0
    kwargs.pop("pretrained", None)
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError) as e:
        raise WeightsError(f"timm cannot build {arch!r} with {kwargs}: {e}") from e


def save_project_encoder(
    out_dir: str | Path, backbone: nn.Module, meta: Mapping[str, Any], fp16: bool = True
) -> Path:
    """Write ``encoder.json`` + ``model.safetensors`` for ``backbone`` into ``out_dir``; returns the folder.

    ``meta`` needs at least name, arch, embed_dim, input_size, mean, std and mpp; timm_kwargs, licence,
    description and training (a summary dict) are recommended. Floating-point weights are stored as
    float16 when ``fp16`` (half the size; loading casts back to float32).
    """
    import torch
    from safetensors.torch import save_file

    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"save_project_encoder: meta lacks {missing}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in backbone.state_dict().items():
        t = v.detach().to("cpu")
        if fp16 and t.is_floating_point():
            t = t.to(torch.float16)
        state[k] = t.contiguous().clone()
    full = {**dict(meta), "weights_dtype": "float16" if fp16 else "float32"}
    with F.atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"arch": str(full["arch"]), "name": str(full["name"])})
    F.write_encoder_json(out / ENCODER_JSON, full)  # adds format_version, normalises the numbers
    for f in (out / WEIGHTS_FILE, out / ENCODER_JSON):  # temporary files are created 0600
        f.chmod(0o644)
    log.info("saved encoder %s (%s, %d-d) to %s", full["name"], full["arch"], int(full["embed_dim"]), out)
    return out


def load_project_encoder(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load an encoder folder (path, its encoder.json, or a name under ``models/``).

    Returns ``(backbone, meta)``: a timm ``nn.Module`` with ``num_classes=0`` in eval mode, float32, on
    ``device``, mapping images normalised with ``meta['mean']``/``meta['std']`` at ``meta['mpp']`` µm/px
    to ``meta['embed_dim']`` features; ``meta`` is the encoder.json content plus ``weights_source``.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = resolve_project_encoder(path)
    if folder is None:
        raise WeightsError(
            f"{path}: not an encoder folder (no {ENCODER_JSON}) and no encoder of that name in {models_dir()}"
            " — pass the folder written by `wsi ssl-train --out`"
        )
    meta = read_encoder_json(folder)
    wpath = folder / WEIGHTS_FILE
    meta["weights_source"] = str(wpath)
    if not wpath.is_file():
        raise WeightsError(f"{wpath}: weights file missing — copy model.safetensors next to encoder.json")
    model = build_backbone(meta["arch"], meta.get("timm_kwargs"))
    try:
        state = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{wpath}: cannot read weights ({e}); re-export the encoder") from e
    ref = model.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref and v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(
            f"{wpath}: weights do not match arch {meta['arch']!r} with {meta.get('timm_kwargs')}: {e}"
        ) from e
    model.eval().to(torch.device(device))
    return model, meta
