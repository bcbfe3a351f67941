"""The :class:`Encoder` module every registry entry produces (its metadata is in :mod:`.meta`), preprocessing,
devices and precision (in-memory tiles are embedded by :mod:`wsi_pipeline.tiles.embed`).

An encoder maps a *normalised* float NCHW batch at ``meta.input_size`` px and ``meta.mpp`` µm/px to an
(N, ``meta.embed_dim``) feature matrix. :meth:`Encoder.preprocess` turns uint8 NHWC tiles into that batch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from wsi_pipeline.encoders.meta import POOL_CLS, POOL_MODEL, POOLS, PRECISIONS, EncoderMeta
from wsi_pipeline.encoders.stain import build_stain_norm
from wsi_pipeline.errors import ConfigError

log = logging.getLogger(__name__)

RANDOM_INIT = "random-init"  # weights id of a random initialisation (+ ":seed<N>" when seeded)
DEFAULT_INIT_SEED = 0  # seed of `timm:<arch>` without weights: the same network in every process


class Encoder(nn.Module):
    """A trunk (timm / torchvision / project backbone) plus pooling, with its :class:`EncoderMeta`.

    ``forward(x)`` takes a normalised float NCHW batch and returns (N, embed_dim); encoders trained with a
    per-tile stain standardisation (``meta.extra["stain_norm"]``) apply it first.
    ``weights_sha256`` is the checksum of the weights file loaded ('' for random initialisation),
    ``weights_path`` where it came from, and ``init_seed`` the seed of a random initialisation (None when
    unknown); :attr:`weights_id` names the weights in features files and resume keys.
    """

    def __init__(
        self,
        trunk: nn.Module,
        meta: EncoderMeta,
        weights_sha256: str = "",
        weights_path: str = "",
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        if meta.pool not in POOLS:
            raise ConfigError(f"encoder {meta.name}: unknown pool {meta.pool!r}; expected one of {POOLS}")
        self.trunk = trunk
        self.meta = meta
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        self.init_seed = init_seed
        self.register_buffer("_mean", torch.tensor(meta.mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("_std", torch.tensor(meta.std, dtype=torch.float32).view(1, 3, 1, 1), False)
        # per-tile stain standardisation the encoder was trained with (encoder.json "stain_norm"), or None
        self.stain = build_stain_norm(meta.extra.get("stain_norm"), meta.mean, meta.std)

    # ---- properties
    @property
    def embed_dim(self) -> int:
        return self.meta.embed_dim

    @property
    def is_cnn(self) -> bool:
        """True for convolutional trunks (they benefit from channels_last)."""
        return not hasattr(self.trunk, "patch_embed") and any(
            isinstance(m, nn.Conv2d) for m in list(self.trunk.modules())[:8]
        )

    @property
    def device(self) -> torch.device:
        return self._mean.device

    @property
    def random_init(self) -> bool:
        return not self.weights_sha256

    @property
    def weights_id(self) -> str:
        """The weights' identity in features files and resume keys: the weights file's checksum, or
        ``random-init:seed<N>`` for a seeded random initialisation (``random-init`` when the seed is unknown)."""
        if self.weights_sha256:
            return self.weights_sha256
        return RANDOM_INIT if self.init_seed is None else f"{RANDOM_INIT}:seed{self.init_seed}"

    @property
    def forward_spec(self) -> dict[str, Any]:
        """What besides the weights changes this encoder's features: input normalisation, pooling and the
        stain standardisation. Part of every cache / resume key next to ``weights_sha256``."""
        m = self.meta
        return {"mean": [round(float(v), 6) for v in m.mean], "std": [round(float(v), 6) for v in m.std],
                "pool": m.pool, "stain_norm": m.extra.get("stain_norm") or "none"}

    # ---- compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stain is not None:
            x = self.stain(x)
        out = self.trunk(x)
        pool = self.meta.pool
        if pool == POOL_MODEL:
            return out
        if out.ndim != 3:
            raise RuntimeError(f"encoder {self.meta.name}: pool {pool!r} needs tokens (N, T, D), got {tuple(out.shape)}")
        if pool == POOL_CLS:
            return out[:, 0]
        n_prefix = int(getattr(self.trunk, "num_prefix_tokens", 1))
        return torch.cat([out[:, 0], out[:, n_prefix:].mean(dim=1)], dim=-1)

    def preprocess(self, images: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """uint8 (N, H, W, 3) tiles → normalised float32 (N, 3, S, S), S = ``meta.input_size``.

        Tiles are resized (bilinear, antialiased) only when they are not already S×S; with ``resize=False``
        they keep their own size (N, 3, H, W) — for encoders fed at their µm/px (:mod:`wsi_pipeline.tiles`).
        """
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"preprocess expects uint8 (N, H, W, 3), got {tuple(images.shape)}")
        x = images.to(self._mean.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        s = self.meta.input_size
        if resize and x.shape[-2:] != (s, s):
            x = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return x.sub_(self._mean).div_(self._std).contiguous()

    def extra_repr(self) -> str:
        m = self.meta
        return f"name={m.name!r}, arch={m.arch!r}, embed_dim={m.embed_dim}, input_size={m.input_size}, mpp={m.mpp}"


# ---------------------------------------------------------------- devices and precision
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU; anything else as given (checked)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def autocast_dtype(precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed-precision context for inference on ``device`` (no-op for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def prepare_for_inference(encoder: Encoder, device: torch.device, channels_last: bool | None = None) -> Encoder:
    """Move to ``device``, eval mode, channels_last for CNNs (or as forced)."""
    encoder = encoder.to(device).eval()
    if channels_last if channels_last is not None else encoder.is_cnn:
        encoder = encoder.to(memory_format=torch.channels_last)
    return encoder
