"""One synthetic slide: a class map (truth) plus everything needed to render and write it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.synth.layout import (
    CLASS_NAMES,
    LayoutParams,
    class_map_truth,
    lymph_geometry,
    make_class_map,
)
from wsi_pipeline.synth.tissue import RenderOptions, TissuePainter

DEFAULT_CELL_UM = 112.0  # one class-map cell = one 224-px tile at 0.5 µm/px


@dataclass
class SlideSpec:
    """A synthetic slide before rendering. ``class_map`` cell (0, 0) starts at level-0 pixel (0, 0)."""

    slide_id: str
    seed: int
    phenotype: str
    class_map: np.ndarray
    size_l0: tuple[int, int]
    mpp: float
    cell_um: float = DEFAULT_CELL_UM
    extra: dict[str, Any] = field(default_factory=dict)

    def truth(self) -> dict[str, Any]:
        """``immune_phenotype``, class fractions (``class_map_truth``) and lymphocyte geometry."""
        out: dict[str, Any] = {"immune_phenotype": self.phenotype}
        out.update(class_map_truth(self.class_map))
        out.update({f"geom_{k}": v for k, v in lymph_geometry(self.class_map).items()})
        return out

    def painter(self, options: RenderOptions | None = None) -> TissuePainter:
        return TissuePainter(
            self.class_map, self.cell_um, self.mpp, self.size_l0, self.seed, self.phenotype,
            options or RenderOptions(),
        )


def grid_shape(size_l0: tuple[int, int], mpp: float, cell_um: float) -> tuple[int, int]:
    """(rows, cols) of class-map cells covering a level-0 size (partial cells at the right/bottom)."""
    return math.ceil(size_l0[1] * mpp / cell_um), math.ceil(size_l0[0] * mpp / cell_um)


def make_slide_spec(
    slide_id: str,
    seed: int,
    phenotype: str,
    size_l0: tuple[int, int] = (4000, 3000),
    mpp: float = 0.5,
    cell_um: float = DEFAULT_CELL_UM,
    layout: LayoutParams | None = None,
    til_target: float | None = None,
    tumour_target: float | None = None,
) -> SlideSpec:
    """Draw a class map for a slide of ``size_l0`` level-0 pixels at ``mpp`` µm/px (deterministic)."""
    rng = np.random.default_rng([seed, 1])
    cm = make_class_map(grid_shape(size_l0, mpp, cell_um), phenotype, rng, layout, til_target, tumour_target)
    return SlideSpec(slide_id, seed, phenotype, cm, (int(size_l0[0]), int(size_l0[1])), float(mpp), cell_um)


def _umask_mode() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_slide(
    spec: SlideSpec,
    path: str | Path,
    downsamples: tuple[int, ...] = (1, 4, 16),
    quality: int = 80,
    tile: int = 256,
    options: RenderOptions | None = None,
    thumbnail_max: int = 768,
) -> Path:
    """Render and write ``spec`` as an Aperio-style JPEG pyramid (MPP in the metadata); atomic."""
    from wsi_pipeline.formats.atomic import atomic_path
    from wsi_pipeline.synth.pyramid import write_pyramid_tiff

    path = Path(path)
    with atomic_path(path) as tmp:
        write_pyramid_tiff(tmp, spec.painter(options), spec.size_l0, spec.mpp, downsamples, tile=tile,
                           quality=quality, flavor="aperio", thumbnail_max=thumbnail_max)
        tmp.chmod(_umask_mode())  # mkstemp creates 0600; give the slide ordinary permissions
    return path


def save_truth(spec: SlideSpec, path: str | Path) -> Path:
    """Save the class map and truth next to a slide (``.npz``: ``class_map``, ``class_names``,
    ``cell_um``, ``mpp``, ``cell_px`` (level-0 px per cell), ``til_fraction``, ...)."""
    from wsi_pipeline.formats.atomic import atomic_path

    path = Path(path)
    truth = spec.truth()
    arrays: dict[str, Any] = {
        "class_map": spec.class_map,
        "class_names": np.array(CLASS_NAMES),
        "cell_um": np.float64(spec.cell_um),
        "mpp": np.float64(spec.mpp),
        "cell_px": np.float64(spec.cell_um / spec.mpp),
        "seed": np.int64(spec.seed),
    }
    arrays.update({k: np.asarray(v) for k, v in truth.items()})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        tmp.chmod(_umask_mode())
    return path
