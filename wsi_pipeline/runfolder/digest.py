"""Digests of a stage's inputs, for resume keys: content where a file is small or user-supplied (labels, a
model folder), size + modification time where files are many and written atomically by the stages
themselves (features, scores)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from wsi_pipeline.formats.hashing import file_sha256, params_hash
from wsi_pipeline.runfolder.status import read_status


def content_digest(path: str | Path | None) -> str:
    """sha256 of a file's bytes; '' for no file (None, or a path that does not exist)."""
    if path is None:
        return ""
    p = Path(path)
    return file_sha256(p) if p.is_file() else ""


def folder_digest(folder: str | Path) -> str:
    """One digest of every file's relative path and content below ``folder`` (e.g. a model folder)."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return params_hash({str(p.relative_to(root)): file_sha256(p) for p in files})


def stamps(paths: Iterable[Path]) -> str:
    """One digest of (name, size, mtime) of each existing file: cheap, for outputs written atomically."""
    out: dict[str, Any] = {}
    for p in paths:
        if p.exists():
            st = p.stat()
            out[p.name] = [st.st_size, st.st_mtime_ns]
    return params_hash(out)


def status_digest(slides_csv: str | Path, stages: Iterable[str] | None = None) -> str:
    """The status table's outcomes (slide, stage, component, status, error, tiles) without timings."""
    keep = set(stages) if stages is not None else None
    rows = sorted((r.slide_id, r.stage, r.component, r.status, r.error, str(r.n_tiles))
                  for r in read_status(slides_csv) if keep is None or r.stage in keep)
    return params_hash({"rows": rows})
