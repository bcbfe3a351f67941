"""`wsi tile SLIDE_OR_DIR... --out RUN`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("tile")
    def tile(
        inputs: list[Path] = typer.Argument(..., help="Slide files and/or folders of slides."),
        out: Path = typer.Option(..., "--out", "-o", help="RUN folder."),
        target_mpp: float = typer.Option(0.5, "--target-mpp", help="Tile resolution in µm/px."),
        tile_size: int = typer.Option(224, "--tile-size", help="Tile side in pixels at --target-mpp."),
        overlap: int = typer.Option(0, "--overlap", help="Overlap between neighbouring tiles, in pixels."),
        min_tissue: float = typer.Option(0.25, "--min-tissue", help="Minimum tissue fraction to keep a tile."),
        slide_mpp: float = typer.Option(None, "--slide-mpp", help="Level-0 µm/px for slides whose file has no MPP."),
        force_slide_mpp: float = typer.Option(None, "--force-slide-mpp",
                                              help="Level-0 µm/px for every slide, overriding the files."),
        mpp_from_objective: bool = typer.Option(False, "--mpp-from-objective",
                                                help="Allow MPP = 10 / objective power when a file has none."),
        tissue_mpp: float = typer.Option(8.0, "--tissue-mpp", help="Resolution of the tissue mask (µm/px)."),
        no_pen_rejection: bool = typer.Option(False, "--no-pen-rejection", help="Keep pen-marked areas."),
        workers: int = typer.Option(None, "--workers", "-j", help="Parallel slides (default: the cores; 0 = in-process)."),
        shard: str = typer.Option(None, "--shard", help="I/N: process only shard I of N (default: torchrun/SLURM rank)."),
        recursive: bool = typer.Option(False, "--recursive", "-r", help="Search folders recursively."),
        force: bool = typer.Option(False, "--force", help="Redo slides already tiled with the same parameters."),
    ) -> None:
        """Detect tissue and cut every slide into tiles at a true physical resolution."""
        from wsi_pipeline.config import TilingConfig
        from wsi_pipeline.runfolder.batch import default_workers, parse_shard
        from wsi_pipeline.runfolder.resolved import save_resolved
        from wsi_pipeline.slide import find_slides
        cfg = TilingConfig(target_mpp=target_mpp, tile_size=tile_size, overlap=overlap, min_tissue=min_tissue,
                           slide_mpp=slide_mpp, force_slide_mpp=force_slide_mpp, mpp_from_objective=mpp_from_objective, tissue_mpp=tissue_mpp,
                           reject_pen=not no_pen_rejection).validate()
        paths = find_slides(inputs, recursive=recursive)
        if not paths:
            raise typer.BadParameter(f"no slide files found in {', '.join(map(str, inputs))}")
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
