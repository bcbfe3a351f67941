"""The Slide interface every backend implements. All coordinates are level-0 pixels."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import MissingMPPError

MPP_TOLERANCE = 0.05  # a level whose MPP is within 5% above the target still "meets" it
READ_BLOCK_PX = 4096  # block side for whole-level reads that are shrunk on the fly (bounded memory)


@dataclass(frozen=True)
class MPPInfo:
    """Resolved microns-per-pixel of level 0 and where it came from."""

    mpp: float | None
    source: str  # "metadata", "tiff-tags", "ome", "override", "objective", "none"


class Slide(ABC):
    """A whole-slide image opened for reading. Use as a context manager or call :meth:`close`."""

    backend: str = "abstract"

    def __init__(self, path: str | Path, mpp_info: MPPInfo) -> None:
        self.path = Path(path)
        self._mpp_info = mpp_info

    # ---- geometry
    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) per level, level 0 first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        ...

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    # ---- metadata
    @property
    @abstractmethod
    def vendor(self) -> str:
        ...

    @property
    @abstractmethod
    def objective_power(self) -> float | None:
        ...

    @property
    @abstractmethod
    def properties(self) -> dict[str, str]:
        ...

    @property
    def slide_id(self) -> str:
        return slide_id_from_path(self.path)

    @property
    def mpp_info(self) -> MPPInfo:
        return self._mpp_info

    @property
    def mpp(self) -> float:
        """µm per level-0 pixel; raises :class:`MissingMPPError` when unknown and not overridden."""
        if self._mpp_info.mpp is None:
            raise MissingMPPError(self.path, self.objective_power)
        return self._mpp_info.mpp

    @property
    def mpp_or_none(self) -> float | None:
        return self._mpp_info.mpp

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    # ---- pixels
    @abstractmethod
    def _read_region(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3); regions outside the slide read as white."""

    def read_region(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` = (w, h) pixels of ``level`` whose top-left is ``l0_xy`` (level-0 coordinates).

        Returns RGB uint8 of shape (h, w, 3); transparent or out-of-slide pixels are white.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range 0..{self.level_count - 1}")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {size}")
        return self._read_region((int(l0_xy[0]), int(l0_xy[1])), level, (w, h))

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose MPP still meets ``target_mpp`` (≤ target within 5%); level 0 if none."""
        best = 0
        for lvl in range(self.level_count):
            if self.level_mpp(lvl) <= target_mpp * (1 + MPP_TOLERANCE):
                best = lvl
        return best

    def best_level_for_downsample(self, downsample: float) -> int:
        return level_for_downsample(self.level_downsamples, downsample)

    def read_region_at_mpp(self, l0_xy: tuple[int, int], target_mpp: float, size: int | tuple[int, int]) -> np.ndarray:
        """Read a (w, h)-pixel region at ``target_mpp`` µm/px whose top-left is ``l0_xy`` (level 0).

        Picks :meth:`best_level_for_mpp`, reads the matching extent there and resizes (area-averaging
        when shrinking).
        """
        w, h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        level = self.best_level_for_mpp(target_mpp)
        scale = target_mpp / self.level_mpp(level)  # level pixels per output pixel (>= ~1)
        lw, lh = max(1, round(w * scale)), max(1, round(h * scale))
        region = self.read_region(l0_xy, level, (lw, lh))
        if (lw, lh) == (w, h):
            return region
        return resize_rgb(region, (w, h))

    def read_level(self, level: int) -> np.ndarray:
        """The whole of one level as RGB uint8 (use only for low-resolution levels)."""
        w, h = self.level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))

    def read_at_downsample(self, downsample: float, level: int | None = None) -> tuple[np.ndarray, float]:
        """The whole slide at about ``downsample`` × level 0, from ``level`` (default: the closest finer one).

        A level much finer than asked is read block by block and shrunk, so memory stays bounded even on a
        slide without a pyramid. Returns (RGB image, level-0 pixels per output pixel along x).
        """
        level = self.best_level_for_downsample(downsample) if level is None else level
        lw, lh = self.level_dimensions[level]
        lds = self.level_downsamples[level]
        w0, h0 = self.dimensions
        if lds * 1.5 >= downsample:  # close enough: the level as it is
            img = self.read_level(level)
            return img, w0 / img.shape[1]
        ow, oh = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        out = np.empty((oh, ow, 3), np.uint8)
        fx, fy = ow / lw, oh / lh  # output px per level px
        block = READ_BLOCK_PX
        for by in range(0, lh, block):
            for bx in range(0, lw, block):
                bw, bh = min(block, lw - bx), min(block, lh - by)
                ox0, oy0 = round(bx * fx), round(by * fy)
                ox1, oy1 = round((bx + bw) * fx), round((by + bh) * fy)
                if ox1 <= ox0 or oy1 <= oy0:
                    continue
                region = self.read_region((round(bx * lds), round(by * lds)), level, (bw, bh))
                out[oy0:oy1, ox0:ox1] = resize_rgb(region, (ox1 - ox0, oy1 - oy0))
        return out, w0 / ow

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """A thumbnail whose longer side is ≤ ``max_size``; returns (RGB, level-0 px per thumbnail px)."""
        w0, h0 = self.dimensions
        ds = max(w0, h0) / max_size
        return self.read_at_downsample(max(ds, 1.0))

    def info(self) -> dict[str, Any]:
        mpp = self._mpp_info.mpp
        return {
            "path": str(self.path),
            "slide_id": self.slide_id,
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(d, 4) for d in self.level_downsamples],
            "mpp": mpp,
            "mpp_source": self._mpp_info.source,
            "level_mpp": [round(mpp * d, 4) for d in self.level_downsamples] if mpp else None,
            "objective_power": self.objective_power,
        }

    # ---- lifecycle
    def close(self) -> None:  # noqa: B027 - optional for backends
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {self.dimensions[0]}x{self.dimensions[1]}, mpp={self._mpp_info.mpp})"


def slide_id_from_path(path: str | Path) -> str:
    """File name without its extension(s): 'a/b/S1.ome.tiff' → 'S1'; for MRXS/DICOM folders, the folder name."""
    p = Path(path)
    name = p.name
    for ext in (".ome.tiff", ".ome.tif", ".ome.btf"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return p.stem if p.suffix else name


def resize_rgb(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize RGB uint8 to (w, h): box/area filter when shrinking, bilinear when enlarging."""
    from PIL import Image

    w, h = size
    if img.shape[1] == w and img.shape[0] == h:
        return img
    shrinking = img.shape[1] > w or img.shape[0] > h
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(img).resize((w, h), resample=resample))


def level_for_downsample(downsamples: tuple[float, ...], downsample: float) -> int:
    """Index of the coarsest level not coarser than ``downsample`` (module-level twin for pure code)."""
    best = 0
    for lvl, ds in enumerate(downsamples):
        if ds <= downsample * (1 + MPP_TOLERANCE):
            best = lvl
    return best

