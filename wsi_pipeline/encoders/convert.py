"""State-dict converters from Hugging Face ``transformers`` layouts to timm ``VisionTransformer`` keys.

Keys already in timm layout pass through unchanged, so a file converted elsewhere loads too.
"""

from __future__ import annotations

import re
from typing import Any

StateDict = dict[str, Any]

_HF_PREFIXES = ("vit.", "dinov2.", "model.")

_COMMON = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^layernorm\.(weight|bias)$", r"norm.\1"),
]
_VIT = [
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
]
_DINOV2 = [
    (r"^encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
]
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def _strip_hf_prefix(state: StateDict) -> StateDict:
    for pref in _HF_PREFIXES:
        if state and all(k.startswith(pref) or k.startswith("pooler.") or k.startswith("classifier.")
                         for k in state) and any(k.startswith(pref) for k in state):
            return {k[len(pref):] if k.startswith(pref) else k: v for k, v in state.items()}
    return state


def _convert(state: StateDict, rules: list[tuple[str, str]]) -> StateDict:
    import torch

    state = _strip_hf_prefix(state)
    if not any(k.startswith("encoder.layer.") or k.startswith("embeddings.") for k in state):
        return state  # already timm layout
    compiled = [(re.compile(p), r) for p, r in rules]
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    for k, v in state.items():
        m = _QKV.match(k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        for pat, rep in compiled:
            if pat.match(k):
                out[pat.sub(rep, k)] = v
                break
        else:
            out[k] = v  # unknown: left for the loader to report
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise KeyError(f"layer {layer}: incomplete q/k/v {kind} weights ({sorted(parts)})")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    if "reg_token" in out and out["reg_token"].ndim == 3 and out["reg_token"].shape[0] != 1:
        out["reg_token"] = out["reg_token"].unsqueeze(0)
    return out


def hf_vit_to_timm(state: StateDict) -> StateDict:
    """``transformers`` ``ViTModel`` (e.g. owkin/phikon) → timm ``vit_*`` keys."""
    return _convert(state, _COMMON + _VIT)


def hf_dinov2_to_timm(state: StateDict) -> StateDict:
    """``transformers`` ``Dinov2Model`` (e.g. owkin/phikon-v2) → timm ``vit_*`` keys (LayerScale as ls1/ls2)."""
    return _convert(state, _COMMON + _DINOV2)


def timm_vit_to_hf(state: StateDict, dinov2: bool = False) -> StateDict:
    """Inverse mapping (timm → transformers layout); used to write weights in the published format."""
    out: StateDict = {}
    simple = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "reg_token": "embeddings.register_tokens",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    blk = re.compile(r"^blocks\.(\d+)\.(.+)$")
    for k, v in state.items():
        if k in simple:
            out[simple[k]] = v
            continue
        m = blk.match(k)
        if not m:
            out[k] = v
            continue
        i, rest = m.group(1), m.group(2)
        pre = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            q, kk, vv = v.chunk(3, dim=0)
            for n, t in (("query", q), ("key", kk), ("value", vv)):
                out[f"{pre}attention.attention.{n}.{kind}"] = t.clone()
        elif rest.startswith("attn.proj."):
            out[pre + "attention.output.dense." + rest.rsplit(".", 1)[1]] = v
        elif dinov2:
            rest = re.sub(r"^ls([12])\.gamma$", r"layer_scale\1.lambda1", rest)
            out[pre + rest] = v
        else:
            rest = (rest.replace("norm1.", "layernorm_before.").replace("norm2.", "layernorm_after.")
                    .replace("mlp.fc1.", "intermediate.dense.").replace("mlp.fc2.", "output.dense."))
            out[pre + rest] = v
    return out
