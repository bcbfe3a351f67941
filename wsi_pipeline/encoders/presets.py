"""Presets for the public pathology encoders: architecture, preprocessing, licence and where the weights
live. Architectures follow the model cards / reference loaders of each model (timm kwargs as published).

Every preset loads from a local weights file (``--weights``) without network access; without one the
Hugging Face Hub is tried. Gated models (UNI, UNI2-h, Virchow2, H-optimus-0) need the licence accepted on
the Hub first, or a local file.

CONCH (MahmoodLab/CONCH) is not a preset: its vision tower is a CoCa/open_clip module (attentional
poolers on a ViT-B/16 at 448 px) defined in the ``conch`` package, which is not on PyPI; reproducing it
here could not be checked against the reference implementation offline. Use CONCH v1 features from
TRIDENT, or register it in your own code with :func:`register_encoder` once ``conch`` is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wsi_pipeline.encoders.convert import hf_dinov2_to_timm, hf_vit_to_timm
from wsi_pipeline.encoders.meta import IMAGENET_MEAN, IMAGENET_STD, POOL_CLS_MEAN, EncoderMeta
from wsi_pipeline.encoders.registry import register_encoder

if TYPE_CHECKING:
    from torch import nn

def _timm(overrides: dict[str, Any], arch: str, **kwargs: Any) -> nn.Module:
    """timm model at random init; ``overrides`` (e.g. ``depth=2`` in tests) win over the preset's kwargs."""
    import timm

    kwargs.update(pretrained=False, num_classes=0)
    kwargs.update(overrides)
    return timm.create_model(arch, **kwargs)


CC_BY_NC_ND = "CC-BY-NC-ND-4.0 (non-commercial, gated: accept the terms on the Hub)"

# ---------------------------------------------------------------- CLAM baseline


@register_encoder(
    EncoderMeta(
        name="resnet50-trunc",
        arch="resnet50 (layers 1-3) + adaptive avg pool",
        embed_dim=1024,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        mpp=0.5,
        licence="BSD-3-Clause (torchvision ImageNet weights)",
        weights_source="hf-hub:timm/resnet50.tv_in1k",
        description="ImageNet ResNet-50 truncated after layer3, global average pooled (CLAM baseline, 1024-d)",
    ),
    hub_id="timm/resnet50.tv_in1k",
    ignore_prefixes=("layer4.", "fc."),
)
def resnet50_trunc(**overrides: Any) -> nn.Module:
    from torch import nn

    model = _timm(overrides, "resnet50")
    model.layer4 = nn.Identity()  # features after layer3: 1024 channels at stride 16
    model.num_features = 1024
    return model


# ---------------------------------------------------------------- Owkin


@register_encoder(
    EncoderMeta(
        name="phikon",
        arch="vit_base_patch16_224 (iBOT, HF ViTModel weights)",
        embed_dim=768,
        input_size=224,
        mpp=0.5,
        licence="Owkin non-commercial licence (see https://huggingface.co/owkin/phikon)",
        weights_source="hf-hub:owkin/phikon",
        description="Phikon: ViT-B/16 trained with iBOT on 40M TCGA tiles; CLS token of the last layer",
    ),
    hub_id="owkin/phikon",
    hub_files=("model.safetensors", "pytorch_model.bin"),
    convert=hf_vit_to_timm,
    ignore_prefixes=("pooler.",),
)
def phikon(**overrides: Any) -> nn.Module:
    from functools import partial

    from torch import nn

    # HF config: hidden 768, 12 layers, 12 heads, mlp 3072, qkv_bias, layer_norm_eps 1e-12
    return _timm(overrides, "vit_base_patch16_224", global_pool="token",
        norm_layer=partial(nn.LayerNorm, eps=1e-12),
    )


@register_encoder(
    EncoderMeta(
        name="phikon-v2",
        arch="vit_large_patch16_224 (DINOv2, HF Dinov2Model weights)",
        embed_dim=1024,
        input_size=224,
        mpp=0.5,
        licence="Owkin non-commercial licence (see https://huggingface.co/owkin/phikon-v2)",
        weights_source="hf-hub:owkin/phikon-v2",
        description="Phikon-v2: ViT-L/16 trained with DINOv2 on 460M public tiles; CLS token",
    ),
    hub_id="owkin/phikon-v2",
    hub_files=("model.safetensors",),
    convert=hf_dinov2_to_timm,
    ignore_prefixes=("embeddings.mask_token", "mask_token"),
)
def phikon_v2(**overrides: Any) -> nn.Module:

    # DINOv2 ViT-L/16: LayerScale, GELU MLP ratio 4, no registers, layer_norm_eps 1e-6
    return _timm(overrides, "vit_large_patch16_224", global_pool="token",
        init_values=1e-5, dynamic_img_size=True,
    )


# ---------------------------------------------------------------- Mahmood lab


@register_encoder(
    EncoderMeta(
        name="uni",
        arch="vit_large_patch16_224 (init_values=1e-5)",
        embed_dim=1024,
        input_size=224,
        mpp=0.5,
        licence=CC_BY_NC_ND,
        weights_source="hf-hub:MahmoodLab/UNI",
        description="UNI: ViT-L/16 trained with DINOv2 on 100M tiles of Mass-100K; CLS token",
    ),
    hub_id="MahmoodLab/UNI",
    hub_files=("pytorch_model.bin",),
    gated=True,
)
def uni(**overrides: Any) -> nn.Module:

    return _timm(overrides, "vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
        dynamic_img_size=True,
    )


@register_encoder(
    EncoderMeta(
        name="uni2-h",
        arch="vit_giant_patch14_224 (depth 24, dim 1536, SwiGLU, 8 register tokens)",
        embed_dim=1536,
        input_size=224,
        mpp=0.5,
        licence=CC_BY_NC_ND,
        weights_source="hf-hub:MahmoodLab/UNI2-h",
        description="UNI2-h: ViT-H/14-style with SwiGLU and 8 registers, trained on 200M+ tiles; CLS token",
    ),
    hub_id="MahmoodLab/UNI2-h",
    hub_files=("pytorch_model.bin",),
    gated=True,
)
def uni2_h(**overrides: Any) -> nn.Module:
    import timm
    import torch

    return _timm(overrides, "vit_giant_patch14_224", img_size=224, patch_size=14, depth=24, num_heads=24,
        init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, no_embed_class=True,
        mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, reg_tokens=8, dynamic_img_size=True,
    )


# ---------------------------------------------------------------- Bioptimus


@register_encoder(
    EncoderMeta(
        name="h-optimus-0",
        arch="vit_giant_patch14_reg4_dinov2 (img_size 224, init_values=1e-5)",
        embed_dim=1536,
        input_size=224,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        mpp=0.5,
        licence="Apache-2.0 (gated: accept the terms on the Hub)",
        weights_source="hf-hub:bioptimus/H-optimus-0",
        description="H-optimus-0: ViT-g/14 with 4 registers trained with DINOv2 on 500k+ slides; CLS token",
    ),
    hub_id="bioptimus/H-optimus-0",
    hub_files=("model.safetensors", "pytorch_model.bin"),
    gated=True,
)
def h_optimus_0(**overrides: Any) -> nn.Module:

    return _timm(overrides, "vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5,
        global_pool="token", dynamic_img_size=False,
    )


# ---------------------------------------------------------------- Paige


@register_encoder(
    EncoderMeta(
        name="virchow2",
        arch="vit_huge_patch14_224 (SwiGLU, 4 register tokens)",
        embed_dim=2560,
        input_size=224,
        mpp=0.5,
        licence=CC_BY_NC_ND,
        weights_source="hf-hub:paige-ai/Virchow2",
        description="Virchow2: ViT-H/14 trained on 3.1M slides at mixed magnifications; "
        "concat(class token, mean of patch tokens) = 2560-d",
        pool=POOL_CLS_MEAN,
    ),
    hub_id="paige-ai/Virchow2",
    hub_files=("pytorch_model.bin", "model.safetensors"),
    gated=True,
)
def virchow2(**overrides: Any) -> nn.Module:
    import timm
    import torch

    return _timm(overrides, "vit_huge_patch14_224", img_size=224, init_values=1e-5,
        reg_tokens=4, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
        mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU,
    )
