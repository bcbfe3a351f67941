"""Write pyramidal, tiled, JPEG-compressed TIFF slides that OpenSlide reads (Aperio SVS flavour or
generic tiled TIFF), with MPP in the metadata. Pixels come from a *painter*: a function that renders any
level-0 region at any downsample, so gigapixel slides are written tile by tile in bounded memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

# paint((l0_x, l0_y), (w, h), downsample) -> RGB uint8 (h, w, 3) covering w*downsample × h*downsample l0 px
Painter = Callable[[tuple[int, int], tuple[int, int], float], np.ndarray]


def array_painter(img: np.ndarray) -> Painter:
    """A painter over an in-memory level-0 RGB image (area-averaged for downsampled levels)."""
    from wsi_pipeline.slide.base import resize_rgb

    H, W = img.shape[:2]

    def paint(l0_xy: tuple[int, int], size: tuple[int, int], downsample: float) -> np.ndarray:
        x0, y0 = l0_xy
        w, h = size
        x1, y1 = min(W, x0 + round(w * downsample)), min(H, y0 + round(h * downsample))
        out = np.full((h, w, 3), 255, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        region = img[y0:y1, x0:x1]
        rw, rh = max(1, round((x1 - x0) / downsample)), max(1, round((y1 - y0) / downsample))
        region = resize_rgb(np.ascontiguousarray(region), (min(rw, w), min(rh, h)))
        out[: region.shape[0], : region.shape[1]] = region
        return out

    return paint


def _level_tiles(paint: Painter, level_wh: tuple[int, int], downsample: float, tile: int) -> Iterator[np.ndarray]:
    w, h = level_wh
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            l0 = (round(tx * downsample), round(ty * downsample))
            yield np.ascontiguousarray(paint(l0, (tile, tile), downsample), dtype=np.uint8)


def write_pyramid_tiff(
    path: str | Path,
    paint: Painter,
    size_l0: tuple[int, int],
    mpp: float | None,
    downsamples: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    quality: int = 80,
    flavor: str = "aperio",
    objective_power: float | None = None,
    thumbnail_max: int = 768,
) -> Path:
    """Write a pyramid; ``flavor='aperio'`` gives an SVS-style file (ImageDescription with AppMag/MPP),
    ``'generic'`` a generic tiled TIFF with the MPP in the resolution tags (centimetre units).
    ``mpp=None`` writes no MPP at all (for tests of the missing-MPP path)."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    W, H = size_l0
    if objective_power is None and mpp:
        objective_power = round(10.0 / mpp)
    levels = [(max(1, W // d), max(1, H // d), float(d)) for d in downsamples if W // d >= 1 and H // d >= 1]
    bigtiff = W * H * 3 > 2**31
    resolution = None
    if mpp and flavor == "generic":
        px_per_cm = 1e4 / mpp
        resolution = (px_per_cm, px_per_cm)
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for i, (lw, lh, ds) in enumerate(levels):
            if flavor == "aperio":
                head = "Aperio Image Library v12.0.15 \n"
                desc = f"{head}{W}x{H} [0,0 {W}x{H}] ({tile}x{tile}) JPEG/RGB Q={quality}"
                if i == 0:
                    if objective_power:
                        desc += f"|AppMag = {objective_power:g}"
                    if mpp:
                        desc += f"|MPP = {mpp:.4f}"
                else:
                    desc = f"{head}{W}x{H} -> {lw}x{lh} - ({tile}x{tile}) JPEG/RGB Q={quality}"
            else:
                desc = None
            lres = None
            if resolution is not None:
                lres = (resolution[0] / ds, resolution[1] / ds)
            tif.write(
                _level_tiles(paint, (lw, lh), ds, tile),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                description=desc,
                resolution=lres,
                resolutionunit="CENTIMETER" if lres else None,
                metadata=None,
                subfiletype=0 if i == 0 else 1,
            )
            if i == 0 and flavor == "aperio":
                # Aperio: the stripped thumbnail follows level 0 (an associated image for OpenSlide)
                ds_t = max(W, H) / thumbnail_max
                tw, th = max(1, round(W / ds_t)), max(1, round(H / ds_t))
                thumb = paint((0, 0), (tw, th), ds_t)
                tif.write(thumb, photometric="rgb", compression="jpeg", description=f"Aperio Image Library v12.0.15 \n{W}x{H} -> {tw}x{th} - ", metadata=None)
    return path
