"""`wsi extract`: features in tiles order, resume, isolation of a bad slide, a killed run resumed to the
same features, CLAM/TRIDENT coordinates, and 2-rank torchrun (gloo) sharding."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.features.config import ExtractConfig
from wsi_pipeline.features.extract import run_extract
from wsi_pipeline.formats import api as F
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.runfolder.status import read_status
from wsi_pipeline.slide.open import open_slide

ENCODER = "timm:resnet18"
REPO = Path(__file__).resolve().parents[2]


def _grid(path: Path, n: int, target_mpp: float = 0.5, tile: int = 224, offset: int = 0) -> tuple[np.ndarray, dict]:
    """``n`` tile corners on a regular grid around the slide centre, plus the tiling attributes."""
    with open_slide(path) as s:
        mpp, (w, h) = s.mpp, s.dimensions
    step = round(tile * target_mpp / mpp)
    cols = max(1, (w - step) // step)
    xy = [((i % cols) * step + offset, (i // cols) * step + offset) for i in range(n)]
    attrs = {F.A_TARGET_MPP: target_mpp, F.A_SLIDE_MPP: mpp, F.A_TILE_SIZE: tile, F.A_PATCH_SIZE: tile,
             F.A_PATCH_SIZE_L0: step, F.A_LEVEL0_W: w, F.A_LEVEL0_H: h, F.A_SLIDE_PATH: str(path)}
    return np.asarray(xy, dtype=np.int64), attrs


def _make_run(root: Path, slides: dict[str, tuple[Path, int]], target_mpp: float = 0.5) -> RunLayout:
    layout = RunLayout(root)
    for k, (sid, (path, n)) in enumerate(slides.items()):
        xy, attrs = _grid(path, n, target_mpp, offset=37 * k)
        F.write_tiles_h5(layout.tiles_h5(sid), xy[::-1].copy(), {**attrs, F.A_SLIDE_ID: sid})  # not raster order
    return layout


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = timm.create_model("resnet18", num_classes=0)
    path = tmp_path_factory.mktemp("w") / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def slides(small_svs: Path, cmu_svs: Path, generic_tiff: Path) -> dict[str, tuple[Path, int]]:
    return {"blob-a": (small_svs, 20), "cmu": (cmu_svs, 12), "generic": (generic_tiff, 12), "blob-b": (small_svs, 16)}


def _cfg(weights: Path, **kw: object) -> ExtractConfig:
    base = {"encoder": ENCODER, "weights": str(weights), "batch_size": 8, "num_workers": 1, "device": "cpu",
            "precision": "bf16"}
    base.update(kw)
    return ExtractConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, slides: dict, weights: Path) -> dict[str, np.ndarray]:
    """A clean single-process run: features per slide."""
    layout = _make_run(tmp_path_factory.mktemp("ref") / "RUN", slides)
    summary = run_extract(layout.root, _cfg(weights))
    assert summary.ok and sorted(summary.done) == sorted(slides)
    return {sid: F.read_features_h5(layout.features_h5(ENCODER, sid)).features for sid in slides}


def test_features_follow_tiles_order_and_match_the_encoder(tmp_path: Path, slides: dict, weights: Path) -> None:
    from wsi_pipeline.encoders.registry import create_encoder
    from wsi_pipeline.tiles.embed import embed_images

    sub = {k: slides[k] for k in ("cmu", "generic")}
    layout = _make_run(tmp_path / "RUN", sub)
    events: list = []
    summary = run_extract(layout.root, _cfg(weights, precision="fp32", dtype="float32", num_workers=0),
                          progress=events.append)
    assert summary.ok and summary.figures["tiles"] == 24
    start = events[0]  # the progress display counts tiles, and names them so
    assert (start.kind, start.units_total, start.unit) == ("start", 24, "tiles")
    assert sum(e.units for e in events if e.kind == "units") == 24
    enc = create_encoder(ENCODER, str(weights))
    for sid, (path, n) in sub.items():
        fs = F.read_features_h5(layout.features_h5(ENCODER, sid))
        tiles = F.read_tiles_h5(layout.tiles_h5(sid))
        assert fs.features.shape == (n, 512) and fs.features.dtype == np.float32
        np.testing.assert_array_equal(fs.l0_xy, tiles.l0_xy)
        a = fs.attrs
        assert a[F.A_ENCODER] == ENCODER and a[F.A_WEIGHTS_SHA256] == F.file_sha256(weights)
        assert a[F.A_TARGET_MPP] == 0.5 and a[F.A_TILE_SIZE] == 224 and a[F.A_FORMAT_VERSION] == F.FORMAT_VERSION
        assert a[F.A_PARAMS_HASH] and a[F.A_EMBED_DIM] == 512
        with open_slide(path) as s:  # the reference: OpenSlide pixels through the same encoder
            imgs = [s.read_region_at_mpp(tuple(int(v) for v in xy), 0.5, 224) for xy in tiles.l0_xy[:4]]
        ref = embed_images(enc, imgs, precision="fp32")
        cos = (ref * fs.features[:4]).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(fs.features[:4], axis=1)
        assert cos.min() > 0.999
    rows = {(r.slide_id, r.stage): r for r in read_status(layout.slides_csv)}
    assert rows[("cmu", "extract")].status == "done" and rows[("cmu", "extract")].n_tiles == "12"

    # resume: nothing recomputed; --force recomputes; another precision is another resume key
    mtime = layout.features_h5(ENCODER, "cmu").stat().st_mtime_ns
    again = run_extract(layout.root, _cfg(weights, precision="fp32", dtype="float32", num_workers=0))
    assert sorted(again.skipped) == ["cmu", "generic"] and not again.done
    assert layout.features_h5(ENCODER, "cmu").stat().st_mtime_ns == mtime
    forced = run_extract(layout.root, _cfg(weights, precision="fp32", dtype="float32", num_workers=0, force=True))
    assert sorted(forced.done) == ["cmu", "generic"]


def test_a_bad_slide_is_recorded_and_the_others_go_on(tmp_path: Path, small_svs: Path, weights: Path) -> None:
    broken = tmp_path / "broken.svs"
    data = small_svs.read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # truncated copy
    layout = _make_run(tmp_path / "RUN", {"good": (small_svs, 8)})
    xy, attrs = _grid(small_svs, 8)
    bottom = xy + np.array([0, attrs[F.A_LEVEL0_H] - 2 * attrs[F.A_PATCH_SIZE_L0]])  # tile data past the truncation
    F.write_tiles_h5(layout.tiles_h5("broken"), bottom, {**attrs, F.A_SLIDE_PATH: str(broken)})
    F.write_tiles_h5(layout.tiles_h5("gone"), xy, {**attrs, F.A_SLIDE_PATH: str(tmp_path / "gone.svs")})
    F.write_tiles_h5(layout.tiles_h5("no-tissue"), np.zeros((0, 2), np.int64), attrs)
    summary = run_extract(layout.root, _cfg(weights))
    assert sorted(summary.done) == ["good", "no-tissue"]
    assert F.read_features_h5(layout.features_h5(ENCODER, "no-tissue")).features.shape == (0, 512)
    assert sorted(o.slide_id for o in summary.failed) == ["broken", "gone"]
    rows = {r.slide_id: r for r in read_status(layout.slides_csv) if r.stage == "extract"}
    assert rows["good"].status == "done" and rows["broken"].status == "failed" and rows["gone"].status == "failed"
    assert "SlideNotFoundError" in rows["gone"].error_type and rows["broken"].error
    assert not layout.features_h5(ENCODER, "broken").exists()


def test_tiles_at_another_mpp_than_the_encoder_are_refused(tmp_path: Path, small_svs: Path, weights: Path) -> None:
    layout = _make_run(tmp_path / "RUN", {"blob": (small_svs, 4)}, target_mpp=1.0)
    with pytest.raises(ConfigError, match="allow-mpp-mismatch"):
        run_extract(layout.root, _cfg(weights))
    assert run_extract(layout.root, _cfg(weights, allow_mpp_mismatch=True)).done == ["blob"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "wsi_pipeline", "extract", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    return env


def test_killed_extraction_resumes_to_identical_features(tmp_path: Path, slides: dict, weights: Path,
                                                          reference: dict) -> None:
    layout = _make_run(tmp_path / "RUN", slides)
    args = _cli(str(layout.root), "--encoder", ENCODER, "--weights", str(weights), "--device", "cpu",
                "--batch-size", "8", "--num-workers", "1")
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    feats_dir = layout.features_dir(ENCODER)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if feats_dir.is_dir() and any(feats_dir.glob("*.h5")):
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session: the CLI and its reader process
        proc.wait()
    finished = sorted(p.stem for p in feats_dir.glob("*.h5"))
    assert 1 <= len(finished) < len(slides), "kill the run mid-way"
    for sid in finished:  # a file under its final name is always complete
        np.testing.assert_array_equal(F.read_features_h5(feats_dir / f"{sid}.h5").features, reference[sid])
    summary = run_extract(layout.root, _cfg(weights))
    assert sorted(summary.skipped) == finished and sorted(summary.done) == sorted(set(slides) - set(finished))
    assert not list(feats_dir.glob(".*.tmp"))  # leftovers of the killed run are gone
    for sid in slides:
        np.testing.assert_array_equal(F.read_features_h5(feats_dir / f"{sid}.h5").features, reference[sid])


def test_torchrun_two_gloo_ranks_split_the_slides(tmp_path: Path, slides: dict, weights: Path,
                                                  reference: dict) -> None:
    layout = _make_run(tmp_path / "RUN", slides)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "wsi_pipeline", "extract", str(layout.root), "--encoder", ENCODER, "--weights", str(weights),
           "--device", "cpu", "--batch-size", "8", "--num-workers", "1"]
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "all 2 ranks: extracted 4 slides" in " ".join((res.stdout + res.stderr).split())  # rich wraps
    rows = [r for r in read_status(layout.slides_csv) if r.stage == "extract"]
    assert sorted(r.slide_id for r in rows) == sorted(slides) and all(r.status == "done" for r in rows)
    for sid in slides:
        got = F.read_features_h5(layout.features_h5(ENCODER, sid)).features
        np.testing.assert_allclose(got.astype(np.float32), reference[sid].astype(np.float32), rtol=2e-2, atol=2e-2)


def test_clam_and_trident_coordinates(tmp_path: Path, cmu_svs: Path, generic_tiff: Path, weights: Path) -> None:
    """`--coords-dir` takes CLAM (patch_level/downsample) and TRIDENT (magnifications) coordinate files."""
    import h5py
    from typer.testing import CliRunner

    from wsi_pipeline.cli import build_app

    coords = tmp_path / "coords" / "patches"
    coords.mkdir(parents=True)
    xy = np.array([[0, 0], [224, 224], [448, 0], [1000, 1500]], dtype=np.int64)
    with h5py.File(coords / "CMU-1-Small-Region.h5", "w") as f:  # CLAM
        d = f.create_dataset("coords", data=xy)
        d.attrs.update({"patch_size": 224, "patch_level": 0, "downsample": [1.0, 1.0], "level_dim": [2220, 2967],
                        "name": "CMU-1-Small-Region", "save_path": "x"})
    with h5py.File(coords / "CMU-1-Small-Region_pyramid_generic_patches.h5", "w") as f:  # TRIDENT
        d = f.create_dataset("coords", data=xy)
        d.attrs.update({"patch_size": 224, "patch_size_level0": 224, "target_magnification": 20,
                        "level0_magnification": 20.04, "overlap": 0, "name": "CMU-1-Small-Region_pyramid_generic"})
    slides_dir = tmp_path / "slides"
    slides_dir.mkdir()
    for p in (cmu_svs, generic_tiff):
        (slides_dir / p.name).symlink_to(p)
    out = tmp_path / "RUN"
    res = CliRunner().invoke(build_app(), [
        "extract", str(out), "--coords-dir", str(tmp_path / "coords"), "--slides-dir", str(slides_dir),
        "--encoder", ENCODER, "--weights", str(weights), "--device", "cpu", "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    layout = RunLayout(out)
    for sid in ("CMU-1-Small-Region", "CMU-1-Small-Region_pyramid_generic"):
        fs = F.read_features_h5(layout.features_h5(ENCODER, sid))
        assert fs.features.shape == (4, 512)
        np.testing.assert_array_equal(fs.l0_xy, xy)
        assert fs.attrs[F.A_TARGET_MPP] == pytest.approx(0.5, abs=0.01)
    assert (out / "configs" / "extract.yaml").exists()


def test_encoders_command_lists_presets() -> None:
    from typer.testing import CliRunner

    from wsi_pipeline.cli import build_app

    res = CliRunner().invoke(build_app(), ["encoders", "--json"])
    assert res.exit_code == 0
    assert {"uni", "virchow2", "resnet50-trunc"} <= {m["name"] for m in __import__("json").loads(res.output)}


def test_extract_slide_features_in_memory(small_svs: Path, weights: Path) -> None:
    from wsi_pipeline.encoders.registry import create_encoder
    from wsi_pipeline.features.extract import extract_slide_features
    from wsi_pipeline.features.reader import ReadSpec

    xy, attrs = _grid(small_svs, 5)
    enc = create_encoder(ENCODER, str(weights))
    feats = extract_slide_features(small_svs, xy, ReadSpec(0.5, 224, attrs[F.A_SLIDE_MPP]), enc,
                                   ExtractConfig(num_workers=0, precision="fp32"), device="cpu")
    assert feats.shape == (5, 512) and feats.dtype == np.float32



def test_a_reader_process_crash_fails_only_its_slide(tmp_path: Path, slides: dict, weights: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader process killed by one slide (think: a segfault in a codec) fails that slide alone."""
    from wsi_pipeline.features import dataset as D

    real_getitem = D.SlideBatchDataset.__getitem__

    def dies_on_generic(self, i):  # items are batches of (slide, positions) segments
        if any("generic" in self.sources[si].slide_path for si, _ in self.items[i]):
            os._exit(3)
        return real_getitem(self, i)

    monkeypatch.setattr(D.SlideBatchDataset, "__getitem__", dies_on_generic)
    layout = _make_run(tmp_path / "RUN", slides)
    summary = run_extract(layout.root, _cfg(weights, prefetch_factor=2))
    (failed,) = summary.failed  # the type once, not repeated in the message
    assert failed.slide_id == "generic" and failed.error_type == "WorkerCrash"
    assert failed.error.startswith("the reader process died reading this slide")
    assert sorted(summary.done) == ["blob-a", "blob-b", "cmu"]


def test_sigchld_suppression_is_scoped_to_our_loaders() -> None:
    """Extraction keeps torch's SIGCHLD handler off only while its own workers start; other DataLoaders of
    the process get torch's usual behaviour afterwards."""
    from torch.utils.data._utils import signal_handling

    from wsi_pipeline.features.engine import _no_async_worker_errors

    if not hasattr(signal_handling, "_SIGCHLD_handler_set"):
        pytest.skip("this torch has no _SIGCHLD_handler_set flag")
    before = signal_handling._SIGCHLD_handler_set
    with _no_async_worker_errors():
        assert signal_handling._SIGCHLD_handler_set is True
    assert signal_handling._SIGCHLD_handler_set == before


def test_changed_stain_spec_with_same_weights_re_extracts(tmp_path: Path, small_svs: Path) -> None:
    """The resume key holds what the encoder does besides its weights: editing the stain standardisation
    in encoder.json (same model.safetensors) must not reuse the old features."""
    import json

    import torch

    from wsi_pipeline.encoders.project import build_backbone, save_project_encoder

    torch.manual_seed(0)
    meta = {"name": "tiny", "arch": "resnet10t", "embed_dim": 512, "input_size": 224,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "mpp": 0.5}
    folder = save_project_encoder(tmp_path / "tiny", build_backbone("resnet10t"), meta)
    layout = _make_run(tmp_path / "RUN", {"blob": (small_svs, 6)})
    cfg = ExtractConfig(encoder=str(folder), batch_size=8, num_workers=1, device="cpu", precision="bf16")
    first = run_extract(layout.root, cfg)
    assert first.done == ["blob"]
    assert run_extract(layout.root, cfg).skipped == ["blob"]  # nothing changed: resumed
    spec = {"method": "reinhard-lab", "target_mean": [56.0, 22.0, -7.5], "target_std": [14.0, 6.9, 5.2],
            "max_gain": 4.0}
    path = folder / "encoder.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "stain_norm": spec}))
    again = run_extract(layout.root, cfg)
    assert again.done == ["blob"] and not again.skipped
