"""`wsi tile` end to end: outputs, h5 attrs, batch isolation, resume, shards, kill-and-rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.config import TilingConfig
from wsi_pipeline.formats import api as F
from wsi_pipeline.runfolder.batch import Shard
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.runfolder.status import read_status
from wsi_pipeline.tiling.stage import run_tile, tile_slide, unique_slide_ids


def _wsi(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsi_pipeline", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_tile_generated_slide_outputs(small_svs: Path, tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    res = tile_slide(small_svs, layout, TilingConfig(target_mpp=1.0, tile_size=64, min_tissue=0.5))
    ts = F.read_tiles_h5(layout.tiles_h5("blob"))
    assert len(ts) == res.n_tiles > 20
    a = ts.attrs
    # CLAM / TRIDENT attribute names and ours
    assert a["patch_size"] == 64 and a["patch_size_level0"] == 128 and a["patch_level"] == 0
    assert (a["level0_width"], a["level0_height"]) == (2048, 1536)
    assert a["target_mpp"] == 1.0 and a["slide_mpp"] == pytest.approx(0.5)
    assert a["tile_size"] == 64 and a["overlap"] == 0 and a["min_tissue"] == 0.5
    assert a["format_version"] == F.FORMAT_VERSION and a["pipeline_version"]
    with h5py.File(layout.tiles_h5("blob")) as f:
        assert f["coords"].dtype == np.int64 and f["coords"].shape[1] == 2
        assert f["coords"].attrs["patch_size"] == 64  # CLAM reads attrs on the dataset
    # coordinates inside the tissue ellipse (centre 1024,768; radii 614,461)
    cx = (ts.l0_xy[:, 0] + 64 - 1024) / 614
    cy = (ts.l0_xy[:, 1] + 64 - 768) / 461
    assert (cx**2 + cy**2 <= 1.15).all()
    # count consistent with the mask: ellipse area / tile area, within 25%
    expected = np.pi * 614 * 461 / 128**2
    assert 0.75 * expected < len(ts) < 1.25 * expected
    for p in (layout.mask_png("blob"), layout.thumbnail_png("blob"), layout.grid_png("blob")):
        assert Image.open(p).size[0] > 0
    gj = json.loads(layout.tissue_geojson("blob").read_text())
    from wsi_pipeline.formats.geojson import validate_feature_collection

    assert validate_feature_collection(gj) == []
    assert len(gj["features"]) == 1
    area = gj["features"][0]["properties"]["measurements"]["area_um2"]
    assert area == pytest.approx(np.pi * 614 * 461 * 0.25, rel=0.1)


def test_real_slides_tile_counts(cmu_svs: Path, generic_tiff: Path, tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    a = tile_slide(cmu_svs, layout, TilingConfig())
    b = tile_slide(generic_tiff, layout, TilingConfig())
    assert a.n_tiles > 20 and abs(a.n_tiles - b.n_tiles) <= 3  # same pixels, two formats


def test_batch_isolates_failures_and_resumes(cmu_svs: Path, tcga_svs: Path, bad_dcm: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    r = _wsi("tile", str(cmu_svs), str(tcga_svs), str(bad_dcm), str(empty), "--out", str(out), "--workers", "2")
    assert r.returncode == 1, r.stderr
    rows = {x.slide_id: x for x in read_status(out / "slides.csv")}
    assert rows["CMU-1-Small-Region"].status == "done"
    assert rows["tcga-cr-7395-01a-01-ts1"].error_type == "MissingMPPError"
    assert "--slide-mpp" in rows["tcga-cr-7395-01a-01-ts1"].error
    assert rows["TCGA-XK-AAJU_nonconformant_sm"].error_type == "CorruptSlideError"
    assert rows["empty"].error_type == "CorruptSlideError" and "empty file" in rows["empty"].error
    assert (out / "config.yaml").exists()
    # the fallback MPP fixes the TCGA slide; the CMU slide is skipped (already done, its own MPP unchanged)
    r = _wsi("tile", str(cmu_svs), str(tcga_svs), "--out", str(out), "--slide-mpp", "0.25")
    assert r.returncode == 0, r.stderr
    assert "tiled 1, skipped (already done) 1" in r.stderr
    ts = F.read_tiles_h5(out / "tiles" / "tcga-cr-7395-01a-01-ts1.h5")
    assert ts.attrs["slide_mpp"] == 0.25 and ts.attrs["patch_size_level0"] == 448
    r = _wsi("tile", str(cmu_svs), "--out", str(out), "--min-tissue", "0.9")
    assert "tiled 1, skipped (already done) 0" in r.stderr  # parameters changed → redone


def test_info_cli(cmu_svs: Path, tcga_svs: Path) -> None:
    r = _wsi("info", str(cmu_svs), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["mpp"] == pytest.approx(0.499)
    r = _wsi("info", str(tcga_svs))  # shown: exit 0, the missing MPP is a warning naming the fix (issue 16)
    assert r.returncode == 0 and "warning:" in r.stderr and "--slide-mpp" in r.stderr
    r = _wsi("info", str(tcga_svs), "--slide-mpp", "0.25", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["mpp"] == 0.25


def test_slide_id_collisions_get_suffix(tmp_path: Path) -> None:
    ids = unique_slide_ids([tmp_path / "a" / "S1.svs", tmp_path / "b" / "S1.svs", tmp_path / "S2.ndpi",
                            tmp_path / "c" / "S1.tiff"])
    assert ids == ["S1", "S1-2", "S2", "S1-3"]


def test_shards_partition_the_batch(small_svs: Path, cmu_svs: Path, generic_tiff: Path, tmp_path: Path) -> None:
    paths = [small_svs, cmu_svs, generic_tiff]
    cfg = TilingConfig()
    done = []
    for i in range(2):
        layout = RunLayout(tmp_path / f"r{i}")
        s = run_tile(paths, layout.root, cfg, workers=0, shard=Shard(i, 2))
        done.append(set(s.done))
    assert done[0].isdisjoint(done[1]) and len(done[0] | done[1]) == 3


def test_kill_and_rerun_leaves_no_half_file(tmp_path: Path) -> None:
    from blob_images import blob_image as _blob_image

    from wsi_pipeline.synth.pyramid import array_painter, write_pyramid_tiff

    slides = tmp_path / "slides"
    for k in range(6):
        write_pyramid_tiff(slides / f"s{k}.svs", array_painter(_blob_image(3000, 2400, k)), (3000, 2400), mpp=0.25,
                           downsamples=(1, 4, 16))
    run = tmp_path / "run"
    args = [sys.executable, "-m", "wsi_pipeline", "tile", str(slides), "--out", str(run), "--workers", "1",
            "--target-mpp", "0.25", "--tile-size", "32", "--tissue-mpp", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "tiles").glob("*.h5")):
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted((run / "tiles").glob("*.h5"))
    assert 1 <= len(finished) < 6, "kill should land mid-batch"
    for f in finished:  # every file under its final name is complete and valid
        ts = F.read_tiles_h5(f)
        assert len(ts) > 0 and ts.attrs["params_hash"]
    for sub in ("tiles", "masks", "thumbnails", "tissue"):
        leftovers = [p for p in (run / sub).glob("*") if not p.name.startswith(".")] if (run / sub).exists() else []
        assert all(p.suffix in (".h5", ".png", ".geojson") for p in leftovers)
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"skipped (already done) {len(finished)}" in r.stderr
    clean = tmp_path / "clean"
    subprocess.run([*args[:6], str(clean), *args[7:]], check=True, capture_output=True, timeout=600)
    for k in range(6):
        a = F.read_tiles_h5(run / "tiles" / f"s{k}.h5").l0_xy
        b = F.read_tiles_h5(clean / "tiles" / f"s{k}.h5").l0_xy
        np.testing.assert_array_equal(a, b)


def test_a_target_finer_than_the_scan_is_warned(small_svs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """0.25 µm/px tiles from a 0.5-µm/px scan are upsampled 2×: tiled, with a warning naming both scales and the
    fix; 0.5 and coarser are not warned."""
    import logging

    with caplog.at_level(logging.WARNING, logger="wsi_pipeline.tiling.stage"):
        tile_slide(small_svs, RunLayout(tmp_path / "fine"), TilingConfig(target_mpp=0.25, tile_size=128))
        tile_slide(small_svs, RunLayout(tmp_path / "same"), TilingConfig(target_mpp=0.5, tile_size=128))
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "--target-mpp 0.25 is finer than the scan (0.5 µm/px" in msg and "upsampled 2.0×" in msg
    assert "at least 0.5" in msg
