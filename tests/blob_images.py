"""Small generated slide images shared by tests (importable: tests/ is on pythonpath)."""

from __future__ import annotations

import numpy as np


def blob_image(w: int, h: int, seed: int = 0) -> np.ndarray:
    """White glass with one elliptical pink/purple 'tissue' blob carrying some texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((xx - w * 0.5) / (w * 0.3)) ** 2 + ((yy - h * 0.5) / (h * 0.3)) ** 2 <= 1.0
    img = np.full((h, w, 3), 242, np.uint8)
    noise = rng.normal(0, 12, (h, w, 1))
    tissue = np.clip(np.array([200, 120, 185]) + noise, 0, 255).astype(np.uint8)
    img[inside] = tissue[inside]
    return img
