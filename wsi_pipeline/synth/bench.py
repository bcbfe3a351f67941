"""The benchmark slide: a gigapixel Aperio-style JPEG pyramid with realistic tissue coverage.

Default: 40000 × 30000 px at 0.25 µm/px (10 × 7.5 mm), downsamples 1, 4, 16, 64, 256-px tiles, several
tissue blobs covering about half of the slide, glass elsewhere. It is painted tile by tile (bounded
memory) by :class:`~wsi_pipeline.synth.tissue.TissuePainter`; to stay fast, level 0 is rendered at
0.5 µm/px and upsampled ×2 (``min_render_um``), so nuclei are slightly soft at full resolution.

The file is cached: ``make_bench_slide()`` reuses it when a sidecar ``<name>.json`` records the same
parameters. Location: ``$WSI_BENCH_DIR`` or ``~/.cache/wsi-pipeline/bench/``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.synth.layout import LayoutParams, class_map_truth, make_class_map
from wsi_pipeline.synth.tissue import RenderOptions, TissuePainter

log = logging.getLogger(__name__)

BENCH_GENERATOR_VERSION = 2  # bump when the pixels of the bench slide change


@dataclass(frozen=True)
class BenchSlideParams:
    """Everything that decides the bench slide's pixels (the cache key)."""

    size: tuple[int, int] = (40000, 30000)
    mpp: float = 0.25
    downsamples: tuple[int, ...] = (1, 4, 16, 64)
    tile: int = 256
    quality: int = 80
    seed: int = 0
    cell_um: float = 112.0
    phenotype: str = "inflamed"
    tissue_coverage: tuple[float, float] = (0.45, 0.55)
    blob_sigma_cells: float = 3.0
    n_blobs: int = 4
    render: RenderOptions = field(
        default_factory=lambda: RenderOptions(raster_um=2.0, min_render_um=0.5, strip_px=4096)
    )

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d["generator_version"] = BENCH_GENERATOR_VERSION
        return json.loads(json.dumps(d))  # tuples → lists, as stored in the sidecar


def default_bench_dir() -> Path:
    env = os.environ.get("WSI_BENCH_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wsi-pipeline" / "bench"


def default_bench_path(params: BenchSlideParams | None = None) -> Path:
    p = params or BenchSlideParams()
    return default_bench_dir() / f"bench_{p.size[0]}x{p.size[1]}_{p.mpp:g}mpp.svs"


def bench_class_map(params: BenchSlideParams) -> np.ndarray:
    """The bench slide's class map: a few tissue blobs, tumour nests, stroma, lymphocytes."""
    from wsi_pipeline.synth.slides import grid_shape

    shape = grid_shape(params.size, params.mpp, params.cell_um)
    layout = LayoutParams(tissue_coverage=params.tissue_coverage, blob_sigma_cells=params.blob_sigma_cells,
                          margin_cells=2 if min(shape) >= 30 else 1, adipose_prob=1.0, n_blobs=params.n_blobs)
    rng = np.random.default_rng([params.seed, 2])
    return make_class_map(shape, params.phenotype, rng, layout)


def bench_painter(params: BenchSlideParams) -> TissuePainter:
    return TissuePainter(bench_class_map(params), params.cell_um, params.mpp, params.size, params.seed,
                         params.phenotype, params.render)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def bench_slide_is_current(path: str | Path, params: BenchSlideParams | None = None) -> bool:
    """True when ``path`` exists and its sidecar records exactly ``params``."""
    path = Path(path)
    side = _sidecar(path)
    if not (path.is_file() and side.is_file()):
        return False
    try:
        stored = json.loads(side.read_text())
    except json.JSONDecodeError:
        return False
    return stored.get("params") == (params or BenchSlideParams()).key()


def make_bench_slide(
    path: str | Path | None = None, params: BenchSlideParams | None = None, force: bool = False
) -> Path:
    """Build the benchmark slide at ``path`` (default :func:`default_bench_path`), or reuse it when a
    previous build with the same parameters is there. Written atomically, tile by tile."""
    from wsi_pipeline.formats.atomic import atomic_path, write_text_atomic
    from wsi_pipeline.synth.pyramid import write_pyramid_tiff

    p = params or BenchSlideParams()
    path = Path(path) if path is not None else default_bench_path(p)
    if not force and bench_slide_is_current(path, p):
        log.info("reusing bench slide %s", path)
        return path
    t0 = time.perf_counter()
    painter = bench_painter(p)
    truth = class_map_truth(painter.class_map)
    log.info("building bench slide %s (%dx%d at %g µm/px, tissue %.0f%% of cells)", path, *p.size, p.mpp,
             100 * truth["tissue_coverage"])
    with atomic_path(path) as tmp:
        write_pyramid_tiff(tmp, painter, p.size, p.mpp, p.downsamples, tile=p.tile, quality=p.quality,
                           flavor="aperio")
        tmp.chmod(0o644)
    seconds = time.perf_counter() - t0
    write_text_atomic(_sidecar(path), json.dumps(
        {"params": p.key(), "seconds": round(seconds, 1), "bytes": path.stat().st_size,
         "tissue_coverage_cells": truth["tissue_coverage"]}, indent=1))
    log.info("bench slide written in %.1f s", seconds)
    return path
