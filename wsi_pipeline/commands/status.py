"""`wsi status RUN [--json]`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    @app.command("status")
    def status(
        run: Path = typer.Argument(..., help="RUN folder."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    ) -> None:
        """Fold the status journals into RUN/slides.csv, then show the slides per stage and status, and every
        failed slide with its error."""
        from wsi_pipeline.runfolder.status import status_overview

        overview = status_overview(run)
        if as_json:
            typer.echo(json.dumps(overview.to_dict(), indent=2))
        else:
            _print(overview.to_dict())


def _print(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    c = Console(soft_wrap=True)
    if not doc["stages"]:
        c.print(f"{escape(doc['run'])}: no status rows yet")
        return
    statuses = list(dict.fromkeys(k for s in doc["stages"] for k in s if k not in ("stage", "component")))
    t = Table(title=f"{doc['run']}: {doc['rows']} status rows")
    for col in ("stage", "component", *statuses):
        t.add_column(col, justify="left" if col in ("stage", "component") else "right")
    for s in doc["stages"]:
        t.add_row(escape(s["stage"]), escape(s["component"]), *(str(s.get(k, 0)) for k in statuses))
    c.print(t)
    for f in doc["failed"]:
        comp = f" [{escape(f['component'])}]" if f["component"] else ""
        c.print(f"[red]✗ {escape(f['slide_id'])}[/red] ({escape(f['stage'])}{comp}) "
                f"[bold]{escape(f['error_type'])}[/bold]: {escape(f['error'])}")
