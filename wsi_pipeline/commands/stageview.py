"""How every command shows a stage: one progress display fed by :class:`StageEvent`s, and one summary with
the per-slide causes of failure (slide, error type, the message that says how to fix it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from wsi_pipeline.runfolder.executor import Progress, StageEvent, StageSummary, iter_failures

MARKS = {"done": "✓", "skipped": "=", "failed": "✗"}


@contextlib.contextmanager
def stage_progress() -> Iterator[Progress]:
    """A rich progress display with one bar per stage; a stage that announces ``units_total`` (extraction:
    tiles) gets a bar in those units with a rate column in them (e.g. "740 tiles/s")."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]{task.fields[stage]:<8}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("{task.description}"))
    with Progress(*columns, transient=False) as bar:
        tasks: dict[str, Any] = {}
        by_units: dict[str, str] = {}  # stage → the name of its units

        def hook(ev: StageEvent) -> None:
            if ev.kind == "start":
                total = ev.units_total if ev.units_total else ev.total
                if ev.units_total:
                    by_units[ev.stage] = ev.unit or "units"
                tasks[ev.stage] = bar.add_task("", total=max(total or 0, 1), stage=ev.stage, rate="")
                return
            task = tasks.get(ev.stage)
            if task is None:
                return
            if ev.kind == "units":
                bar.advance(task, ev.units)
                speed = bar.tasks[task].speed
                bar.update(task, rate=f"{speed:,.0f} {by_units.get(ev.stage, 'units')}/s" if speed else "")
            elif ev.kind == "slide" and ev.outcome is not None:
                if ev.stage not in by_units:
                    bar.advance(task)
                bar.update(task, description=f"{ev.outcome.slide_id} {MARKS.get(ev.outcome.status, '')}")
            elif ev.kind == "end":
                bar.update(task, completed=bar.tasks[task].total)

        yield hook


def print_failures(summaries: Sequence[StageSummary]) -> None:
    """Every failed slide with its stage, error type and message (the message says how to fix it)."""
    from rich.console import Console
    from rich.markup import escape

    c = Console(stderr=True, soft_wrap=True)
    for stage, o in iter_failures(summaries):
        c.print(f"[red]✗ {escape(o.slide_id)}[/red] ({stage}) [bold]{escape(o.error_type)}[/bold]: {escape(o.error)}")


def print_table(summaries: Sequence[StageSummary], title: str) -> None:
    """One row per stage: done, skipped, failed, seconds, note."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("stage", "done", "skipped", "failed", "seconds", "note"):
        t.add_column(col)
    for s in summaries:
        done = len(s.done) or int(s.figures.get("done", 0))
        skipped = len(s.skipped) or int(s.figures.get("skipped", 0))
        t.add_row(s.stage, str(done), str(skipped), str(len(s.failed)), f"{s.seconds:.1f}", s.note)
    Console(stderr=True).print(t)


def failure_footer(summaries: Sequence[StageSummary], run: Any) -> None:
    """After the failures: how many slides failed, and where the full table is."""
    from rich.console import Console

    failed = {o.slide_id for _, o in iter_failures(summaries)}
    if failed:
        Console(stderr=True).print(f"[red]{len(failed)} slide(s) failed[/red] — causes above, in {run}/slides.csv "
                                   f"and from `wsi status {run}`")
