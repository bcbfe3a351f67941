"""Configuration dataclasses of ``wsi ssl-train`` and ``wsi eval-encoder``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.ssl.augment import AugmentConfig


@dataclass
class SSLConfig:
    """DINO pretraining. Learning rate is given per 256 images (scaled by the global batch / 256)."""

    data: str
    out: str
    arch: str = "resnet10t"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # encoder name written to encoder.json (default: the --out folder name)
    steps: int = 1000
    batch_size: int = 64  # per rank
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data_mpp: float = 0.5  # µm/px of image-folder tiles (RUN tiles carry their own)
    subset: str = "all"  # all | train | test of the source split of a labelled folder
    split_seed: int = 0
    test_fraction: float = 0.3
    max_tiles_per_slide: int = 0  # RUN sources: 0 = all
    slide_dirs: list[str] = field(default_factory=list)  # RUN sources: where slides moved since tiling are (by name)
    input_size: int = 224  # nominal tile size written to encoder.json
    stain_norm: str = "none"  # none | reinhard-lab: per-tile stain standardisation, part of the exported encoder
    stain_fit_tiles: int = 1024  # tiles sampled (seeded) to fit the stain-standardisation target
    init_from: str = ""  # start from these backbone weights (encoder name/folder or weights file); '' = random
    # optimisation
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_steps: int = -1  # -1: 10% of steps
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer_steps: int = -1  # -1: 2% of steps
    drop_path: float = 0.1  # student ViTs only
    # DINO
    out_dim: int = 4096
    hidden_dim: int = 1024
    bottleneck_dim: int = 256
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_steps: int = -1  # -1: 30% of steps
    center_momentum: float = 0.9
    koleo: float = 0.0  # weight of the KoLeo regulariser on the student's first global view
    # run
    precision: str = "bf16"  # bf16 | fp32 (autocast)
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    augment_on_device: bool = True  # on a GPU, run the augmentations there (workers only read tiles)
    threads: int = 0  # torch intra-op threads per rank (0: torch's default)
    checkpoint_every: int = 100
    checkpoint_dir: str = ""  # default: <out>/checkpoints
    resume: bool = False
    stop_at_step: int = 0  # stop (after a checkpoint) at this step, to resume later; 0 = run to the end
    log_every: int = 10
    licence: str = "see the training data's licence"
    description: str = ""

    def resolved(self) -> SSLConfig:
        """Fill the -1 defaults that depend on ``steps`` and check ranges."""
        import dataclasses

        if self.steps <= 0:
            raise ConfigError(f"--steps must be positive, got {self.steps}")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size must be ≥ 2 (DINO centring), got {self.batch_size}")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"--precision {self.precision!r}: use bf16 or fp32")
        a = self.augment
        if a.global_size < 16 or a.local_size < 8 or a.n_local < 0:
            raise ConfigError(f"crop sizes too small: global {a.global_size}, local {a.local_size}, n_local {a.n_local}")
        if not 0 < a.zoom_min <= a.zoom_max:
            raise ConfigError(f"--zoom-min {a.zoom_min} / --zoom-max {a.zoom_max}: need 0 < zoom-min <= zoom-max "
                              "(1.0 / 1.0 turns the scale jitter off)")
        from wsi_pipeline.encoders.stain import STAIN_NORMS

        if self.stain_norm not in ("none", *STAIN_NORMS):
            raise ConfigError(f"--stain-norm {self.stain_norm!r}: use none or one of {', '.join(STAIN_NORMS)}")
        c = dataclasses.replace(self)
        if c.warmup_steps < 0:
            c.warmup_steps = max(1, c.steps // 10)
        if c.freeze_last_layer_steps < 0:
            c.freeze_last_layer_steps = c.steps // 50
        if c.teacher_temp_warmup_steps < 0:
            c.teacher_temp_warmup_steps = max(1, (c.steps * 3) // 10)
        return c


CONFIG_YAML = "config.yaml"  # the resolved SSLConfig, written next to the encoder it trains


def ssl_config_from_dict(data: Mapping[str, Any], source: str | Path = "the configuration") -> SSLConfig:
    """An :class:`SSLConfig` from a mapping of its fields, ``augment`` a section of
    :class:`~wsi_pipeline.ssl.augment.AugmentConfig` fields: the YAML of ``wsi ssl-train --config`` and the
    ``config.yaml`` it writes next to the encoder. Unknown keys, and no ``data`` or ``out``, are a
    :class:`ConfigError` naming ``source``."""
    from wsi_pipeline.config import from_dict

    fields = dict(data)
    augment = fields.pop("augment", None) or {}
    try:
        if not isinstance(augment, Mapping):
            raise ConfigError(f"`augment` must be a section of AugmentConfig fields, got {augment!r}")
        missing = [k for k in ("data", "out") if not fields.get(k)]
        if missing:
            raise ConfigError(f"no {' or '.join(missing)}: give --{' and --'.join(missing)} or set them in --config")
        aug = {k: tuple(v) if k in ("mean", "std") else v for k, v in augment.items()}
        return from_dict(SSLConfig, {**fields, "augment": from_dict(AugmentConfig, aug)})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


@dataclass
class EvalConfig:
    """``wsi eval-encoder``: k-NN and linear probe on a labelled tile folder, split by source image."""

    encoder: str | None
    data: str
    weights: str | None = None
    data_mpp: float = 0.5
    seed: int = 0
    test_fraction: float = 0.3
    min_sources: int = 8  # classes with fewer distinct sources are split by tile
    k: int = 20
    batch_size: int = 64
    precision: str = "bf16"
    device: str = "auto"
    random_init: bool = True  # also evaluate the same architecture at random initialisation
    colour_baseline: bool = True
    max_per_class: int = 0  # 0 = all tiles
    json_path: str = ""
    # set: drop the held-out side of the split and re-split the training side with this seed (model selection)
    inner_split_seed: int | None = None
