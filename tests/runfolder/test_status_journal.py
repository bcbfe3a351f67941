"""The status journals (issue #22): torn lines, folding rules, compaction idempotence, the base state, kill -9
of concurrent ranks with a resume, and `wsi status`."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wsi_pipeline.cli import build_app
from wsi_pipeline.errors import ConfigError, FormatError
from wsi_pipeline.formats.atomic import write_text_atomic
from wsi_pipeline.formats.journal import list_journals, read_status_journal
from wsi_pipeline.formats.tables import read_slides_csv
from wsi_pipeline.runfolder.batch import Shard
from wsi_pipeline.runfolder.executor import SlideItem, SlideOutcome, run_per_slide
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.runfolder.status import (
    SlideStatus,
    append_status,
    compact_status,
    read_status,
    update_status,
)

T0 = 1_800_000_000_000_000_000  # a fixed wall-clock time (ns) for records whose order matters


def _journals(table: Path) -> list[Path]:
    live, folding = list_journals(table)
    return live + folding


def test_torn_last_line_is_skipped_with_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = tmp_path / "slides.csv"
    update_status(table, SlideStatus("a", "tile", n_tiles=3), SlideStatus("b", "tile", n_tiles=4))
    (journal,) = _journals(table)
    with open(journal, "ab") as f:  # a process killed in the middle of its next line
        f.write(b'{"v":1,"t":17964126480881324,"slide_id":"c","sta')
    with caplog.at_level(logging.WARNING):
        records = read_status_journal(journal)
    assert [r.row.slide_id for r in records] == ["a", "b"]
    assert "skipping line 3, an incomplete record" in caplog.text
    assert [r.slide_id for r in read_status(table)] == ["a", "b"]
    result = compact_status(table)
    assert result is not None and result.records == 2 and result.journals == 1
    assert [r.slide_id for r in read_slides_csv(table)] == ["a", "b"] and not _journals(table)
    # the writer's next record goes to a new journal, intact
    update_status(table, SlideStatus("c", "tile", n_tiles=5))
    assert [(r.slide_id, r.n_tiles) for r in read_status(table)] == [("a", "3"), ("b", "4"), ("c", "5")]


def test_newer_journal_version_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "status" / "slides.other-1-1.jsonl"
    journal.parent.mkdir()
    journal.write_text(json.dumps({"v": 99, "t": T0, "slide_id": "a", "stage": "tile"}) + "\n")
    with pytest.raises(FormatError, match="format version 99, newer"):
        read_status(tmp_path / "slides.csv")


@pytest.mark.parametrize(("first", "second", "expected"), [
    ("done", "skipped", "done"),  # skipped never replaces done
    ("failed", "done", "done"),  # the latest outcome wins
    ("done", "failed", "failed"),
    ("failed", "skipped", "skipped"),
])
def test_latest_outcome_wins_but_skipped_never_replaces_done(tmp_path: Path, first: str, second: str,
                                                             expected: str) -> None:
    table = tmp_path / "slides.csv"
    append_status(table, SlideStatus("a", "tile", status=first, error="x" if first == "failed" else ""), t_ns=T0)
    append_status(table, SlideStatus("a", "tile", status=second, error="y" if second == "failed" else ""),
                  t_ns=T0 + 5_000)
    assert [r.status for r in read_status(table)] == [expected]
    compact_status(table)
    assert [r.status for r in read_slides_csv(table)] == [expected]
    # an older record arriving after the compaction (a rank with a slow clock) does not win either
    append_status(table, SlideStatus("a", "tile", status="failed", error="old"), t_ns=T0 - 1_000_000)
    compact_status(table)
    assert [r.status for r in read_slides_csv(table)] == [expected]


def test_compaction_is_idempotent_and_survives_a_crash_mid_way(tmp_path: Path) -> None:
    table = tmp_path / "slides.csv"
    for i in range(5):
        append_status(table, SlideStatus(f"s{i}", "tile", n_tiles=i), t_ns=T0 + i)
    append_status(table, SlideStatus("s1", "tile", status="failed", error="boom"), t_ns=T0 + 10)
    (journal,) = _journals(table)
    lines = journal.read_bytes()
    assert compact_status(table).written
    text = table.read_bytes()
    # a compaction killed after writing slides.csv but before deleting what it folded: folded again, no change
    (table.parent / "status" / f"{journal.stem}.123.folding").write_bytes(lines)
    assert [r.status for r in read_status(table)] == ["done", "failed", "done", "done", "done"]
    again = compact_status(table)
    assert again.journals == 1 and not again.written and table.read_bytes() == text and not _journals(table)
    assert compact_status(table).records == 0 and table.read_bytes() == text


def test_existing_slides_csv_is_the_base_state(tmp_path: Path) -> None:
    """A RUN folder from before the journals (version 1 table, rows to the second) still reads, and a
    compaction keeps its rows."""
    table = tmp_path / "slides.csv"
    table.write_text("slide_id,stage,path,status,error,error_type,n_tiles,slide_mpp,seconds,updated\n"
                     "a,tile,/x/a.svs,done,,,3,0.5,1.0,2026-01-01T00:00:00\n"
                     "b,tile,/x/b.svs,failed,boom,CorruptSlideError,,,0.1,2026-01-01T00:00:00\n")
    before = table.read_bytes()
    assert [(r.slide_id, r.status) for r in read_status(table)] == [("a", "done"), ("b", "failed")]
    assert compact_status(table).records == 0 and table.read_bytes() == before  # nothing to fold: untouched
    update_status(table, SlideStatus("b", "tile", path="/x/b.svs", n_tiles=7),
                  SlideStatus("c", "tile", path="/x/c.svs", n_tiles=2))
    compact_status(table)
    rows = {r.slide_id: r for r in read_slides_csv(table)}
    assert (rows["a"].status, rows["a"].n_tiles, rows["a"].updated) == ("done", "3", "2026-01-01T00:00:00")
    assert (rows["b"].status, rows["b"].n_tiles) == ("done", "7") and rows["c"].n_tiles == "2"
    assert table.read_text().splitlines()[0].startswith("slide_id,stage,component,")


# ---------------------------------------------------------------- kill -9 of concurrent ranks, then resume
@dataclass
class _MarkStage:
    """A per-slide stage whose output is a marker file (written atomically before its status row)."""

    out: Path
    delay: float = 0.002
    name: str = "mark"
    component: str = ""

    def key(self, item: SlideItem) -> str:
        return "k1"

    def done(self, item: SlideItem, key: str) -> SlideOutcome | None:
        return SlideOutcome(item.slide_id, n_tiles=1) if (self.out / item.slide_id).exists() else None

    def process(self, item: SlideItem, key: str) -> SlideOutcome:
        time.sleep(self.delay)
        write_text_atomic(self.out / item.slide_id, key)
        return SlideOutcome(item.slide_id, n_tiles=1)


def _rank(run: Path, index: int, count: int, n: int) -> None:
    items = Shard(index, count).select([SlideItem(f"s{i:04d}") for i in range(n)])
    run_per_slide(_MarkStage(run / "marks"), items, RunLayout(run), workers=0)


def _compactor(run: Path, stop_after: float) -> None:
    end = time.monotonic() + stop_after
    while time.monotonic() < end:
        compact_status(RunLayout(run).slides_csv)
        time.sleep(0.01)


def _rows_of(run: Path, ids: set[str]) -> int:
    return sum(1 for r in read_status(RunLayout(run).slides_csv) if r.slide_id in ids)


def test_kill9_of_ranks_then_resume_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    run, n, ranks = tmp_path / "RUN", 240, 4
    (run / "marks").mkdir(parents=True)
    ctx = mp.get_context("fork")
    rng = random.Random(22)
    victims = set(rng.sample(range(ranks), 2))
    compactor = ctx.Process(target=_compactor, args=(run, 3.0))
    compactor.start()
    procs = [ctx.Process(target=_rank, args=(run, i, ranks, n)) for i in range(ranks)]
    for p in procs:
        p.start()
    for i in sorted(victims):  # SIGKILL each victim once it has recorded a few slides, well before its end
        mine = {f"s{j:04d}" for j in range(i, n, ranks)}
        deadline = time.monotonic() + 20
        while _rows_of(run, mine) < 5 + rng.randrange(10) and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(procs[i].pid, signal.SIGKILL)
    for p in [*procs, compactor]:
        p.join(60)
    assert [procs[i].exitcode for i in sorted(victims)] == [-signal.SIGKILL] * len(victims)
    assert all(procs[i].exitcode == 0 for i in range(ranks) if i not in victims)
    table = RunLayout(run).slides_csv
    victim = f"-{procs[min(victims)].pid}-"
    torn = [p for p in list_journals(table)[0] if victim in p.name] or [table.parent / "status" /
                                                                         f"slides.host{victim}0.jsonl"]
    with open(torn[0], "ab") as f:  # as if the kill had landed in the middle of a write
        f.write(b'{"v":1,"t":1796412648088132490,"slide_id":"s00')

    before = {r.slide_id: r for r in read_status(table)}
    marked = {p.name for p in (run / "marks").iterdir()}
    assert 0 < len(before) < n and {r.status for r in before.values()} == {"done"}  # victims stopped mid-way

    resumed = [ctx.Process(target=_rank, args=(run, i, ranks, n)) for i in range(ranks)]
    for p in resumed:
        p.start()
    for p in resumed:
        p.join(60)
    assert all(p.exitcode == 0 for p in resumed)
    # a stale rank reporting "skipped" for every slide after the fact changes no done row
    append_status(table, *[SlideStatus(f"s{i:04d}", "mark", status="skipped", n_tiles=1) for i in range(n)])
    compact_status(table)

    rows = read_slides_csv(table)
    keys = [(r.slide_id, r.stage, r.component) for r in rows]
    assert len(keys) == len(set(keys)) == n  # nothing lost, nothing duplicated
    assert {r.slide_id for r in rows} == {f"s{i:04d}" for i in range(n)}
    assert all((run / "marks" / r.slide_id).exists() for r in rows)
    by_id = {r.slide_id: r for r in rows}
    for s in before:  # recorded before the kill: the same row, still done
        assert by_id[s].status == "done" and by_id[s].updated == before[s].updated
    # a slide with its output but no row (killed in between) is "skipped" (not redone); the rest are done now
    for s in set(by_id) - set(before):
        assert by_id[s].status == ("skipped" if s in marked else "done"), s
    assert not _journals(table) and read_status(table) == rows


# ---------------------------------------------------------------- wsi status
def test_wsi_status_compacts_and_counts(tmp_path: Path) -> None:
    run = tmp_path / "RUN"
    table = RunLayout(run).slides_csv
    update_status(table, SlideStatus("a", "tile", n_tiles=3), SlideStatus("b", "tile", n_tiles=4),
                  SlideStatus("c", "tile", status="failed", error="c.svs: truncated; re-scan it",
                              error_type="CorruptSlideError"),
                  SlideStatus("a", "extract", component="uni", n_tiles=3))
    res = CliRunner().invoke(build_app(), ["status", str(run), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["rows"] == 4 and doc["compaction"]["records"] == 4
    stages = {(s["stage"], s["component"]): s for s in doc["stages"]}
    assert (stages[("tile", "")]["done"], stages[("tile", "")]["failed"]) == (2, 1)
    assert stages[("extract", "uni")]["done"] == 1
    assert [(f["slide_id"], f["error_type"]) for f in doc["failed"]] == [("c", "CorruptSlideError")]
    assert len(read_slides_csv(table)) == 4 and not _journals(table)
    res = CliRunner().invoke(build_app(), ["status", str(run)], catch_exceptions=False)
    assert res.exit_code == 0 and "CorruptSlideError" in res.output and "c.svs: truncated" in res.output
    res = CliRunner().invoke(build_app(), ["status", str(tmp_path / "nope")])
    assert isinstance(res.exception, ConfigError) and "no such RUN folder" in str(res.exception)
