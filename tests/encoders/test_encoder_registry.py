"""Encoder registry contract: every preset's architecture and preprocessing, weights round trips in the
published formats, project encoders, the offline Hub error. Never touches the network."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from wsi_pipeline.encoders.base import Encoder
from wsi_pipeline.encoders.convert import timm_vit_to_hf
from wsi_pipeline.encoders.meta import EncoderMeta
from wsi_pipeline.encoders.registry import (
    create_encoder,
    default_encoder_name,
    get_encoder_meta,
    get_entry,
    list_encoders,
)
from wsi_pipeline.encoders.weights import load_weights
from wsi_pipeline.errors import UnknownNameError, WeightsError

PRESETS = ["resnet50-trunc", "phikon", "phikon-v2", "uni", "uni2-h", "h-optimus-0", "virchow2"]
# (embed_dim, input_size, prefix tokens of the trunk, patch grid side) as published
EXPECTED = {
    "resnet50-trunc": (1024, 224, None, None),
    "phikon": (768, 224, 1, 14),
    "phikon-v2": (1024, 224, 1, 14),
    "uni": (1024, 224, 1, 14),
    "uni2-h": (1536, 224, 9, 16),
    "h-optimus-0": (1536, 224, 5, 16),
    "virchow2": (2560, 224, 5, 16),
}
PARAMS_M = {"phikon": 85.8, "phikon-v2": 303.4, "uni": 303.4, "uni2-h": 681.4, "h-optimus-0": 1134.8,
            "virchow2": 631.2, "resnet50-trunc": 8.5}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No network in these tests, and an empty Hub cache."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    cache = tmp_path_factory.mktemp("hf_cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))


def _x(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def test_registry_lists_every_preset_with_metadata() -> None:
    names = list_encoders(include_project=False)
    assert set(PRESETS) <= set(names)
    for n in PRESETS:
        m = get_encoder_meta(n)
        assert m.name == n and m.arch and m.licence and m.weights_source.startswith("hf-hub:")
        assert len(m.mean) == 3 and len(m.std) == 3 and all(0 < s < 1 for s in m.std)
        assert m.mpp == 0.5 and (m.embed_dim, m.input_size) == EXPECTED[n][:2]
    assert get_encoder_meta("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)
    assert get_encoder_meta("UNI").name == "uni"  # case-insensitive
    with pytest.raises(UnknownNameError, match="unknown encoder 'nope'"):
        create_encoder("nope")
    with pytest.raises(UnknownNameError, match="timm has no architecture"):
        create_encoder("timm:not_a_model")


@pytest.mark.parametrize("name", PRESETS)
def test_preset_architecture_on_meta_device(name: str) -> None:
    """Full-size architectures built without memory: output shape, token layout, parameter count."""
    entry = get_entry(name)
    dim, size, prefix, grid = EXPECTED[name]
    with torch.device("meta"):
        trunk = entry.build() if name == "resnet50-trunc" else entry.build(weight_init="skip")
        enc = Encoder(trunk, entry.meta)
        y = enc(torch.empty(2, 3, size, size))
    assert tuple(y.shape) == (2, dim)
    assert sum(p.numel() for p in trunk.parameters()) / 1e6 == pytest.approx(PARAMS_M[name], abs=0.1)
    if prefix is not None:
        assert trunk.num_prefix_tokens == prefix
        assert trunk.patch_embed.grid_size == (grid, grid)


def test_preprocess_normalises_and_resizes() -> None:
    enc = create_encoder("timm:resnet18")
    img = torch.full((1, 224, 224, 3), 128, dtype=torch.uint8)
    x = enc.preprocess(img)
    expected = (128 / 255 - torch.tensor(enc.meta.mean)) / torch.tensor(enc.meta.std)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    assert torch.allclose(x[0, :, 5, 5], expected.float(), atol=1e-5)
    small = torch.randint(0, 255, (3, 150, 150, 3), dtype=torch.uint8)
    assert enc.preprocess(small).shape == (3, 3, 224, 224)


def test_timm_weights_roundtrip_safetensors_and_nested_pth(tmp_path) -> None:
    from safetensors.torch import save_file

    from wsi_pipeline.formats.hashing import file_sha256

    src = create_encoder("timm:vit_tiny_patch16_224")
    state = {k: v.contiguous() for k, v in src.trunk.state_dict().items()}
    st = tmp_path / "w.safetensors"
    save_file(state, str(st))
    # a DINO-style training checkpoint: nested, DDP-prefixed, with a projection head the trunk lacks
    pth = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "teacher": {**{f"module.backbone.{k}": v for k, v in state.items()},
                                        "module.head.mlp.0.weight": torch.zeros(4, 4)}}, pth)
    x = _x()
    with torch.inference_mode():
        ref = src(x)
        for path in (st, pth):
            enc = create_encoder("timm:vit_tiny_patch16_224", weights=str(path))
            assert enc.weights_sha256 == file_sha256(path)
            assert torch.equal(enc(x), ref)
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, bad)
    with pytest.raises(WeightsError, match="weights missing"):
        create_encoder("timm:vit_tiny_patch16_224", weights=str(bad))
    with pytest.raises(WeightsError, match="not found"):
        create_encoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / "missing.bin"))


def test_resnet50_trunc_loads_full_torchvision_checkpoint(tmp_path) -> None:
    """The published file is a full ResNet-50 (layer4 + fc): the preset keeps layers 1-3 + avg pool."""
    import timm

    full = timm.create_model("resnet50", pretrained=False).eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save(full.state_dict(), path)
    enc = create_encoder("resnet50-trunc", weights=str(path))
    x = _x(seed=1)
    with torch.inference_mode():
        h = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        h = full.layer3(full.layer2(full.layer1(h)))
        ref = h.mean(dim=(2, 3))
        out = enc(x)
    assert out.shape == (2, 1024)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert enc.is_cnn


def test_phikon_loads_transformers_vit_checkpoint(tmp_path) -> None:
    """owkin/phikon ships `transformers` ViTModel weights; the preset maps them onto timm (full size)."""
    from safetensors.torch import save_file

    entry = get_entry("phikon")
    ref_trunk = entry.build().eval()
    hf_state = timm_vit_to_hf(ref_trunk.state_dict())
    hf_state["pooler.dense.weight"] = torch.zeros(768, 768)  # ViTModel's pooler: unused
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(path))
    enc = create_encoder("phikon", weights=str(path))
    x = _x(seed=2)
    with torch.inference_mode():
        assert torch.equal(enc(x), Encoder(ref_trunk, entry.meta)(x))


@pytest.mark.parametrize("name", ["phikon-v2", "uni", "uni2-h", "h-optimus-0", "virchow2"])
def test_large_preset_weights_roundtrip_reduced_depth(name: str, tmp_path) -> None:
    """Same module structure as the published checkpoint (one block deep, to stay fast): save, load, compare."""
    entry = get_entry(name)
    src = entry.build(depth=1).eval()
    if name == "phikon-v2":  # Dinov2Model layout on the Hub
        from safetensors.torch import save_file

        state = timm_vit_to_hf(src.state_dict(), dinov2=True)
        state["embeddings.mask_token"] = torch.zeros(1, 1024)
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(src.state_dict(), path)
    dst = entry.build(depth=1).eval()
    load_weights(path, dst, entry.convert, entry.ignore_prefixes)
    x = _x(1, seed=3)
    with torch.inference_mode():
        a, b = Encoder(src, entry.meta)(x), Encoder(dst, entry.meta)(x)
    assert a.shape == (1, entry.meta.embed_dim)
    assert torch.equal(a, b)


def test_transformers_checkpoints_match_reference_implementation() -> None:
    """Cross-check against `transformers` itself when it is installed (v4 checkpoint layout)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "ViTModel") or int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("needs transformers 4.x (the layout of the published checkpoints)")
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    from wsi_pipeline.encoders.weights import load_state_into

    torch.manual_seed(0)
    x = _x(seed=4)
    cfg = ViTConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=3072,
                    layer_norm_eps=1e-12)
    hf = ViTModel(cfg).eval()
    e = get_entry("phikon")
    t = e.build(depth=1)
    load_state_into(t, hf.state_dict(), "vit", e.convert, e.ignore_prefixes)
    with torch.inference_mode():
        torch.testing.assert_close(Encoder(t, e.meta)(x), hf(pixel_values=x).last_hidden_state[:, 0])
    hf2 = Dinov2Model(Dinov2Config(hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, patch_size=16,
                                   image_size=518, layerscale_value=1e-5)).eval()
    e2 = get_entry("phikon-v2")
    t2 = e2.build(depth=1)
    load_state_into(t2, hf2.state_dict(), "dinov2", e2.convert, e2.ignore_prefixes)
    with torch.inference_mode():
        torch.testing.assert_close(Encoder(t2, e2.meta)(x), hf2(pixel_values=x).last_hidden_state[:, 0])


def test_preset_without_weights_offline_says_how_to_pass_a_file() -> None:
    with pytest.raises(WeightsError) as ei:
        create_encoder("uni")
    msg = str(ei.value)
    assert "--weights /path/to/pytorch_model.bin" in msg and "MahmoodLab/UNI" in msg
    with pytest.raises(WeightsError, match="--weights"):
        create_encoder("timm:vit_tiny_patch16_224", weights="hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")


def test_project_encoder_by_path_and_by_name(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    from wsi_pipeline.encoders.project import save_project_encoder

    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=112).eval()
    folder = save_project_encoder(
        tmp_path / "models" / "demo-enc", backbone,
        {"name": "demo-enc", "arch": "vit_tiny_patch16_224", "timm_kwargs": {"img_size": 112}, "embed_dim": 192,
         "input_size": 112, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "mpp": 1.0,
         "licence": "CC-BY-4.0", "description": "test"},
        fp16=False,
    )
    by_path = create_encoder(str(folder))
    assert isinstance(by_path.meta, EncoderMeta)
    assert (by_path.meta.name, by_path.meta.input_size, by_path.meta.mpp) == ("demo-enc", 112, 1.0)
    assert by_path.meta.weights_source == "project" and len(by_path.weights_sha256) == 64
    monkeypatch.setenv("WSI_MODELS_DIR", str(tmp_path / "models"))
    by_name = create_encoder("demo-enc")
    assert "demo-enc" in list_encoders()
    assert default_encoder_name() == "demo-enc"  # the only shipped one
    x = _x(1, 112, seed=5)
    with torch.inference_mode():
        assert torch.equal(by_name(x), backbone(x)) and torch.equal(by_path(x), backbone(x))
    monkeypatch.setenv("WSI_MODELS_DIR", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match="--encoder"):
        default_encoder_name()


def test_model_folders_are_found_by_path_marker_file_or_name(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One lookup for every kind of model folder (encoder, tissue classifier, MIL model): by its folder, its
    marker file or its bare name under WSI_MODELS_DIR; a path with a folder part is never joined to it."""
    from wsi_pipeline.encoders.project import find_model_folder

    mil = tmp_path / "models" / "my-mil"
    mil.mkdir(parents=True)
    (mil / "model.json").write_text("{}")
    monkeypatch.setenv("WSI_MODELS_DIR", str(tmp_path / "models"))
    assert find_model_folder(mil, "model.json") == mil
    assert find_model_folder(mil / "model.json", "model.json") == mil
    assert find_model_folder("my-mil", "model.json") == tmp_path / "models" / "my-mil"
    assert find_model_folder("my-mil", "encoder.json") is None  # another kind's marker
    assert find_model_folder("elsewhere/my-mil", "model.json") is None and find_model_folder("", "model.json") is None
