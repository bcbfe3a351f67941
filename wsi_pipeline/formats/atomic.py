"""Atomic writes: a file that exists under its final name is always complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` only if the block succeeds.

    A file that exists under its final name is therefore always complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs are shared with the team
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> None:
    """Write ``text`` atomically; ``durable``: also on disk (the file fsync'd before the rename, its folder
    after) when this returns, for a file whose sources are deleted next (the status compaction)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    if durable:
        fsync_dir(Path(path).parent)


def fsync_dir(folder: str | Path) -> None:
    """Make the names in ``folder`` (files created, renamed or deleted) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_if_changed(path: str | Path, text: str) -> bool:
    """Write ``text`` atomically unless the file already holds exactly it (keeps mtimes of unchanged
    outputs, so resumable stages downstream see nothing new). Returns whether it wrote."""
    p = Path(path)
    if p.exists() and p.read_text() == text:
        return False
    write_text_atomic(p, text)
    return True


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
