"""`wsi info SLIDE [--json]`."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info(
        slide: Path = typer.Argument(..., help="Slide file (SVS, NDPI, MRXS, SCN, BIF, TIFF, OME-TIFF, DICOM, PNG/JPEG)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        slide_mpp: float = typer.Option(None, "--slide-mpp", help="Level-0 µm/px if the file has none."),
        force_slide_mpp: float = typer.Option(None, "--force-slide-mpp", help="Override the file's µm/px."),
        mpp_from_objective: bool = typer.Option(False, "--mpp-from-objective",
                                                help="Allow MPP = 10 / objective power when the file has none."),
    ) -> None:
        """Show a slide's levels, vendor, objective power and MPP (µm per pixel).

        Exits 0 once the slide is shown; a missing MPP is a warning here (tiling it needs --slide-mpp)."""
        from wsi_pipeline.errors import MissingMPPError
        from wsi_pipeline.slide.open import open_slide

        with open_slide(slide, mpp=force_slide_mpp, mpp_fallback=slide_mpp,
                        mpp_from_objective=mpp_from_objective) as s:
            data = s.info()
            if as_json:
                typer.echo(json.dumps(data, indent=2))
            else:
                _print_table(data)
            if data["mpp"] is None:
                try:
                    s.mpp  # noqa: B018 - raises MissingMPPError naming the fix
                except MissingMPPError as e:
                    typer.secho(f"warning: {e}", err=True, fg=typer.colors.YELLOW)

    def _print_table(data: dict) -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{data['slide_id']}  ({data['backend']}: {data['vendor']})", show_header=False)
        t.add_row("path", data["path"])
        t.add_row("dimensions (level 0)", f"{data['dimensions'][0]} × {data['dimensions'][1]}")
        mpp = data["mpp"]
        t.add_row("MPP (µm/px)", f"{mpp:g} ({data['mpp_source']})" if mpp else "[red]missing[/red]")
        t.add_row("objective power", f"{data['objective_power']:g}x" if data["objective_power"] else "-")
        for i, (dims, ds) in enumerate(zip(data["level_dimensions"], data["level_downsamples"], strict=True)):
            lvl_mpp = f", {data['level_mpp'][i]:g} µm/px" if data["level_mpp"] else ""
            t.add_row(f"level {i}", f"{dims[0]} × {dims[1]}  (downsample {ds:g}{lvl_mpp})")
        Console().print(t)
