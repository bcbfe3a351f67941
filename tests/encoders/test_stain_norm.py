"""Per-tile Reinhard stain standardisation: colour maths against scikit-image, the moments it sets, the
invariance it buys an encoder, and its round trip through encoder.json."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipeline.encoders.stain import (
    REINHARD,
    ReinhardStandardize,
    build_stain_norm,
    f_to_rgb,
    fit_reinhard_target,
    lab_moments,
    rgb_to_f,
)
from wsi_pipeline.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def kather_tiles(kather_dir: Path, n_per_class: int = 2) -> list[np.ndarray]:
    from wsi_pipeline.tiles.folders import read_rgb

    out = []
    for cdir in sorted(p for p in kather_dir.iterdir() if p.is_dir()):
        out += [read_rgb(f) for f in sorted(cdir.iterdir())[:n_per_class]]
    return out


def to_normalised(images: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def restain(img: np.ndarray, gain: tuple[float, float, float], shift: tuple[float, float, float]) -> np.ndarray:
    """Another lab's version of a tile: L*a*b* channels scaled and shifted (a global stain/scanner change)."""
    from skimage.color import lab2rgb, rgb2lab

    lab = rgb2lab(img)
    m = lab.mean(axis=(0, 1))
    lab = (lab - m) * np.array(gain) + m + np.array(shift)
    return (np.clip(lab2rgb(lab), 0, 1) * 255 + 0.5).astype(np.uint8)


def test_colour_space_matches_skimage_and_round_trips(kather_dir: Path) -> None:
    from skimage.color import rgb2lab

    from wsi_pipeline.encoders.stain import colour_matrices

    imgs = [*kather_tiles(kather_dir, 1), np.zeros((20, 20, 3), np.uint8)]  # a black tile: the linear toes
    lab = [rgb2lab(im).reshape(-1, 3) for im in imgs]
    for im, ref in zip(imgs, lab, strict=True):
        m, s = lab_moments(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255.0)
        np.testing.assert_allclose(m[0].numpy(), ref.mean(0), atol=1e-3)
        np.testing.assert_allclose(s[0].numpy(), ref.std(0, ddof=1), atol=1e-3)
    mats = colour_matrices()
    x = torch.from_numpy(np.stack(imgs[:-1])).permute(0, 3, 1, 2).float() / 255.0
    back = f_to_rgb(rgb_to_f(x, mats["to_xyz_w"]), mats["from_xyz_w"]).reshape(x.shape)
    assert (back - x).abs().max() < 1e-4


def test_standardise_sets_target_moments(kather_dir: Path) -> None:
    imgs = [im for im in kather_tiles(kather_dir, 2) if im.std() > 20][:6]  # textured tissue, gain not capped
    target_mean, target_std = (60.0, 20.0, -10.0), (14.0, 8.0, 6.0)
    mod = ReinhardStandardize(target_mean, target_std, MEAN, STD, max_gain=100.0)
    out = mod(to_normalised(imgs))
    rgb = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    m, s = lab_moments(rgb)
    assert torch.allclose(m, torch.tensor(target_mean).expand_as(m), atol=3.0)  # gamut clipping moves it a little
    assert torch.allclose(s, torch.tensor(target_std).expand_as(s), rtol=0.25)


def test_gain_cap_keeps_blank_tiles_finite() -> None:
    blank = [np.full((32, 32, 3), 244, np.uint8), np.zeros((32, 32, 3), np.uint8)]
    out = ReinhardStandardize((60.0, 20.0, -10.0), (14.0, 8.0, 6.0), MEAN, STD)(to_normalised(blank))
    assert torch.isfinite(out).all()


def test_restained_tile_gives_nearly_the_same_features(kather_dir: Path) -> None:
    """The point of it: an encoder with stain_norm sees a re-stained tile (another lab's colours) almost
    as the original; the same encoder without it does not."""
    from wsi_pipeline.encoders.base import Encoder, EncoderMeta
    from wsi_pipeline.encoders.project import build_backbone
    from wsi_pipeline.tiles.embed import embed_images

    imgs = [im for im in kather_tiles(kather_dir, 1) if im.std() > 20][:4]
    shifted = [restain(im, (0.8, 1.3, 1.2), (8.0, -6.0, 5.0)) for im in imgs]
    spec = fit_reinhard_target(kather_tiles(kather_dir, 2))
    assert spec["method"] == REINHARD and spec["fitted_on_tiles"] == 16
    torch.manual_seed(0)
    trunk = build_backbone("resnet10t")
    plain = Encoder(trunk, EncoderMeta("plain", "resnet10t", 512))
    normed = Encoder(trunk, EncoderMeta("normed", "resnet10t", 512, extra={"stain_norm": spec}))
    assert plain.stain is None and normed.stain is not None

    def cos(enc: Encoder) -> float:
        a = embed_images(enc, imgs, precision="fp32")
        b = embed_images(enc, shifted, precision="fp32")
        return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))

    assert cos(normed) > 0.99
    assert 1 - cos(normed) < 0.5 * (1 - cos(plain))


def test_stain_norm_round_trips_through_encoder_json(tmp_path: Path, kather_dir: Path) -> None:
    from wsi_pipeline.encoders.project import build_backbone, save_project_encoder
    from wsi_pipeline.encoders.registry import create_encoder

    spec = fit_reinhard_target(kather_tiles(kather_dir, 1))
    folder = save_project_encoder(tmp_path / "enc", build_backbone("resnet10t"), {
        "name": "enc", "arch": "resnet10t", "embed_dim": 512, "input_size": 224, "mean": MEAN, "std": STD,
        "mpp": 0.5, "stain_norm": spec})
    enc = create_encoder(str(folder))
    assert enc.stain is not None
    assert enc.stain.target_mean.flatten().tolist() == pytest.approx(spec["target_mean"])
    assert "stain" not in "".join(enc.state_dict())  # targets live in encoder.json, not in the weights


def test_unknown_or_incomplete_spec_is_a_config_error() -> None:
    assert build_stain_norm(None, MEAN, STD) is None
    with pytest.raises(ConfigError, match="not known"):
        build_stain_norm({"method": "macenko"}, MEAN, STD)
    with pytest.raises(ConfigError, match="lacks"):
        build_stain_norm({"method": REINHARD, "target_mean": [1, 2, 3]}, MEAN, STD)


def test_folded_forward_equals_the_reference_colour_transfer(kather_dir: Path) -> None:
    """The fast forward (affine map folded into f-space) equals the plain L*a*b* recipe done with
    scikit-image, gain cap included."""
    from skimage.color import lab2rgb, lab2xyz, rgb2lab

    imgs = [*kather_tiles(kather_dir, 1), np.full((150, 150, 3), 240, np.uint8)]  # a blank tile: gain capped
    x = to_normalised(imgs).contiguous(memory_format=torch.channels_last)
    target_mean, target_std = (56.0, 22.0, -7.5), (14.0, 6.9, 5.2)
    mod = ReinhardStandardize(target_mean, target_std, MEAN, STD, max_gain=4.0)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    ref, in_gamut = [], []
    for im in imgs:
        lab = rgb2lab(im)
        m, s = lab.mean(axis=(0, 1)), lab.std(axis=(0, 1), ddof=1)
        gain = np.minimum(np.array(target_std) / np.maximum(s, 1e-6), 4.0)
        lab = (lab - m) * gain + np.array(target_mean)
        # scikit-image clips negative XYZ before the matrix, we clip linear RGB after it: they agree except
        # on the (rare) colours with negative XYZ
        in_gamut.append((lab2xyz(lab) >= 0).all(axis=-1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ref.append(np.clip(lab2rgb(lab), 0, 1))
    ref = (torch.from_numpy(np.stack(ref)).permute(0, 3, 1, 2).float() - mean) / std
    keep = torch.from_numpy(np.stack(in_gamut))[:, None].expand_as(ref)
    assert keep.float().mean() > 0.99
    out = mod(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out - ref)[keep].abs().max() < 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mod(x.to(torch.bfloat16)).dtype == torch.bfloat16


def mosaic(kather_dir: Path, px: int, rows: int, cols: int) -> np.ndarray:
    """A region of kather16 tiles (one per class, cropped to ``px``), ``rows`` × ``cols`` of them."""
    tiles = [im[:px, :px] for im in kather_tiles(kather_dir, 1)]
    return np.concatenate([np.concatenate(tiles[r * cols:(r + 1) * cols], 1) for r in range(rows)], 0)


def local_reference(region: np.ndarray, window_px: int, block_px: int, target_mean: tuple[float, ...],
                    target_std: tuple[float, ...], max_gain: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sliding colour transfer done plainly in float64 with scikit-image: L*a*b* moments of the window
    (block_px blocks, clipped at the edges) per block, gain and offset upsampled bilinearly, L*a*b* mapped
    per pixel. Returns normalised (1, 3, H, W) and the mask of colours scikit-image and the module clip alike."""
    from skimage.color import lab2rgb, lab2xyz, rgb2lab

    lab = torch.from_numpy(rgb2lab(region)).permute(2, 0, 1)[None]  # float64
    k = max(1, round(window_px / block_px)) | 1
    m = torch.nn.functional.avg_pool2d(torch.cat([lab, lab * lab], 1), block_px)
    m = torch.nn.functional.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False)
    npx = window_px * window_px
    std = ((m[:, 3:] - m[:, :3] ** 2) * npx / (npx - 1)).clamp_min(0).sqrt()
    gain = (torch.tensor(target_std, dtype=torch.float64).view(1, 3, 1, 1) / std.clamp_min(1e-6)).clamp(max=max_gain)
    offset = torch.tensor(target_mean, dtype=torch.float64).view(1, 3, 1, 1) - gain * m[:, :3]
    p = torch.nn.functional.interpolate(torch.cat([gain, offset], 1), size=region.shape[:2], mode="bilinear",
                                        align_corners=False)
    out = (lab * p[:, :3] + p[:, 3:])[0].permute(1, 2, 0).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rgb = torch.from_numpy(np.clip(lab2rgb(out), 0, 1)).permute(2, 0, 1)[None].float()
    in_gamut = torch.from_numpy((lab2xyz(out) >= 0).all(axis=-1))[None, None].expand_as(rgb)
    return (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1), in_gamut


def test_sliding_standardisation_equals_the_plain_recipe(kather_dir: Path) -> None:
    """forward_local against the recipe done plainly (scikit-image, float64), on a mosaic of tissue classes
    with a black and a blank patch (the linear toes, the gain cap): window moments, edges, interpolation."""
    region = mosaic(kather_dir, 144, 2, 3)
    region[8:40, 8:40] = 0
    region[-64:, -64:] = 246
    target_mean, target_std = (56.0, 22.0, -7.5), (14.0, 6.9, 5.2)
    mod = ReinhardStandardize(target_mean, target_std, MEAN, STD, max_gain=4.0)
    ref, keep = local_reference(region, 136, 8, target_mean, target_std, 4.0)
    assert keep.float().mean() > 0.99
    x = to_normalised([region])
    out = mod.forward_local(x, 136, 8)
    assert out.shape == x.shape and out.is_contiguous()
    assert (out - x).abs().mean() > 0.1  # it does change the colours
    assert (out - ref)[keep].abs().max() < 1e-4


def test_sliding_standardisation_from_uint8_pixels_equals_the_normalised_path(kather_dir: Path) -> None:
    """forward_local_pixels (the sRGB curve read off a table) = forward_local of the preprocessed pixels."""
    region = mosaic(kather_dir, 144, 2, 4)
    region[:24, :24] = 0
    region[-64:, -64:] = 246
    mod = ReinhardStandardize((56.0, 22.0, -7.5), (14.0, 6.9, 5.2), MEAN, STD)
    ref = mod.forward_local(to_normalised([region]), 148, 8)
    out = mod.forward_local_pixels(torch.from_numpy(region)[None], 148, 8, torch.channels_last)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert (out - ref).abs().max() < 5e-5
    with pytest.raises(ValueError, match="uint8"):
        mod.forward_local_pixels(to_normalised([region]), 148, 8)


@pytest.mark.parametrize(("tile_px", "block_px"), [(136, 8), (150, 6)])
def test_sliding_standardisation_of_a_repeated_tile_is_the_tiles(kather_dir: Path, tile_px: int,
                                                                 block_px: int) -> None:
    """forward_local against forward: in a region that repeats one tile, every window of the tile's size holds
    the tile's pixels once, so away from the edges (where windows shrink) each pixel is mapped as the tile's
    own standardisation maps it."""
    tile = next(im for im in kather_tiles(kather_dir, 1) if im.std() > 20)[:tile_px, :tile_px]
    mod = ReinhardStandardize((56.0, 22.0, -7.5), (14.0, 6.9, 5.2), MEAN, STD)
    x = to_normalised([np.tile(tile, (3, 3, 1))])
    out = mod.forward_local(x, tile_px, block_px)
    ref = mod(to_normalised([tile])).repeat(1, 1, 3, 3)
    k = tile_px // block_px  # odd: the window is the tile
    # pixels whose interpolated gains come from blocks with whole windows
    a, b = (k // 2 + 1) * block_px, (3 * k - k // 2 - 1) * block_px
    assert b - a >= tile_px
    inner = (slice(None), slice(None), slice(a, b), slice(a, b))
    assert (out - x)[inner].abs().mean() > 0.1
    assert (out - ref)[inner].abs().max() < 2e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
def test_accelerator_path_equals_the_cpu_path(kather_dir: Path) -> None:
    """On an accelerator the standardisation runs in one piece (no cache-sized strips) with its window
    moments in float64 on the device: the same result as the CPU's strips, per tile and sliding."""
    region = mosaic(kather_dir, 144, 2, 4)
    region[:24, :24] = 0
    mod = ReinhardStandardize((56.0, 22.0, -7.5), (14.0, 6.9, 5.2), MEAN, STD)
    x = to_normalised([region])
    gpu = mod.to("cuda")
    cpu_local = ReinhardStandardize((56.0, 22.0, -7.5), (14.0, 6.9, 5.2), MEAN, STD).forward_local(x, 148, 8)
    assert (gpu.forward_local(x.cuda(), 148, 8).cpu() - cpu_local).abs().max() < 1e-4
    pixels = torch.from_numpy(region)[None]
    assert (gpu.forward_local_pixels(pixels.cuda(), 148, 8).cpu() - cpu_local).abs().max() < 1e-4
    tiles = to_normalised(kather_tiles(kather_dir, 1))
    cpu_tiles = ReinhardStandardize((56.0, 22.0, -7.5), (14.0, 6.9, 5.2), MEAN, STD)(tiles)
    assert (gpu(tiles.cuda()).cpu() - cpu_tiles).abs().max() < 1e-4
