"""Tile → encoder input: rescale to the encoder's µm/px only, then the one crop / reflect-pad rule."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.slide.base import resize_rgb
from wsi_pipeline.tiles.transform import (
    FIT_NATIVE,
    FIT_PAD,
    accepts_any_size,
    choose_fit,
    encoder_input,
    encoder_inputs,
    fit_tile,
    rescale_tile,
    scaled_size,
)

RNG = np.random.default_rng(0)


def _tile(h: int, w: int | None = None) -> np.ndarray:
    return RNG.integers(0, 255, (h, w or h, 3), dtype=np.uint8)


def test_scale_is_the_only_resize() -> None:
    # a kather tile (150 px @0.495) at 0.5 µm/px is 148 px
    assert scaled_size(150, 0.495, 0.5) == 148 and scaled_size(224, 0.25, 0.5) == 112
    assert scaled_size(1, 0.1, 10.0) == 1
    tile = _tile(150)
    assert rescale_tile(tile, 0.5, 0.5) is tile
    out = rescale_tile(tile, 0.495, 0.5)
    assert out.shape == (148, 148, 3)
    np.testing.assert_array_equal(out, resize_rgb(tile, (148, 148)))
    assert rescale_tile(_tile(100, 60), 1.0, 0.5).shape == (200, 120, 3)


def test_pad_reflects_around_the_untouched_tile() -> None:
    tile = _tile(148)
    padded = fit_tile(tile, 224, FIT_PAD)
    assert padded.shape == (224, 224, 3) and padded.flags.c_contiguous
    np.testing.assert_array_equal(padded[38:186, 38:186], tile)  # centre is the tile, pixel for pixel
    # reflect padding (no repeated edge row, no white): the 38 rows above mirror rows 1..38 of the tile
    np.testing.assert_array_equal(padded[:38, 38:186], tile[38:0:-1])
    np.testing.assert_array_equal(padded[38:186, 186:], tile[:, -2:-40:-1])
    white = np.full((1, 1, 3), 255, np.uint8)
    assert not np.all(fit_tile(np.zeros((100, 100, 3), np.uint8), 224, FIT_PAD) == white)


def test_pad_crops_larger_tiles_and_handles_each_axis() -> None:
    big = _tile(300)
    np.testing.assert_array_equal(fit_tile(big, 224, FIT_PAD), big[38:262, 38:262])
    wide = _tile(100, 300)
    out = fit_tile(wide, 224, FIT_PAD)
    assert out.shape == (224, 224, 3)
    # height 100 → 224 in two reflections (a reflection adds < 100 rows): 49 + 12 rows above the tile
    np.testing.assert_array_equal(out[61:161], wide[:, 38:262])


def test_pad_resizes_only_within_five_percent() -> None:
    near = _tile(220)
    np.testing.assert_array_equal(fit_tile(near, 224, FIT_PAD), resize_rgb(near, (224, 224)))
    exact = _tile(224)
    assert fit_tile(exact, 224, FIT_PAD) is exact
    far = _tile(212)  # 5.4 % off: padded, not stretched
    np.testing.assert_array_equal(fit_tile(far, 224, FIT_PAD)[6:218, 6:218], far)


def test_pad_repeats_reflection_for_tiny_tiles_and_refuses_one_pixel() -> None:
    tiny = _tile(10)
    out = fit_tile(tiny, 224, FIT_PAD)
    assert out.shape == (224, 224, 3)
    assert {tuple(p) for p in out.reshape(-1, 3)} <= {tuple(p) for p in tiny.reshape(-1, 3)}
    with pytest.raises(ConfigError, match="cannot be padded"):
        fit_tile(_tile(1, 50), 224, FIT_PAD)


def test_native_keeps_the_tile_and_refuses_tiny_ones() -> None:
    tile = _tile(148)
    assert fit_tile(tile, 224, FIT_NATIVE) is tile
    with pytest.raises(ConfigError, match="too small"):
        fit_tile(_tile(20), 224, FIT_NATIVE)
    with pytest.raises(ConfigError, match="unknown fit"):
        fit_tile(tile, 224, "stretch")


def test_fit_follows_what_the_encoder_accepts() -> None:
    import timm
    import torch

    from wsi_pipeline.encoders.base import Encoder
    from wsi_pipeline.encoders.registry import create_encoder

    torch.manual_seed(0)
    cnn = create_encoder("timm:resnet10t")
    vit = create_encoder("timm:vit_tiny_patch16_224")
    dyn = Encoder(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True),
                  vit.meta)
    assert [accepts_any_size(e) for e in (cnn, vit, dyn)] == [True, False, True]
    assert [choose_fit(e) for e in (cnn, vit, dyn)] == [FIT_NATIVE, FIT_PAD, FIT_NATIVE]
    tile = _tile(150)
    assert encoder_input(tile, 0.495, cnn).shape == (148, 148, 3)
    np.testing.assert_array_equal(encoder_input(tile, 0.495, vit),
                                  fit_tile(rescale_tile(tile, 0.495, 0.5), 224, FIT_PAD))
    # a recorded fit (classifier.json) overrides the encoder's own choice
    s = cnn.meta.input_size
    assert encoder_input(tile, 0.495, cnn, FIT_PAD).shape == (s, s, 3)
    assert [t.shape for t in encoder_inputs([tile, _tile(300)], 0.495, vit)] == [(224, 224, 3)] * 2
