"""The one embedding loop for in-memory tiles: uint8 HWC tiles → float32 (N, embed_dim) features.

Tiles are batched by shape (a batch holds one shape, so tiles fed at their own size need no padding),
normalised with the encoder's mean/std by :meth:`~wsi_pipeline.encoders.base.Encoder.preprocess`, put in
channels_last memory for CNNs, and run under :func:`~wsi_pipeline.encoders.base.autocast` at the requested
precision. Used by ``wsi eval-encoder``, ``wsi tissue-train`` and ``wsi tme``; the streaming extraction
engine (``features.extract``) keeps its own DataLoader loop over slides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsi_pipeline.tiles.folders import read_rgb
from wsi_pipeline.tiles.transform import encoder_input

if TYPE_CHECKING:
    import torch

    from wsi_pipeline.encoders.base import Encoder


def shape_batches(tiles: Sequence[np.ndarray] | np.ndarray, batch_size: int) -> list[list[int]]:
    """Indices of ``tiles`` in batches of at most ``batch_size`` tiles of one shape (shapes in order of
    first appearance, tiles in order within a shape)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be ≥ 1, got {batch_size}")
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tiles):
        by_shape.setdefault(tuple(t.shape), []).append(i)
    return [idx[s : s + batch_size] for idx in by_shape.values() for s in range(0, len(idx), batch_size)]


def embed_tiles(
    encoder: Encoder,
    tiles: Sequence[np.ndarray] | np.ndarray,
    batch_size: int = 64,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    resize: bool = False,
) -> np.ndarray:
    """Embed uint8 RGB (H, W, 3) tiles → float32 (N, embed_dim), in the order given.

    ``resize`` False: each tile is fed at its own size (bring it to the encoder's µm/px and input with
    :mod:`wsi_pipeline.tiles.transform` first); True: tiles that are not the encoder's input size are resized
    to it (bilinear, antialiased — the extraction stage's rule, which changes the µm/px)."""
    import torch

    from wsi_pipeline.encoders.base import autocast, prepare_for_inference, resolve_device

    dev = resolve_device(device)
    enc = prepare_for_inference(encoder, dev)
    out = np.empty((len(tiles), enc.embed_dim), np.float32)
    with torch.inference_mode():
        for idx in shape_batches(tiles, batch_size):
            batch = torch.from_numpy(np.stack([np.ascontiguousarray(tiles[i]) for i in idx]))
            x = enc.preprocess(batch, resize=resize)
            if enc.is_cnn:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(dev, precision):
                y = enc(x)
            out[idx] = y.float().cpu().numpy()
    return out


def embed_images(
    encoder: Encoder,
    images: Sequence[np.ndarray] | np.ndarray,
    batch_size: int = 32,
    precision: str = "bf16",
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Embed in-memory uint8 RGB tiles resized to the encoder's input size → float32 (N, embed_dim):
    :func:`embed_tiles` with ``resize=True``, as ``wsi extract`` feeds its tiles."""
    return embed_tiles(encoder, images, batch_size, precision, device, resize=True)


def embed_image_files(
    encoder: Encoder,
    paths: Sequence[Path],
    src_mpp: float | Sequence[float],
    fit: str,
    batch_size: int = 64,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embed image files at ``src_mpp`` µm/px (one value, or one per file) at the encoder's µm/px with ``fit``
    (:func:`wsi_pipeline.tiles.transform.encoder_input`), ``batch_size`` files at a time → float32 (N, embed_dim),
    in the order given; ``progress(n)`` after each batch. Files are read in order of their µm/px, so that a
    batch of files whose µm/px differ holds few tile sizes (:func:`embed_tiles` batches by size)."""
    mpps = np.broadcast_to(np.asarray(src_mpp, np.float64), (len(paths),))
    order = np.argsort(mpps, kind="stable")
    out = np.empty((len(paths), encoder.embed_dim), np.float32)
    for s in range(0, len(paths), batch_size):
        idx = order[s : s + batch_size]
        imgs = [encoder_input(read_rgb(paths[i]), float(mpps[i]), encoder, fit) for i in idx]
        out[idx] = embed_tiles(encoder, imgs, batch_size, precision, device)
        if progress is not None:
            progress(len(imgs))
    return out
