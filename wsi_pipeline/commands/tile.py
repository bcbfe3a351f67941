"""`wsi tile SLIDE_OR_DIR... --out RUN`."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_pipeline.commands.tiling_options import TilingOptions, tiling_options


def register(app: typer.Typer) -> None:
    @app.command("tile")
    @tiling_options
    def tile(
        inputs: list[Path] = typer.Argument(..., help="Slide files and/or folders of slides."),
        out: Path = typer.Option(..., "--out", "-o", help="RUN folder."),
        workers: int = typer.Option(None, "--workers", "-j", help="Parallel slides (default: the cores; 0 = in-process)."),
        shard: str = typer.Option(None, "--shard", help="I/N: process only shard I of N (default: torchrun/SLURM rank)."),
        recursive: bool = typer.Option(False, "--recursive", "-r", help="Search folders recursively."),
        force: bool = typer.Option(False, "--force", help="Redo slides already tiled with the same parameters."),
        tiling: TilingOptions = None,  # type: ignore[assignment] - filled by @tiling_options
    ) -> None:
        """Detect tissue and cut every slide into tiles at a true physical resolution."""
        from wsi_pipeline.runfolder.batch import default_workers, parse_shard
        from wsi_pipeline.runfolder.resolved import save_resolved
        from wsi_pipeline.slide.open import find_slides, no_slides_message

        cfg = tiling.apply()
        paths = find_slides(inputs, recursive=recursive)
        if not paths:
            raise typer.BadParameter(no_slides_message(inputs, recursive))
        the_shard = parse_shard(shard)
        n_workers = default_workers() if workers is None else workers
        save_resolved(out, "tile", {"inputs": [str(p) for p in inputs], "tiling": cfg,
                                    "workers": n_workers, "shard": f"{the_shard.index}/{the_shard.count}"})
        from wsi_pipeline.commands.stageview import failure_footer, print_failures, stage_progress
        from wsi_pipeline.tiling.stage import run_tile

        with stage_progress() as progress:
            summary = run_tile(paths, out, cfg, workers=n_workers, shard=the_shard, force=force,
                                 progress=progress)
        _report(summary)
        print_failures([summary])
        failure_footer([summary], out)
        if not summary.ok:
            raise typer.Exit(1)


def _report(summary) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"tiled {len(summary.done)}, skipped (already done) {len(summary.skipped)}, "
                               f"failed {len(summary.failed)}")
