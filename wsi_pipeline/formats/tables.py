"""The CSV files: the labels CSV a user brings, the tables a RUN folder holds (``predictions.csv``,
``patient_predictions.csv``, ``tme.csv``, ``slides.csv``) and a model folder's ``oof_predictions.csv``.
One reader and one writer each.

A CSV file cannot carry its format version, so each format's version and columns are documented here, in
its :class:`CsvFormat` constant; readers check the required columns and refuse a file without them, naming
the file and the command that rewrites it. ``slide_id`` and ``patient_id`` are always read as text (ids
such as ``001`` keep their zeros).

The labels CSV has ONE parsing rule (:func:`read_labels_csv`), used by every command that reads labels
(`wsi train`, `predict`, `evaluate`, `subgroups`, `report`, `predictive`, `evolution`, `tme --labels`):

1. every cell is read as text; header names and cells are stripped of surrounding whitespace;
2. then the cells in :data:`LABELS_NA_VALUES` (the empty cell, ``NA``, ``NaN``, ``null``, …) are missing;
3. ``slide_id`` is required, non-empty and unique; ``patient_id`` defaults to ``slide_id`` (column
   absent, or the cell empty);
4. other columns stay text, or with ``numeric=True`` become numbers when every present value is one.

Violations raise :class:`~wsi_pipeline.errors.LabelsError` naming the file, the rows and the fix.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_pipeline.errors import FormatError, LabelsError
from wsi_pipeline.formats.atomic import write_text_atomic, write_text_if_changed

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SLIDE_ID = "slide_id"
PATIENT_ID = "patient_id"
N_SLIDES = "n_slides"
ID_COLUMNS = (SLIDE_ID, PATIENT_ID)


@dataclass(frozen=True)
class CsvFormat:
    """The name, version and required leading columns of one CSV format, and the command that writes it."""

    name: str
    version: int
    required: tuple[str, ...]
    written_by: str
    description: str = ""


LABELS = CsvFormat(
    "labels.csv", 1, (SLIDE_ID,), "your labels CSV",
    "one row per slide: slide_id (the slide file name without extension), optional patient_id, then any "
    "clinical columns (targets, treatment arm, outcome, covariates, timepoint)",
)
PREDICTIONS = CsvFormat(
    "predictions.csv", 1, (SLIDE_ID, PATIENT_ID), "`wsi predict`",
    "one row per slide: slide_id, patient_id, then per target t: binary t_prob + t_pred; multiclass "
    "t_prob_<class> + t_pred; regression t_pred; survival t_risk (names from mil.tables)",
)
PATIENT_PREDICTIONS = CsvFormat(
    "patient_predictions.csv", 1, (PATIENT_ID, N_SLIDES), "`wsi predict`",
    "one row per patient: patient_id, n_slides, then the prediction columns of predictions.csv (mean of the "
    "patient's slides; t_pred recomputed from the mean)",
)
TME = CsvFormat(
    "tme.csv", 1, (SLIDE_ID,), "`wsi tme RUN`",
    "one row per slide: slide_id, the headline read-outs (immune_phenotype, til_fraction, …), then every "
    "other read-out; sorted by slide_id; floats with 6 significant digits",
)
OOF_PREDICTIONS = CsvFormat(
    "oof_predictions.csv", 2, ("model", PATIENT_ID), "`wsi train`",
    "in a model folder: one row per (model variant, patient): model, patient_id, fold, n_slides, the "
    "out-of-fold prediction columns of predictions.csv (probabilities calibrated, cross-fitted; t_pred at the "
    "variant's recorded cut-off), the uncalibrated probabilities of each calibrated target "
    "(<probability column>_uncalibrated; version 2), then the truth (t_true, or t_time + t_event)",
)

LABELS_CSV = LABELS.name
PREDICTIONS_CSV = PREDICTIONS.name
PATIENT_PREDICTIONS_CSV = PATIENT_PREDICTIONS.name
TME_CSV = TME.name
OOF_PREDICTIONS_CSV = OOF_PREDICTIONS.name

# cells that mean "missing" in a labels CSV, compared after stripping whitespace (case-sensitive)
LABELS_NA_VALUES = ("", "NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "None", "<NA>", "#N/A")


# ---------------------------------------------------------------- labels CSV
SAVE_AS_CSV = "save it as comma-separated UTF-8 (in Excel: Save As → CSV UTF-8 (Comma delimited))"
OTHER_SEPARATORS = {  # a one-column header holding one of these: (what the file is, what to add to the fix)
    ";": ("';' (Excel in a European locale saves CSV so)", ", with '.' as the decimal point"),
    "\t": ("tabs (a tab-separated export)", ""),
    "|": ("'|'", ""),
}


def _labels_error(path: Path, what: str, fix: str) -> LabelsError:
    return LabelsError(f"{path}: {what}; {fix}")


def _lines(index: Iterable[int], limit: int = 5) -> str:
    """File line numbers of data rows (line 1 is the header)."""
    nums = [int(i) + 2 for i in index]
    more = f" (+{len(nums) - limit} more)" if len(nums) > limit else ""
    return ", ".join(map(str, nums[:limit])) + more


def check_label_ids(df: pd.DataFrame, path: str | Path) -> None:
    """The id checks of the labels format: ``slide_id`` present, non-empty, unique. Raises
    :class:`LabelsError` naming ``path``, the lines and the fix."""
    path = Path(path)
    if SLIDE_ID not in df.columns:
        raise _labels_error(path, f"no '{SLIDE_ID}' column (columns: {list(df.columns)})",
                            "add one: the slide file name without extension, one row per slide")
    ids = df[SLIDE_ID]
    empty = ids.isna() | (ids.astype(str).str.strip() == "")
    if empty.any():
        raise _labels_error(path, f"empty slide_id on line(s) {_lines(df.index[empty])}",
                            "fill in the slide id or delete those rows")
    dup = ids.duplicated(keep=False)
    if dup.any():
        first = ids[dup].iloc[0]
        lines = _lines(df.index[ids == first])
        raise _labels_error(path, f"slide_id '{first}' appears twice (lines {lines})",
                            "one row per slide: merge or delete the duplicate rows")


def read_labels_csv(path: str | Path, numeric: bool = False) -> pd.DataFrame:
    """The labels CSV by the one parsing rule of the module docstring: one row per slide (RangeIndex, file
    order), ``slide_id`` and ``patient_id`` as stripped text, other columns text (``numeric=False``, the
    form `wsi train` encodes targets from) or numbers where every present value is one (``numeric=True``,
    the form the analyses compute with). Missing cells are NaN. ``df.attrs["path"]`` is the file."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise _labels_error(path, "labels CSV not found", "pass --labels PATH to a CSV with a slide_id column")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        head = path.read_bytes()[:2]
        what = ("it is UTF-16 text (Excel's \"Unicode Text\" export), not UTF-8" if head in (b"\xff\xfe", b"\xfe\xff")
                else f"cannot parse the labels CSV ({e})")
        raise _labels_error(path, what, SAVE_AS_CSV) from e
    df.columns = [str(c).strip() for c in df.columns]
    if len(df.columns) == 1 and (sep := next((c for c in OTHER_SEPARATORS if c in df.columns[0]), None)):
        why, fix = OTHER_SEPARATORS[sep]
        raise _labels_error(path, f"its columns are separated by {why}, not commas", SAVE_AS_CSV + fix)
    if df.columns.duplicated().any():
        dup = sorted({c for c in df.columns[df.columns.duplicated()]})
        raise _labels_error(path, f"column(s) {dup} appear twice", "rename or delete the duplicate columns")
    df = df.apply(lambda col: col.str.strip())
    df = df.mask(df.isin(LABELS_NA_VALUES))
    check_label_ids(df, path)
    if PATIENT_ID not in df.columns:
        log.info("%s: no patient_id column; every slide is its own patient", path)
        df[PATIENT_ID] = df[SLIDE_ID]
    df[PATIENT_ID] = df[PATIENT_ID].fillna(df[SLIDE_ID])
    if numeric:
        df = _numbers_where_possible(df)
    df.attrs["path"] = str(path)
    return df


def _numbers_where_possible(df: pd.DataFrame) -> pd.DataFrame:
    """Columns other than the ids whose every present value parses as a number, as numbers (int64 when all
    are integers and none is missing, else float64)."""
    import pandas as pd

    out = df.copy()
    for col in out.columns:
        if col in ID_COLUMNS:
            continue
        num = pd.to_numeric(out[col], errors="coerce")
        if int(num.notna().sum()) == int(out[col].notna().sum()):
            out[col] = num
    return out


def write_labels_csv(path: str | Path, df: pd.DataFrame, float_format: str | None = None) -> Path:
    """Write a labels table (checked by :func:`check_label_ids`) atomically."""
    check_label_ids(df.reset_index(drop=True), path)
    write_text_atomic(path, df.to_csv(index=False, float_format=float_format))
    return Path(path)


# ---------------------------------------------------------------- RUN tables (pandas)
def _read_run_table(path: str | Path, fmt: CsvFormat, text: bool = False) -> pd.DataFrame:
    import pandas as pd

    path = Path(path)
    fix = f"re-run {fmt.written_by}"
    if not path.is_file():
        raise FormatError(path, f"no {fmt.name}; run {fmt.written_by} first")
    try:
        if text:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            df = pd.read_csv(path, dtype={c: str for c in ID_COLUMNS})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise FormatError(path, f"cannot parse CSV ({e}); {fix}") from e
    missing = [c for c in fmt.required if c not in df.columns]
    if missing:
        raise FormatError(path, f"no column(s) {missing} (version {fmt.version} of {fmt.name} starts with "
                                f"{list(fmt.required)}); {fix}")
    return df


def _check_columns(path: str | Path, df: pd.DataFrame, fmt: CsvFormat) -> None:
    missing = [c for c in fmt.required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: a {fmt.name} table needs the columns {list(fmt.required)}; missing {missing}")


def read_predictions_csv(path: str | Path, text: bool = False) -> pd.DataFrame:
    """``predictions.csv`` (see :data:`PREDICTIONS`): ids as text, other columns as pandas infers them, or
    every cell as text (``text=True``; missing = '')."""
    return _read_run_table(path, PREDICTIONS, text=text)


def write_predictions_csv(path: str | Path, df: pd.DataFrame) -> Path:
    _check_columns(path, df, PREDICTIONS)
    write_text_atomic(path, df.to_csv(index=False))
    return Path(path)


def read_patient_predictions_csv(path: str | Path) -> pd.DataFrame:
    """``patient_predictions.csv`` (see :data:`PATIENT_PREDICTIONS`)."""
    return _read_run_table(path, PATIENT_PREDICTIONS)


def write_patient_predictions_csv(path: str | Path, df: pd.DataFrame) -> Path:
    _check_columns(path, df, PATIENT_PREDICTIONS)
    write_text_atomic(path, df.to_csv(index=False))
    return Path(path)


def read_oof_predictions_csv(path: str | Path) -> pd.DataFrame:
    """``oof_predictions.csv`` of a model folder (see :data:`OOF_PREDICTIONS`)."""
    return _read_run_table(path, OOF_PREDICTIONS)


def write_oof_predictions_csv(path: str | Path, df: pd.DataFrame) -> Path:
    _check_columns(path, df, OOF_PREDICTIONS)
    write_text_atomic(path, df.to_csv(index=False))
    return Path(path)


def read_tme_csv(path: str | Path) -> pd.DataFrame:
    """``tme.csv`` (see :data:`TME`)."""
    return _read_run_table(path, TME)


def write_tme_csv(
    path: str | Path, rows: pd.DataFrame | Sequence[Mapping[str, Any]], leading: Sequence[str] = (SLIDE_ID,)
) -> Path:
    """``tme.csv`` from one mapping (or DataFrame row) per slide: ``leading`` columns first (those present),
    sorted by ``slide_id``; rewritten only when its content changes (keeps the mtime for resumable stages)."""
    import pandas as pd

    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if len(df):
        _check_columns(path, df, TME)
        first = [c for c in dict.fromkeys([SLIDE_ID, *leading]) if c in df.columns]
        df = df[first + [c for c in df.columns if c not in first]].sort_values(SLIDE_ID)
    write_text_if_changed(path, df.to_csv(index=False, float_format="%.6g"))
    return Path(path)


# ---------------------------------------------------------------- slides.csv (the RUN's status table)
STATUS_DONE = "done"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"  # done earlier with the same parameters


@dataclass
class SlideStatus:
    """One row of ``RUN/slides.csv``: what happened to one slide in one stage (and component)."""

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


_STATUS_FIELDS = [f.name for f in fields(SlideStatus)]
SLIDES_COLUMNS = ("slide_id", "stage", "component",
                  *[c for c in _STATUS_FIELDS if c not in ("slide_id", "stage", "component")])
SLIDES = CsvFormat(
    "slides.csv", 2, ("slide_id", "stage"), "the stage again (delete the broken file first)",
    "one row per (slide_id, stage, component) with status, error, figures; version 1 had no 'component' "
    "column and is read as component ''. The compacted view of the status journals (formats.journal): "
    "'updated' is ISO 8601 local time to the microsecond with UTC offset (rows written before the journals: "
    "to the second, no offset)",
)
SLIDES_CSV = SLIDES.name
_ROW_CELLS = operator.attrgetter(*SLIDES_COLUMNS)


def updated_text(t_ns: int) -> str:
    """The ``updated`` cell of a status row recorded at Unix time ``t_ns`` (ns): ISO 8601 local time to the
    microsecond with its UTC offset, e.g. ``2026-03-01T12:00:00.123456+01:00``."""
    sec, ns = divmod(int(t_ns), 1_000_000_000)
    return datetime.fromtimestamp(sec).astimezone().replace(microsecond=ns // 1000).isoformat()


def updated_us(text: str) -> int:
    """Unix time in microseconds of an ``updated`` cell; a cell without UTC offset (version 1 rows, to the
    second) is local time; an empty or unreadable cell is 0 (older than any record)."""
    try:
        dt = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return 0
    if dt.tzinfo is None:
        dt = dt.astimezone()
    return (dt - _EPOCH) // timedelta(microseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def read_slides_csv(path: str | Path) -> list[SlideStatus]:
    """The rows of ``slides.csv``, all values as text; [] when there is no file yet."""
    path = Path(path)
    if not path.exists():
        return []
    with _slides_rows(path) as (rows, pos):
        width = len(pos)
        get = operator.itemgetter(*(pos.get(c, width) for c in _STATUS_FIELDS))  # a missing column: ''
        pad = [""] * (width + 1)
        return [SlideStatus(*get(cells + pad[len(cells):])) for cells in rows]


def read_slides_keys(path: str | Path) -> set[tuple[str, str, str]]:
    """The (slide_id, stage, component) of every row of ``slides.csv`` (which rows exist), without building
    the rows; empty when there is no file yet."""
    path = Path(path)
    if not path.exists():
        return set()
    with _slides_rows(path) as (rows, pos):
        width = len(pos)
        get = operator.itemgetter(*(pos.get(c, width) for c in ("slide_id", "stage", "component")))
        pad = [""] * (width + 1)
        return {get(cells + pad[len(cells):]) for cells in rows}


@contextlib.contextmanager
def _slides_rows(path: Path) -> Iterator[tuple[Iterator[list[str]], dict[str, int]]]:
    """The non-empty rows of ``slides.csv`` as cell lists, and each column's position; the header checked."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if header and any(c not in header for c in SLIDES.required):
            raise FormatError(path, f"not a status table (header {header}); re-run {SLIDES.written_by}")
        yield (cells for cells in reader if cells), {c: i for i, c in enumerate(header)}


def slides_csv_text(rows: Iterable[SlideStatus]) -> str:
    """The text of ``slides.csv`` (current version) holding ``rows`` in the order given."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(SLIDES_COLUMNS)
    w.writerows(map(_ROW_CELLS, rows))
    return buf.getvalue()


def write_slides_csv(path: str | Path, rows: Iterable[SlideStatus], durable: bool = False) -> None:
    """Write ``slides.csv`` (current version) atomically, rows in the order given; ``durable``: on disk
    (fsync'd, with its folder) before this returns."""
    write_text_atomic(path, slides_csv_text(rows), durable=durable)
