"""`wsi run SLIDES_DIR --out RUN`: the whole pipeline with one progress display."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        slides: Path = typer.Argument(..., help="Folder of slides (or one slide file)."),
        out: Path = typer.Option(..., "--out", "-o", help="RUN folder (created; re-running resumes)."),
        model: str = typer.Option(None, "--model", help="MIL model folder or shipped name (default: the demo model)."),
        encoder: str = typer.Option(None, "--encoder", help="Feature encoder (default: the one the model was trained on)."),
        labels: Path = typer.Option(None, "--labels", help="labels.csv (slide_id, patient_id, targets): adds metrics."),
        config: Path = typer.Option(None, "--config", help="YAML with sections tiling/extract/heatmap/tme."),
        target_mpp: float = typer.Option(None, "--target-mpp", help="Tile µm/px (must match the model)."),
        slide_mpp: float = typer.Option(None, "--slide-mpp", help="Level-0 µm/px for slides whose file has none."),
        workers: int = typer.Option(None, "--workers", "-j", help="Parallel slides while tiling (default: cores)."),
        no_tme: bool = typer.Option(False, "--no-tme", help="Skip the TME read-out."),
        no_heatmaps: bool = typer.Option(False, "--no-heatmaps", help="Skip heatmaps."),
        no_report: bool = typer.Option(False, "--no-report", help="Skip the HTML report."),
        recursive: bool = typer.Option(False, "--recursive", "-r", help="Search the folder recursively."),
    ) -> None:
        """Tile → extract → predict → TME → heatmaps → report. Resumable; failed slides are summarised."""
        from wsi_pipeline.pipeline import DEFAULT_MODEL, RunConfig, config_from_yaml, run_pipeline

        cfg = RunConfig(slides=str(slides), out=str(out), model=DEFAULT_MODEL)
        if config is not None:
            cfg = config_from_yaml(config, cfg)
        overrides = {"model": model, "encoder": encoder, "labels": str(labels) if labels else None,
                     "workers": workers}
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        cfg.tme, cfg.heatmaps, cfg.report = cfg.tme and not no_tme, cfg.heatmaps and not no_heatmaps, \
            cfg.report and not no_report
        cfg.recursive = recursive
        if target_mpp is not None:
            cfg.tiling.target_mpp = target_mpp
        if slide_mpp is not None:
            cfg.tiling.slide_mpp = slide_mpp
        summary = _with_progress(cfg, run_pipeline)
        _print_summary(summary, out)
        if not summary.ok:
            raise typer.Exit(1)


def _with_progress(cfg, run_pipeline):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.fields[stage]:<8}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as progress:
        tasks: dict[str, int] = {}

        def hook(stage: str, event: str, total: int | None) -> None:
            if event == "start":
                tasks[stage] = progress.add_task("", total=max(total or 0, 1), stage=stage)
            elif event == "advance" and stage in tasks:
                progress.advance(tasks[stage])
            elif event == "end" and stage in tasks:
                t = progress.tasks[tasks[stage]]
                progress.update(tasks[stage], completed=t.total)

        return run_pipeline(cfg, hook)


def _print_summary(summary, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(stderr=True)
    t = Table(title=f"wsi run → {out}  ({summary.seconds:.1f} s)")
    for col in ("stage", "done", "skipped", "failed", "seconds", "note"):
        t.add_column(col)
    for st in summary.stages:
        t.add_row(st.name, str(st.done), str(st.skipped), str(len(st.failed)), f"{st.seconds:.1f}", st.note)
    c.print(t)
    for sid, errs in summary.failed.items():
        for stage, err in errs:
            c.print(f"[red]✗ {sid}[/red] ({stage}): {err}")
    if summary.ok:
        c.print(f"report: {out / 'report.html'} · view: wsi view {out}")
