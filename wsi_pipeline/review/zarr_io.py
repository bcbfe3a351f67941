"""Multiscale score rasters as a zarr v3 store with OME-NGFF-like (0.5) ``multiscales`` metadata.

Layout of ``heatmap.zarr``::

    zarr.json                       root attrs "wsi_pipeline": channels, frame, cell size, slide info
    <channel>/zarr.json             attrs "ome": {"version": "0.5", "multiscales": [...]}
    <channel>/0, <channel>/1, ...   float32 (y, x) rasters, NaN where there is no tile

Pixel (i, j) of scale s covers level-0 [j·cell·2^s, (j+1)·cell·2^s) × [i·cell·2^s, (i+1)·cell·2^s).
The NGFF transforms say the same in micrometres with the usual pixel-centre convention
(scale = cell·2^s·mpp, translation = half a pixel), or in level-0 pixels when the MPP is unknown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.review.raster import GridSpec

ALIGNMENT_DOC = (
    "pixel (i, j) of scale s covers level-0 pixels [j*cell_l0*2^s, (j+1)*cell_l0*2^s) x "
    "[i*cell_l0*2^s, (i+1)*cell_l0*2^s); origin = top-left of level 0; NaN = no tile"
)


def ngff_multiscales(name: str, n_scales: int, cell_l0: int, slide_mpp: float | None) -> list[dict[str, Any]]:
    unit_per_l0 = float(slide_mpp) if slide_mpp else 1.0
    axes: list[dict[str, Any]] = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    if slide_mpp:
        for a in axes:
            a["unit"] = "micrometer"
    datasets = []
    for s in range(n_scales):
        px = cell_l0 * (1 << s) * unit_per_l0
        datasets.append({
            "path": str(s),
            "coordinateTransformations": [
                {"type": "scale", "scale": [px, px]},
                {"type": "translation", "translation": [px / 2, px / 2]},
            ],
        })
    return [{"version": "0.5", "name": name, "axes": axes, "datasets": datasets}]


def write_heatmap_zarr(
    path: str | Path,
    grid: GridSpec,
    channels: Mapping[str, Sequence[np.ndarray]],
    labels: Mapping[str, str],
    slide_mpp: float | None,
    extra_attrs: Mapping[str, Any] | None = None,
    chunk: int = 512,
) -> Path:
    """Write every channel's pyramid (scale 0 first) into a fresh zarr v3 store, replacing ``path``
    only once the new store is complete."""
    import zarr

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for key, levels in channels.items():
            g = root.create_group(key)
            for s, arr in enumerate(levels):
                a = np.asarray(arr, dtype=np.float32)
                g.create_array(str(s), data=a, chunks=(min(chunk, a.shape[0]), min(chunk, a.shape[1])),
                               fill_value=np.nan, dimension_names=("y", "x"))
            g.attrs.update({
                "ome": {"version": "0.5", "multiscales": ngff_multiscales(key, len(levels), grid.cell_l0, slide_mpp)},
                "wsi_pipeline": {"label": labels.get(key, key), "cell_l0": grid.cell_l0},
            })
        root.attrs.update({
            "wsi_pipeline": {
                "channels": list(channels),
                "labels": dict(labels),
                "frame": "level0_pixels",
                "cell_l0": grid.cell_l0,
                "shape_scale0": [grid.height, grid.width],
                "level0_width": grid.level0_size[0],
                "level0_height": grid.level0_size[1],
                "slide_mpp": slide_mpp,
                "alignment": ALIGNMENT_DOC,
                **dict(extra_attrs or {}),
            }
        })
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(new: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.rmdir(old)
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(old)


def read_heatmap_zarr(path: str | Path, channel: str, scale: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """One scale of one channel, with the root ``wsi_pipeline`` attrs."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    return np.asarray(root[f"{channel}/{scale}"][:]), dict(root.attrs["wsi_pipeline"])
