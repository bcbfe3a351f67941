"""Deterministic, position-keyed randomness for procedural rendering.

Everything here is a pure function of integer keys (lattice indices, a seed, a channel number), never
of the order in which regions are rendered. A painter can therefore draw any region at any
downsample, in any order, and neighbouring tiles or pyramid levels agree with each other.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


def _as_u64(a: np.ndarray | int) -> np.ndarray:
    return np.asarray(a, dtype=np.int64).astype(np.uint64)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> _S30)) * _MIX1
        z = (z ^ (z >> _S27)) * _MIX2
        return z ^ (z >> _S31)


def hash_u64(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """Hash integer keys (broadcast together) with a seed into uniformly distributed uint64."""
    h = _mix(_as_u64(seed))
    for k in keys:
        h = _mix(h ^ _as_u64(k))
    return h


def uniform(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform floats in [0, 1) (float64), one per broadcast key tuple."""
    return (hash_u64(seed, *keys) >> _S11).astype(np.float64) * (1.0 / 9007199254740992.0)


def _smooth(f: np.ndarray) -> np.ndarray:
    return f * f * (3.0 - 2.0 * f)


def value_noise_grid(xs_um: np.ndarray, ys_um: np.ndarray, scale_um: float, seed: int, key: int) -> np.ndarray:
    """Smooth value noise in [0, 1) on the separable grid ``ys_um × xs_um`` (float32, shape (H, W)).

    Lattice values sit at multiples of ``scale_um`` in physical space, so the field is the same
    whatever region or pixel size it is sampled at.
    """
    gx = np.asarray(xs_um, np.float64) / scale_um
    gy = np.asarray(ys_um, np.float64) / scale_um
    ix = np.floor(gx).astype(np.int64)
    iy = np.floor(gy).astype(np.int64)
    sx = _smooth(gx - ix).astype(np.float32)
    sy = _smooth(gy - iy).astype(np.float32)
    x0, y0 = int(ix.min()), int(iy.min())
    lx = np.arange(x0, int(ix.max()) + 2)
    ly = np.arange(y0, int(iy.max()) + 2)
    block = uniform(seed, key, ly[:, None], lx[None, :]).astype(np.float32)
    cx, cy = ix - x0, iy - y0
    # separable: interpolate along x on the (few) lattice rows, then gather rows and blend along y
    along_x = block[:, cx] * (1.0 - sx)[None, :] + block[:, cx + 1] * sx[None, :]
    top = along_x[cy]
    bot = along_x[cy + 1]
    bot -= top
    bot *= sy[:, None]
    top += bot
    return top


def value_noise_points(x_um: np.ndarray, y_um: np.ndarray, scale_um: float, seed: int, key: int) -> np.ndarray:
    """The same field as :func:`value_noise_grid`, sampled at scattered points (any equal shapes)."""
    gx = np.asarray(x_um, np.float64) / scale_um
    gy = np.asarray(y_um, np.float64) / scale_um
    ix = np.floor(gx).astype(np.int64)
    iy = np.floor(gy).astype(np.int64)
    sx, sy = _smooth(gx - ix), _smooth(gy - iy)
    a = uniform(seed, key, iy, ix)
    b = uniform(seed, key, iy, ix + 1)
    c = uniform(seed, key, iy + 1, ix)
    d = uniform(seed, key, iy + 1, ix + 1)
    top = a + (b - a) * sx
    bot = c + (d - c) * sx
    return (top + (bot - top) * sy).astype(np.float32)


def fbm_grid(
    xs_um: np.ndarray, ys_um: np.ndarray, scale_um: float, seed: int, key: int, octaves: int = 2
) -> np.ndarray:
    """Fractal sum of value-noise octaves (halving scale, halving amplitude), rescaled to about [0, 1)."""
    total = np.zeros((len(ys_um), len(xs_um)), np.float32)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        total += amp * value_noise_grid(xs_um, ys_um, scale_um / 2**o, seed, key * 16 + o)
        norm += amp
        amp *= 0.5
    return total / norm
