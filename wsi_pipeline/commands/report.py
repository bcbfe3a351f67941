"""`wsi report`: one self-contained HTML report of a RUN folder."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run: Path = typer.Argument(..., help="RUN folder."),
        labels: Path | None = typer.Option(None, "--labels", help="Labels CSV: adds performance (ROC, "
                                                                  "calibration, ...) and responder subgroups."),
        out: Path | None = typer.Option(None, "--out", help="Output HTML file (default RUN/report.html)."),
        model: Path | None = typer.Option(None, "--model", help="MIL model DIR (default: the one `wsi predict` "
                                                                "used, from RUN/configs/predict.yaml)."),
        n_boot: int = typer.Option(1000, "--n-boot", help="Patient-level bootstrap resamples for the CIs."),
        thumb_px: int = typer.Option(160, "--thumb-px", help="Size of the inlined slide thumbnails."),
        max_slides: int = typer.Option(2000, "--max-slides", help="Rows of the per-slide table."),
        title: str = typer.Option("wsi-pipeline cohort report", "--title"),
        force: bool = typer.Option(False, "--force", help="Rebuild even when the report is up to date."),
    ) -> None:
        """Cohort report: predictions, heatmap links, performance with CIs, TME and analyses → one HTML file."""
        from rich.console import Console

        from wsi_pipeline.report.build import run_report
        from wsi_pipeline.report.config import ReportConfig

        cfg = ReportConfig(run=str(run), labels=str(labels) if labels else None, out=str(out) if out else None,
                           model=str(model) if model else None, n_boot=n_boot, thumb_px=thumb_px,
                           max_slides=max_slides, title=title)
        res = run_report(cfg, force=force)
        f = res.figures
        if res.note == "up to date":
            Console().print(f"report up to date (same inputs): {f['path']}; --force to rebuild")
        else:
            Console().print(f"report: {f['path']} ({len(f['sections'])} sections: {', '.join(f['sections'])}; "
                            f"{res.seconds:.1f} s)")
