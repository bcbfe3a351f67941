"""RUN/slides.csv: one row per (slide, stage) with status, error, figures. Safe under concurrent writers
(processes of one machine and ranks on a shared file system) through an exclusive lock file."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from wsi_pipeline.formats import write_text_atomic

STATUS_DONE = "done"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"  # done earlier with the same parameters


@dataclass
class SlideStatus:
    slide_id: str
    stage: str
    path: str = ""
    status: str = STATUS_DONE
    error: str = ""
    error_type: str = ""
    n_tiles: int | str = ""
    slide_mpp: float | str = ""
    seconds: float | str = ""
    updated: str = ""
    component: str = ""  # what the row is about within its stage: the encoder of "extract", the model of "heatmap"


_FIELDS = [f.name for f in fields(SlideStatus)]
COLUMNS = ["slide_id", "stage", "component"] + [c for c in _FIELDS if c not in ("slide_id", "stage", "component")]


def _key(r: SlideStatus) -> tuple[str, str, str]:
    return (r.slide_id, r.stage, r.component)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lf:
        fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lf.fileno(), fcntl.LOCK_UN)


def read_status(path: str | Path) -> list[SlideStatus]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append(SlideStatus(**{k: r.get(k, "") or "" for k in COLUMNS}))
    return rows


def update_status(path: str | Path, *records: SlideStatus) -> None:
    """Insert or replace the rows of ``records`` (keyed by slide_id + stage + component), atomically and under a
    lock."""
    path = Path(path)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with _locked(path):
        table = {_key(r): r for r in read_status(path)}
        changed = False
        for rec in records:
            old = table.get(_key(rec))
            if old is not None and _same(old, rec):
                continue  # e.g. a slide failing again with the same error: no churn, the file stays as it is
            rec.updated = rec.updated or stamp
            table[_key(rec)] = rec
            changed = True
        if not changed:
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        for key in sorted(table):
            w.writerow(asdict(table[key]))
        write_text_atomic(path, buf.getvalue())


def _same(a: SlideStatus, b: SlideStatus) -> bool:
    """Equal but for the timestamps and timings."""
    skip = {"updated", "seconds"}
    return all(str(getattr(a, k)) == str(getattr(b, k)) for k in COLUMNS if k not in skip)


def failed(path: str | Path, stage: str | None = None) -> list[SlideStatus]:
    return [r for r in read_status(path) if r.status == STATUS_FAILED and (stage is None or r.stage == stage)]
