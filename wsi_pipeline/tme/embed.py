"""Embedding tiles at a fixed physical scale for the tissue classifier.

The classifier is trained and applied on encoder features of pixels at one µm/px (the encoder's own
``meta.mpp``). A tile at ``src_mpp`` is resized by ``src_mpp / mpp`` *only*; how the scaled tile then meets
the encoder's input (``fit``) is recorded in the classifier and replayed at application time:

* ``native``: fed as is (convolutional encoders take any size; global pooling);
* ``pad``: reflect-padded (smaller) or centre-cropped (larger) to ``input_size``; a tile within 5% of the
  input size is resized to it (≤ 5% scale change).

Never resize a 150-px, 74-µm tile to 224 px: that shows tissue at 0.33 µm/px to an encoder that expects
0.5, and the classifier learns the wrong scale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsi_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from wsi_pipeline.encoders.base import Encoder

log = logging.getLogger(__name__)

FIT_NATIVE = "native"
FIT_PAD = "pad"
FITS = (FIT_NATIVE, FIT_PAD)
RESIZE_TOLERANCE = 0.05
MIN_NATIVE_PX = 32


def choose_fit(encoder: Encoder) -> str:
    """``native`` for convolutional encoders, ``pad`` for the rest (ViTs need their input size)."""
    return FIT_NATIVE if encoder.is_cnn else FIT_PAD


def scaled_size(size_px: int, src_mpp: float, dst_mpp: float) -> int:
    """Pixels of a ``size_px`` tile at ``src_mpp`` when shown at ``dst_mpp`` µm/px."""
    return max(1, round(size_px * src_mpp / dst_mpp))


def fit_tile(img: np.ndarray, input_size: int, fit: str) -> np.ndarray:
    """A tile already at the encoder's µm/px → the array the encoder sees (see module docstring)."""
    from wsi_pipeline.slide.base import resize_rgb

    if fit not in FITS:
        raise ConfigError(f"unknown fit {fit!r}; expected one of {FITS}")
    h, w = img.shape[:2]
    s = int(input_size)
    if fit == FIT_NATIVE:
        if min(h, w) < MIN_NATIVE_PX:
            raise ConfigError(f"tile of {w}×{h} px is too small for the encoder (need ≥ {MIN_NATIVE_PX} px)")
        return img
    if (h, w) == (s, s):
        return img
    if abs(h - s) <= RESIZE_TOLERANCE * s and abs(w - s) <= RESIZE_TOLERANCE * s:
        return resize_rgb(np.ascontiguousarray(img), (s, s))
    out = img
    # centre-crop what is larger, reflect-pad what is smaller (per axis)
    if h > s:
        y0 = (h - s) // 2
        out = out[y0 : y0 + s]
    if w > s:
        x0 = (w - s) // 2
        out = out[:, x0 : x0 + s]
    ph, pw = max(0, s - out.shape[0]), max(0, s - out.shape[1])
    if ph or pw:
        while out.shape[0] < s or out.shape[1] < s:  # reflect needs pad < size: repeat for tiny tiles
            ph, pw = max(0, s - out.shape[0]), max(0, s - out.shape[1])
            ph1, pw1 = min(ph, out.shape[0] - 1), min(pw, out.shape[1] - 1)
            pads = ((ph1 // 2, ph1 - ph1 // 2), (pw1 // 2, pw1 - pw1 // 2), (0, 0))
            out = np.pad(out, pads, mode="reflect")
    return np.ascontiguousarray(out)


def embed_fitted(
    encoder: Encoder,
    images: Sequence[np.ndarray],
    batch_size: int = 64,
    precision: str = "fp32",
    device: str = "cpu",
) -> np.ndarray:
    """Embed uint8 RGB tiles *without resizing* (normalised with the encoder's mean/std). Tiles of one
    batch must share a size (they do: one source scale per call) → float32 (N, embed_dim)."""
    import torch

    from wsi_pipeline.encoders.base import autocast, prepare_for_inference, resolve_device

    dev = resolve_device(device)
    encoder = prepare_for_inference(encoder, dev)
    mean = torch.tensor(encoder.meta.mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(encoder.meta.std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    out = np.empty((len(images), encoder.embed_dim), np.float32)
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            chunk = images[s : s + batch_size]
            shapes = {im.shape for im in chunk}
            groups = [list(range(len(chunk)))] if len(shapes) == 1 else [
                [i for i, im in enumerate(chunk) if im.shape == shp] for shp in shapes
            ]
            for g in groups:
                arr = np.stack([chunk[i] for i in g])
                x = torch.from_numpy(arr).to(dev).permute(0, 3, 1, 2).float().div_(255.0)
                x = x.sub_(mean).div_(std)
                if encoder.is_cnn:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(dev, precision):
                    y = encoder(x)
                out[[s + i for i in g]] = y.float().cpu().numpy()
    return out


def embed_image_files(
    encoder: Encoder,
    paths: Sequence[Path],
    src_mpp: float,
    fit: str,
    batch_size: int = 64,
    precision: str = "fp32",
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embed image files at ``src_mpp`` µm/px at the encoder's µm/px (resize by ``src_mpp/meta.mpp`` only,
    then :func:`fit_tile`) → float32 (N, embed_dim)."""
    from wsi_pipeline.slide.base import resize_rgb
    from wsi_pipeline.ssl.data import read_rgb

    mpp = encoder.meta.mpp
    out = np.empty((len(paths), encoder.embed_dim), np.float32)
    for s in range(0, len(paths), batch_size):
        imgs = []
        for p in paths[s : s + batch_size]:
            img = read_rgb(p)
            h, w = img.shape[:2]
            size = (scaled_size(w, src_mpp, mpp), scaled_size(h, src_mpp, mpp))
            img = resize_rgb(img, size) if size != (w, h) else img
            imgs.append(fit_tile(img, encoder.meta.input_size, fit))
        out[s : s + len(imgs)] = embed_fitted(encoder, imgs, batch_size, precision, device)
        if progress is not None:
            progress(len(imgs))
    return out
