"""`wsi ssl-train` (DINO pretraining; also under `torchrun -m wsi_pipeline ssl-train`) and
`wsi eval-encoder` (k-NN / linear probe on a labelled tile folder)."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import typer

from wsi_pipeline.commands.tiling_options import slide_dir_list, slide_dir_option

# `wsi ssl-train` option → SSLConfig field ("augment.<field>": a field of its augment section); an option not
# listed here is the field of the same name
_SSL_OPTION_FIELDS: dict[str, tuple[str, ...]] = {
    "mpp": ("data_mpp",),
    "train_mpp": ("augment.mpp",),
    "slide_dir": ("slide_dirs",),
    "color_jitter": ("augment.brightness", "augment.contrast", "augment.saturation"),
    **{k: (f"augment.{k}",) for k in ("global_size", "local_size", "n_local", "zoom_min", "zoom_max",
                                       "hed_sigma", "hed_bias", "hue", "gray_p")},
}


def register(app: typer.Typer) -> None:
    @app.command("ssl-train")
    def ssl_train_cmd(
        ctx: typer.Context,
        data: Path = typer.Option(None, "--data", help="Image folder (recursive) or RUN folder with tiles/*.h5 (or `data:` in --config)."),
        out: Path = typer.Option(None, "--out", help="Encoder folder to write: encoder.json, model.safetensors and the resolved config.yaml (or `out:` in --config)."),
        config: Path = typer.Option(None, "--config", "-c", help="YAML of SSLConfig fields, `augment:` a section of AugmentConfig fields (e.g. OUT/config.yaml of an earlier run); options given here override it."),
        arch: str = typer.Option("resnet10t", "--arch", help="timm architecture (vit_tiny_patch16_224, vit_small_patch16_224, resnet18, ...)."),
        timm_kwargs: str = typer.Option("{}", "--timm-kwargs", help='Extra timm.create_model arguments as JSON, e.g. \'{"depth": 6}\'.'),
        name: str = typer.Option("", "--name", help="Encoder name in encoder.json (default: the --out folder name)."),
        steps: int = typer.Option(1000, "--steps", help="Optimisation steps."),
        batch_size: int = typer.Option(64, "--batch-size", help="Images per step and rank."),
        global_size: int = typer.Option(112, "--global-size", help="Global crop size (px at --train-mpp)."),
        local_size: int = typer.Option(48, "--local-size", help="Local crop size (px at --train-mpp)."),
        n_local: int = typer.Option(6, "--n-local", help="Local crops per image."),
        zoom_min: float = typer.Option(0.8, "--zoom-min", help="Crop scale jitter around the physical scale: lowest factor."),
        zoom_max: float = typer.Option(1.25, "--zoom-max", help="Crop scale jitter: highest factor."),
        hed_sigma: float = typer.Option(0.05, "--hed-sigma", help="HED stain jitter: each stain × U(1−σ, 1+σ)."),
        hed_bias: float = typer.Option(0.01, "--hed-bias", help="HED stain jitter: each stain + U(−b, b) (rgb2hed units)."),
        color_jitter: float = typer.Option(0.15, "--color-jitter", help="Brightness/contrast/saturation factors U(1−a, 1+a)."),
        hue: float = typer.Option(0.0, "--hue", help="Hue rotation, fraction of a turn (DINO: 0.1)."),
        gray_p: float = typer.Option(0.0, "--gray-p", help="Probability of a grayscale view (DINO: 0.2)."),
        mpp: float = typer.Option(0.5, "--mpp", help="µm/px of image-folder tiles (kather16: 0.495). RUN tiles carry their own."),
        train_mpp: float = typer.Option(0.5, "--train-mpp", help="µm/px the encoder is trained at (its encoder.json mpp)."),
        subset: str = typer.Option("all", "--subset", help="all | train | test side of the source split of a labelled folder."),
        split_seed: int = typer.Option(0, "--split-seed", help="Seed of the source split (same as eval-encoder --seed)."),
        test_fraction: float = typer.Option(0.3, "--test-fraction", help="Held-out fraction of the source split."),
        max_tiles_per_slide: int = typer.Option(0, "--max-tiles-per-slide", help="RUN sources: sample at most this many tiles per slide (0: all)."),
        slide_dir: list[Path] = slide_dir_option(),
        lr: float = typer.Option(5e-4, "--lr", help="Peak learning rate per 256 images (AdamW; scaled by the global batch)."),
        weight_decay: float = typer.Option(0.04, "--weight-decay"),
        weight_decay_end: float = typer.Option(0.4, "--weight-decay-end"),
        momentum_teacher: float = typer.Option(0.996, "--momentum-teacher", help="Teacher EMA momentum at the start (cosine to 1)."),
        teacher_temp: float = typer.Option(0.07, "--teacher-temp", help="Teacher temperature after warm-up (from --teacher-temp-start)."),
        teacher_temp_start: float = typer.Option(0.04, "--teacher-temp-start", help="Teacher temperature at step 0 (linear warm-up)."),
        warmup_steps: int = typer.Option(-1, "--warmup-steps", help="Learning-rate warm-up steps (-1: 10% of --steps)."),
        out_dim: int = typer.Option(4096, "--out-dim", help="DINO head prototypes."),
        koleo: float = typer.Option(0.0, "--koleo", help="KoLeo regulariser weight (0: off)."),
        clip_grad: float = typer.Option(3.0, "--clip-grad"),
        stain_norm: str = typer.Option("none", "--stain-norm", help="Per-tile stain standardisation built into the encoder: none | reinhard-lab (L*a*b* mean/std of each tile mapped to the training tiles' average)."),
        stain_fit_tiles: int = typer.Option(1024, "--stain-fit-tiles", help="Training tiles sampled (seeded) to fit the --stain-norm target."),
        init_from: str = typer.Option("", "--init-from", help="Start from these backbone weights: an encoder name/folder of the same --arch, a .safetensors/.pth file or hf-hub:org/name (default: random init)."),
        precision: str = typer.Option("bf16", "--precision", help="bf16 (autocast) or fp32."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
        seed: int = typer.Option(0, "--seed"),
        workers: int = typer.Option(0, "--workers", help="DataLoader worker processes per rank."),
        threads: int = typer.Option(0, "--threads", help="torch threads per rank (0: default)."),
        augment_on_device: bool = typer.Option(True, "--augment-on-device/--augment-on-cpu",
                                               help="On a GPU, run the augmentations there (workers only read tiles)."),
        checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Checkpoint (and export) every N steps."),
        checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir", help="Default: OUT/checkpoints."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint, exactly."),
        stop_at_step: int = typer.Option(0, "--stop-at-step", help="Stop after this step (checkpointed) to resume later."),
        licence: str = typer.Option("see the training data's licence", "--licence", help="Licence recorded in encoder.json."),
        description: str = typer.Option("", "--description", help="Description recorded in encoder.json."),
    ) -> None:
        """Pretrain a tile encoder with DINO self-distillation and export its teacher backbone."""
        from wsi_pipeline.config import load_yaml
        from wsi_pipeline.ssl.config import ssl_config_from_dict
        from wsi_pipeline.ssl.trainer import run_ssl_train

        options = {k: v for k, v in ctx.params.items() if k != "config"}
        given = {k for k in options if _given(ctx, k)}
        fields = _ssl_fields(options)
        if config:  # the file, then the options given on the command line; defaults for the rest
            fields = _merge(_merge(fields, load_yaml(config)), _ssl_fields(options, only=given))
        cfg = ssl_config_from_dict(fields, config or "ssl-train")
        steps = cfg.steps
        res = run_ssl_train(cfg)
        import os

        if int(os.environ.get("RANK", "0")) == 0:
            state = "done" if res.completed else "stopped (resume with --resume)"
            last = f", last loss {res.losses[-1]:.4f}" if res.losses else ""
            typer.echo(f"ssl-train {state} at step {res.steps_done}/{steps}{last}; encoder: {res.out_dir}")

    @app.command("eval-encoder")
    def eval_encoder_cmd(
        encoder: str | None = typer.Option(None, "--encoder", help="Encoder name, timm:<arch> or folder (default: the shipped demo encoder)."),
        data: Path = typer.Option(..., "--data", help="Labelled tile folder: one sub-folder of tiles per class."),
        weights: str | None = typer.Option(None, "--weights", help="Weights file for the encoder."),
        mpp: float = typer.Option(0.5, "--mpp", help="µm/px of the tiles (kather16: 0.495); tiles are rescaled to the encoder's MPP."),
        seed: int = typer.Option(0, "--seed", help="Seed of the source split and the random-init baseline."),
        test_fraction: float = typer.Option(0.3, "--test-fraction"),
        min_sources: int = typer.Option(8, "--min-sources", help="Classes with fewer source images are split by tile (a huge value: split every class by tile)."),
        k: int = typer.Option(20, "-k", "--k", help="Neighbours of the k-NN probe."),
        batch_size: int = typer.Option(64, "--batch-size"),
        precision: str = typer.Option("bf16", "--precision", help="bf16 | fp16 | fp32."),
        device: str = typer.Option("auto", "--device"),
        no_random_init: bool = typer.Option(False, "--no-random-init", help="Skip the random-init baseline."),
        max_per_class: int = typer.Option(0, "--max-per-class", help="Subsample tiles per class (0: all)."),
        json_path: Path | None = typer.Option(None, "--json", help="Write the report as JSON."),
        inner_split_seed: int | None = typer.Option(
            None, "--inner-split-seed",
            help="Choosing between checkpoints or recipes? Leave the held-out sources out and evaluate on a "
                 "second split (this seed) of the training side; keep the held-out figure for the final model."),
    ) -> None:
        """k-NN (k=20, cosine, weighted) and linear-probe balanced accuracy on held-out source images."""
        from rich.console import Console
        from rich.table import Table

        from wsi_pipeline.ssl.config import EvalConfig
        from wsi_pipeline.ssl.evaluate import interval_lines, run_eval_encoder, table_rows

        cfg = EvalConfig(
            encoder=encoder, data=str(data), weights=weights, data_mpp=mpp, seed=seed, test_fraction=test_fraction,
            min_sources=min_sources, k=k, batch_size=batch_size, precision=precision, device=device, random_init=not no_random_init,
            max_per_class=max_per_class, json_path=str(json_path) if json_path else "", inner_split_seed=inner_split_seed,
        )
        report = run_eval_encoder(cfg)
        modes = list(report["split"]["mode_per_class"].values())
        n_tile = modes.count("tile")
        how = ("split by tile" if n_tile == len(modes) else "split by source image" if n_tile == 0
               else f"split by source image ({n_tile} classes with few sources by tile)")
        what = (f"held-out (split seed {seed})" if inner_split_seed is None else
                f"inner validation (training side of split seed {seed}, re-split with seed {inner_split_seed}; "
                "held-out sources unused)")
        table = Table(title=(f"{what} balanced accuracy: {report['n_train']} train / {report['n_test']} test tiles, "
                             f"{len(report['classes'])} classes, {how}"))
        table.add_column("features")
        table.add_column(f"k-NN (k={k}, cosine, weighted)", justify="right")
        table.add_column("linear probe", justify="right")
        for row in table_rows(report):
            table.add_row(*row)
        Console().print(table)
        for line in interval_lines(report):
            typer.echo(line)
        if json_path:
            typer.echo(f"wrote {json_path}")
        else:
            typer.echo(json.dumps({k_: v for k_, v in report.items() if k_.endswith("balanced_accuracy")}))


def _ssl_fields(options: Mapping[str, Any], only: Collection[str] | None = None) -> dict[str, Any]:
    """The SSLConfig fields (``augment`` a nested section) of the ``wsi ssl-train`` options (all, or ``only``)."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if only is not None and name not in only:
            continue
        if name == "timm_kwargs":
            value = _json_option("--timm-kwargs", value)
        elif isinstance(value, Path):
            value = str(value)
        elif name == "slide_dir":
            value = slide_dir_list(value)
        elif name == "checkpoint_dir" and value is None:
            value = ""
        for field in _SSL_OPTION_FIELDS.get(name, (name,)):
            section, _, key = field.rpartition(".")
            (out.setdefault(section, {}) if section else out)[key] = value
    return out


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given (command line or environment), not left at its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with the keys of ``over``; a section (mapping) is merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _json_option(option: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        from wsi_pipeline.errors import ConfigError

        raise ConfigError(f"{option} {text!r} is not valid JSON ({e})") from e
