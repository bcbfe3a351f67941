"""Tile sources for SSL training (image folders, RUN folders, split subsets) and the pathology augmentations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipeline.ssl import augment as A
from wsi_pipeline.ssl.data import RunTiles, open_tile_source
from wsi_pipeline.tiles.folders import load_labelled_folder, read_rgb
from wsi_pipeline.tiles.split import source_split


def test_train_and_test_subsets_are_the_two_sides_of_the_source_split(kather_dir: Path) -> None:
    tiles = load_labelled_folder(kather_dir)
    is_test, _ = source_split(tiles, 0.3, seed=0)
    train = open_tile_source(kather_dir, 0.495, subset="train", split_seed=0)
    test = open_tile_source(kather_dir, 0.495, subset="test", split_seed=0)
    assert len(train) + len(test) == len(tiles) and len(test) == int(is_test.sum())
    assert not set(train.paths) & set(test.paths)
    assert set(test.paths) == {p for p, t in zip(tiles.paths, is_test, strict=True) if t}


def test_hed_matches_skimage_and_jitter_keeps_range(kather_dir: Path) -> None:
    from skimage.color import hed2rgb, rgb2hed

    img = read_rgb(next(iter(sorted((kather_dir / "01_TUMOR").iterdir()))))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255.0
    hed = A.rgb_to_hed(x)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(hed, rgb2hed(img / 255.0), atol=1e-6)
    back = A.hed_to_rgb(A.rgb_to_hed(x))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, hed2rgb(rgb2hed(img / 255.0)), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    y = A.hed_jitter(x.float().repeat(4, 1, 1, 1), g, 0.1, 0.02)
    assert y.shape == (4, 3, 150, 150) and y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(y[0], y[1])  # per-image jitter


def test_multi_crop_scale_shapes_and_determinism() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (150, 150, 3), dtype=np.uint8) for _ in range(5)]
    cfg = A.AugmentConfig(global_size=64, local_size=24, n_local=3, mpp=0.5)
    v1 = A.multi_crop(images, 0.25, cfg, torch.Generator().manual_seed(3))
    v2 = A.multi_crop(images, 0.25, cfg, torch.Generator().manual_seed(3))
    assert [tuple(v.shape) for v in v1] == [(5, 3, 64, 64)] * 2 + [(5, 3, 24, 24)] * 3
    assert all(torch.equal(a, b) for a, b in zip(v1, v2, strict=True))
    # physical scale: at 0.25 µm/px source and 0.5 µm/px training, a 64-px crop spans 128·z source px
    sizes = torch.tensor([[150.0, 150.0]] * 1000)
    boxes = A.crop_boxes(sizes, 64, 0.5 / 0.25, (0.8, 1.25), torch.Generator().manual_seed(0))
    side = boxes[:, 3] - boxes[:, 1]
    assert side.min() >= 128 * 0.8 - 1e-3 and side.max() <= 150 + 1e-3
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 150 + 1e-3).all()


def test_flip_rot_and_blur_are_per_image() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    y = A.flip_rot90(x, g)
    for a, b in zip(x, y, strict=True):  # each output is one of the 8 dihedral images of its input
        cands = [torch.rot90(t, k, (-2, -1)) for t in (a, a.flip(-1)) for k in range(4)]
        assert any(torch.equal(b, c) for c in cands)
    z = A.gaussian_blur(x, g, p=0.0, sigma_min=0.5, sigma_max=1.0)
    assert torch.allclose(z, x, atol=1e-6)  # p=0: identity
    z = A.gaussian_blur(x, g, p=1.0, sigma_min=1.0, sigma_max=1.0)
    assert z.std() < x.std()


def test_run_folder_source_reads_tiles_from_slides(cmu_svs: Path, tmp_path: Path) -> None:
    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.slide.open import open_slide
    from wsi_pipeline.tiling.stage import tile_slide

    layout = RunLayout(tmp_path / "RUN")
    tile_slide(cmu_svs, layout, TilingConfig(target_mpp=1.0, tile_size=64))
    src = open_tile_source(layout.root, subset="all", max_tiles_per_slide=20)
    assert isinstance(src, RunTiles) and src.mpp == 1.0 and len(src) == 20
    with open_slide(cmu_svs) as s:
        _, x, y = src.entries[3]
        np.testing.assert_array_equal(src.read(3), s.read_region_at_mpp((int(x), int(y)), 1.0, 64))
    from wsi_pipeline.ssl.config import SSLConfig
    from wsi_pipeline.ssl.trainer import run_ssl_train

    res = run_ssl_train(SSLConfig(
        data=str(layout.root), out=str(tmp_path / "enc"), arch="resnet10t", steps=2, batch_size=4, out_dim=32,
        hidden_dim=32, bottleneck_dim=16, augment=A.AugmentConfig(global_size=32, local_size=16, n_local=1, mpp=1.0),
        max_tiles_per_slide=20, threads=1, checkpoint_every=0,
    ))
    assert res.completed
    import json

    meta = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    assert meta["mpp"] == 1.0 and "tiles of 1 slides" in meta["training"]["data"]
    with pytest.raises(Exception, match="RUN folders"):
        open_tile_source(layout.root, subset="train")


def test_hue_rotation_keeps_luma_and_grayscale() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 5, 5) * 0.5 + 0.25  # away from the clipping range
    on = torch.ones(6, dtype=torch.bool)
    y = A.hue_rotate(x, g, 0.1, on)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close((y * luma).sum(1), (x * luma).sum(1), atol=1e-5, rtol=0)
    assert not torch.allclose(x, y)
    torch.testing.assert_close(A.hue_rotate(x, g, 0.0, on), x, atol=1e-6, rtol=0)
    z = A.random_grayscale(x, g, 1.0)
    assert torch.equal(z[:, 0], z[:, 1]) and torch.equal(z[:, 1], z[:, 2])


def test_run_folder_source_finds_slides_moved_since_tiling(cmu_svs: Path, tmp_path: Path) -> None:
    import shutil

    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.errors import SlideNotFoundError
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.tiling.stage import tile_slide

    (tmp_path / "old").mkdir()
    slide = shutil.copy(cmu_svs, tmp_path / "old" / "s.svs")
    layout = RunLayout(tmp_path / "RUN")
    tile_slide(slide, layout, TilingConfig(target_mpp=1.0, tile_size=64))
    shutil.move(tmp_path / "old", tmp_path / "new")
    with pytest.raises(SlideNotFoundError, match="pass --slide-dir FOLDER"):
        open_tile_source(layout.root, max_tiles_per_slide=4)
    src = open_tile_source(layout.root, max_tiles_per_slide=4, slide_dirs=[str(tmp_path / "new")])
    assert len(src) == 4 and src.read(0).shape == (64, 64, 3)
