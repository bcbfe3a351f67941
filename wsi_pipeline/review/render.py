"""Pictures for people: heatmap over the thumbnail (tissue outline, colour bar, title), the bare overlay
layer, and top/bottom tile galleries. matplotlib (Agg) is imported inside the functions."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.formats.atomic import atomic_path
from wsi_pipeline.review.raster import Normalizer

log = logging.getLogger(__name__)

DPI = 100
# zlib level of the figures and galleries (thumbnail pixels, which compress poorly): about 3x faster to write
# than the default 6 at 5-10 % larger files (the heatmap stage spent half its time in PNG encoding)
FAST_PNG = {"compress_level": 1}


@dataclass(frozen=True)
class FigureGeometry:
    """Where the thumbnail lands in the figure PNG: pixel box (x0, y0, x1, y1), y down, end-exclusive."""

    image_box_px: tuple[float, float, float, float]
    png_size: tuple[int, int]  # (w, h)

    def thumb_to_png(self, tx: float, ty: float, thumb_size: tuple[int, int]) -> tuple[float, float]:
        x0, y0, x1, y1 = self.image_box_px
        return x0 + tx / thumb_size[0] * (x1 - x0), y0 + ty / thumb_size[1] * (y1 - y0)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_png(path: str | Path, rgb_or_rgba: np.ndarray, fast: bool = False) -> Path:
    """Write an image array as PNG, atomically: smallest file (``optimize``), or quickest (``fast``:
    :data:`FAST_PNG`, for large images that compress poorly, such as thumbnails)."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb_or_rgba)).save(tmp, format="PNG",
                                                                **(FAST_PNG if fast else {"optimize": True}))
    return path


def blend(thumb: np.ndarray, overlay_rgba: np.ndarray, alpha: float) -> np.ndarray:
    """Thumbnail RGB with the overlay's colours laid on at ``alpha`` where the overlay is opaque."""
    a = (overlay_rgba[..., 3:4].astype(np.float32) / 255.0) * float(alpha)
    out = thumb[..., :3].astype(np.float32) * (1 - a) + overlay_rgba[..., :3].astype(np.float32) * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- tissue outline
def outlines_from_geojson(path: Path, l0_per_px: tuple[float, float]) -> list[np.ndarray]:
    """Exterior and hole rings of every polygon in a tissue GeoJSON, in thumbnail pixels."""
    data = json.loads(path.read_text())
    rings: list[np.ndarray] = []
    for f in data.get("features", []):
        g = f.get("geometry") or {}
        polys = [g.get("coordinates")] if g.get("type") == "Polygon" else (
            g.get("coordinates") or [] if g.get("type") == "MultiPolygon" else [])
        for poly in polys:
            for ring in poly or []:
                arr = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
                rings.append(arr / np.asarray(l0_per_px))
    return rings


def outlines_from_mask(mask: np.ndarray, level0_size: tuple[int, int], l0_per_px: tuple[float, float]
                       ) -> list[np.ndarray]:
    """Contours of a binary tissue mask covering the whole slide, in thumbnail pixels (x, y)."""
    from skimage import measure

    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    m = m > (127 if m.dtype == np.uint8 else 0)
    if not m.any():
        return []
    padded = np.pad(m.astype(np.float32), 1)
    mx, my = level0_size[0] / m.shape[1], level0_size[1] / m.shape[0]  # level-0 px per mask px
    out = []
    for c in measure.find_contours(padded, 0.5):
        # contour (row, col) in padded-mask pixel-centre coordinates → level-0 → thumbnail
        x = (c[:, 1] - 1 + 0.5) * mx / l0_per_px[0]
        y = (c[:, 0] - 1 + 0.5) * my / l0_per_px[1]
        out.append(np.stack([x, y], axis=1))
    return out


# ---------------------------------------------------------------- figures
def render_heatmap_figure(
    path: str | Path,
    composite: np.ndarray,
    outlines: Sequence[np.ndarray],
    normalizer: Normalizer,
    lut: np.ndarray,
    title: str,
    subtitle: str = "",
    width_in: float = 8.0,
) -> FigureGeometry:
    """Save the overlay composite with outline, colour bar and title; return where the image sits."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    th, tw = composite.shape[:2]
    img_w = width_in
    img_h = width_in * th / tw
    left, right_pad, cbar_w, cbar_gap, top, bottom = 0.2, 1.6, 0.25, 0.2, 0.75, 0.2
    fig_w = left + img_w + cbar_gap + cbar_w + right_pad
    fig_h = top + img_h + bottom
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=DPI)
    try:
        ax = fig.add_axes((left / fig_w, bottom / fig_h, img_w / fig_w, img_h / fig_h))
        ax.imshow(composite, interpolation="antialiased", extent=(0, tw, th, 0), aspect="auto")
        for ring in outlines:
            if len(ring) >= 2:
                ax.plot(ring[:, 0], ring[:, 1], color="#1a7a1a", linewidth=1.0)
        ax.set_xlim(0, tw)
        ax.set_ylim(th, 0)
        ax.set_axis_off()
        cax = fig.add_axes(((left + img_w + cbar_gap) / fig_w, bottom / fig_h + 0.1 * img_h / fig_h,
                            cbar_w / fig_w, 0.8 * img_h / fig_h))
        grad = np.linspace(0, 1, 256)[:, None]
        cax.imshow(grad, aspect="auto", cmap=ListedColormap(lut / 255.0), origin="lower", extent=(0, 1, 0, 1))
        ticks = normalizer.ticks()
        cax.set_xticks([])
        cax.yaxis.tick_right()
        cax.set_yticks([p for p, _ in ticks])
        cax.set_yticklabels([lbl for _, lbl in ticks], fontsize=8)
        cax.set_ylabel(normalizer.label, fontsize=8)
        cax.yaxis.set_label_position("right")
        fig.text(left / fig_w, 1 - 0.3 / fig_h, title, fontsize=12, fontweight="bold", va="center")
        if subtitle:
            fig.text(left / fig_w, 1 - 0.58 / fig_h, subtitle, fontsize=9, va="center", color="#444444")
        fig.canvas.draw()
        png_w, png_h = (int(v) for v in fig.canvas.get_width_height())
        bb = ax.get_window_extent()
        geom = FigureGeometry((bb.x0, png_h - bb.y1, bb.x1, png_h - bb.y0), (png_w, png_h))
        # the canvas just drawn at DPI is the figure's PNG (opaque: RGB): written as is, not drawn again by savefig
        save_png(path, np.asarray(fig.canvas.buffer_rgba())[..., :3], fast=True)
    finally:
        plt.close(fig)
    return geom


def render_gallery(path: str | Path, images: Sequence[np.ndarray], captions: Sequence[str], title: str,
                   ncols: int = 4, cell_px: int = 220) -> Path:
    """A grid of tile images with a caption under each (Pillow: ~50× faster than a matplotlib figure)."""
    from PIL import Image, ImageDraw

    n = max(1, len(images))
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    pad, cap_h, title_h = 8, 22, 34
    width = ncols * (cell_px + pad) + pad
    height = title_h + nrows * (cell_px + cap_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    title_font, cap_font = _font(16), _font(11)
    draw.text((width // 2, title_h // 2), title, fill="black", font=title_font, anchor="mm")
    for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
        r, c = divmod(i, ncols)
        x = pad + c * (cell_px + pad)
        y = title_h + r * (cell_px + cap_h + pad)
        tile = Image.fromarray(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
        tile.thumbnail((cell_px, cell_px), Image.Resampling.LANCZOS)
        canvas.paste(tile, (x + (cell_px - tile.width) // 2, y + (cell_px - tile.height) // 2))
        draw.text((x + cell_px // 2, y + cell_px + cap_h // 2), _fit(draw, cap, cap_font, cell_px),
                  fill="black", font=cap_font, anchor="mm")
    if not images:
        draw.text((width // 2, height // 2), "no scored tiles", fill="black", font=cap_font, anchor="mm")
    return save_png(path, np.asarray(canvas), fast=True)


FONT_FILE = "DejaVuSans.ttf"  # shipped with matplotlib: covers "—", "µ", "→" and the accented letters


def _font(size: int) -> Any:
    """DejaVu Sans from matplotlib's data folder (Pillow's built-in font draws "—" and "µ" as empty boxes)."""
    import matplotlib
    from PIL import ImageFont

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / FONT_FILE
    if not path.is_file():
        from matplotlib import font_manager

        path = Path(font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans")))
    return ImageFont.truetype(str(path), size)


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
