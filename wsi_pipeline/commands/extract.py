"""`wsi extract RUN [--encoder NAME] [--weights FILE] ...` and `wsi encoders`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from wsi_pipeline.commands.tiling_options import slide_dir_list, slide_dir_option


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract(
        run: Path = typer.Argument(..., help="RUN folder (with tiles/ from `wsi tile`)."),
        encoder: str = typer.Option(None, "--encoder", "-e",
                                    help="Encoder: a preset (see `wsi encoders`), timm:<arch>, or an encoder "
                                         "folder; default: the shipped demo encoder."),
        weights: str = typer.Option(None, "--weights", "-w",
                                    help="Local weights file (.safetensors/.pth/.bin) or hf-hub:org/name."),
        init_seed: int = typer.Option(None, "--init-seed",
                                      help="Seed of the random initialisation of timm:<arch> without --weights "
                                           "(default 0: the same network in every process and run)."),
        batch_size: int = typer.Option(32, "--batch-size", "-b", help="Tiles per batch."),
        num_workers: int = typer.Option(None, "--num-workers",
                                        help="Reader processes (default: cores-1 up to 16 with a GPU; 0 on "
                                             "CPU = read between batches in this process)."),
        reader_threads: int = typer.Option(None, "--reader-threads",
                                           help="Decoding threads when reading in this process "
                                                "(default: torch's thread count)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        slide_dir: list[Path] = slide_dir_option(),
        precision: str = typer.Option("bf16", "--precision", help="bf16, fp16 or fp32 (autocast)."),
        compile_model: bool = typer.Option(False, "--compile", help="torch.compile the encoder."),
        dtype: str = typer.Option("float16", "--dtype", help="Stored feature dtype: float16 or float32."),
        shard: str = typer.Option(None, "--shard", help="I/N: only shard I of N (default: torchrun/SLURM rank)."),
        coords_dir: Path = typer.Option(None, "--coords-dir",
                                        help="CLAM/TRIDENT coordinate .h5 files instead of RUN/tiles."),
        slides_dir: Path = typer.Option(None, "--slides-dir", help="Folder of the slides of --coords-dir."),
        slide_mpp: float = typer.Option(None, "--slide-mpp",
                                        help="Level-0 µm/px for --coords-dir slides without MPP."),
        allow_mpp_mismatch: bool = typer.Option(False, "--allow-mpp-mismatch",
                                                help="Run even if the tiles' µm/px differs from the encoder's."),
        no_fast_reader: bool = typer.Option(False, "--no-fast-reader",
                                            help="Read every slide through OpenSlide (slower)."),
        decode: str = typer.Option("auto", "--decode",
                                   help="JPEG tile decoding: cpu-full (full scale + area resize, the reference), "
                                        "cpu-scaled (1/2, 1/4, 1/8 scale in the DCT when the target µm/px "
                                        "allows), gpu (opt-in: nvJPEG on the model's GPU; measured slower "
                                        "than cpu-scaled on an H200), auto (= cpu-scaled, on CPU and CUDA)."),
        prefetch_batches: int = typer.Option(None, "--prefetch-batches",
                                             help="Batches the reader processes may have ready ahead, all "
                                                  "together: bounds the main process's batch buffers to "
                                                  "(N + 2) x batch x tile² x 3 bytes (default: 2 per reader "
                                                  "process, within 1 GiB)."),
        force: bool = typer.Option(False, "--force", help="Recompute slides already extracted."),
    ) -> None:
        """Embed every tile of every slide with an encoder into RUN/features/<encoder>/<slide_id>.h5."""
        from wsi_pipeline.commands.stageview import failure_footer, print_failures, stage_progress
        from wsi_pipeline.features.config import ExtractConfig
        from wsi_pipeline.features.extract import run_extract
        from wsi_pipeline.runfolder.resolved import save_resolved

        cfg = ExtractConfig(
            encoder=encoder, weights=weights, init_seed=init_seed, batch_size=batch_size, num_workers=num_workers,
            reader_threads=reader_threads, device=device,
            precision=precision, compile=compile_model, dtype=dtype, shard=shard,
            coords_dir=str(coords_dir) if coords_dir else None, slides_dir=str(slides_dir) if slides_dir else None,
            slide_mpp=slide_mpp, allow_mpp_mismatch=allow_mpp_mismatch, fast_reader=not no_fast_reader,
            decode=decode, prefetch_batches=prefetch_batches, force=force, slide_dirs=slide_dir_list(slide_dir),
        ).validate()
        if _rank() == 0:
            save_resolved(run, "extract", {"extract": cfg})
        with stage_progress() as progress:
            summary = run_extract(run, cfg, progress=progress)
        _report(summary)
        print_failures([summary])
        failure_footer([summary], run)
        if not summary.ok:
            raise typer.Exit(1)

    @app.command("encoders")
    def encoders(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """List the encoder presets and shipped project encoders with their metadata."""
        import json

        from wsi_pipeline.encoders.registry import get_encoder_meta, list_encoders

        metas = [get_encoder_meta(n) for n in list_encoders()]
        if as_json:
            typer.echo(json.dumps([m.to_dict() for m in metas], indent=2, default=str))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(title="encoders (also: timm:<any timm architecture>)")
        for col in ("name", "dim", "input", "µm/px", "licence", "weights"):
            t.add_column(col)
        for m in metas:
            t.add_row(m.name, str(m.embed_dim), str(m.input_size), f"{m.mpp:g}", m.licence, m.weights_source)
        Console().print(t)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _report(summary: Any) -> None:
    from rich.console import Console

    f = summary.figures
    rank = f" (rank {_rank()})" if _rank() else ""
    Console(stderr=True).print(
        f"{f['encoder']}{rank}: extracted {len(summary.done)} slides ({f['tiles']} tiles, {f['tiles_per_s']:,.1f} "
        f"tiles/s), skipped (already done) {len(summary.skipped)}, failed {len(summary.failed)} → {f['features_dir']}")
