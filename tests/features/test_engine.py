"""The extraction loop: batches that span slides, features independent of batch composition, the device
decode path through the engine (on the CPU), decode modes in the features and the resume key, the loop
breakdown, and the writer thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.features.config import ExtractConfig
from wsi_pipeline.features.dataset import SlideSource, pack_batches, read_order, split_segments
from wsi_pipeline.features.engine import STAT_KEYS, DecodePlan, run_jobs
from wsi_pipeline.features.extract import run_extract
from wsi_pipeline.features.job import SlideJob
from wsi_pipeline.features.reader import ReadSpec
from wsi_pipeline.features.writer import SlideWriter
from wsi_pipeline.formats import api as F
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.slide.open import open_slide

ENCODER = "timm:resnet18"


def _job(path: Path, n: int, sid: str, offset: int = 0, mpp: float | None = None) -> SlideJob:
    with open_slide(path, mpp=mpp) as s:
        mpp, (w, h) = s.mpp, s.dimensions
    step = round(224 * 0.5 / mpp)
    cols = max(1, (w - step) // step)
    xy = np.array([((i % cols) * step + offset, (i // cols) * step + offset) for i in range(n)], np.int64)[::-1]
    attrs = {F.A_TARGET_MPP: 0.5, F.A_SLIDE_MPP: mpp, F.A_TILE_SIZE: 224, F.A_PATCH_SIZE: 224,
             F.A_PATCH_SIZE_L0: step, F.A_SLIDE_PATH: str(path), F.A_LEVEL0_W: w, F.A_LEVEL0_H: h}
    return SlideJob(sid, str(path), F.TileSet(xy.copy(), attrs), Path("/dev/null"))


@pytest.fixture(scope="module")
def encoder():
    import torch

    from wsi_pipeline.encoders.registry import create_encoder

    torch.manual_seed(0)
    return create_encoder(ENCODER)


def _cfg(**kw: object) -> ExtractConfig:
    base = {"encoder": ENCODER, "batch_size": 8, "num_workers": 0, "device": "cpu", "precision": "bf16"}
    base.update(kw)
    return ExtractConfig(**base).validate()  # type: ignore[arg-type]


def _run(jobs: list[SlideJob], encoder, cfg: ExtractConfig, **kw: object) -> dict[str, np.ndarray]:
    import torch

    out = {}
    for job, feats, err in run_jobs(jobs, encoder, cfg, torch.device("cpu"), **kw):
        assert not err, err
        out[job.slide_id] = feats
    return out


def test_batches_span_slides_and_cover_every_tile_once() -> None:
    xs, ys = np.meshgrid(np.arange(7) * 224, np.arange(3) * 224)
    grid = np.stack([xs.ravel(), ys.ravel()], 1)  # 21 tiles
    sources = [SlideSource(f"s{i}", grid[: 21 - 5 * i], ReadSpec(0.5, 224, 0.5), 224) for i in range(3)]
    sources.append(SlideSource("other-size", grid[:4], ReadSpec(0.5, 256, 0.5), 256))
    items = pack_batches(sources, 8)
    sizes = [sum(len(p) for _, p in item) for item in items]
    assert all(s <= 8 for s in sizes) and sum(sizes) == 21 + 16 + 11 + 4
    assert any(len({si for si, _ in item}) > 1 for item in items)  # some batches hold two slides
    assert sizes[:-2] == [8] * (len(sizes) - 2)  # only the batch before the tile-size change and the last are short
    assert [si for si, _ in items[-1]] == [3]  # a tile size never shares a batch with another
    for si, src in enumerate(sources):  # each slide's tiles in read order, exactly once
        pos = np.concatenate([p for item in items for s, p in item if s == si])
        np.testing.assert_array_equal(pos, read_order(src.l0_xy, src.step_l0))
    assert sum(len(item) for item in items) == len(split_segments(items))


def test_features_do_not_depend_on_which_slides_share_a_batch(small_svs: Path, cmu_svs: Path, encoder) -> None:
    """A cohort runs as one stream of full batches; each slide's features are bit-identical to extracting it
    alone (resume after an interruption relies on it)."""
    jobs = [_job(small_svs, 11, "a"), _job(cmu_svs, 6, "b"), _job(small_svs, 5, "c", offset=40)]
    together = _run(jobs, encoder, _cfg())
    for j in jobs:
        alone = _run([_job(Path(j.slide_path), j.n_tiles, j.slide_id, 0 if j.slide_id != "c" else 40)], encoder, _cfg())
        np.testing.assert_array_equal(together[j.slide_id], alone[j.slide_id])


def test_device_decode_path_through_the_engine(cmu_svs: Path, small_svs: Path, tcga_svs: Path, encoder) -> None:
    """decode=gpu's loop (compressed tiles from a reader process, one batched decode, tiles cut on the device)
    run on the CPU: the features of cpu-full, in tiles-file order; a JPEG 2000 slide in the same batches is
    read as pixels by its reader."""
    jobs = [_job(cmu_svs, 9, "cmu"), _job(small_svs, 7, "blob"), _job(tcga_svs, 3, "j2k", mpp=0.25)]
    stats: dict = {}
    dev = _run(jobs, encoder, _cfg(num_workers=1, precision="fp32"), decode=DecodePlan("gpu"), stats=stats)
    full = _run(jobs, encoder, _cfg(num_workers=1, precision="fp32", decode="cpu-full"))
    for sid in full:
        a, b = dev[sid], full[sid]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > 0.9999, sid
    assert stats["decode"] == "gpu" and stats["decode_s"] > 0 and stats["tiles"] == 19
    assert set(STAT_KEYS) <= set(stats) and stats["loop_s"] >= stats["wait_s"]


def test_rgb_coded_slides_fall_back_to_cpu_scaled_readers(cmu_svs: Path, small_svs: Path, encoder) -> None:
    """decode=gpu on a device that decodes RGB-coded (Aperio) tiles wrongly: those slides are decoded by the
    readers as cpu-scaled (not cpu-full), YCbCr-coded slides still go to the device path."""
    import tifffile

    with tifffile.TiffFile(str(cmu_svs)) as a, tifffile.TiffFile(str(small_svs)) as b:
        assert int(a.pages[0].photometric) == 2 and int(b.pages[0].photometric) == 6  # RGB-coded, YCbCr
    jobs = [_job(cmu_svs, 9, "cmu", mpp=0.25), _job(small_svs, 7, "blob")]  # CMU-1 read at 1/2 scale
    plan = DecodePlan("gpu", gpu_rgb=False)
    stats: dict = {}
    got = _run(jobs, encoder, _cfg(num_workers=1, precision="fp32"), decode=plan, stats=stats)
    scaled = _run(jobs, encoder, _cfg(num_workers=1, precision="fp32", decode="cpu-scaled"))
    full = _run(jobs, encoder, _cfg(num_workers=1, precision="fp32", decode="cpu-full"))
    np.testing.assert_array_equal(got["cmu"], scaled["cmu"])
    assert np.abs(got["cmu"] - full["cmu"]).max() > 0  # not the full decode
    cos = (got["blob"] * full["blob"]).sum(1) / np.linalg.norm(got["blob"], axis=1) / np.linalg.norm(full["blob"], axis=1)
    assert cos.min() > 0.9999  # the device path (run on the CPU): cpu-full's pixels
    assert stats["decode"] == plan.key == "gpu/rgb-on-cpu-scaled" and stats["decode_s"] > 0


def test_float16_output_matches_the_stored_rounding(small_svs: Path, encoder) -> None:
    jobs = [_job(small_svs, 6, "a")]
    f32 = _run(jobs, encoder, _cfg())
    f16 = _run(jobs, encoder, _cfg(), out_dtype=np.float16)
    assert f16["a"].dtype == np.float16
    np.testing.assert_array_equal(f16["a"], f32["a"].astype(np.float16))


def test_decode_mode_is_recorded_and_is_part_of_the_resume_key(tmp_path: Path, small_svs: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    layout = RunLayout(tmp_path / "RUN")
    job = _job(small_svs, 6, "blob")
    F.write_tiles_h5(layout.tiles_h5("blob"), job.tiles.l0_xy, {**job.tiles.attrs, F.A_SLIDE_ID: "blob"})
    first = run_extract(layout.root, _cfg())
    assert first.done == ["blob"]
    assert F.read_features_h5(layout.features_h5(ENCODER, "blob")).attrs["decode"] == "cpu-scaled"
    assert {"wait_s", "compute_s", "loop_s", "writer_busy_s"} <= set(first.figures["stats"])
    with caplog.at_level("WARNING"):  # no GPU: gpu falls back to cpu-scaled, which is already extracted
        assert run_extract(layout.root, _cfg(decode="gpu")).skipped == ["blob"]
    assert "--decode gpu" in caplog.text
    again = run_extract(layout.root, _cfg(decode="cpu-full"))
    assert again.done == ["blob"]
    assert F.read_features_h5(layout.features_h5(ENCODER, "blob")).attrs["decode"] == "cpu-full"


def test_writer_runs_in_order_off_the_calling_thread_and_bounds_its_queue() -> None:
    seen: list[tuple[int, str]] = []
    gate = threading.Event()

    def handle(i: int) -> None:
        gate.wait(5)
        seen.append((i, threading.current_thread().name))

    with SlideWriter(handle, depth=2) as w:
        w.put(0)  # taken by the thread, which waits at the gate
        time.sleep(0.05)
        w.put(1)
        w.put(2)  # the queue (depth 2) is now full
        t = time.perf_counter()
        threading.Timer(0.2, gate.set).start()
        w.put(3)  # blocks until the thread makes room
        assert time.perf_counter() - t > 0.1
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert {name for _, name in seen} == {"features-writer"}


def test_writer_errors_reach_the_caller() -> None:
    def handle(i: int) -> None:
        if i == 1:
            raise OSError("disk full")

    w = SlideWriter(handle)
    w.put(0)
    w.put(1)
    with pytest.raises(OSError, match="disk full"):
        w.close()
