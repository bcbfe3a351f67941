"""`wsi run SLIDES_DIR --out RUN`: the whole pipeline with one progress display."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_pipeline.commands.tiling_options import TilingOptions, tiling_options


def register(app: typer.Typer) -> None:
    @app.command("run")
    @tiling_options
    def run(
        slides: Path = typer.Argument(..., help="Folder of slides (or one slide file)."),
        out: Path = typer.Option(..., "--out", "-o", help="RUN folder (created; re-running resumes)."),
        model: str = typer.Option(None, "--model", help="MIL model folder or shipped name (default: the demo model)."),
        encoder: str = typer.Option(None, "--encoder", help="Feature encoder (default: the one the model was trained on)."),
        weights: str = typer.Option(None, "--weights", "-w",
                                    help="Local weights file (or hf-hub:org/name) of --encoder, when not shipped."),
        labels: Path = typer.Option(None, "--labels", help="labels.csv (slide_id, patient_id, targets): adds metrics."),
        config: Path = typer.Option(None, "--config", help="YAML with sections tiling/extract/heatmap/tme."),
        workers: int = typer.Option(None, "--workers", "-j", help="Parallel slides while tiling and drawing heatmaps (default: cores)."),
        no_tme: bool = typer.Option(False, "--no-tme", help="Skip the TME read-out."),
        no_heatmaps: bool = typer.Option(False, "--no-heatmaps", help="Skip heatmaps."),
        no_report: bool = typer.Option(False, "--no-report", help="Skip the HTML report."),
        recursive: bool = typer.Option(False, "--recursive", "-r", help="Search the folder recursively."),
        force: bool = typer.Option(False, "--force", help="Redo tiling and everything that depends on it."),
        align_features: bool = typer.Option(
            False, "--align-features",
            help="Predict with this cohort's own feature statistics (slides from another site; at least 10)."),
        tiling: TilingOptions = None,  # type: ignore[assignment] - filled by @tiling_options
    ) -> None:
        """Tile → extract → predict → TME → heatmaps → report. Resumable; failed slides are summarised."""
        from wsi_pipeline.pipeline import DEFAULT_MODEL, RunConfig, config_from_yaml, run_pipeline

        cfg = RunConfig(slides=str(slides), out=str(out), model=DEFAULT_MODEL)
        if config is not None:
            cfg = config_from_yaml(config, cfg)
        overrides = {"model": model, "encoder": encoder, "labels": str(labels) if labels else None,
                     "workers": workers}
        if weights is not None:
            cfg.extract = {**cfg.extract, "weights": weights}
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        cfg.tme, cfg.heatmaps, cfg.report = cfg.tme and not no_tme, cfg.heatmaps and not no_heatmaps, \
            cfg.report and not no_report
        cfg.recursive, cfg.force = recursive, force
        cfg.align_features = cfg.align_features or align_features
        cfg.tiling = tiling.apply(cfg.tiling)
        from wsi_pipeline.commands.stageview import failure_footer, print_failures, print_table, stage_progress

        with stage_progress() as progress:
            summary = run_pipeline(cfg, progress)
        print_table(summary.stages, f"wsi run → {out}  ({summary.seconds:.1f} s)")
        print_failures(summary.stages)
        failure_footer(summary.stages, out)
        if summary.ok:
            typer.echo(f"report: {out / 'report.html'} · view: wsi view {out}", err=True)
        else:
            raise typer.Exit(1)
