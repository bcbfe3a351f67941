"""Resuming a cohort: the per-slide executor checks many slides per forked worker, and a slide whose check
crashes its worker is still isolated and reported on its own."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from wsi_pipeline.formats.atomic import write_text_atomic
from wsi_pipeline.runfolder import executor
from wsi_pipeline.runfolder.executor import SlideItem, SlideOutcome, run_per_slide
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.runfolder.status import read_status

CRASH, RAISE = "s0005", "s0007"


@dataclass
class _Stage:
    out: Path
    name: str = "mark"
    component: str = ""

    def key(self, item: SlideItem) -> str:
        if item.slide_id == CRASH:
            os._exit(3)  # a codec segfault while opening the slide
        if item.slide_id == RAISE:
            raise ValueError(f"{item.slide_id}: unreadable")
        return "k1"

    def done(self, item: SlideItem, key: str) -> SlideOutcome | None:
        with open(self.out / "checked-by.txt", "a") as f:
            f.write(f"{os.getpid()}\n")
        return SlideOutcome(item.slide_id, n_tiles=2) if (self.out / item.slide_id).exists() else None

    def process(self, item: SlideItem, key: str) -> SlideOutcome:
        write_text_atomic(self.out / item.slide_id, key)
        return SlideOutcome(item.slide_id, n_tiles=2)


def test_resume_checks_run_in_chunks_and_stay_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor, "RESUME_CHECK_MIN", 16)
    monkeypatch.setattr(executor, "RESUME_CHUNK", 8)
    layout, marks = RunLayout(tmp_path / "RUN"), tmp_path / "marks"
    marks.mkdir()
    items = [SlideItem(f"s{i:04d}") for i in range(24)]
    first = run_per_slide(_Stage(marks), items, layout, workers=2)
    assert len(first.done) == 22 and {o.slide_id: o.error_type for o in first.failed} == {
        CRASH: "WorkerCrash", RAISE: "ValueError"}
    (marks / "checked-by.txt").unlink()

    again = run_per_slide(_Stage(marks), items, layout, workers=2)
    assert len(again.skipped) == 22 and sorted(o.slide_id for o in again.failed) == [CRASH, RAISE]
    assert {o.error_type for o in again.failed} == {"WorkerCrash", "ValueError"}
    # chunks of 8 slides: two workers check theirs (16 checks); the first chunk's worker dies at s0005 after
    # 5 checks, and its slides go one worker each (6 checks; s0005 and s0007 fail again)
    pids = (marks / "checked-by.txt").read_text().split()
    assert len(pids) == 16 + 5 + 6 and len(set(pids)) == 2 + 1 + 6
    rows = {r.slide_id: r.status for r in read_status(layout.slides_csv)}
    assert len(rows) == 24 and rows[CRASH] == rows[RAISE] == "failed"
    assert sum(s == "done" for s in rows.values()) == 22  # skipped never replaced the done rows
