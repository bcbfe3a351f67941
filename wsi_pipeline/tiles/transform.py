"""A tile at some µm/px → the array an encoder sees: one rule for every stage that embeds in-memory tiles.

1. **Scale.** The tile is resized by ``src_mpp / encoder_mpp`` *only* (:func:`rescale_tile`), so the encoder
   sees tissue at the µm/px it was trained at. Never stretch a 150-px, 74-µm tile to 224 px: that shows
   tissue at 0.33 µm/px to an encoder that expects 0.5.
2. **Fit** (:func:`fit_tile`), how the scaled tile meets the encoder's input:

   * ``native``: fed as is, at its own size — encoders that accept any size (CNNs with global pooling,
     ViTs built with ``dynamic_img_size``; :func:`choose_fit`);
   * ``pad``: to ``input_size`` × ``input_size`` — centre-cropped where larger, **reflect-padded** where
     smaller (per axis); a tile within 5 % of the input size on both axes is resized to it (≤ 5 % scale
     change).

A tissue classifier records its fit (``classifier.json`` ``fit``) and is applied with it. The slide-wide
extraction stage (``wsi extract``) is different on purpose: its tiles are cut at the tiling's
``--tile-size`` and :meth:`wsi_pipeline.encoders.base.Encoder.preprocess` resizes them to the encoder input
(the µm/px check of ``features.extract.check_mpp`` warns when that changes the scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from wsi_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from wsi_pipeline.encoders.base import Encoder

FIT_NATIVE = "native"
FIT_PAD = "pad"
FITS = (FIT_NATIVE, FIT_PAD)
RESIZE_TOLERANCE = 0.05
MIN_NATIVE_PX = 32


def accepts_any_size(encoder: Encoder) -> bool:
    """CNN trunks, and ViTs built with ``dynamic_img_size=True``, take inputs of any size."""
    trunk = encoder.trunk
    pe = getattr(trunk, "patch_embed", None)
    if pe is not None:
        return bool(getattr(trunk, "dynamic_img_size", False) or getattr(pe, "dynamic_img_size", False))
    return encoder.is_cnn


def choose_fit(encoder: Encoder) -> str:
    """``native`` for encoders that take any size, ``pad`` for the rest (ViTs need their input size)."""
    return FIT_NATIVE if accepts_any_size(encoder) else FIT_PAD


def scaled_size(size_px: int, src_mpp: float, dst_mpp: float) -> int:
    """Pixels of a ``size_px`` tile at ``src_mpp`` when shown at ``dst_mpp`` µm/px (e.g. 150 @0.495 → 148 @0.5)."""
    return max(1, round(size_px * src_mpp / dst_mpp))


def rescale_tile(img: np.ndarray, src_mpp: float, dst_mpp: float) -> np.ndarray:
    """Resize a uint8 HWC tile from ``src_mpp`` to ``dst_mpp`` µm/px (unchanged when the size stays)."""
    from wsi_pipeline.slide.base import resize_rgb

    h, w = img.shape[:2]
    size = (scaled_size(w, src_mpp, dst_mpp), scaled_size(h, src_mpp, dst_mpp))
    return img if size == (w, h) else resize_rgb(img, size)


def _centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    y0, x0 = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return img[y0 : y0 + size, x0 : x0 + size]


def _reflect_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad each axis up to ``size``, centred (repeated for tiles under half of it: reflect pads < side)."""
    if min(img.shape[:2]) < 2:
        raise ConfigError(f"a {img.shape[1]}×{img.shape[0]} px tile cannot be padded to {size} px (need ≥ 2 px)")
    out = img
    while out.shape[0] < size or out.shape[1] < size:
        h, w = out.shape[:2]
        ph, pw = min(max(0, size - h), h - 1), min(max(0, size - w), w - 1)
        out = np.pad(out, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect")
    return out


def fit_tile(img: np.ndarray, input_size: int, fit: str) -> np.ndarray:
    """A tile already at the encoder's µm/px → the array the encoder sees (see the module docstring)."""
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
    return np.ascontiguousarray(_reflect_pad(_centre_crop(img, s), s))


def encoder_input(img: np.ndarray, src_mpp: float, encoder: Encoder, fit: str | None = None) -> np.ndarray:
    """:func:`rescale_tile` to the encoder's µm/px, then :func:`fit_tile` (``fit`` None: :func:`choose_fit`)."""
    fit = fit or choose_fit(encoder)
    return fit_tile(rescale_tile(img, src_mpp, encoder.meta.mpp), encoder.meta.input_size, fit)


def encoder_inputs(images: Sequence[np.ndarray], src_mpp: float, encoder: Encoder,
                   fit: str | None = None) -> list[np.ndarray]:
    """:func:`encoder_input` of each tile."""
    fit = fit or choose_fit(encoder)
    return [encoder_input(im, src_mpp, encoder, fit) for im in images]
