"""Decode modes: standalone JPEG streams from TIFF tiles, DCT-scaled CPU decoding, the device decode path
(run here on the CPU through torchvision's libjpeg-turbo decoder, the code nvJPEG runs on a GPU), and the
fidelity of each mode against the reference (full decode + area resize)."""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.features.config import ExtractConfig
from wsi_pipeline.features.decode import (
    ADOBE_RGB,
    decode_cpu,
    jpeg_subsampling,
    resolve_decode_mode,
    simplejpeg_module,
    standalone_jpeg,
)
from wsi_pipeline.features.engine import DecodePlan, resolve_decode
from wsi_pipeline.features.gpu_decode import (
    assemble_tiles,
    decode_streams,
    probe_gpu_decoding,
    resize_regions,
)
from wsi_pipeline.features.reader import JpegTiffReader, ReadSpec, open_tile_reader
from wsi_pipeline.slide.open import open_slide

CPU = torch.device("cpu")


def _raw_tiles(path: Path, n: int = 6) -> tuple[list[bytes], bytes | None, bool, tuple[int, int]]:
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        page = tif.pages[0]
        tables, raw = page.jpegtables, int(page.photometric) == 2
        size = (int(page.tilewidth), int(page.tilelength))
        pairs = [(o, c) for o, c in zip(page.dataoffsets, page.databytecounts, strict=True) if c > 1000][:n]
    with open(path, "rb") as fh:
        streams = []
        for o, c in pairs:
            fh.seek(o)
            streams.append(fh.read(c))
    return streams, tables, raw, size


@pytest.fixture(scope="module")
def fine_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small bench-style slide (synthetic tissue, Aperio flavour) at 0.25 µm/px: 0.5 µm/px tiles decode at
    half scale in the DCT."""
    from wsi_pipeline.synth.bench import BenchSlideParams, make_bench_slide

    params = BenchSlideParams(size=(3072, 2304), downsamples=(1, 4), n_blobs=1, tissue_coverage=(0.6, 0.8))
    return make_bench_slide(tmp_path_factory.mktemp("fine") / "fine.svs", params)


def test_spliced_aperio_tiles_are_standalone_jpegs_equal_to_libtiff_decoding(cmu_svs: Path) -> None:
    """Aperio tiles are abbreviated (tables in JPEGTables) and RGB-coded: the spliced stream opens in Pillow
    on its own and decodes to imagecodecs' TIFF-style decode (tables given, no colour conversion)."""
    import imagecodecs
    from PIL import Image

    streams, tables, raw, size = _raw_tiles(cmu_svs)
    assert tables and raw
    for s in streams:
        with pytest.raises(OSError):  # abbreviated: no tables, not decodable alone
            Image.open(io.BytesIO(s)).load()
        jpeg = standalone_jpeg(s, tables, raw_rgb=True)
        assert jpeg[:2] == b"\xff\xd8" and ADOBE_RGB in jpeg[:64]
        ref = imagecodecs.jpeg8_decode(s, tables=tables, colorspace=2, outcolorspace=2)
        got = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(decode_cpu(jpeg, 1, size, simplejpeg_module()), ref)
        assert jpeg_subsampling(jpeg) == (1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="SOI"):
        standalone_jpeg(b"\x00\x01" + streams[0][2:], tables)


def test_an_adobe_ycbcr_marker_is_overridden_for_rgb_tiles(cmu_svs: Path) -> None:
    streams, tables, _, _ = _raw_tiles(cmu_svs, 1)
    ycc = b"\xff\xd8" + ADOBE_RGB[:-1] + b"\x01" + streams[0][2:]  # says "YCbCr" although the TIFF says RGB
    a = standalone_jpeg(ycc, tables, raw_rgb=True)
    b = standalone_jpeg(streams[0], tables, raw_rgb=True)
    assert a.count(b"Adobe") == 1
    np.testing.assert_array_equal(decode_cpu(a, 1, (240, 240)), decode_cpu(b, 1, (240, 240)))


@pytest.mark.parametrize("reduce", [1, 2, 4, 8])
def test_scaled_decoding_is_libjpeg_dct_scaling_by_either_backend(cmu_svs: Path, reduce: int) -> None:
    """simplejpeg and Pillow's draft run the same libjpeg-turbo scaled IDCT: identical pixels."""
    from PIL import Image

    streams, tables, raw, size = _raw_tiles(cmu_svs, 3)
    sj = simplejpeg_module()
    for s in streams:
        jpeg = standalone_jpeg(s, tables, raw)
        fast = decode_cpu(jpeg, reduce, size, sj)
        assert fast.shape == (size[1] // reduce, size[0] // reduce, 3)
        np.testing.assert_array_equal(fast, decode_cpu(jpeg, reduce, size, None))
        im = Image.open(io.BytesIO(tables[:-2] + s[2:]))  # the previous reader: draft in "YCbCr" = raw components
        im.draft("YCbCr", (size[0] // reduce, size[1] // reduce))
        np.testing.assert_array_equal(fast, np.asarray(im))


def test_decode_modes_resolve_and_validate(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_decode_mode("auto", CPU) == "cpu-scaled"
    # auto never picks the device path, which measured slower on an H200 (module doc); gpu is opt-in
    assert resolve_decode_mode("auto", torch.device("cuda")) == "cpu-scaled"
    assert resolve_decode("auto", torch.device("cuda")) == DecodePlan("cpu-scaled")
    assert resolve_decode_mode("cpu-full", CPU) == "cpu-full"
    with caplog.at_level(logging.WARNING):
        assert resolve_decode_mode("gpu", CPU) == "cpu-scaled"
    assert "--decode gpu" in caplog.text and "not on a CUDA device" in caplog.text
    with pytest.raises(ConfigError, match="--decode 'fast'"):
        ExtractConfig(decode="fast").validate()
    assert ExtractConfig(reduced_decode=False).validate().decode == "cpu-full"
    assert ExtractConfig().validate().decode == "auto"


def test_device_decoding_probe_sees_both_flavours_right_on_libjpeg() -> None:
    mad = probe_gpu_decoding(CPU)
    assert set(mad) == {"ycbcr", "rgb"} and max(mad.values()) < 0.5


def test_device_decoding_probe_catches_a_decoder_that_ignores_the_rgb_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder that converts RGB-coded tiles as YCbCr is off by tens of levels: the probe says so."""
    from wsi_pipeline.features import gpu_decode

    real = gpu_decode.decode_streams

    def converts_everything(data: torch.Tensor, offsets: np.ndarray, device: torch.device) -> list[torch.Tensor]:
        jpeg = bytes(data.numpy()).replace(ADOBE_RGB, b"")  # what a decoder blind to APP14 sees
        return real(torch.from_numpy(np.frombuffer(bytearray(jpeg), np.uint8)), [0, len(jpeg)], device)

    monkeypatch.setattr(gpu_decode, "decode_streams", converts_everything)
    mad = probe_gpu_decoding(CPU)
    assert mad["ycbcr"] < 0.5 and mad["rgb"] > 10


@pytest.mark.parametrize("s, size", [(448, 224), (443, 224), (672, 224), (200, 224), (224, 224)])
def test_device_resize_is_pillows_resize(s: int, size: int) -> None:
    from wsi_pipeline.slide.base import resize_rgb

    rng = np.random.default_rng(s)
    img = np.clip(rng.normal(150, 50, (2, s, s, 3)), 0, 255).astype(np.uint8)
    got = resize_regions(torch.from_numpy(img), size).numpy()
    ref = np.stack([resize_rgb(im, (size, size)) for im in img])
    assert got.shape == ref.shape == (2, size, size, 3)
    diff = np.abs(got.astype(int) - ref)  # float vs Pillow's fixed point: rare rounding flips, per pass
    assert diff.max() <= 2 and diff.mean() < 0.05


def _random_corners(path: Path, target_mpp: float, n: int, seed: int = 3) -> tuple[np.ndarray, ReadSpec]:
    with open_slide(path) as s:
        spec = ReadSpec(target_mpp, 224, s.mpp)
        w, h = s.dimensions
    step = round(224 * target_mpp / spec.slide_mpp)
    rng = np.random.default_rng(seed)
    xy = np.stack([rng.integers(-step // 3, w - step // 2, n), rng.integers(-step // 3, h - step // 2, n)], 1)
    return xy, spec


@pytest.mark.parametrize("which, target_mpp", [("cmu", 0.5), ("cmu", 1.0), ("generic", 1.0), ("fine", 0.5)])
def test_device_path_cuts_the_reference_pixels(cmu_svs: Path, generic_tiff: Path, fine_slide: Path, which: str,
                                               target_mpp: float) -> None:
    """Compressed tiles → one batched decode → gathered, shifted (generic TIFF levels sit at fractional
    positions), resized output tiles: the full-decode reader's pixels, at most 1 level off (rounding)."""
    path = {"cmu": cmu_svs, "generic": generic_tiff, "fine": fine_slide}[which]
    xy, spec = _random_corners(path, target_mpp, 20)
    with open_tile_reader(path, spec, decode="gpu") as r:
        assert isinstance(r, JpegTiffReader)
        jb = r.jpeg_batch(xy)
        fallback = r.read_many(xy)  # slides the device does not decode right: the readers decode them
    with open_tile_reader(path, spec, decode="cpu-full") as r:
        ref = r.read_many(xy)
    with open_tile_reader(path, spec, decode="cpu-scaled") as r:
        np.testing.assert_array_equal(fallback, r.read_many(xy))
    assert len(jb) == len(xy) and jb.n_streams <= jb.table.size
    decoded = decode_streams(torch.from_numpy(jb.data), jb.offsets, CPU)
    got = assemble_tiles(decoded, dataclasses.asdict(jb), CPU).numpy()
    assert got.shape == ref.shape
    diff = np.abs(got.astype(int) - ref)
    assert diff.max() <= 1 and diff.mean() < 1e-3


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("which", ["fine", "cmu"])
def test_scaled_decode_fidelity_against_the_reference(fine_slide: Path, cmu_svs: Path, which: str) -> None:
    """cpu-scaled (1/2 in the DCT) against cpu-full (full decode + box resize), on synthetic tissue at
    0.25 µm/px read at 0.5 and on real tissue (CMU-1, 0.499 µm/px, read at exactly twice that). Stated
    tolerance — mean absolute difference below 1 level per channel, worst tile below 2; features of a
    random-init ResNet-18 at cosine ≥ 0.999 (measured: ~0.6 and ~0.25 levels; cosine > 0.9999)."""
    from wsi_pipeline.encoders.registry import create_encoder
    from wsi_pipeline.tiles.embed import embed_images

    path = {"fine": fine_slide, "cmu": cmu_svs}[which]
    with open_slide(path) as s:
        target = 0.5 if which == "fine" else 2 * s.mpp
    xy, spec = _random_corners(path, target, 16, seed=5)
    xy = np.clip(xy, 0, None) // 2 * 2  # even level positions: every tile takes the DCT-scaled path
    with open_tile_reader(path, spec, decode="cpu-scaled") as r:
        assert r.reduce == 2
        scaled = r.read_many(xy)
    with open_tile_reader(path, spec, decode="cpu-full") as r:
        full = r.read_many(xy)
    mad = np.abs(scaled.astype(np.int16) - full).mean(axis=(0, 1, 2))
    worst = np.abs(scaled.astype(np.int16) - full).mean(axis=(1, 2, 3)).max()
    assert mad.shape == (3,) and mad.max() < 1.0 and worst < 2.0
    assert np.abs(scaled.astype(np.int16) - full).max() > 0  # a different decode, not the same pixels
    torch.manual_seed(0)
    enc = create_encoder("timm:resnet18")
    cos = _cosine(embed_images(enc, list(scaled), precision="fp32"), embed_images(enc, list(full), precision="fp32"))
    assert cos.min() >= 0.999
