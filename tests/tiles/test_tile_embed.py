"""The one embedding loop: shape grouping, normalisation, order, resize mode, image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipeline.encoders.registry import create_encoder
from wsi_pipeline.tiles.embed import embed_image_files, embed_images, embed_tiles, shape_batches
from wsi_pipeline.tiles.transform import FIT_NATIVE, FIT_PAD, encoder_inputs


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return create_encoder("timm:resnet10t")


def _tiles(sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (s, s, 3), dtype=np.uint8) for s in sizes]


def test_shape_batches_group_by_shape_in_order() -> None:
    tiles = _tiles([64, 80, 64, 64, 80, 96, 64])
    assert shape_batches(tiles, 2) == [[0, 2], [3, 6], [1, 4], [5]]
    assert sorted(i for b in shape_batches(tiles, 64) for i in b) == list(range(7))
    with pytest.raises(ValueError, match="batch size"):
        shape_batches(tiles, 0)


def test_grouping_by_shape_gives_the_features_of_one_by_one(cnn) -> None:
    tiles = _tiles([64, 80, 64, 64, 80, 96, 64])
    together = embed_tiles(cnn, tiles, batch_size=3, precision="fp32")
    alone = np.concatenate([embed_tiles(cnn, [t], precision="fp32") for t in tiles])
    assert together.shape == (7, cnn.embed_dim) and together.dtype == np.float32
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    assert not np.allclose(together[0], together[2])  # each row is its own tile, in the order given


def test_tiles_are_normalised_with_the_encoder_mean_and_std_at_their_own_size(cnn) -> None:
    tiles = _tiles([72, 72])
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(cnn.meta.mean).view(1, 3, 1, 1), torch.tensor(cnn.meta.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        ref = cnn.eval()((x - mean) / std).numpy()
    np.testing.assert_allclose(embed_tiles(cnn, tiles, precision="fp32"), ref, rtol=1e-4, atol=1e-5)
    resized = embed_tiles(cnn, tiles, precision="fp32", resize=True)  # at the encoder input: other features
    assert not np.allclose(resized, ref, atol=1e-3)
    bf16 = embed_tiles(cnn, tiles, precision="bf16")
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()


def test_embed_images_in_memory_tiles() -> None:
    enc = create_encoder("timm:vit_tiny_patch16_224")
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 255, (224, 224, 3), dtype=np.uint8) for _ in range(5)]
    a = embed_images(enc, tiles, batch_size=2, precision="fp32")
    b = embed_images(enc, np.stack(tiles), batch_size=5, precision="fp32")
    assert a.shape == (5, 192) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-4)
    c = embed_images(enc, [rng.integers(0, 255, (150, 150, 3), dtype=np.uint8)], precision="bf16")
    assert c.shape == (1, 192) and np.isfinite(c).all()


@pytest.mark.parametrize("fit", [FIT_NATIVE, FIT_PAD])
def test_image_files_are_embedded_at_the_encoder_scale(cnn, tmp_path: Path, fit: str) -> None:
    from PIL import Image

    tiles = _tiles([150, 150, 120, 150, 150], seed=1)
    paths = []
    for i, t in enumerate(tiles):
        paths.append(tmp_path / f"t{i}.png")
        Image.fromarray(t).save(paths[-1])
    seen: list[int] = []
    got = embed_image_files(cnn, paths, 0.495, fit, batch_size=2, precision="fp32", progress=seen.append)
    ref = embed_tiles(cnn, encoder_inputs(tiles, 0.495, cnn, fit), precision="fp32")
    assert seen == [2, 2, 1]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_image_files_with_their_own_scale_keep_their_order(cnn, tmp_path: Path) -> None:
    """One µm/px per file (e.g. magnified copies of training tiles): each file is brought to the encoder's scale
    from its own µm/px, and the rows come back in the order of the files, whatever order they are read in."""
    from PIL import Image

    from wsi_pipeline.tiles.transform import encoder_input

    tiles = _tiles([150, 150, 150, 150], seed=2)
    paths = []
    for i, t in enumerate(tiles):
        paths.append(tmp_path / f"m{i}.png")
        Image.fromarray(t).save(paths[-1])
    mpps = [0.55, 0.45, 0.495, 0.45]
    got = embed_image_files(cnn, paths, mpps, FIT_NATIVE, batch_size=2, precision="fp32")
    ref = np.concatenate([embed_tiles(cnn, [encoder_input(t, m, cnn, FIT_NATIVE)], precision="fp32")
                          for t, m in zip(tiles, mpps, strict=True)])
    assert {encoder_input(t, m, cnn, FIT_NATIVE).shape[0] for t, m in zip(tiles, mpps, strict=True)} == {165, 135, 148}
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
