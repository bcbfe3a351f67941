"""The status journals of a RUN folder: ``RUN/status/slides.<writer>.jsonl``, one per writing process.

``slides.csv`` (:mod:`wsi_pipeline.formats.tables`) is the compacted view of the status; the journals hold
the outcomes recorded since the last compaction. Each process appends to its own journal (``<writer>`` names
the host, the process id and the process's start time, so no two processes ever share one), one JSON object
per line, every line flushed and fsync'd:

=========  =====================================================================================
key        value
=========  =====================================================================================
``v``      format version of the line (:data:`STATUS_JOURNAL_VERSION`)
``t``      when the outcome was recorded: Unix time in nanoseconds (``time.time_ns()``)
others     the :class:`~wsi_pipeline.formats.tables.SlideStatus` fields but ``updated`` (which is ``t``
           as text), as text like the cells of ``slides.csv``: ``slide_id``, ``stage``, ``component``,
           ``path``, ``status``, ``error``, ``error_type``, ``n_tiles``, ``slide_mpp``, ``seconds``
=========  =====================================================================================

A process killed in the middle of a write leaves a torn last line: the reader skips it with a warning (the
outcome it was writing was never acknowledged). A compaction renames the journals it folds to
``slides.<writer>.<t>.folding`` before it reads them and deletes them once ``slides.csv`` holds their rows;
readers read both kinds. The folding rules live with the status table (:mod:`wsi_pipeline.runfolder.status`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from wsi_pipeline.errors import FormatError
from wsi_pipeline.formats.tables import SLIDES_COLUMNS, SlideStatus, updated_text

log = logging.getLogger(__name__)

STATUS_JOURNAL_VERSION = 1
STATUS_DIR = "status"  # next to the table: RUN/status/
JOURNAL_SUFFIX = ".jsonl"
FOLDING_SUFFIX = ".folding"
_ROW_KEYS = tuple(c for c in SLIDES_COLUMNS if c != "updated")


@dataclass(frozen=True)
class StatusRecord:
    """One journal line: a status row and when it was recorded (Unix ns)."""

    t_ns: int
    row: SlideStatus


# ---------------------------------------------------------------- names
def journal_dir(table: str | Path) -> Path:
    """Where the journals of a status table live: ``<table's folder>/status``."""
    return Path(table).parent / STATUS_DIR


def journal_path(table: str | Path, writer: str) -> Path:
    """The journal of one writing process: ``status/<table stem>.<writer>.jsonl`` (``writer``: no dot)."""
    if "." in writer:
        raise ValueError(f"a journal writer name has no dot: {writer!r}")
    return journal_dir(table) / f"{Path(table).stem}.{writer}{JOURNAL_SUFFIX}"


def folding_path(journal: Path, t_ns: int) -> Path:
    """The name a compaction gives a journal it is folding (unique: ``t_ns`` is the compaction's start)."""
    return journal.with_name(f"{journal.name[: -len(JOURNAL_SUFFIX)]}.{t_ns}{FOLDING_SUFFIX}")


def list_journals(table: str | Path) -> tuple[list[Path], list[Path]]:
    """(live journals ``*.jsonl``, journals being folded ``*.folding``) of ``table``, sorted; one scan."""
    d = journal_dir(table)
    prefix = f"{Path(table).stem}."
    live: list[Path] = []
    folding: list[Path] = []
    try:
        with os.scandir(d) as it:
            for e in it:
                if not e.name.startswith(prefix):
                    continue
                rest = e.name[len(prefix):]  # <writer>.jsonl or <writer>.<t>.folding; a writer has no dot
                if rest.endswith(JOURNAL_SUFFIX) and "." not in rest[: -len(JOURNAL_SUFFIX)]:
                    live.append(Path(e.path))
                elif rest.endswith(FOLDING_SUFFIX) and rest[: -len(FOLDING_SUFFIX)].count(".") == 1:
                    folding.append(Path(e.path))
    except FileNotFoundError:
        pass
    return sorted(live), sorted(folding)


# ---------------------------------------------------------------- writer
def encode_status_records(records: Iterable[StatusRecord]) -> bytes:
    """The journal lines of ``records`` (UTF-8, each ending in a newline)."""
    lines = []
    for rec in records:
        doc: dict[str, object] = {"v": STATUS_JOURNAL_VERSION, "t": int(rec.t_ns)}
        for k in _ROW_KEYS:
            doc[k] = _text(getattr(rec.row, k))
        lines.append(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode() if lines else b""


def write_status_records(fd: int, records: Iterable[StatusRecord]) -> None:
    """Append ``records`` to the journal open as ``fd`` (opened with ``O_APPEND``), then fsync it."""
    data = memoryview(encode_status_records(records))
    while data:
        n = os.write(fd, data)
        data = data[n:]
    os.fsync(fd)


# ---------------------------------------------------------------- reader
def read_status_journal(path: str | Path, torn_level: int = logging.WARNING) -> list[StatusRecord]:
    """Every complete record of one journal, in file order. A torn line (a writer killed mid-write; in a
    live journal maybe a write in flight) is skipped and logged at ``torn_level``; a line of a newer
    format version raises :class:`FormatError`. A missing file raises ``FileNotFoundError`` (a compaction
    may have just folded it)."""
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out: list[StatusRecord] = []
    for i, line in enumerate(lines, 1):
        rec = _decode(path, i, line, torn_level)
        if rec is not None:
            out.append(rec)
    return out


def _decode(path: Path, lineno: int, line: bytes, torn_level: int) -> StatusRecord | None:
    try:
        doc = json.loads(line)
        version = int(doc["v"])
        t_ns = int(doc["t"])
        if version <= STATUS_JOURNAL_VERSION:
            row = SlideStatus(**{k: _text(doc.get(k, "")) for k in _ROW_KEYS}, updated=updated_text(t_ns))
    except (ValueError, KeyError, TypeError, AttributeError):
        log.log(torn_level, "%s: skipping line %d, an incomplete record (a process killed while writing it)",
                path, lineno)
        return None
    if version > STATUS_JOURNAL_VERSION:
        raise FormatError(path, f"journal line {lineno} has format version {version}, newer than this "
                                f"wsi-pipeline understands ({STATUS_JOURNAL_VERSION}); upgrade wsi-pipeline")
    return StatusRecord(t_ns, row)


def _text(v: object) -> str:
    """A value as slides.csv holds it (all text; None as empty)."""
    return "" if v is None else str(v)
