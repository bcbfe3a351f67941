"""Text in the pictures: gallery titles and captions draw "—" and "µ" as glyphs, not as missing-glyph boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.review.render import render_gallery

MISSING = "\u4e00"  # a CJK character that neither Pillow's built-in font nor DejaVu Sans has: the missing-glyph box
TITLE_ROWS = 34  # the gallery's title band


def _title_band(tmp_path: Path, title: str) -> np.ndarray:
    tile = np.full((48, 48, 3), 180, np.uint8)
    path = render_gallery(tmp_path / f"{ord(title[0])}.png", [tile], ["0.5 µm/px"], title)
    return np.asarray(Image.open(path).convert("L"))[:TITLE_ROWS]


@pytest.mark.parametrize("char", ["—", "µ", "→", "é"])
def test_gallery_title_draws_the_glyph_not_the_missing_glyph_box(tmp_path: Path, char: str) -> None:
    band = _title_band(tmp_path, char)
    assert (band < 128).any(), "nothing drawn"
    assert not np.array_equal(band, _title_band(tmp_path, MISSING))


def test_heatmap_gallery_titles_use_a_full_font(tmp_path: Path) -> None:
    """The real title of a gallery (slide — target … µm/px) against the same title with boxes for — and µ."""
    title = "blob — response: top 8 tiles (0.5 µm/px)"
    boxed = title.replace("—", MISSING).replace("µ", MISSING)
    assert not np.array_equal(_title_band(tmp_path / "a", title), _title_band(tmp_path / "b", boxed))
