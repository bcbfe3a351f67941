"""Extraction planning at cohort scale: each rank reads the status once and only its own slides' tiles files;
the shards partition the cohort, balanced on tile counts, the same on every rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_pipeline.errors import FormatError
from wsi_pipeline.features.config import ExtractConfig
from wsi_pipeline.features.extract import balanced_share, plan_jobs
from wsi_pipeline.features.job import SlideJob
from wsi_pipeline.formats import api as F
from wsi_pipeline.runfolder.batch import Shard
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.runfolder.status import SlideStatus, update_status

ATTRS = {F.A_TARGET_MPP: 0.5, F.A_SLIDE_MPP: 0.25, F.A_TILE_SIZE: 224, F.A_PATCH_SIZE_L0: 448,
         F.A_LEVEL0_W: 10_000, F.A_LEVEL0_H: 8_000}


def _run(root: Path, sizes: dict[str, int], rows: bool = True) -> RunLayout:
    """Tiles files naming ``root/attr/<sid>.svs`` and status rows naming ``root/status/<sid>.svs`` (empty files:
    planning checks that a slide exists, never reads it)."""
    layout = RunLayout(root)
    for d in ("attr", "status"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for sid, n in sizes.items():
        xy = np.stack([np.arange(n) * 448, np.zeros(n)], axis=1)
        for d in ("attr", "status"):
            (root / d / f"{sid}.svs").touch()
        F.write_tiles_h5(layout.tiles_h5(sid), xy, {**ATTRS, F.A_SLIDE_PATH: str(root / "attr" / f"{sid}.svs")})
        if rows:
            update_status(layout.slides_csv, SlideStatus(sid, "tile", path=str(root / "status" / f"{sid}.svs"),
                                                         n_tiles=n))
    return layout


def test_ranks_read_only_their_tiles_and_partition_the_cohort(tmp_path: Path) -> None:
    sizes = {f"s{i:02d}": 5 + (7 * i) % 23 for i in range(17)}
    layout = _run(tmp_path / "RUN", sizes)
    layout.tiles_h5("s03").write_bytes(b"not an h5 file")  # unreadable: only the rank that owns it finds out
    plans = [plan_jobs(layout, "enc", ExtractConfig(), Shard(i, 3)) for i in range(3)]
    ids = [sorted([j.slide_id for j in jobs] + [sid for sid, _ in bad]) for jobs, bad in plans]
    assert sorted(s for part in ids for s in part) == sorted(sizes)  # every slide in exactly one shard
    bad = [(i, sid, e) for i, (_, b) in enumerate(plans) for sid, e in b]
    assert [(sid, type(e)) for _, sid, e in bad] == [("s03", FormatError)]
    for jobs, _ in plans:
        for j in jobs:
            assert j.tiles is not None and j.n_tiles == sizes[j.slide_id] and j.slide_path == str(tmp_path / "RUN" / "status" / f"{j.slide_id}.svs")
    loads = [sum(sizes[s] for s in part) for part in ids]
    assert max(loads) - min(loads) <= max(sizes.values())  # balanced on tiles


def test_tiles_without_status_rows_are_sized_from_the_files(tmp_path: Path) -> None:
    sizes = {"a": 3, "b": 9, "c": 4}
    layout = _run(tmp_path / "RUN", sizes, rows=False)
    jobs, bad = plan_jobs(layout, "enc", ExtractConfig())
    assert not bad and {j.slide_id: (j.n_tiles, j.slide_path) for j in jobs} == {
        s: (n, str(tmp_path / "RUN" / "attr" / f"{s}.svs")) for s, n in sizes.items()}


def test_balanced_share_matches_the_greedy_rule() -> None:
    """Biggest first, each to the least-loaded shard, ties to the lowest index (the reference loop)."""
    rng = np.random.default_rng(0)
    jobs = [SlideJob(f"s{i:03d}", "", None, Path("x"), size=int(n)) for i, n in enumerate(rng.integers(0, 50, 200))]
    for count in (1, 3, 8):
        loads, want = [0] * count, {i: [] for i in range(count)}
        for j in sorted(jobs, key=lambda j: (-j.n_tiles, j.slide_id)):
            r = min(range(count), key=lambda i: (loads[i], i))
            loads[r] += max(1, j.n_tiles)
            want[r].append(j.slide_id)
        for i in range(count):
            assert [j.slide_id for j in balanced_share(jobs, i, count)] == want[i]
