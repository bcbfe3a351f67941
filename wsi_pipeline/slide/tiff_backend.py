"""tifffile backend for OME-TIFF and plain (also stripped, untiled) TIFF pyramids, and a Pillow backend
for PNG / JPEG images. Regions are read lazily through tifffile's zarr store."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import CorruptSlideError, UnsupportedFormatError
from wsi_pipeline.slide.base import MPPInfo, Slide
from wsi_pipeline.slide.mpp import finalize_mpp, mpp_from_resolution

_OME_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.integer):
        return (a.astype(np.float32) * (255.0 / np.iinfo(a.dtype).max)).astype(np.uint8)
    return np.clip(a * 255.0, 0, 255).astype(np.uint8)


def _as_rgb(a: np.ndarray, axes: str) -> np.ndarray:
    """Rearrange a (…, Y, X, …) block to (Y, X, 3) RGB."""
    axes = axes.upper()
    if "C" in axes and "S" not in axes:
        axes = axes.replace("C", "S")
    keep = [ax for ax in axes if ax in "YXS"]
    # drop singleton non-spatial axes (T, Z, …)
    idx = tuple(slice(None) if ax in "YXS" else 0 for ax in axes)
    a = a[idx]
    order = [keep.index("Y"), keep.index("X")] + ([keep.index("S")] if "S" in keep else [])
    a = np.transpose(a, order)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] >= 4:
        a = a[..., :3]
    return _to_uint8(np.ascontiguousarray(a))


def _ome_mpp(ome_xml: str | None) -> float | None:
    if not ome_xml:
        return None
    m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome_xml)
    if not m:
        return None
    unit_m = re.search(r'PhysicalSizeXUnit="([^"]+)"', ome_xml)
    unit = unit_m.group(1) if unit_m else "µm"
    factor = _OME_UNIT_TO_UM.get(unit)
    value = float(m.group(1)) * factor if factor else None
    return value if value and 0.02 <= value <= 50 else None


class TiffSlide(Slide):
    backend = "tifffile"

    def __init__(self, path: str | Path, mpp: float | None = None, mpp_from_objective: bool = False,
                 mpp_fallback: float | None = None) -> None:
        import tifffile

        try:
            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series[0]
            self._levels = list(series.levels)
            dims = []
            for lvl in self._levels:
                shape = dict(zip(lvl.axes, lvl.shape, strict=False))
                dims.append((int(shape["X"]), int(shape["Y"])))
        except (tifffile.TiffFileError, ValueError, IndexError, KeyError, OSError) as e:
            raise CorruptSlideError(path, f"not a readable TIFF ({e})",
                                    "the file may be truncated or damaged; copy or export it again") from e
        self._axes = series.axes
        self._dims = tuple(dims)
        self._arrays: dict[int, Any] = {}
        page = self._levels[0].pages[0]
        tags = page.tags
        res = tags.get("XResolution")
        unit = tags.get("ResolutionUnit")
        found_mpp, source = _ome_mpp(self._tif.ome_metadata), "ome"
        if found_mpp is None and res is not None and unit is not None:
            num, den = res.value if isinstance(res.value, tuple) else (res.value, 1)
            unit_name = {2: "inch", 3: "centimeter"}.get(int(unit.value), "none")
            found_mpp, source = mpp_from_resolution(num / den, unit_name), "tiff-tags"
        self._objective = None
        desc = page.description or ""
        m = re.search(r"AppMag\s*=\s*([0-9.]+)", desc)
        if m:
            self._objective = float(m.group(1))
        info = finalize_mpp(MPPInfo(found_mpp, source if found_mpp else "none"), mpp, self._objective,
                            mpp_from_objective,
                            mpp_fallback)
        super().__init__(path, info)
        self._props = {"tifffile.axes": self._axes, "tifffile.is_ome": str(self._tif.is_ome)}
        self._read_region((0, 0), self.level_count - 1, (1, 1))

    def _array(self, level: int) -> Any:
        if level not in self._arrays:
            import zarr

            store = self._tif.series[0].aszarr(level=level)
            self._arrays[level] = zarr.open_array(store, mode="r")
        return self._arrays[level]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        w0 = self._dims[0][0]
        return tuple(w0 / w for w, _ in self._dims)

    @property
    def vendor(self) -> str:
        return "ome-tiff" if self._tif.is_ome else "tiff"

    @property
    def objective_power(self) -> float | None:
        return self._objective

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._props)

    def _read_region(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        ds = self.level_downsamples[level]
        lw, lh = self._dims[level]
        x0, y0 = round(l0_xy[0] / ds), round(l0_xy[1] / ds)
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)
        sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(lw, x0 + w), min(lh, y0 + h)
        if sx1 <= sx0 or sy1 <= sy0:
            return out
        axes = self._levels[level].axes
        idx = tuple(
            slice(sy0, sy1) if ax == "Y" else slice(sx0, sx1) if ax == "X" else slice(None) for ax in axes
        )
        try:
            block = np.asarray(self._array(level)[idx])
        except (ValueError, OSError, RuntimeError) as e:
            raise CorruptSlideError(self.path, f"decoding failed at level {level} ({e})",
                                    "the file is truncated or damaged; re-copy or re-export it") from e
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = _as_rgb(block, axes)
        return out

    def close(self) -> None:
        self._tif.close()


class ImageSlide(Slide):
    """A single-level PNG / JPEG / BMP image, held in memory (for tiles, crops and small scans)."""

    backend = "pillow"
    MAX_PIXELS = 400_000_000

    def __init__(self, path: str | Path, mpp: float | None = None, mpp_from_objective: bool = False,
                 mpp_fallback: float | None = None) -> None:
        from PIL import Image, UnidentifiedImageError

        Image.MAX_IMAGE_PIXELS = self.MAX_PIXELS
        try:
            with Image.open(path) as im:
                im.load()
                dpi = im.info.get("dpi")
                self._fmt = (im.format or "image").lower()
                self._img = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise UnsupportedFormatError(path, f"not a readable image ({e})",
                                         "convert it to a pyramidal TIFF / SVS, PNG or JPEG") from e
        found = None
        if dpi and float(dpi[0]) > 2540:  # > 2540 dpi ⇒ < 10 µm/px: a real scan resolution, not a screen default
            found = mpp_from_resolution(float(dpi[0]), "inch")
        info = finalize_mpp(MPPInfo(found, "metadata" if found else "none"), mpp, None, mpp_from_objective,
                            mpp_fallback)
        super().__init__(path, info)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return ((self._img.shape[1], self._img.shape[0]),)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    @property
    def vendor(self) -> str:
        return self._fmt

    @property
    def objective_power(self) -> float | None:
        return None

    @property
    def properties(self) -> dict[str, str]:
        return {"image.format": self._fmt}

    def _read_region(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        H, W = self._img.shape[:2]
        x0, y0 = l0_xy
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)
        sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(W, x0 + w), min(H, y0 + h)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = self._img[sy0:sy1, sx0:sx1]
        return out
