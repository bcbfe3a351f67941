"""DINO pretraining on CPU with a tiny ViT on a few real Kather tiles: loss falls, exact resume, export →
registry, the CLI, and a 2-rank torchrun (gloo) run."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipeline.ssl.augment import AugmentConfig
from wsi_pipeline.ssl.config import SSLConfig

REPO = Path(__file__).resolve().parents[2]
# a 2-block ViT with 8-px patches: a "tiny ViT" that trains in seconds on 32-px crops
TINY_VIT = {"depth": 2, "patch_size": 8, "img_size": 32, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(scope="module")
def tiny_tiles(kather_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real Kather tiles per class (16 tiles, class sub-folders) in a temporary folder."""
    root = tmp_path_factory.mktemp("kather_tiny")
    for cdir in sorted(p for p in kather_dir.iterdir() if p.is_dir()):
        (root / cdir.name).mkdir()
        for f in sorted(cdir.iterdir())[:2]:
            shutil.copy(f, root / cdir.name / f.name)
    return root


def tiny_config(data: Path, out: Path, steps: int, **kw) -> SSLConfig:
    base = dict(
        data=str(data), out=str(out), arch="vit_tiny_patch16_224", timm_kwargs=dict(TINY_VIT), steps=steps,
        batch_size=8, out_dim=64, hidden_dim=64, bottleneck_dim=32, data_mpp=0.495,
        augment=AugmentConfig(global_size=32, local_size=16, n_local=2), lr=0.02, momentum_teacher=0.99,
        teacher_temp_start=0.04, teacher_temp=0.04, warmup_steps=2, checkpoint_every=0, threads=1, seed=0,
    )
    base.update(kw)
    return SSLConfig(**base)


def test_loss_falls_and_export_loads_through_registry(tiny_tiles: Path, tmp_path: Path) -> None:
    from wsi_pipeline.encoders.project import load_project_encoder
    from wsi_pipeline.encoders.registry import create_encoder
    from wsi_pipeline.ssl.trainer import run_ssl_train
    from wsi_pipeline.tiles.embed import embed_images

    out = tmp_path / "enc"
    res = run_ssl_train(tiny_config(tiny_tiles, out, steps=40))
    assert res.completed and res.steps_done == 40 and len(res.losses) == 40
    assert all(np.isfinite(res.losses)) and len(res.kl) == 40
    # DINO loss = teacher entropy + KL(teacher ‖ student). From identical init the centring first flattens
    # the teacher (entropy, hence the raw loss, rises); what the student learns is the KL part: it must fall.
    first, last = np.mean(res.kl[1:11]), np.mean(res.kl[-10:])
    assert last < 0.8 * first, f"DINO KL(teacher||student) did not fall: {first:.3f} -> {last:.3f}"
    assert (out / "encoder.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "train_log.csv").read_text().count("\n") == 41

    # the registry loads the exported teacher by path and gives the teacher's embeddings
    enc = create_encoder(str(out))
    assert enc.meta.arch == "vit_tiny_patch16_224" and enc.meta.embed_dim == 64 and enc.meta.mpp == 0.5
    ckpt = torch.load(res.checkpoint, map_location="cpu", weights_only=False)
    backbone, _ = load_project_encoder(out)
    teacher_bb = {k[len("backbone."):]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
    for k, v in backbone.state_dict().items():  # fp16 storage: equal to the teacher up to fp16 rounding
        torch.testing.assert_close(v, teacher_bb[k].to(torch.float16).float())
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    a = embed_images(enc, tiles, precision="fp32")
    x = enc.preprocess(torch.from_numpy(tiles))
    with torch.no_grad():
        b = backbone(x).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # and by bare name from the models directory
    os.environ["WSI_MODELS_DIR"] = str(tmp_path)
    try:
        assert create_encoder("enc").meta.name == "enc"
    finally:
        del os.environ["WSI_MODELS_DIR"]


def test_exact_resume_equals_straight_run(tiny_tiles: Path, tmp_path: Path) -> None:
    from wsi_pipeline.ssl.trainer import run_ssl_train

    n, k = 6, 3
    # the straight run also loads its batches in 2 worker processes: batches depend on (seed, step) only
    straight = run_ssl_train(tiny_config(tiny_tiles, tmp_path / "a", n, checkpoint_every=2, workers=2))
    part1 = run_ssl_train(tiny_config(tiny_tiles, tmp_path / "b", n, checkpoint_every=2, stop_at_step=k))
    assert not part1.completed and part1.steps_done == k
    part2 = run_ssl_train(tiny_config(tiny_tiles, tmp_path / "b", n, checkpoint_every=2, resume=True))
    assert part2.completed and len(part2.losses) == n - k
    assert part1.losses + part2.losses == straight.losses
    sa = torch.load(straight.checkpoint, map_location="cpu", weights_only=False)
    sb = torch.load(part2.checkpoint, map_location="cpu", weights_only=False)
    assert sa["step"] == sb["step"] == n
    for part in ("student", "teacher", "dino_loss"):
        for key, v in sa[part].items():
            assert torch.equal(v, sb[part][key]), f"{part}.{key} differs after resume"
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(ga[x], gb[x]) for x in ga)
    # a checkpoint made with another recipe is refused
    from wsi_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="different settings"):
        run_ssl_train(tiny_config(tiny_tiles, tmp_path / "b", n, resume=True, lr=0.5))


def test_ssl_train_cli_and_eval_encoder(tiny_tiles: Path, kather_dir: Path, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from wsi_pipeline.cli import build_app

    out = tmp_path / "cli_enc"
    runner = CliRunner()
    r = runner.invoke(build_app(), [
        "ssl-train", "--data", str(tiny_tiles), "--out", str(out), "--arch", "resnet10t", "--steps", "2",
        "--batch-size", "4", "--global-size", "48", "--local-size", "24", "--n-local", "2", "--mpp", "0.495",
        "--subset", "train", "--out-dim", "64", "--threads", "1", "--checkpoint-every", "1",
        "--zoom-min", "0.7", "--zoom-max", "1.4", "--warmup-steps", "1", "--teacher-temp-start", "0.05",
    ])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["arch"] == "resnet10t" and meta["mpp"] == 0.5 and meta["training"]["steps_done"] == 2
    cfg = meta["training"]["config"]
    assert (cfg["augment"]["zoom_min"], cfg["augment"]["zoom_max"]) == (0.7, 1.4)
    assert cfg["warmup_steps"] == 1 and cfg["teacher_temp_start"] == 0.05
    assert "train split" in meta["training"]["data"]

    js = tmp_path / "eval.json"
    r = runner.invoke(build_app(), ["eval-encoder", "--encoder", str(out), "--data", str(tiny_tiles), "--mpp", "0.495",
                                    "--json", str(js), "--device", "cpu", "-k", "3"])
    assert r.exit_code == 0, r.output
    rep = json.loads(js.read_text())
    for key in ("knn_balanced_accuracy", "linear_balanced_accuracy", "random_init_knn_balanced_accuracy",
                "random_init_linear_balanced_accuracy", "colour_histogram_knn_balanced_accuracy"):
        assert 0.0 <= rep[key] <= 1.0
    assert rep["tile_px_fed"] == [148]  # 150 px at 0.495 µm/px → 148 px at the encoder's 0.5 µm/px
    assert "random init" in r.output and "colour histogram" in r.output
    ci = rep["ci95_by_source_bootstrap"]
    assert ci["knn_balanced_accuracy"][0] <= rep["knn_balanced_accuracy"] <= ci["knn_balanced_accuracy"][1]
    assert len(ci["knn_gain_over_random_init"]) == 2 and "bootstrap over test source images" in r.output

    # model selection without the held-out tiles: a second split of the training side (6 tiles per class)
    inner_args = ["eval-encoder", "--encoder", str(out), "--mpp", "0.495", "--device", "cpu", "-k", "2",
                  "--no-random-init", "--inner-split-seed", "1"]
    r = runner.invoke(build_app(), [*inner_args, "--data", str(tiny_tiles)])  # 2 tiles per class: too few
    assert r.exit_code != 0 and "inner split of the training side left no training" in str(r.exception)
    six = tmp_path / "six"
    for cdir in sorted(p for p in kather_dir.iterdir() if p.is_dir()):
        (six / cdir.name).mkdir(parents=True)
        for f in sorted(cdir.iterdir())[:6]:
            shutil.copy(f, six / cdir.name / f.name)
    js_inner = tmp_path / "eval_inner.json"
    r = runner.invoke(build_app(), [*inner_args, "--data", str(six), "--json", str(js_inner)])
    assert r.exit_code == 0, r.output
    inner = json.loads(js_inner.read_text())
    assert inner["split"]["inner_split_seed"] == 1 and inner["split"]["held_out_tiles_unused"] > 0
    assert inner["split"]["held_out_tiles_unused"] + inner["n_train"] + inner["n_test"] == 48


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(tiny_tiles: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "wsi_pipeline", "ssl-train", "--data", str(tiny_tiles), "--out", str(out),
        "--arch", "vit_tiny_patch16_224", "--steps", "3", "--batch-size", "4", "--global-size", "32",
        "--local-size", "16", "--n-local", "2", "--mpp", "0.495", "--out-dim", "64", "--device", "cpu",
        "--checkpoint-every", "3", "--threads", "1",
    ]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "ssl-train done at step 3/3" in p.stdout
    from wsi_pipeline.encoders.registry import create_encoder

    enc = create_encoder(str(out))
    ckpt = torch.load(out / "checkpoints" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["batch_size"] == 4 and ckpt["step"] == 3
    assert enc.meta.name == "ddp"
    log = (out / "train_log.csv").read_text()
    assert "img_per_s" in log and log.count("\n") == 4


def test_device_augmentation_path_gives_the_same_views(tiny_tiles: Path, tmp_path: Path) -> None:
    """Workers that only read tiles + augmentation on the training device (the GPU path, here run with the
    CPU as the device) give exactly the views of the all-in-worker path: the random stream is the same."""
    from wsi_pipeline.ssl.data import open_tile_source
    from wsi_pipeline.ssl.trainer import MultiCropBatches, iterate_views

    cfg = tiny_config(tiny_tiles, tmp_path / "o", steps=3)
    source = open_tile_source(cfg.data, cfg.data_mpp, "all", 0, 0.3, None)
    batches = MultiCropBatches(source, cfg.augment, 4, seed=1)
    plain = list(iterate_views(batches, 0, 3, workers=0))
    on_device = list(iterate_views(batches, 0, 3, workers=2, augment_device=torch.device("cpu")))
    assert [s for s, _ in on_device] == [0, 1, 2]
    for (_, a), (_, b) in zip(plain, on_device, strict=True):
        assert len(a) == len(b) == 2 + cfg.augment.n_local
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b, strict=True))


def test_stain_norm_and_init_from_are_trained_exported_and_resumed(tiny_tiles: Path, tmp_path: Path) -> None:
    """--stain-norm fits its target on the training tiles (the same after a resume), runs in front of the
    student and teacher, and is exported with the encoder; --init-from starts from an encoder's weights."""
    import json

    from wsi_pipeline.encoders.project import build_backbone, save_project_encoder
    from wsi_pipeline.encoders.registry import create_encoder
    from wsi_pipeline.errors import WeightsError
    from wsi_pipeline.ssl.trainer import build_models, init_backbone_weights, run_ssl_train

    torch.manual_seed(123)
    start = build_backbone("vit_tiny_patch16_224", {**TINY_VIT, "dynamic_img_size": True})
    init = save_project_encoder(tmp_path / "init", start, {
        "name": "init", "arch": "vit_tiny_patch16_224", "timm_kwargs": {**TINY_VIT, "dynamic_img_size": True},
        "embed_dim": 64, "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "mpp": 0.5}, fp16=False)
    cfg = tiny_config(tiny_tiles, tmp_path / "a", 4, checkpoint_every=2, stain_norm="reinhard-lab",
                      stain_fit_tiles=8, init_from=str(init))
    student, teacher = build_models(cfg.resolved())
    for k, v in start.state_dict().items():
        assert torch.equal(student.backbone.state_dict()[k], v) and torch.equal(teacher.backbone.state_dict()[k], v)
    with pytest.raises(WeightsError, match="--arch"):
        init_backbone_weights(build_backbone("resnet10t"), str(init), "resnet10t")

    straight = run_ssl_train(cfg)
    part1 = run_ssl_train(tiny_config(tiny_tiles, tmp_path / "b", 4, checkpoint_every=2, stain_norm="reinhard-lab",
                                  stain_fit_tiles=8, init_from=str(init), stop_at_step=2))
    part2 = run_ssl_train(tiny_config(tiny_tiles, tmp_path / "b", 4, checkpoint_every=2, stain_norm="reinhard-lab",
                                  stain_fit_tiles=8, init_from=str(init), resume=True))
    assert part1.losses + part2.losses == straight.losses
    meta = json.loads((tmp_path / "a" / "encoder.json").read_text())
    assert meta["stain_norm"]["method"] == "reinhard-lab" and meta["stain_norm"]["fitted_on_tiles"] == 8
    assert meta["training"]["init_from"] == str(init)
    assert meta["stain_norm"] == json.loads((tmp_path / "b" / "encoder.json").read_text())["stain_norm"]
    enc = create_encoder(str(tmp_path / "a"))
    assert enc.stain is not None
    from wsi_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="stain-norm"):
        tiny_config(tiny_tiles, tmp_path / "c", 2, stain_norm="macenko").resolved()
    with pytest.raises(ConfigError, match="zoom-min"):
        dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, zoom_min=1.5)).resolved()
