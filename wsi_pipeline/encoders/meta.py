"""What describes an encoder without building it: :class:`EncoderMeta`, the normalisation constants, the
pooling modes and the precisions. Torch-free, so the registry and its presets load without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PRECISIONS = ("bf16", "fp16", "fp32")

# How an encoder turns its trunk's output into one vector per image.
POOL_MODEL = "model"  # the trunk already returns (N, D)
POOL_CLS = "cls"  # trunk returns tokens (N, T, D): class token
POOL_CLS_MEAN = "cls+mean"  # concat(class token, mean of patch tokens after the prefix tokens) (Virchow)
POOLS = (POOL_MODEL, POOL_CLS, POOL_CLS_MEAN)


@dataclass(frozen=True)
class EncoderMeta:
    """What a user (and the feature files) need to know about an encoder."""

    name: str
    arch: str
    embed_dim: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mpp: float = 0.5  # µm/px of the tiles the encoder was trained on
    licence: str = "unknown"
    weights_source: str = ""  # 'hf-hub:org/name', a URL, 'project' or a local path
    description: str = ""
    pool: str = POOL_MODEL
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d
