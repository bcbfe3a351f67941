"""Encoder registry and the :class:`Encoder` module.

Public API::

    from wsi_pipeline.encoders import create_encoder, list_encoders, get_encoder_meta
    enc = create_encoder("timm:vit_small_patch16_224")            # random init
    enc = create_encoder("uni", weights="/path/pytorch_model.bin")  # a preset with a local file

In-memory tiles are embedded by :mod:`wsi_pipeline.tiles.embed` (``embed_images``, ``embed_tiles``).
``Encoder``/``EncoderMeta`` import torch; they are loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wsi_pipeline.encoders.registry import (
    DEFAULT_ENCODER,
    TIMM_PREFIX,
    EncoderEntry,
    create_encoder,
    default_encoder_name,
    get_encoder_meta,
    get_entry,
    list_encoders,
    register_encoder,
)

if TYPE_CHECKING:
    from wsi_pipeline.encoders.base import (
        Encoder,
        EncoderMeta,
        autocast,
        prepare_for_inference,
        resolve_device,
    )

_LAZY = {
    "Encoder", "EncoderMeta", "autocast", "resolve_device", "prepare_for_inference",
    "IMAGENET_MEAN", "IMAGENET_STD", "PRECISIONS",
}

__all__ = [
    "DEFAULT_ENCODER",
    "TIMM_PREFIX",
    "Encoder",
    "EncoderEntry",
    "EncoderMeta",
    "autocast",
    "create_encoder",
    "default_encoder_name",
    "get_encoder_meta",
    "get_entry",
    "list_encoders",
    "prepare_for_inference",
    "register_encoder",
    "resolve_device",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from wsi_pipeline.encoders import base

        return getattr(base, name)
    raise AttributeError(f"module 'wsi_pipeline.encoders' has no attribute {name!r}")
