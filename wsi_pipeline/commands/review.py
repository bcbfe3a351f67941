"""Review commands: ``wsi heatmap``, ``wsi export-qupath`` and ``wsi view``."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_pipeline.commands.tiling_options import slide_dir_list, slide_dir_option


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(s.strip() for s in v.split(",") if s.strip())
    return out


def register(app: typer.Typer) -> None:
    @app.command("heatmap")
    def heatmap(
        run: Path = typer.Argument(..., help="RUN folder with tiles and per-tile scores."),
        model: str = typer.Option("", "--model", help="MIL model dir (or its name); default: the only one."),
        targets: list[str] = typer.Option(None, "--targets", help="Targets to map (comma-separated or repeated)."),
        scale: str = typer.Option("percentile", "--scale", help="percentile (within slide) or absolute."),
        vmin: float = typer.Option(None, "--vmin", help="Absolute scale: score at the bottom of the colour bar."),
        vmax: float = typer.Option(None, "--vmax", help="Absolute scale: score at the top of the colour bar."),
        smooth: bool = typer.Option(False, "--smooth/--no-smooth", help="Average overlapping tiles per cell."),
        top_k: int = typer.Option(8, "--top-k", help="Tiles per top/bottom gallery (0: none)."),
        attention: bool = typer.Option(False, "--attention", help="Also map each target's MIL attention."),
        cmap: str = typer.Option("RdYlBu_r", "--cmap", help="matplotlib colour map."),
        slides: list[str] = typer.Option(None, "--slide", help="Only these slide ids (repeatable)."),
        no_zarr: bool = typer.Option(False, "--no-zarr", help="Skip the multiscale zarr."),
        no_geojson: bool = typer.Option(False, "--no-geojson", help="Skip the QuPath GeoJSON."),
        force: bool = typer.Option(False, "--force", help="Redo slides whose outputs are up to date."),
        workers: int = typer.Option(None, "--workers", "-j", help="Parallel slides (default: the cores; 0 = in-process)."),
        slide_dir: list[Path] = slide_dir_option(),
    ) -> None:
        """Heatmaps per slide and target: PNG overlay, multiscale zarr, top/bottom-k galleries, QuPath GeoJSON."""
        from rich.console import Console

        from wsi_pipeline.commands.stageview import failure_footer, print_failures, stage_progress
        from wsi_pipeline.review.config import HeatmapConfig
        from wsi_pipeline.review.heatmap import run_heatmaps
        from wsi_pipeline.runfolder.layout import RunLayout
        from wsi_pipeline.runfolder.resolved import save_resolved

        cfg = HeatmapConfig(model=model, targets=_split(targets), scale=scale, vmin=vmin, vmax=vmax, smooth=smooth,
                            top_k=top_k, attention=attention, cmap=cmap, zarr=not no_zarr,
                            geojson=not no_geojson, force=force, workers=workers,
                            slide_dirs=slide_dir_list(slide_dir)).validate()
        save_resolved(run, "heatmap", {"heatmap": cfg})
        with stage_progress() as progress:
            summary = run_heatmaps(run, cfg, _split(slides) or None, progress=progress)
        Console(stderr=True).print(f"heatmaps: {len(summary.done)} done, {len(summary.skipped)} up to date, "
                                   f"{len(summary.failed)} failed → {RunLayout(run).root / 'heatmaps'}")
        print_failures([summary])
        failure_footer([summary], run)
        if summary.failed:
            raise typer.Exit(1)

    @app.command("export-qupath")
    def export_qupath_cmd(
        run: Path = typer.Argument(..., help="RUN folder with tiles and per-tile scores."),
        model: str = typer.Option("", "--model", help="MIL model dir (or its name); default: the only one."),
        targets: list[str] = typer.Option(None, "--targets", help="Targets to export (comma-separated)."),
        attention: bool = typer.Option(False, "--attention", help="Also export MIL attention."),
        slides: list[str] = typer.Option(None, "--slide", help="Only these slide ids (repeatable)."),
        force: bool = typer.Option(False, "--force", help="Rewrite GeoJSON files that are up to date."),
    ) -> None:
        """QuPath GeoJSON per slide: one detection per tile with score measurements and the top class."""
        from rich.console import Console

        from wsi_pipeline.commands.stageview import failure_footer, print_failures, stage_progress
        from wsi_pipeline.review.qupath import run_export_qupath

        with stage_progress() as progress:
            summary = run_export_qupath(run, model or None, _split(targets), _split(slides) or None,
                                        attention=attention, force=force, progress=progress)
        Console(stderr=True).print(
            f"QuPath GeoJSON: {len(summary.done)} written, {len(summary.skipped)} up to date, "
            f"{len(summary.failed)} failed (File → Import objects, or drag the .geojson onto the image in QuPath)")
        print_failures([summary])
        failure_footer([summary], run)
        if not summary.ok:
            raise typer.Exit(1)

    @app.command("view")
    def view(
        run: Path = typer.Argument(..., help="RUN folder to browse."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
        port: int = typer.Option(8000, "--port", help="Port to listen on."),
        model: str = typer.Option("", "--model", help="Scores of this model (name or dir); default: the only one."),
        allow_host: list[str] = typer.Option(None, "--allow-host",
                                             help="Also answer to this Host name (repeatable; e.g. behind a proxy). "
                                                  "Others are refused: DNS-rebinding protection."),
        slide_dir: list[Path] = slide_dir_option(),
    ) -> None:
        """Browse the run's slides in a deep-zoom viewer with heatmap overlays."""
        from wsi_pipeline.review.config import ViewerConfig
        from wsi_pipeline.review.server import serve

        cfg = ViewerConfig(host=host, port=port, model=model, allow_hosts=_split(allow_host),
                           slide_dirs=slide_dir_list(slide_dir)).validate()
        serve(run, cfg, on_ready=lambda url: typer.echo(f"wsi view: {url}  (Ctrl+C to stop)"))
