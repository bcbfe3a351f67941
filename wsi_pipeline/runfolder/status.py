"""The status of a RUN folder: one row per (slide, stage, component), kept as per-process journals plus a
compacted table, ``RUN/slides.csv``.

**Writing** (:func:`append_status`, O(1), no global lock). Each process appends to its own journal
``RUN/status/slides.<host>-<pid>-<start>.jsonl`` (format: :mod:`wsi_pipeline.formats.journal`): open with
``O_APPEND``, take an exclusive ``flock`` on *that journal only*, check the name still points to the file
opened (else a compaction took it away: open again), write the lines, fsync, close. A record is on disk when
the call returns; ``kill -9`` can only tear the line being written, which readers skip.

**Reading** (:func:`read_status`): ``slides.csv`` (the base state: a table with no journals, e.g. a RUN
folder from before the journals, is read as it is) merged with every journal. Journals are read first, the
base last, and the reading starts again if a journal vanished meanwhile (a compaction folded it, so the base
read after it holds its rows).

**Folding** (one rule for reading and compacting). Per (slide, stage, component) the latest record wins, by
its time to the microsecond (wall clock of the writing host; ties broken on the row's text, so every order
of folding gives the same table), except that

- ``skipped`` never replaces ``done`` (a resumed stage found the output the ``done`` row describes);
- a record equal to the current row but for ``updated`` and ``seconds`` keeps the row (no churn).

Folding a record twice changes nothing, so a journal may be folded again after a crash (idempotent).

**Compacting** (:func:`compact_status`: the end of every stage that recorded something, ``wsi status RUN``).
Under ``RUN/status/slides.compact.lock`` (compactions only; writers never take it): every journal whose own
lock can be taken (no write in flight) is renamed to ``*.<t>.folding`` (its writer's next append makes a new
journal); a journal with a write in flight is read but left in place. The ``*.folding`` files (with any a
crashed compaction left), the live journals and the base are folded; ``slides.csv`` is written atomically
and fsync'd (only if it changed); only then are the ``*.folding`` files deleted. A journal a live process
may still append to is therefore never deleted, and a crash at any point loses nothing: the next compaction
or read folds the files again. At the end of a stage the compaction does not wait: if another process is
compacting, its table may miss this process's last records until the next compaction (``wsi status RUN``
waits), but every reader merges the journals, so no stage ever sees a stale status.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.formats.atomic import fsync_dir
from wsi_pipeline.formats.journal import (
    StatusRecord,
    folding_path,
    journal_dir,
    journal_path,
    list_journals,
    read_status_journal,
    write_status_records,
)
from wsi_pipeline.formats.tables import (
    SLIDES_COLUMNS,
    SLIDES_CSV,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_SKIPPED,
    SlideStatus,
    read_slides_csv,
    read_slides_keys,
    updated_us,
    write_slides_csv,
)

__all__ = ["COLUMNS", "STATUS_DONE", "STATUS_FAILED", "STATUS_SKIPPED", "Compaction", "SlideStatus",
           "StatusOverview", "append_status", "compact_status", "failed", "read_status", "read_status_keys",
           "status_overview", "update_status"]

log = logging.getLogger(__name__)

COLUMNS = list(SLIDES_COLUMNS)
_UNCHANGED = frozenset({"updated", "seconds"})  # a record differing only in these keeps the row
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_READ_ATTEMPTS = 20

Key = tuple[str, str, str]


def _key(r: SlideStatus) -> Key:
    return (r.slide_id, r.stage, r.component)


# ---------------------------------------------------------------- writing
def writer_id() -> str:
    """This process's journal name: host, pid and the process's start time (a reused pid gets a new name)."""
    host = _UNSAFE.sub("-", socket.gethostname()).strip("-") or "host"
    try:
        start = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "0"
    return f"{host}-{os.getpid()}-{start}"


def append_status(table: str | Path, *rows: SlideStatus, t_ns: int | None = None) -> None:
    """Record ``rows`` in this process's journal of ``table`` (``RUN/slides.csv``): O(1), durable on return.
    ``t_ns`` (default: now) is the time the outcome is recorded at."""
    if not rows:
        return
    t = time.time_ns() if t_ns is None else int(t_ns)
    records = [StatusRecord(t, r) for r in rows]
    path = journal_path(table, writer_id())
    for _ in range(100):
        fd = _open_journal(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # this journal only: a compaction may be taking it away
            if _still_named(fd, path):
                write_status_records(fd, records)
                return
        finally:
            os.close(fd)
    raise OSError(errno.EAGAIN, f"{path}: the journal kept being moved away while appending")


def update_status(path: str | Path, *records: SlideStatus) -> None:
    """Insert or replace the rows of ``records`` (keyed by slide_id + stage + component): appended to this
    process's journal (see :func:`append_status`); ``slides.csv`` shows them after the next compaction,
    :func:`read_status` at once."""
    append_status(path, *records)


def _open_journal(path: Path) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    try:
        fd = os.open(path, flags | os.O_EXCL, 0o644)
    except FileExistsError:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
    fsync_dir(path.parent)  # a new journal: its name survives a crash of the machine too
    return fd


def _still_named(fd: int, path: Path) -> bool:
    st = os.fstat(fd)
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


# ---------------------------------------------------------------- folding
class _Table:
    """The folded status: per key the row and the time it was recorded at (µs)."""

    def __init__(self, base: Iterable[SlideStatus] = ()) -> None:
        # a base row's time is parsed only when a record for its key comes (most never do)
        self.rows: dict[Key, tuple[int | None, SlideStatus]] = {
            (r.slide_id, r.stage, r.component): (None, r) for r in base}

    def fold(self, records: Iterable[StatusRecord]) -> None:
        for rec in sorted(records, key=lambda x: x.t_ns):
            self.apply(rec.t_ns // 1000, rec.row)

    def apply(self, t_us: int, row: SlideStatus) -> None:
        key = _key(row)
        cur = self.rows.get(key)
        if cur is not None:
            cur_t, cur_row = cur
            if not _replaces(t_us, row, updated_us(cur_row.updated) if cur_t is None else cur_t, cur_row):
                return
        self.rows[key] = (t_us, row)

    def sorted_rows(self) -> list[SlideStatus]:
        return [self.rows[k][1] for k in sorted(self.rows)]


def _replaces(t_us: int, row: SlideStatus, cur_t: int, cur: SlideStatus) -> bool:
    newer = t_us > cur_t if t_us != cur_t else _tiebreak(row) > _tiebreak(cur)
    if not newer:
        return False
    if row.status == STATUS_SKIPPED and cur.status == STATUS_DONE:
        return False
    return any(str(getattr(row, c)) != str(getattr(cur, c)) for c in COLUMNS if c not in _UNCHANGED)


def _tiebreak(r: SlideStatus) -> tuple[bool, tuple[str, ...]]:
    """Order of two records of the same microsecond: not-skipped first, then the row's text."""
    return (r.status != STATUS_SKIPPED, tuple(str(getattr(r, c)) for c in COLUMNS))


def _read_journals(table: Path) -> tuple[list[StatusRecord], bool]:
    """Every record of every journal of ``table``; False when one vanished while reading (folded)."""
    live, folding = list_journals(table)
    records: list[StatusRecord] = []
    complete = True
    for p in folding + live:
        try:  # a live journal's last line may be a write in flight: not worth a warning
            records.extend(read_status_journal(p, torn_level=logging.DEBUG if p in live else logging.WARNING))
        except FileNotFoundError:
            complete = False
    return records, complete


# ---------------------------------------------------------------- reading
def read_status(path: str | Path) -> list[SlideStatus]:
    """Every row of the status table (``slides.csv`` merged with its journals), sorted by slide, stage and
    component; [] when there is none yet. All values are text, as in ``slides.csv``."""
    table = Path(path)
    for _ in range(_READ_ATTEMPTS):
        records, complete = _read_journals(table)
        if complete:
            break
    else:
        raise OSError(errno.EAGAIN, f"{journal_dir(table)}: journals kept being folded while reading; try again")
    base = read_slides_csv(table)  # after the journals: holds every journal folded meanwhile
    if not records:
        return base
    folded = _Table(base)
    folded.fold(records)
    return folded.sorted_rows()


def read_status_keys(path: str | Path) -> set[Key]:
    """The (slide_id, stage, component) of every row of the status (which rows exist; a stage's start),
    without building or folding the rows."""
    table = Path(path)
    for _ in range(_READ_ATTEMPTS):
        records, complete = _read_journals(table)
        if complete:
            return read_slides_keys(table) | {_key(r.row) for r in records}
    raise OSError(errno.EAGAIN, f"{journal_dir(table)}: journals kept being folded while reading; try again")


def failed(path: str | Path, stage: str | None = None) -> list[SlideStatus]:
    return [r for r in read_status(path) if r.status == STATUS_FAILED and (stage is None or r.stage == stage)]


# ---------------------------------------------------------------- compacting
@dataclass
class Compaction:
    """What one compaction did."""

    rows: int | None = None  # rows of slides.csv after it (None: nothing to fold, the table was not read)
    records: int = 0  # journal records folded
    journals: int = 0  # journal files folded and deleted
    in_flight: int = 0  # journals read but left in place (a write was in flight)
    written: bool = False  # slides.csv changed
    seconds: float = 0.0


def compact_status(path: str | Path, wait: bool = True) -> Compaction | None:
    """Fold the journals of ``path`` (``RUN/slides.csv``) into it (see the module docstring). ``wait=False``:
    return None at once when another process is compacting."""
    t0 = time.perf_counter()
    table = Path(path)
    live, folding = list_journals(table)
    if not live and not folding:
        return Compaction(seconds=time.perf_counter() - t0)
    with _compaction_lock(table, wait) as got:
        if not got:
            return None
        in_flight = _seize(table, live)
        _, folding = list_journals(table)  # the journals seized now and any a crashed compaction left
        records: list[StatusRecord] = []
        for p in folding:
            records.extend(read_status_journal(p))
        base = read_slides_csv(table)
        folded = _Table(base)
        folded.fold(records)
        rows = folded.sorted_rows()
        written = rows != base
        if written:
            write_slides_csv(table, rows, durable=True)
        for p in folding:
            p.unlink(missing_ok=True)
        if folding:
            fsync_dir(journal_dir(table))
    return Compaction(len(rows), len(records), len(folding), in_flight, written, time.perf_counter() - t0)


def _seize(table: Path, journals: list[Path]) -> int:
    """Rename every journal with no write in flight to ``*.folding``; the number left in place."""
    stamp = time.time_ns()
    left = 0
    for p in journals:
        try:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND)  # writable: NFS emulates flock with POSIX locks
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                left += 1
                continue
            if _still_named(fd, p):
                os.rename(p, folding_path(p, stamp))
        finally:
            os.close(fd)
    return left


@contextlib.contextmanager
def _compaction_lock(table: Path, wait: bool) -> Iterator[bool]:
    d = journal_dir(table)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / f"{table.stem}.compact.lock", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            log.info("%s: another process is compacting the status; leaving it to that one", table)
            yield False
            return
        yield True
    finally:
        os.close(fd)


# ---------------------------------------------------------------- `wsi status RUN`
@dataclass
class StatusOverview:
    """Counts per (stage, component) and status, and the failed rows, of a RUN folder (after compaction)."""

    run: str
    rows: int = 0
    counts: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    failed: list[SlideStatus] = field(default_factory=list)
    compaction: Compaction | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "rows": self.rows,
            "stages": [{"stage": s, "component": c, **n} for (s, c), n in self.counts.items()],
            "failed": [{"slide_id": r.slide_id, "stage": r.stage, "component": r.component,
                        "error_type": r.error_type, "error": r.error, "path": r.path} for r in self.failed],
            "compaction": None if self.compaction is None else vars(self.compaction),
        }


def status_overview(run_root: str | Path) -> StatusOverview:
    """Compact ``RUN/slides.csv`` (waiting for a compaction under way), then count its rows per stage and
    status and list the failed slides."""
    root = Path(run_root)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such RUN folder; pass the folder given to --out of `wsi tile` / `wsi run`")
    table = root / SLIDES_CSV
    compaction = compact_status(table, wait=True)
    rows = read_status(table)
    counts: dict[tuple[str, str], Counter[str]] = {}
    for r in rows:
        counts.setdefault((r.stage, r.component), Counter())[r.status] += 1
    statuses = (STATUS_DONE, STATUS_SKIPPED, STATUS_FAILED)
    out = {k: {s: int(c.get(s, 0)) for s in statuses} | {s: n for s, n in c.items() if s not in statuses}
           for k, c in sorted(counts.items())}
    return StatusOverview(str(root), len(rows), out, [r for r in rows if r.status == STATUS_FAILED], compaction)
