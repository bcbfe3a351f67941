"""The one stage executor: every stage of a RUN folder runs through it.

A stage is a small object (see the protocols below); the executor owns what every stage needs the same way:

- the **resume key**: ``stage.key(item)`` covers every input the stage depends on; ``stage.done(item, key)``
  says whether the output on disk was made under that key (then the slide is *skipped*);
- **crash isolation**: a slide that raises, or kills its worker process, is a *failed* outcome and the
  others go on (``workers > 0``: one forked process per slide; ``workers == 0``: in this process);
- **status rows**, one per (slide, stage, component): appended to this process's journal as each slide
  finishes (O(1)), folded into ``RUN/slides.csv`` when the stage ends (:mod:`~wsi_pipeline.runfolder.status`);
- **progress** events of one shape (:class:`StageEvent`);
- one **summary** type (:class:`StageSummary`), whose ``ok`` decides the command's exit code.

Three kinds of stage:

- :class:`PerSlideStage`: a function of one slide (tiling, TME, heatmaps);
- :class:`StreamingStage`: takes the slides still to do and yields one outcome per slide as they finish
  (extraction: one DataLoader feeds the model across slides);
- :class:`CohortStage`: one output for all slides (predict's tables, the report), keyed on all its inputs.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from wsi_pipeline.errors import WSIPipelineError
from wsi_pipeline.formats.cards import read_stage_record, write_stage_record
from wsi_pipeline.runfolder.batch import map_isolated
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.runfolder.status import (
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_SKIPPED,
    SlideStatus,
    append_status,
    compact_status,
    read_status_keys,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- what a stage deals in
@dataclass(frozen=True)
class SlideItem:
    """One slide in a stage's scope: its id in the RUN folder and, when known, its file."""

    slide_id: str
    path: str = ""


@dataclass
class SlideOutcome:
    """What happened to one slide in one stage."""

    slide_id: str
    status: str = STATUS_DONE  # done | skipped | failed
    path: str = ""
    n_tiles: int | None = None
    slide_mpp: float | None = None
    seconds: float = 0.0
    error: str = ""
    error_type: str = ""
    value: Any = None  # the stage's per-slide result (e.g. a TME row); not written to slides.csv

    @property
    def ok(self) -> bool:
        return self.status != STATUS_FAILED


def failure(item: SlideItem, error: BaseException | str, seconds: float = 0.0, error_type: str = "") -> SlideOutcome:
    """A failed outcome from an exception (its type and message, which says how to fix) or a message."""
    if isinstance(error, BaseException):
        error_type = error_type or type(error).__name__
        error = str(error) or repr(error)
    return SlideOutcome(item.slide_id, STATUS_FAILED, path=item.path, seconds=seconds, error=str(error),
                        error_type=error_type or str(error).split(":", 1)[0])


@dataclass
class StageSummary:
    """One stage's run: an outcome per slide in scope, wall time, and stage-specific figures."""

    stage: str
    component: str = ""
    outcomes: list[SlideOutcome] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""
    figures: dict[str, Any] = field(default_factory=dict)  # e.g. tiles, tiles_per_s, wait_s for extraction

    def _ids(self, status: str) -> list[str]:
        return [o.slide_id for o in self.outcomes if o.status == status]

    @property
    def done(self) -> list[str]:
        return self._ids(STATUS_DONE)

    @property
    def skipped(self) -> list[str]:
        return self._ids(STATUS_SKIPPED)

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == STATUS_FAILED]

    @property
    def ok(self) -> bool:
        return not self.failed

    def values(self) -> dict[str, Any]:
        """slide_id → the stage's per-slide result, for the slides that did not fail."""
        return {o.slide_id: o.value for o in self.outcomes if o.ok}


@dataclass(frozen=True)
class StageEvent:
    """Progress of a stage. ``kind``: ``start`` (``total`` slides in scope; ``units_total`` finer units such
    as tiles, when the stage counts them, named by ``unit``), ``units`` (``units`` more done), ``slide``
    (``outcome``), ``end``."""

    stage: str
    kind: str
    total: int | None = None
    units_total: int | None = None
    units: int = 0
    outcome: SlideOutcome | None = None
    unit: str = ""


Progress = Callable[[StageEvent], None]


def _no_progress(_: StageEvent) -> None:
    return None


# ---------------------------------------------------------------- the stage protocols
@runtime_checkable
class PerSlideStage(Protocol):
    """A function of one slide. ``key``, ``done`` and ``process`` run in a worker process (the resume checks,
    ``key`` + ``done``, of a large cohort run in chunks of slides per worker, then ``process`` per slide)."""

    name: str
    component: str

    def key(self, item: SlideItem) -> str: ...

    def done(self, item: SlideItem, key: str) -> SlideOutcome | None: ...

    def process(self, item: SlideItem, key: str) -> SlideOutcome: ...


@runtime_checkable
class StreamingStage(Protocol):
    """Slides streamed through one pipeline. ``key`` and ``done`` run here; ``stream`` gets the slides still
    to do with their keys and yields one outcome per slide, in any order. ``units`` (optional) counts the
    work of those slides, e.g. tiles (what one is: ``unit``), and ``stream`` may report them through
    ``emit_units``."""

    name: str
    component: str
    unit: str

    def key(self, item: SlideItem) -> str: ...

    def done(self, item: SlideItem, key: str) -> SlideOutcome | None: ...

    def units(self, todo: Sequence[tuple[SlideItem, str]]) -> int | None: ...

    def stream(self, todo: Sequence[tuple[SlideItem, str]],
               emit_units: Callable[[int], None]) -> Iterator[SlideOutcome]: ...


@runtime_checkable
class CohortStage(Protocol):
    """One output for all slides. ``key`` covers every input (content, not timestamps); ``process`` makes the
    output and returns the per-slide outcomes it wants recorded (may be empty)."""

    name: str
    component: str

    def key(self) -> str: ...

    def outputs_exist(self) -> bool: ...

    def process(self, key: str) -> list[SlideOutcome]: ...


# ---------------------------------------------------------------- status rows
class _Recorder:
    """Records one status row per outcome in this process's journal; a skipped slide gets a row only when it
    has none yet (the status is read once, at the start). ``close`` folds the journals into slides.csv."""

    def __init__(self, layout: RunLayout, stage: str, component: str) -> None:
        self.layout, self.stage, self.component = layout, stage, component
        self.recorded = {sid for sid, st, comp in read_status_keys(layout.slides_csv)
                         if st == stage and comp == component}
        self.wrote = False

    def __call__(self, o: SlideOutcome) -> None:
        if o.status == STATUS_SKIPPED and o.slide_id in self.recorded:
            return
        append_status(self.layout.slides_csv, SlideStatus(
            slide_id=o.slide_id, stage=self.stage, component=self.component, path=o.path, status=o.status,
            error=o.error, error_type=o.error_type, n_tiles="" if o.n_tiles is None else o.n_tiles,
            slide_mpp="" if o.slide_mpp is None else round(o.slide_mpp, 6), seconds=round(o.seconds, 3)))
        self.recorded.add(o.slide_id)
        self.wrote = True
        if o.status == STATUS_FAILED:
            log.warning("%s (%s): %s", o.slide_id, self.stage, o.error)

    def close(self) -> None:
        """Fold the journals into slides.csv unless another process is doing it (the rows are safe in the
        journals either way, and every reader merges them)."""
        if not self.wrote:
            return
        try:
            compact_status(self.layout.slides_csv, wait=False)
        except (OSError, WSIPipelineError) as e:
            log.warning("%s: not compacted (%s); the journals in %s keep every row, `wsi status %s` retries",
                        self.layout.slides_csv, e, self.layout.status_dir, self.layout.root)

    def __enter__(self) -> _Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _skipped(prev: SlideOutcome, item: SlideItem) -> SlideOutcome:
    prev.status = STATUS_SKIPPED
    prev.slide_id = prev.slide_id or item.slide_id
    prev.path = prev.path or item.path
    return prev


# ---------------------------------------------------------------- per-slide
RESUME_CHECK_MIN = 64  # from this many slides, the resume checks run in chunks before the per-slide workers
RESUME_CHUNK = 128  # slides per forked resume-check worker


def _resume_checks(stage: PerSlideStage, items: Sequence[SlideItem], workers: int,
                   finish: Callable[[SlideOutcome], None]) -> list[SlideItem]:
    """Run ``key`` + ``done`` of many slides in forked workers, a chunk of slides each (one fork per chunk
    instead of one per slide: resuming a cohort costs the checks, not the forks); ``finish`` each slide
    already done, return the others in their order. A slide whose check raises, or whose chunk's worker
    dies, is left to its own isolated attempt, which reports the error."""
    chunks = [list(items[i:i + RESUME_CHUNK]) for i in range(0, len(items), RESUME_CHUNK)]
    to_do: set[str] = set()
    for res in map_isolated(lambda chunk: _check_done(stage, chunk), chunks, workers=workers):
        if not res.ok:
            to_do.update(it.slide_id for it in res.item)
            continue
        for item, out in zip(res.item, res.value, strict=True):
            if out is None:
                to_do.add(item.slide_id)
            else:
                finish(out)
    return [it for it in items if it.slide_id in to_do]


def _check_done(stage: PerSlideStage, chunk: Sequence[SlideItem]) -> list[SlideOutcome | None]:
    out: list[SlideOutcome | None] = []
    for item in chunk:
        try:
            prev = stage.done(item, stage.key(item))
        except Exception:  # noqa: BLE001 - the slide's own isolated attempt raises it again and reports it
            prev = None
        out.append(None if prev is None else _skipped(prev, item))
    return out


def _attempt(stage: PerSlideStage, item: SlideItem, force: bool) -> SlideOutcome:
    t0 = time.perf_counter()
    key = stage.key(item)
    if not force:
        prev = stage.done(item, key)
        if prev is not None:
            return _skipped(prev, item)
    out = stage.process(item, key)
    out.path = out.path or item.path
    out.seconds = out.seconds or time.perf_counter() - t0
    return out


def run_per_slide(stage: PerSlideStage, items: Sequence[SlideItem], layout: RunLayout, *, workers: int = 0,
                  force: bool = False, progress: Progress | None = None,
                  preload: Sequence[str] = ()) -> StageSummary:
    """Run ``stage`` on every item. ``workers > 0``: each slide in its own forked process, at most that many
    at a time (the ``preload`` modules are imported here first, so the workers inherit them instead of each
    importing them again: seconds for scipy, scikit-image or matplotlib); ``0``: in this process, with
    exceptions caught per slide."""
    emit = progress or _no_progress
    t0 = time.perf_counter()
    summary = StageSummary(stage.name, stage.component)
    emit(StageEvent(stage.name, "start", total=len(items)))
    if workers > 0 and len(items) > 1:
        for name in preload:
            importlib.import_module(name)
    n_workers = workers if len(items) > 1 else 0 if workers <= 0 else workers
    with _Recorder(layout, stage.name, stage.component) as record:
        todo = items
        if workers > 0 and not force and len(items) >= RESUME_CHECK_MIN:
            todo = _resume_checks(stage, items, workers, lambda o: _finish(o, record, summary, emit, stage.name))
        for res in map_isolated(lambda it: _attempt(stage, it, force), todo, workers=n_workers):
            out = res.value if res.ok else failure(res.item, res.error, res.seconds, res.error_type)
            _finish(out, record, summary, emit, stage.name)
    summary.seconds = time.perf_counter() - t0
    emit(StageEvent(stage.name, "end"))
    return summary


def _finish(out: SlideOutcome, record: _Recorder, summary: StageSummary, emit: Progress, name: str) -> None:
    record(out)
    summary.outcomes.append(out)
    emit(StageEvent(name, "slide", outcome=out))


# ---------------------------------------------------------------- streaming
def run_streaming(stage: StreamingStage, items: Sequence[SlideItem], layout: RunLayout, *, force: bool = False,
                  progress: Progress | None = None) -> StageSummary:
    """Plan (resume keys), then stream the slides still to do through ``stage.stream``. A failure to plan
    one slide fails that slide only; an error that stops the stream fails the slides it had not finished,
    and is raised again."""
    emit = progress or _no_progress
    t0 = time.perf_counter()
    summary = StageSummary(stage.name, stage.component)
    todo: list[tuple[SlideItem, str]] = []
    planned: list[SlideOutcome] = []
    for item in items:
        try:
            planned_or_key = _plan(stage, item, force)
        except Exception as e:  # noqa: BLE001 - isolation: this slide fails, the others are planned
            planned.append(failure(item, e))
            continue
        if isinstance(planned_or_key, SlideOutcome):
            planned.append(planned_or_key)
        else:
            todo.append((item, planned_or_key))
    emit(StageEvent(stage.name, "start", total=len(items), units_total=stage.units(todo), unit=stage.unit))
    with _Recorder(layout, stage.name, stage.component) as record:
        for out in planned:
            _finish(out, record, summary, emit, stage.name)
        _stream(stage, todo, record, summary, emit)
    summary.seconds = time.perf_counter() - t0
    emit(StageEvent(stage.name, "end"))
    return summary


def _stream(stage: StreamingStage, todo: Sequence[tuple[SlideItem, str]], record: _Recorder,
            summary: StageSummary, emit: Progress) -> None:
    pending = {item.slide_id: item for item, _ in todo}
    try:
        for out in stage.stream(todo, lambda n: emit(StageEvent(stage.name, "units", units=n))):
            pending.pop(out.slide_id, None)
            _finish(out, record, summary, emit, stage.name)
    except BaseException as e:
        for item in pending.values():
            _finish(failure(item, f"the {stage.name} stage stopped before this slide: {type(e).__name__}: {e}",
                            error_type=type(e).__name__), record, summary, emit, stage.name)
        raise


def _plan(stage: StreamingStage, item: SlideItem, force: bool) -> SlideOutcome | str:
    key = stage.key(item)
    if not force:
        prev = stage.done(item, key)
        if prev is not None:
            return _skipped(prev, item)
    return key


# ---------------------------------------------------------------- cohort
def run_cohort(stage: CohortStage, layout: RunLayout, *, force: bool = False,
               progress: Progress | None = None) -> StageSummary:
    """Make the stage's one output unless it exists under the same key (``RUN/stages/<stage>.json``)."""
    emit = progress or _no_progress
    t0 = time.perf_counter()
    summary = StageSummary(stage.name, stage.component)
    emit(StageEvent(stage.name, "start", total=1))
    key = stage.key()
    path = layout.stage_record_json(stage.name, stage.component)
    record = read_stage_record(path)
    if not force and record.get("key") == key and stage.outputs_exist():
        summary.note = "up to date"
        summary.figures["skipped"] = 1
    else:
        with _Recorder(layout, stage.name, stage.component) as recorder:
            for out in stage.process(key):
                _finish(out, recorder, summary, emit, stage.name)
        write_stage_record(path, {"stage": stage.name, "component": stage.component, "key": key,
                                  "slides": len(summary.outcomes), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        summary.figures["done"] = 1
    summary.seconds = time.perf_counter() - t0
    emit(StageEvent(stage.name, "end"))
    return summary


def iter_failures(summaries: Iterable[StageSummary]) -> Iterator[tuple[str, SlideOutcome]]:
    """(stage, failed outcome) over several stages, in order."""
    for s in summaries:
        for o in s.failed:
            yield s.stage, o
