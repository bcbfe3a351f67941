"""RUN/slides.csv: one row per (slide, stage, component) with status, error, figures. Safe under concurrent
writers (processes of one machine and ranks on a shared file system) through an exclusive lock file.

The file format (columns, the :class:`SlideStatus` row, reading and writing) is owned by
:mod:`wsi_pipeline.formats.tables`; this module keeps the locking and the update rules."""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path

from wsi_pipeline.formats import (
    SLIDES_COLUMNS,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_SKIPPED,
    SlideStatus,
    read_slides_csv,
    write_slides_csv,
)

__all__ = ["COLUMNS", "STATUS_DONE", "STATUS_FAILED", "STATUS_SKIPPED", "SlideStatus", "failed", "read_status",
           "update_status"]

COLUMNS = list(SLIDES_COLUMNS)


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
    """Every row of the status table; [] when there is none yet."""
    return read_slides_csv(path)


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
        write_slides_csv(path, [table[key] for key in sorted(table)])


def _same(a: SlideStatus, b: SlideStatus) -> bool:
    """Equal but for the timestamps and timings."""
    skip = {"updated", "seconds"}
    return all(str(getattr(a, k)) == str(getattr(b, k)) for k in COLUMNS if k not in skip)


def failed(path: str | Path, stage: str | None = None) -> list[SlideStatus]:
    return [r for r in read_status(path) if r.status == STATUS_FAILED and (stage is None or r.stage == stage)]
