"""Configuration of ``wsi extract``."""

from __future__ import annotations

import dataclasses
from typing import Any

from wsi_pipeline.errors import ConfigError

FEATURE_DTYPES = ("float16", "float32")


@dataclasses.dataclass
class ExtractConfig:
    encoder: str | None = None  # registry name, timm:<arch>, project folder; None = the shipped default
    weights: str | None = None  # local weights file or hf-hub:org/name
    init_seed: int | None = None  # seed of a random-init encoder (timm:<arch>, no weights); None = 0
    batch_size: int = 32
    num_workers: int | None = None  # reader processes; None = 0 on CPU (read in-process), cores - 1 with CUDA
    slide_dirs: list[str] = dataclasses.field(default_factory=list)  # where slides moved since tiling are (by name)
    reader_threads: int | None = None  # decoding threads when reading in-process; None = torch's threads
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "bf16"  # bf16 | fp16 | fp32 (autocast)
    compile: bool = False  # torch.compile the encoder
    dtype: str = "float16"  # stored feature dtype
    fast_reader: bool = True  # read JPEG-tiled TIFF pyramids with tifffile + libjpeg-turbo
    decode: str = "auto"  # auto | cpu-full | cpu-scaled | gpu (features.decode); auto = cpu-scaled everywhere
    reduced_decode: bool = True  # legacy switch: False = decode "cpu-full" (when decode is auto or cpu-scaled)
    cache_tiles: int = 256  # decoded stored tiles kept per reader process
    prefetch_factor: int = 2  # batches prefetched per reader process (when prefetch_batches is None)
    prefetch_batches: int | None = None  # batches ready ahead, all readers together: (N + 2) batch buffers (features.ring)
    allow_mpp_mismatch: bool = False  # tiles at another µm/px than the encoder was trained at
    force: bool = False  # recompute slides already extracted with the same parameters
    shard: str | None = None  # I/N (default: torchrun / SLURM rank)
    coords_dir: str | None = None  # CLAM / TRIDENT coordinate .h5 files instead of RUN/tiles
    slides_dir: str | None = None  # where the slides of --coords-dir live
    slide_mpp: float | None = None  # level-0 µm/px for coords files of slides without MPP

    def validate(self) -> ExtractConfig:
        from wsi_pipeline.encoders.meta import PRECISIONS

        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0 (got {self.num_workers})")
        if self.reader_threads is not None and self.reader_threads < 1:
            raise ConfigError(f"--reader-threads must be >= 1 (got {self.reader_threads})")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.dtype not in FEATURE_DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: expected one of {', '.join(FEATURE_DTYPES)}")
        if (self.coords_dir is None) != (self.slides_dir is None):
            raise ConfigError("--coords-dir and --slides-dir go together (coordinate files and their slides)")
        if self.prefetch_factor < 1:
            raise ConfigError(f"prefetch_factor must be >= 1 (got {self.prefetch_factor})")
        if self.prefetch_batches is not None and self.prefetch_batches < 1:
            raise ConfigError(f"--prefetch-batches must be >= 1 (got {self.prefetch_batches})")
        from wsi_pipeline.features.decode import check_decode_mode

        check_decode_mode(self.decode)
        if not self.reduced_decode and self.decode in ("auto", "cpu-scaled"):
            self.decode = "cpu-full"
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
