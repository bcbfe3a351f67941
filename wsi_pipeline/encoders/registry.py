"""The encoder registry: one place where every encoder name lives.

Names resolve in this order:

1. ``timm:<arch>`` — any timm architecture (``num_classes=0``), random init unless ``weights`` is given;
2. a registered preset (``uni``, ``virchow2``, ``resnet50-trunc`` ... see :func:`list_encoders`);
3. a path to a project encoder folder (``encoder.json`` + ``model.safetensors``, from ``wsi ssl-train``);
4. a bare name of a folder under the models directory (:func:`~wsi_pipeline.encoders.project.models_dir`:
   ``$WSI_MODELS_DIR``, the models shipped in the installed package, or a checkout's ``models/``).

Presets register themselves as timm's models do: :mod:`.presets` imports this module and decorates its
builders with :func:`register_encoder`; this module never imports them. The package ``__init__`` imports
:mod:`.presets`, so the registry is full whenever this module is imported by its full name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from wsi_pipeline.errors import UnknownNameError, WeightsError

if TYPE_CHECKING:
    from torch import nn

    from wsi_pipeline.encoders.base import Encoder
    from wsi_pipeline.encoders.meta import EncoderMeta
    from wsi_pipeline.encoders.weights import Converter

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
# The encoder `wsi extract` uses without --encoder: the demo encoder shipped under models/ (issue 6).
DEFAULT_ENCODER = "wsip-dino-r10"

TrunkBuilder = Callable[[], "nn.Module"]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class EncoderEntry:
    """A registered preset: its metadata, a builder of the (random-init) trunk and how to load weights."""

    meta: EncoderMeta
    build: TrunkBuilder
    hub_id: str | None = None  # 'org/name' on the Hugging Face Hub
    hub_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    convert: Converter | None = None  # foreign state-dict layout -> trunk layout
    ignore_prefixes: tuple[str, ...] = ()  # checkpoint keys the trunk does not use (heads, text towers)
    gated: bool = False


_REGISTRY: dict[str, EncoderEntry] = {}


def _key(name: str) -> str:
    return name.strip().lower()


def register_encoder(
    meta: EncoderMeta,
    *,
    hub_id: str | None = None,
    hub_files: Sequence[str] = ("model.safetensors", "pytorch_model.bin"),
    convert: Converter | None = None,
    ignore_prefixes: Sequence[str] = (),
    gated: bool = False,
) -> Callable[[F], F]:
    """Decorator registering a trunk builder under ``meta.name`` (timm-style)::

        @register_encoder(EncoderMeta(name="uni", arch="vit_large_patch16_224", embed_dim=1024, ...),
                          hub_id="MahmoodLab/UNI")
        def uni() -> nn.Module:
            return timm.create_model("vit_large_patch16_224", init_values=1e-5, num_classes=0, ...)

    The builder takes no argument and returns a random-initialised module whose state-dict keys match
    the published checkpoint (after ``convert``).
    """

    def deco(fn: F) -> F:
        key = _key(meta.name)
        if key in _REGISTRY:
            raise ValueError(f"encoder {meta.name!r} is already registered")
        _REGISTRY[key] = EncoderEntry(
            meta=meta, build=fn, hub_id=hub_id, hub_files=tuple(hub_files), convert=convert,
            ignore_prefixes=tuple(ignore_prefixes), gated=gated,
        )
        return fn

    return deco


def get_entry(name: str) -> EncoderEntry:
    entry = _REGISTRY.get(_key(name))
    if entry is None:
        raise UnknownNameError(f"unknown encoder preset {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return entry


def list_encoders(include_project: bool = True) -> list[str]:
    """Preset names, then project encoders found under the models directory. (Any ``timm:<arch>`` works too.)"""
    names = sorted(e.meta.name for e in _REGISTRY.values())
    if include_project:
        from wsi_pipeline.encoders.project import list_project_encoders

        names += [n for n in list_project_encoders() if _key(n) not in _REGISTRY]
    return names


def get_encoder_meta(name: str) -> EncoderMeta:
    """Metadata of an encoder without building it (timm archs and project encoders: read from config)."""
    if name.startswith(TIMM_PREFIX):
        return _timm_meta(name[len(TIMM_PREFIX):], None)
    if _key(name) in _REGISTRY:
        return _REGISTRY[_key(name)].meta
    folder = _project_folder(name)
    if folder is not None:
        from wsi_pipeline.encoders.project import read_encoder_json

        return _project_meta(read_encoder_json(folder), str(folder))
    raise _unknown(name)


def default_encoder_name() -> str:
    """The default ``--encoder``: :data:`DEFAULT_ENCODER` if shipped, else the only shipped project encoder."""
    from wsi_pipeline.encoders.project import list_project_encoders, models_dir

    shipped = list_project_encoders()
    if DEFAULT_ENCODER in shipped:
        return DEFAULT_ENCODER
    if len(shipped) == 1:
        return shipped[0]
    raise WeightsError(
        f"no default encoder: expected {models_dir() / DEFAULT_ENCODER}/encoder.json"
        + (f" (found {shipped})" if shipped else "")
        + " — pass --encoder NAME (see `wsi encoders`), e.g. --encoder timm:resnet18 for a quick test"
    )


def create_encoder(name: str | None = None, weights: str | None = None, device: str = "cpu",
                   init_seed: int | None = None) -> Encoder:
    """Build an :class:`Encoder` by name (see module doc) in eval mode on ``device``.

    ``weights``: a local ``.safetensors``/``.pth``/``.bin`` state dict or ``hf-hub:org/name``. For presets
    with no ``weights``, the Hub is tried (offline failure raises :class:`WeightsError` saying how to pass
    a local file); ``timm:<arch>`` without weights stays at random initialisation, seeded with ``init_seed``
    (default :data:`~wsi_pipeline.encoders.base.DEFAULT_INIT_SEED`) on a private RNG: the same network in
    every process, and the caller's RNG state untouched. ``encoder.weights_id`` then reads
    ``random-init:seed<N>``.
    """
    from wsi_pipeline.encoders.base import DEFAULT_INIT_SEED, resolve_device

    name = name or default_encoder_name()
    if name.startswith(TIMM_PREFIX):
        seed = DEFAULT_INIT_SEED if init_seed is None else int(init_seed)
        enc = _create_timm(name[len(TIMM_PREFIX):], weights, seed)
    elif _key(name) in _REGISTRY:
        enc = _create_preset(_REGISTRY[_key(name)], weights)
    else:
        folder = _project_folder(name)
        if folder is None:
            raise _unknown(name)
        enc = _create_project(folder, weights)
    return enc.eval().to(resolve_device(device))


# ---------------------------------------------------------------- helpers
def _unknown(name: str) -> UnknownNameError:
    from wsi_pipeline.encoders.project import models_dir

    return UnknownNameError(
        f"unknown encoder {name!r}: not a preset ({', '.join(list_encoders(include_project=True))}), not "
        f"'timm:<arch>', not a folder with encoder.json and not under {models_dir()} — check the name"
    )


def _project_folder(name: str) -> Any:
    from wsi_pipeline.encoders.project import resolve_project_encoder

    return resolve_project_encoder(name)


def _timm_meta(arch: str, model: Any) -> EncoderMeta:
    import timm

    from wsi_pipeline.encoders.meta import IMAGENET_MEAN, IMAGENET_STD, EncoderMeta

    if model is None:
        if not timm.is_model(arch):
            raise UnknownNameError(f"timm has no architecture {arch!r}; see timm.list_models()")
        cfg = timm.get_pretrained_cfg(arch)
        cfg = cfg.to_dict() if cfg is not None else {}
        embed_dim = -1  # unknown without building
    else:
        cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        embed_dim = int(model.num_features)
    size = cfg.get("input_size", (3, 224, 224))
    return EncoderMeta(
        name=f"{TIMM_PREFIX}{arch}",
        arch=arch,
        embed_dim=embed_dim,
        input_size=int(size[-1]),
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
        mpp=0.5,
        licence="see timm model card",
        weights_source="random-init",
        description=f"timm {arch} (num_classes=0)",
    )


def _create_timm(arch: str, weights: str | None, init_seed: int) -> Encoder:
    import timm
    import torch

    from wsi_pipeline.encoders.base import Encoder
    from wsi_pipeline.encoders.weights import load_weights, resolve_weights_file

    if not timm.is_model(arch):
        raise UnknownNameError(f"timm has no architecture {arch!r}; see `python -c \"import timm; print(timm.list_models())\"`")
    if weights is None:
        with torch.random.fork_rng(devices=[]):  # built on the CPU: only its generator is used, then restored
            torch.manual_seed(init_seed)
            trunk = timm.create_model(arch, pretrained=False, num_classes=0)
        log.warning("encoder timm:%s at random initialisation, seed %d (pass --weights for pretrained weights)",
                    arch, init_seed)
        return Encoder(trunk, _timm_meta(arch, trunk), init_seed=init_seed)
    path = resolve_weights_file(weights)
    trunk = _build_empty(lambda: timm.create_model(arch, pretrained=False, num_classes=0))
    loaded = load_weights(path, trunk, ignore_prefixes=("head.", "fc.", "classifier.", "head_dist."))
    meta = replace(_timm_meta(arch, trunk), weights_source=str(weights))
    return Encoder(trunk, meta, weights_sha256=loaded.sha256, weights_path=loaded.path)


def _create_preset(entry: EncoderEntry, weights: str | None) -> Encoder:
    from wsi_pipeline.encoders.base import Encoder
    from wsi_pipeline.encoders.weights import HUB_PREFIX, load_weights, resolve_weights_file, weights_fix_hint

    source = weights
    if source is None:
        if entry.hub_id is None:
            raise WeightsError(f"encoder {entry.meta.name}: no published weights location — pass --weights FILE")
        source = HUB_PREFIX + entry.hub_id
        log.info("encoder %s: no --weights given, trying the Hugging Face Hub (%s)", entry.meta.name, source)
    try:
        path = resolve_weights_file(source, entry.hub_files)  # before building: fail fast
        trunk = _build_empty(entry.build)
        loaded = load_weights(path, trunk, entry.convert, entry.ignore_prefixes)
    except WeightsError as e:
        if weights is None and entry.gated:
            raise WeightsError(
                f"{e} — {entry.meta.name} is gated: accept its licence on https://huggingface.co/{entry.hub_id}"
                f" and log in (huggingface-cli login), or {weights_fix_hint(entry.hub_id)}"
            ) from e
        raise
    return Encoder(trunk, entry.meta, weights_sha256=loaded.sha256, weights_path=loaded.path)


def _build_empty(build: Callable[[], Any]) -> Any:
    """Build a module on the ``meta`` device (no memory, no initialisation) for weights to be assigned into."""
    import torch

    with torch.device("meta"):
        return build()


def _project_meta(cfg: dict[str, Any], folder: str) -> EncoderMeta:
    from wsi_pipeline.encoders.meta import EncoderMeta

    return EncoderMeta(
        name=str(cfg["name"]),
        arch=str(cfg["arch"]),
        embed_dim=int(cfg["embed_dim"]),
        input_size=int(cfg["input_size"]),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        mpp=float(cfg["mpp"]),
        licence=str(cfg.get("licence", "unknown")),
        weights_source="project",
        description=str(cfg.get("description", "")),
        extra={"folder": folder, "timm_kwargs": cfg.get("timm_kwargs", {}),
               **({"stain_norm": cfg["stain_norm"]} if cfg.get("stain_norm") else {})},
    )


def _create_project(folder: Any, weights: str | None) -> Encoder:
    from wsi_pipeline.encoders.base import Encoder
    from wsi_pipeline.encoders.project import load_project_encoder
    from wsi_pipeline.encoders.weights import load_weights
    from wsi_pipeline.formats.hashing import file_sha256

    trunk, cfg = load_project_encoder(folder)
    meta = _project_meta(cfg, str(folder))
    if weights is not None:
        loaded = load_weights(weights, trunk)
        return Encoder(trunk, meta, weights_sha256=loaded.sha256, weights_path=loaded.path)
    wpath = str(cfg["weights_source"])
    return Encoder(trunk, meta, weights_sha256=file_sha256(wpath), weights_path=wpath)
