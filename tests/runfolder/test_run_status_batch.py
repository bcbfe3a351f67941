"""RUN/slides.csv bookkeeping, crash-isolated batch workers and sharding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.formats import tables as F
from wsi_pipeline.runfolder.batch import Shard, map_isolated, parse_shard
from wsi_pipeline.runfolder.layout import RunLayout, safe_name
from wsi_pipeline.runfolder.status import SlideStatus, compact_status, failed, read_status, update_status


def test_status_upsert_and_no_churn(tmp_path: Path) -> None:
    p = tmp_path / "slides.csv"
    update_status(p, SlideStatus("a", "tile", n_tiles=3), SlideStatus("b", "tile", status="failed", error="boom"))
    update_status(p, SlideStatus("a", "extract", n_tiles=3))
    rows = read_status(p)  # the journal merged before any compaction
    assert [(r.slide_id, r.stage) for r in rows] == [("a", "extract"), ("a", "tile"), ("b", "tile")]
    assert [r.slide_id for r in failed(p)] == ["b"]
    assert compact_status(p).written and read_status(p) == rows == F.read_slides_csv(p)
    assert not list((tmp_path / "status").glob("*.jsonl")) + list((tmp_path / "status").glob("*.folding"))
    before = p.stat().st_mtime_ns
    update_status(p, SlideStatus("b", "tile", status="failed", error="boom", seconds=9.0))  # same failure again
    assert not compact_status(p).written and p.stat().st_mtime_ns == before
    update_status(p, SlideStatus("b", "tile", n_tiles=5))  # fixed
    assert not failed(p)


def test_status_rows_per_component(tmp_path: Path) -> None:
    """Two encoders extracting the same slide keep one row each (keyed by slide, stage and component)."""
    p = tmp_path / "slides.csv"
    update_status(p, SlideStatus("a", "extract", component="phikon", n_tiles=3))
    update_status(p, SlideStatus("a", "extract", component="uni", status="failed", error="WeightsError: x"))
    rows = {r.component: r for r in read_status(p) if r.stage == "extract"}
    assert set(rows) == {"phikon", "uni"} and rows["phikon"].status == "done" and rows["uni"].status == "failed"
    compact_status(p)
    assert p.read_text().splitlines()[0].startswith("slide_id,stage,component,")
    legacy = tmp_path / "legacy.csv"  # a slides.csv written before the component column existed still reads
    legacy.write_text("slide_id,stage,path,status,error,error_type,n_tiles,slide_mpp,seconds,updated\n"
                      "a,tile,/x.svs,done,,,3,0.5,1.0,2026-01-01T00:00:00\n")
    update_status(legacy, SlideStatus("a", "tile", n_tiles=4))
    assert [(r.stage, r.component, r.n_tiles) for r in read_status(legacy)] == [("tile", "", "4")]


def _work(x: int) -> int:
    if x == 2:
        raise ValueError("bad input 2")
    if x == 3:
        os._exit(11)  # a crashing codec: the worker dies without answering
    return x * 10


@pytest.mark.parametrize("workers", [0, 2])
def test_map_isolated_survives_errors_and_crashes(workers: int) -> None:
    items = [1, 2, 4] if workers == 0 else [1, 2, 3, 4]
    out = {o.item: o for o in map_isolated(_work, items, workers=workers)}
    assert out[1].ok and out[1].value == 10 and out[4].value == 40
    assert not out[2].ok and out[2].error_type == "ValueError" and "bad input 2" in out[2].error
    if workers:
        assert not out[3].ok and out[3].error_type == "WorkerCrash" and "exit code 11" in out[3].error


def test_parse_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert parse_shard(None) == Shard(0, 1)
    assert parse_shard("1/3") == Shard(1, 3)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parse_shard(None) == Shard(2, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_shard(None) == Shard(1, 2)  # torchrun wins over SLURM
    with pytest.raises(ConfigError):
        parse_shard("3/3")
    items = list(range(10))
    parts = [Shard(i, 3).select(items) for i in range(3)]
    assert sorted(x for part in parts for x in part) == items


def test_layout_paths_say_their_frame(tmp_path: Path) -> None:
    lay = RunLayout(tmp_path)
    assert lay.tiles_h5("S1") == tmp_path / "tiles" / "S1.h5"
    assert lay.features_h5("timm:vit_small_patch16_224", "S1") == tmp_path / "features" / "timm-vit_small_patch16_224" / "S1.h5"
    assert safe_name("hf-hub:owkin/phikon") == "hf-hub-owkin-phikon"
