#!/usr/bin/env python
"""Cohort-scale benchmark of a RUN folder's bookkeeping (issue #22), by simulation on one small machine.

For each cohort size (default 1k, 10k, 100k slides) it builds placeholder slides (empty ``.svs`` files),
tiny tiles files (copies of one template) and runs N worker processes standing in for cluster ranks:

* **status updates** (AFTER): N processes append one status record per slide to their journals (the real
  ``append_status``: O_APPEND + fsync); updates/s, per-update latency, total seconds;
* **status updates** (BEFORE): the lock + read + rewrite ``update_status`` of ``--before-rev`` (loaded from
  git), timed per update on a table of n rows; its total for n slides is Σ cost(i), i = 0..n, measured
  directly up to ``--before-full-max`` slides and otherwise n · (cost(0) + cost(n)) / 2 (the cost grows
  linearly with the table, which the direct measurement at 1k confirms);
* **kill -9 and resume**: the N processes run the real per-slide executor over their shards; random ranks
  are SIGKILLed mid-run; then every rank resumes; after the compaction the script checks that no row is
  lost or duplicated, that every row recorded before the kill is unchanged, and that the slides whose
  output was written but whose row was not are ``skipped``, the others ``done``;
* **compaction** of slides.csv: n journal records onto an empty table, and after the resume;
* **adding 20 slides** to a RUN with n rows vs an empty RUN (target: at most 1.5× + 3 s);
* **planning**: listing the slides (``find_slides``), slide items + sharding (``wsi tile``), the status
  read at a stage's start, and extraction planning of one rank (``plan_jobs``) vs the old plan, which read
  every tiles file on every rank (timed up to ``--before-plan-max`` slides, linear beyond);
* **tile resume checks** (once, on ``--tile-resume`` hard links of a small generated slide tiled "done"):
  one forked worker per slide (before) vs chunks of slides per worker (after), ms per slide.

Training-data throughput and peak RSS of training at scale belong to the training-at-scale item (issue
#22 item 3) and are not measured here.

    python scripts/bench_scale.py                       # 1k, 10k, 100k; ~10 min on a 2-core machine
    python scripts/bench_scale.py --sizes 1000 --json   # CI-sized
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGE = "tile"  # the simulated stage writes tiling rows, which extraction planning then reads
TEMPLATE_TILES = 40


# ---------------------------------------------------------------- helpers
def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _ctx() -> Any:
    return mp.get_context("fork")


def _ids(n: int) -> list[str]:
    return [f"S{i:06d}" for i in range(n)]


@dataclass
class Cohort:
    root: Path
    n: int

    @property
    def slides(self) -> Path:
        return self.root / "slides"

    def slide_path(self, sid: str) -> str:
        return str(self.slides / f"{sid}.svs")


def make_cohort(root: Path, n: int) -> Cohort:
    """n empty slide files (placeholders: listing and planning never open them)."""
    c = Cohort(root, n)
    c.slides.mkdir(parents=True, exist_ok=True)
    for sid in _ids(n):
        with open(c.slide_path(sid), "wb"):
            pass
    return c


def make_tiles(layout: Any, cohort: Cohort) -> None:
    """A tiny tiles file per slide: copies of one template (planning reads only their counts and attrs)."""
    import numpy as np

    from wsi_pipeline.formats import api as F

    tmpl = layout.root / "tiles_template.h5"
    xy = np.stack([np.arange(TEMPLATE_TILES) * 448, np.zeros(TEMPLATE_TILES)], axis=1)
    F.write_tiles_h5(tmpl, xy, {F.A_TARGET_MPP: 0.5, F.A_SLIDE_MPP: 0.25, F.A_TILE_SIZE: 224,
                                F.A_PATCH_SIZE_L0: 448, F.A_LEVEL0_W: 40_000, F.A_LEVEL0_H: 30_000,
                                F.A_SLIDE_PATH: "/placeholder.svs"})
    layout.tiles_dir.mkdir(parents=True, exist_ok=True)
    for sid in _ids(cohort.n):
        shutil.copyfile(tmpl, layout.tiles_h5(sid))


# ---------------------------------------------------------------- AFTER: journal appends
def _append_rank(table: str, ids: list[str], out: str) -> None:
    from wsi_pipeline.runfolder.status import SlideStatus, append_status

    lat = []
    for sid in ids:
        t0 = time.perf_counter()
        append_status(table, SlideStatus(sid, STAGE, path=f"/c/{sid}.svs", n_tiles=TEMPLATE_TILES))
        lat.append(time.perf_counter() - t0)
    Path(out).write_text(json.dumps(lat))


def bench_appends(work: Path, n: int, ranks: int) -> dict[str, Any]:
    """n status updates from ``ranks`` processes at once, through the real journal writer; then the
    compaction of those n records into an empty slides.csv."""
    from wsi_pipeline.runfolder.batch import Shard
    from wsi_pipeline.runfolder.status import compact_status

    table = work / "slides.csv"
    work.mkdir(parents=True, exist_ok=True)
    ids = _ids(n)
    outs = [work / f"lat{i}.json" for i in range(ranks)]
    procs = [_ctx().Process(target=_append_rank, args=(str(table), Shard(i, ranks).select(ids), str(outs[i])))
             for i in range(ranks)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    lat = sorted(x for o in outs for x in json.loads(o.read_text()))
    comp_s, comp = _timed(lambda: compact_status(table))
    return {"updates": n, "ranks": ranks, "wall_s": wall, "updates_per_s": n / wall,
            "latency_p50_ms": 1000 * lat[len(lat) // 2], "latency_p99_ms": 1000 * lat[int(len(lat) * 0.99)],
            "compact_s": comp_s, "compacted_rows": comp.rows}


# ---------------------------------------------------------------- BEFORE: lock + rewrite
def load_old_status(rev: str) -> ModuleType:
    """``runfolder/status.py`` and ``formats/tables.py`` as of ``rev``, loaded as standalone modules."""
    def load(name: str, path: str, replace: tuple[str, str] | None = None) -> ModuleType:
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True,
                             capture_output=True, text=True).stdout
        if replace:
            src = src.replace(*replace)
        spec = importlib.util.spec_from_loader(name, loader=None)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        exec(compile(src, f"{rev}:{path}", "exec"), mod.__dict__)  # our own code at a git revision
        return mod

    load("_old_tables", "wsi_pipeline/formats/tables.py")
    return load("_old_status", "wsi_pipeline/runfolder/status.py",
                ("from wsi_pipeline.formats import (", "from _old_tables import ("))


def bench_before(work: Path, n: int, old: ModuleType, k: int, full_max: int) -> dict[str, Any]:
    """Cost of one old ``update_status`` on an empty table and on one of n rows (median of k), and the
    total for n slides (measured when n <= full_max, else the trapezoid n·(c0 + cn)/2)."""
    work.mkdir(parents=True, exist_ok=True)

    def per_update(rows: int) -> float:
        table = work / f"before_{rows}.csv"
        if rows:
            old.write_slides_csv(table, [old.SlideStatus(s, STAGE, path=f"/c/{s}.svs", n_tiles=40)
                                         for s in _ids(rows)])
        costs = []
        for j in range(k):
            dt, _ = _timed(lambda j=j: old.update_status(table, old.SlideStatus(f"NEW{j:04d}", STAGE, n_tiles=40)))
            costs.append(dt)
        return statistics.median(costs)

    c0, cn = per_update(0), per_update(n)
    out: dict[str, Any] = {"update_ms_empty": 1000 * c0, "update_ms_at_n": 1000 * cn,
                           "total_s_estimated": n * (c0 + cn) / 2}
    if n <= full_max:
        table = work / "before_full.csv"
        wall, _ = _timed(lambda: [old.update_status(table, old.SlideStatus(s, STAGE, n_tiles=40)) for s in _ids(n)])
        out["total_s_measured"] = wall
    out["total_s"] = out.get("total_s_measured", out["total_s_estimated"])
    out["updates_per_s"] = n / out["total_s"]
    return out


# ---------------------------------------------------------------- the executor: kill -9, resume
@dataclass
class MarkStage:
    """A per-slide stage whose output is an empty marker file (written before its status row)."""

    marks: Path
    name: str = STAGE
    component: str = ""

    def key(self, item: Any) -> str:
        return "k1"

    def done(self, item: Any, key: str) -> Any:
        from wsi_pipeline.runfolder.executor import SlideOutcome

        return SlideOutcome(item.slide_id, n_tiles=TEMPLATE_TILES) if (self.marks / item.slide_id).exists() else None

    def process(self, item: Any, key: str) -> Any:
        from wsi_pipeline.runfolder.executor import SlideOutcome

        with open(self.marks / item.slide_id, "wb"):
            pass
        return SlideOutcome(item.slide_id, path=item.path, n_tiles=TEMPLATE_TILES)


def _run_rank(run: str, cohort_root: str, n: int, index: int, count: int) -> None:
    from wsi_pipeline.runfolder.batch import Shard
    from wsi_pipeline.runfolder.executor import SlideItem, run_per_slide
    from wsi_pipeline.runfolder.layout import RunLayout

    cohort = Cohort(Path(cohort_root), n)
    items = Shard(index, count).select([SlideItem(s, cohort.slide_path(s)) for s in _ids(n)])
    marks = Path(run) / "marks" / str(index)
    marks.mkdir(parents=True, exist_ok=True)
    run_per_slide(MarkStage(marks), items, RunLayout(run), workers=0)


def bench_kill_resume(run: Path, cohort: Cohort, ranks: int, seed: int) -> dict[str, Any]:
    """The real executor in ``ranks`` processes; kill -9 of random ranks mid-run; resume; compact; check."""
    from wsi_pipeline.formats.journal import list_journals
    from wsi_pipeline.formats.tables import read_slides_csv
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.runfolder.status import compact_status, read_status

    rng = random.Random(seed)
    layout, n = RunLayout(run), cohort.n
    victims = sorted(rng.sample(range(ranks), max(1, ranks // 4)))
    procs = [_ctx().Process(target=_run_rank, args=(str(run), str(cohort.root), n, i, ranks)) for i in range(ranks)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    targets = {v: int(len(range(v, n, ranks)) * rng.uniform(0.2, 0.6)) for v in victims}
    while targets:  # kill each victim once 20–60 % of its share is done
        for v, target in list(targets.items()):
            mdir = run / "marks" / str(v)
            if not procs[v].is_alive():
                del targets[v]
            elif mdir.is_dir() and len(os.listdir(mdir)) >= target:
                os.kill(procs[v].pid, signal.SIGKILL)
                del targets[v]
        time.sleep(0.01)
    for p in procs:
        p.join()
    first_s = time.perf_counter() - t0
    killed = [v for v in victims if procs[v].exitcode == -signal.SIGKILL]
    read_s, before_rows = _timed(lambda: read_status(layout.slides_csv))
    before = {r.slide_id: r for r in before_rows}
    marked = {m for i in range(ranks) for m in os.listdir(run / "marks" / str(i))}

    resumed = [_ctx().Process(target=_run_rank, args=(str(run), str(cohort.root), n, i, ranks)) for i in range(ranks)]
    t1 = time.perf_counter()
    for p in resumed:
        p.start()
    for p in resumed:
        p.join()
    resume_s = time.perf_counter() - t1
    comp_s, _ = _timed(lambda: compact_status(layout.slides_csv))

    rows = read_slides_csv(layout.slides_csv)
    keys = [(r.slide_id, r.stage, r.component) for r in rows]
    by_id = {r.slide_id: r for r in rows}
    checks = {
        "all_ranks_exit_0_on_resume": all(p.exitcode == 0 for p in resumed),
        "no_row_lost": {r.slide_id for r in rows} == set(_ids(n)),
        "no_row_duplicated": len(keys) == len(set(keys)) == n,
        "rows_before_kill_unchanged": all(by_id[s].status == "done" and by_id[s].updated == r.updated
                                          for s, r in before.items()),
        "written_but_unrecorded_are_skipped": all(
            by_id[s].status == ("skipped" if s in marked else "done") for s in set(by_id) - set(before)),
        "journals_all_folded": not any(list_journals(layout.slides_csv)),
    }
    return {"ranks": ranks, "killed": killed, "rows_at_kill": len(before), "first_run_s": first_s,
            "read_status_after_kill_s": read_s, "resume_s": resume_s, "compact_s": comp_s,
            "skipped_rows": sum(r.status == "skipped" for r in rows), "checks": checks,
            "ok": all(checks.values()) and bool(killed)}


def bench_add20(work: Path, full_run: Path) -> dict[str, Any]:
    """A stage over 20 new slides in an empty RUN and in ``full_run`` (n rows): start read, 20 records,
    compaction."""
    from wsi_pipeline.runfolder.executor import SlideItem, run_per_slide
    from wsi_pipeline.runfolder.layout import RunLayout

    items = [SlideItem(f"NEW{i:03d}", f"/c/NEW{i:03d}.svs") for i in range(20)]
    out = {}
    for label, run in (("empty", work / "empty_run"), ("full", full_run)):
        marks = run / "marks" / "new"
        marks.mkdir(parents=True, exist_ok=True)
        out[f"{label}_s"], _ = _timed(lambda run=run, marks=marks: run_per_slide(MarkStage(marks), items,
                                                                                RunLayout(run), workers=0))
    out["limit_s"] = 1.5 * out["empty_s"] + 3.0
    out["ok"] = out["full_s"] <= out["limit_s"]
    return out


# ---------------------------------------------------------------- planning
def bench_planning(cohort: Cohort, run: Path, ranks: int, before_max: int) -> dict[str, Any]:
    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.extract import plan_jobs
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.batch import Shard
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.runfolder.status import read_status
    from wsi_pipeline.slide.open import find_slides
    from wsi_pipeline.tiling.stage import slide_items

    layout = RunLayout(run)
    out: dict[str, Any] = {}
    out["find_slides_s"], paths = _timed(lambda: find_slides([cohort.slides]))
    out["slide_items_and_shard_s"], _ = _timed(lambda: Shard(0, ranks).select(slide_items(paths)))
    out["read_status_s"], rows = _timed(lambda: read_status(layout.slides_csv))
    out["status_rows"] = len(rows)
    make_s, _ = _timed(lambda: make_tiles(layout, cohort))
    out["make_tiles_files_s"] = make_s
    out["plan_extract_rank0_s"], (jobs, bad) = _timed(
        lambda: plan_jobs(layout, "bench-encoder", ExtractConfig(), Shard(0, ranks)))
    out["plan_extract_rank0_slides"] = len(jobs) + len(bad)

    def old_plan(ids: list[str]) -> None:  # the old plan_jobs: the status once, then every tiles file
        read_status(layout.slides_csv)
        for sid in ids:
            F.read_tiles_h5(layout.tiles_h5(sid))

    m = min(cohort.n, before_max)
    secs, _ = _timed(lambda: old_plan(_ids(m)))
    out["plan_extract_before_s"] = secs * cohort.n / m
    out["plan_extract_before_measured_on"] = m
    return out


# ---------------------------------------------------------------- tile resume checks (real slides)
def bench_tile_resume(work: Path, n: int, workers: int) -> dict[str, Any]:
    """Resume of ``wsi tile`` over n slides already tiled (hard links of one small generated slide whose
    tiles files carry the right resume key): one fork per slide (before) vs chunks (after)."""
    import numpy as np

    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder import executor
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.synth.slides import make_slide_spec, write_slide
    from wsi_pipeline.tiling.stage import TileStage, run_tile, slide_items

    src = work / "tile_slides"
    src.mkdir(parents=True, exist_ok=True)
    tmpl = write_slide(make_slide_spec("tmpl", 0, "inflamed", size_l0=(1200, 900)), work / "tmpl.svs")
    for sid in _ids(n):
        os.link(tmpl, src / f"{sid}.svs")
    paths = sorted(src.iterdir())
    layout, cfg = RunLayout(work / "tile_run"), TilingConfig()
    stage = TileStage(layout, cfg)
    for item in slide_items(paths):
        F.write_tiles_h5(layout.tiles_h5(item.slide_id), np.zeros((3, 2)), {
            F.A_TARGET_MPP: 0.5, F.A_SLIDE_MPP: 0.5, F.A_TILE_SIZE: 224, F.A_PATCH_SIZE_L0: 224,
            F.A_LEVEL0_W: 1200, F.A_LEVEL0_H: 900, F.A_PARAMS_HASH: stage.key(item)})
    run_tile(paths, layout.root, cfg, workers=workers)  # records the skipped rows once
    out: dict[str, Any] = {"slides": n, "workers": workers}
    saved = executor.RESUME_CHECK_MIN
    try:
        executor.RESUME_CHECK_MIN = 10**9
        secs, s = _timed(lambda: run_tile(paths, layout.root, cfg, workers=workers))
        out["before_ms_per_slide"] = 1000 * secs / n
    finally:
        executor.RESUME_CHECK_MIN = saved
    secs, s2 = _timed(lambda: run_tile(paths, layout.root, cfg, workers=workers))
    out["after_ms_per_slide"] = 1000 * secs / n
    out["ok"] = len(s.skipped) == len(s2.skipped) == n
    return out


# ---------------------------------------------------------------- report
def bench_size(root: Path, n: int, args: argparse.Namespace, old: ModuleType) -> dict[str, Any]:
    print(f"== {n:,} slides", file=sys.stderr, flush=True)
    cohort = make_cohort(root / "cohort", n)
    res: dict[str, Any] = {"slides": n}
    res["after"] = bench_appends(root / "appends", n, args.ranks)
    print(f"   after : {res['after']['updates_per_s']:,.0f} updates/s", file=sys.stderr, flush=True)
    res["before"] = bench_before(root / "before", n, old, 20 if n <= 10_000 else 5, args.before_full_max)
    print(f"   before: {res['before']['update_ms_at_n']:.1f} ms/update at {n:,} rows", file=sys.stderr, flush=True)
    res["kill_resume"] = bench_kill_resume(root / "RUN", cohort, args.ranks, seed=n)
    print(f"   kill -9 + resume ok: {res['kill_resume']['ok']}", file=sys.stderr, flush=True)
    res["add20"] = bench_add20(root, root / "RUN")
    res["planning"] = bench_planning(cohort, root / "RUN", args.ranks, args.before_plan_max)
    return res


def print_table(results: list[dict[str, Any]], tile: dict[str, Any] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=max(160, shutil.get_terminal_size().columns))
    t = Table(title="status updates: BEFORE (lock + rewrite slides.csv) vs AFTER (per-rank journals)")
    for col in ("slides", "before ms/update at n", "before total s", "before updates/s", "after updates/s",
                "after p99 ms", "after total s", "compact n rows s", "before/after total"):
        t.add_column(col, justify="right")
    for r in results:
        b, a = r["before"], r["after"]
        est = "" if "total_s_measured" in b else " (est.)"
        t.add_row(f"{r['slides']:,}", f"{b['update_ms_at_n']:.1f}", f"{b['total_s']:,.0f}{est}",
                  f"{b['updates_per_s']:,.1f}", f"{a['updates_per_s']:,.0f}", f"{a['latency_p99_ms']:.1f}",
                  f"{a['wall_s']:.1f}", f"{a['compact_s']:.2f}", f"{b['total_s'] / a['wall_s']:,.0f}×")
    c.print(t)
    first = results[0]
    s = Table(title="slope: seconds per slide (ratio to the smallest size; linear = 1, quadratic = size ratio)")
    for col in ("slides", "before s/slide", "after s/slide", "compact s/row", "read_status s/row",
                "plan extract rank0 s/slide"):
        s.add_column(col, justify="right")

    def per(r: dict[str, Any], v: float, v0: float) -> str:
        return f"{v / r['slides'] * 1e3:.3f} ms ({(v / r['slides']) / (v0 / first['slides']):.2f})"

    for r in results:
        s.add_row(f"{r['slides']:,}", per(r, r["before"]["total_s"], first["before"]["total_s"]),
                  per(r, r["after"]["wall_s"], first["after"]["wall_s"]),
                  per(r, r["after"]["compact_s"], first["after"]["compact_s"]),
                  per(r, r["planning"]["read_status_s"], first["planning"]["read_status_s"]),
                  per(r, r["planning"]["plan_extract_rank0_s"], first["planning"]["plan_extract_rank0_s"]))
    c.print(s)
    k = Table(title="kill -9 + resume, adding 20 slides, planning (seconds)")
    for col in ("slides", "killed ranks", "rows at kill", "run s", "resume s", "checks", "add 20: empty / full"
                " (limit)", "find_slides", "items+shard", "read status", "plan extract before → after"):
        k.add_column(col, justify="right")
    for r in results:
        kr, ad, p = r["kill_resume"], r["add20"], r["planning"]
        k.add_row(f"{r['slides']:,}", str(kr["killed"]), f"{kr['rows_at_kill']:,}", f"{kr['first_run_s']:.1f}",
                  f"{kr['resume_s']:.1f}", "ok" if kr["ok"] else "FAILED " + str(kr["checks"]),
                  f"{ad['empty_s']:.2f} / {ad['full_s']:.2f} ({ad['limit_s']:.1f}) {'ok' if ad['ok'] else 'OVER'}",
                  f"{p['find_slides_s']:.2f}", f"{p['slide_items_and_shard_s']:.2f}", f"{p['read_status_s']:.2f}",
                  f"{p['plan_extract_before_s']:.1f}"
                  f"{' (est.)' if p['plan_extract_before_measured_on'] < r['slides'] else ''} → "
                  f"{p['plan_extract_rank0_s']:.2f}")
    c.print(k)
    if tile:
        c.print(f"tile resume checks, {tile['slides']} slides, {tile['workers']} workers: "
                f"{tile['before_ms_per_slide']:.1f} ms/slide (a fork per slide) → {tile['after_ms_per_slide']:.1f} "
                f"ms/slide (chunks); 100k slides: {tile['before_ms_per_slide'] * 100:.0f} s → "
                f"{tile['after_ms_per_slide'] * 100:.0f} s")
    c.print("training-data throughput and peak RSS: not measured here (training at scale, issue #22 item 3)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000", help="comma-separated cohort sizes")
    ap.add_argument("--ranks", type=int, default=8, help="worker processes standing in for cluster ranks")
    ap.add_argument("--before-rev", default="7118ea2", help="git revision of the lock + rewrite status code")
    ap.add_argument("--before-full-max", type=int, default=1000,
                    help="measure the old total directly up to this size (else the trapezoid estimate)")
    ap.add_argument("--before-plan-max", type=int, default=10_000,
                    help="time the old extraction plan (every tiles file) up to this size, linear beyond")
    ap.add_argument("--tile-resume", type=int, default=300, help="slides for the tile resume check (0: skip)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the cohorts (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=args.workdir))
    old = load_old_status(args.before_rev)
    results = []
    try:
        for n in sizes:
            results.append(bench_size(work / f"n{n}", n, args, old))
            if not args.keep:
                shutil.rmtree(work / f"n{n}", ignore_errors=True)
        tile = bench_tile_resume(work / "tile", args.tile_resume, workers=2) if args.tile_resume else None
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"results": results, "tile_resume": tile, "ranks": args.ranks,
                          "training": "not measured (issue #22 item 3)"}, indent=1))
    else:
        print_table(results, tile)
    ok = all(r["kill_resume"]["ok"] and r["add20"]["ok"] for r in results) and (tile is None or tile["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
