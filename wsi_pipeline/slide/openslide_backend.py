"""OpenSlide backend: SVS, NDPI, MRXS, SCN, BIF, VMS, generic tiled TIFF, DICOM WSI, ..."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_pipeline.errors import CorruptSlideError
from wsi_pipeline.slide.base import Slide
from wsi_pipeline.slide.dicom import dicom_wsi_problem
from wsi_pipeline.slide.mpp import (
    finalize_mpp,
    mpp_from_openslide_properties,
    objective_from_openslide_properties,
)


def _lowlevel():
    import openslide

    return openslide


class OpenSlideSlide(Slide):
    backend = "openslide"

    def __init__(self, path: str | Path, mpp: float | None = None, mpp_from_objective: bool = False,
                 mpp_fallback: float | None = None) -> None:
        openslide = _lowlevel()
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as e:
            dicom = dicom_wsi_problem(Path(path))  # OpenSlide names a parsing step; the header names the cause
            if dicom:
                raise CorruptSlideError(path, f"{dicom[0]} (OpenSlide: {e})", dicom[1]) from e
            raise CorruptSlideError(
                path, f"OpenSlide cannot read it ({e})",
                "the file is damaged or not a conformant slide; re-export or re-scan it",
            ) from e
        props = dict(self._osr.properties)
        self._props = props
        self._vendor = props.get("openslide.vendor", "unknown")
        self._objective = objective_from_openslide_properties(props)
        info = finalize_mpp(mpp_from_openslide_properties(props, self._vendor), mpp, self._objective,
                            mpp_from_objective,
                            mpp_fallback)
        super().__init__(path, info)
        self._probe()

    def _probe(self) -> None:
        """Decode one pixel of the coarsest level, so a broken file fails at open, not mid-batch."""
        lvl = self._osr.level_count - 1
        w, h = self._osr.level_dimensions[lvl]
        ds = self._osr.level_downsamples[lvl]
        self._read_region((int(w // 2 * ds), int(h // 2 * ds)), lvl, (1, 1))

    @property
    def osr(self):
        return self._osr

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._osr.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._osr.level_downsamples)

    @property
    def vendor(self) -> str:
        return self._vendor

    @property
    def objective_power(self) -> float | None:
        return self._objective

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._props)

    @property
    def associated_images(self) -> list[str]:
        return list(self._osr.associated_images.keys())

    def _read_region(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        openslide = _lowlevel()
        try:
            rgba = self._osr.read_region(l0_xy, level, size)
        except openslide.OpenSlideError as e:
            raise CorruptSlideError(
                self.path, f"decoding failed at level {level}, x={l0_xy[0]}, y={l0_xy[1]} ({e})",
                "the file is truncated or damaged; re-copy or re-export it",
            ) from e
        return rgba_to_rgb_white(np.asarray(rgba))

    def close(self) -> None:
        self._osr.close()


def rgba_to_rgb_white(rgba: np.ndarray) -> np.ndarray:
    """Composite premultiplied RGBA (OpenSlide's output) over white."""
    if rgba.shape[-1] == 3:
        return rgba
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    # premultiplied: out = rgb + (255 - a)
    out = rgb.astype(np.uint16) + (255 - alpha[..., None]).astype(np.uint16)
    return np.minimum(out, 255).astype(np.uint8)


def openslide_vendor(path: str | Path) -> str | None:
    """OpenSlide's format detection (None when OpenSlide does not know the file)."""
    return _lowlevel().OpenSlide.detect_format(str(path))
