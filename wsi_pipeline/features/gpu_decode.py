"""Decoding and cutting output tiles on the device (decode mode ``gpu``).

Reader processes send :class:`~wsi_pipeline.features.reader.JpegBatch` es: the stored JPEG tiles an output
batch needs, still compressed, and where each output tile lies in them. Here they are decoded in one batched
nvJPEG call (``torchvision.io.decode_jpeg(list, device="cuda")``), the output tiles are gathered from the
decoded stored tiles with one indexing operation, shifted to their sub-pixel level position when needed and
resized with the same filters as ``Slide.read_region_at_mpp`` (box when shrinking, bilinear when enlarging,
two passes rounded to 8 bits like Pillow). Everything also runs with ``device="cpu"`` (torchvision's
libjpeg-turbo decoder): that is how it is tested without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

WHITE = 255


def decode_streams(data: torch.Tensor, offsets: torch.Tensor | np.ndarray, device: torch.device) -> list[torch.Tensor]:
    """Decode the standalone JPEGs ``data[offsets[k]:offsets[k+1]]`` (uint8 CPU tensor) → list of uint8
    (3, h, w) tensors on ``device`` (one batched call)."""
    with warnings.catch_warnings():  # torchvision >= 0.29 announces a move of its codecs to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    off = [int(v) for v in offsets]
    parts = [data[off[k]:off[k + 1]] for k in range(len(off) - 1)]
    if not parts:
        return []
    dev = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if dev.type == "cuda":
            return decode_jpeg(parts, mode=ImageReadMode.RGB, device=dev)
        out = decode_jpeg(parts, mode=ImageReadMode.RGB)
    return out if isinstance(out, list) else [out]


def assemble_tiles(decoded: list[torch.Tensor], batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """Output tiles uint8 (n, T, T, 3) on ``device`` from the decoded stored tiles of one
    :class:`~wsi_pipeline.features.reader.JpegBatch` (given as a mapping of its fields, numpy or CPU tensors).

    The layout is planned on the host (numpy) and sent in one non-blocking copy from pinned memory, so nothing
    here waits for the device: the previous batch's forward pass keeps running while this one is prepared."""
    dev = torch.device(device)
    host = {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in batch.items()
            if k in ("tile_wh", "level_wh", "side", "origin", "first_tile", "table", "shift")}
    tw, th = (int(v) for v in host["tile_wh"])
    lw, lh = (int(v) for v in host["level_wh"])
    side, shift = host["side"], host["shift"]
    size = int(batch["out_size"])
    n = len(side)
    pool = _pixel_pool(decoded, th, tw, dev)
    groups = []
    for s in np.unique(side):
        sel = np.nonzero(side == s)[0]
        parts = _to_device([host["origin"][sel], host["first_tile"][sel], host["table"][sel].astype(np.int64)], dev)
        region = _gather(pool, len(decoded), *parts, int(s), (tw, th), (lw, lh))
        sh = shift[sel]
        if (sh != 0).any():  # regions one px larger, sampled at their sub-pixel level position
            region = _shift_regions(region, _to_device([sh.astype(np.float32)], dev)[0])
        groups.append((sel, resize_regions(region, size)))
    if len(groups) == 1:
        return groups[0][1]
    out = torch.empty((n, size, size, 3), dtype=torch.uint8, device=dev)
    for sel, tiles in groups:
        out[_to_device([sel.astype(np.int64)], dev)[0]] = tiles
    return out


def _to_device(arrays: list[np.ndarray], dev: torch.device) -> list[torch.Tensor]:
    """Small host arrays of one dtype → device tensors of the same shapes, in one copy (pinned, non-blocking
    on CUDA)."""
    flat = np.concatenate([np.ascontiguousarray(a).ravel() for a in arrays])
    t = torch.from_numpy(flat)
    if dev.type == "cuda":
        t = t.pin_memory().to(dev, non_blocking=True)
    out, k = [], 0
    for a in arrays:
        out.append(t[k:k + a.size].view(a.shape))
        k += a.size
    return out


def _pixel_pool(decoded: list[torch.Tensor], th: int, tw: int, dev: torch.device) -> torch.Tensor:
    """(K + 1) stored tiles as rows of RGB pixels ((K + 1) · th · tw, 3), the last tile white."""
    white = torch.full((th * tw, 3), WHITE, dtype=torch.uint8, device=dev)
    if not decoded:
        return white
    rows = []
    for img in decoded:
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        if img.shape[1] != th or img.shape[2] != tw:  # a stream of another size: crop / pad with white
            fixed = torch.full((3, th, tw), WHITE, dtype=torch.uint8, device=dev)
            h, w = min(th, img.shape[1]), min(tw, img.shape[2])
            fixed[:, :h, :w] = img[:3, :h, :w]
            img = fixed
        rows.append(img[:3])
    stack = torch.stack(rows).permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.cat([stack, white])


def _gather(pool: torch.Tensor, k_white: int, origin: torch.Tensor, first: torch.Tensor, table: torch.Tensor,
            s: int, tile_wh: tuple[int, int], level_wh: tuple[int, int]) -> torch.Tensor:
    """Regions uint8 (m, s, s, 3): level pixels [origin, origin + s)², white outside the level."""
    tw, th = tile_wh
    lw, lh = level_wh
    m, ny, nx = table.shape
    ar = torch.arange(s, device=pool.device)
    ys = origin[:, 1:2] + ar  # (m, s) level rows
    xs = origin[:, 0:1] + ar
    inside = ((ys >= 0) & (ys < lh))[:, :, None] & ((xs >= 0) & (xs < lw))[:, None, :]
    ysc, xsc = ys.clamp(0, lh - 1), xs.clamp(0, lw - 1)
    row = (ysc // th - first[:, 1:2]).clamp(0, ny - 1)
    col = (xsc // tw - first[:, 0:1]).clamp(0, nx - 1)
    idx = torch.arange(m, device=pool.device)[:, None, None]
    key = table[idx, row[:, :, None], col[:, None, :]]  # (m, s, s) stored tile of each pixel
    key = torch.where(inside & (key >= 0), key, torch.full_like(key, k_white))
    pix = key * (th * tw) + ((ysc % th) * tw)[:, :, None] + (xsc % tw)[:, None, :]
    return pool[pix]


def _shift_regions(region: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling at (x + ax, y + ay) (``shift`` (m, 2)): (m, s, s, 3) → (m, s - 1, s - 1, 3), the
    reader's ``_bilinear_shift``."""
    s = region.shape[1] - 1
    r = region.float()
    ax = shift[:, 0].view(-1, 1, 1, 1)
    ay = shift[:, 1].view(-1, 1, 1, 1)
    top = r[:, :s, :s] * (1 - ax) + r[:, :s, 1:s + 1] * ax
    bottom = r[:, 1:s + 1, :s] * (1 - ax) + r[:, 1:s + 1, 1:s + 1] * ax
    return (top * (1 - ay) + bottom * ay + 0.5).clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- resizing like Pillow (resize_rgb)
def resize_regions(region: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (m, s, s, 3) → (m, size, size, 3): box filter when shrinking, bilinear when enlarging, one
    pass per axis (horizontal first), each rounded to 8 bits — ``slide.base.resize_rgb``'s arithmetic."""
    s = int(region.shape[1])
    if s == size:
        return region
    if s > size and s % size == 0:  # integer box: plain means
        k = s // size
        m = region.shape[0]
        h = region.view(m, s, size, k, 3).float().mean(3).add_(0.5).floor_()
        return h.view(m, size, k, size, 3).mean(2).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)
    w = _resample_matrix(s, size, str(region.device))  # (size, s)
    with _exact_matmul():
        h = torch.einsum("msxc,tx->mstc", region.float(), w).add_(0.5).floor_().clamp_(0, 255)
        v = torch.einsum("msxc,ts->mtxc", h, w).add_(0.5).floor_().clamp_(0, 255)
    return v.to(torch.uint8)


@functools.lru_cache(maxsize=32)
def _resample_matrix(n_in: int, n_out: int, device: str = "cpu") -> torch.Tensor:
    """Pillow's resampling weights (``precompute_coeffs``): box when shrinking, triangle when enlarging."""
    scale = n_in / n_out
    shrinking = scale > 1
    filterscale = max(scale, 1.0)
    support = (0.5 if shrinking else 1.0) * filterscale
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        x = (np.arange(lo, hi) - center + 0.5) / filterscale
        if shrinking:
            k = ((x >= -0.5) & (x < 0.5)).astype(np.float64)
        else:
            k = np.clip(1.0 - np.abs(x), 0.0, None)
        if k.sum() > 0:
            w[i, lo:hi] = k / k.sum()
    return torch.from_numpy(w.astype(np.float32)).to(device)


@contextlib.contextmanager
def _exact_matmul() -> Iterator[None]:
    """fp32 matmuls without TF32 (the engine enables TF32 for the model; resizing needs 8-bit exactness)."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ---------------------------------------------------------------- self-check
def probe_gpu_decoding(device: torch.device) -> dict[str, float]:
    """Mean absolute difference (0-255) between decoding on ``device`` and libjpeg-turbo on the CPU, for each
    JPEG flavour the reader produces: ``ycbcr`` (YCbCr 4:2:0, like most generic TIFFs) and ``rgb`` (RGB-coded
    4:4:4 with an Adobe APP14 transform-0 marker, like Aperio). A decoder that ignores the marker converts
    the R, G, B components as if they were Y, Cb, Cr, which shows as a difference of tens of levels."""
    from wsi_pipeline.features.decode import decode_cpu, simplejpeg_module, standalone_jpeg

    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (8, 8, 3))
    img = np.kron(base, np.ones((32, 32, 1)))
    img = np.clip(160 + 50 * img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    aperio_like = _component_ids(_encode(img, rgb=True, adobe=False), (0, 1, 2))  # Aperio's ids: no RGB hint
    flavours = {"ycbcr": _encode(img, rgb=False), "rgb": standalone_jpeg(aperio_like, None, True)}
    sj = simplejpeg_module()
    out: dict[str, float] = {}
    for name, jpeg in flavours.items():
        ref = decode_cpu(jpeg, 1, (img.shape[1], img.shape[0]), sj).astype(np.int16)
        data = torch.from_numpy(np.frombuffer(jpeg, np.uint8).copy())
        got = decode_streams(data, np.array([0, len(jpeg)]), device)[0].permute(1, 2, 0).cpu().numpy()
        out[name] = float(np.abs(got.astype(np.int16) - ref).mean())
    return out


def _encode(img: np.ndarray, rgb: bool, adobe: bool = True) -> bytes:
    """A JPEG of ``img``: YCbCr 4:2:0, or RGB components 4:4:4 (``rgb``; with or without the Adobe marker)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    if rgb:
        Image.fromarray(img).save(buf, "JPEG", quality=85, keep_rgb=True, subsampling=0)
        data = buf.getvalue()
        if not adobe:
            i = data.find(b"\xff\xee\x00\x0eAdobe")
            if i >= 0:
                seg = int.from_bytes(data[i + 2:i + 4], "big")
                data = data[:i] + data[i + 2 + seg:]
        return data
    Image.fromarray(img).save(buf, "JPEG", quality=85, subsampling=2)
    return buf.getvalue()


def _component_ids(jpeg: bytes, ids: tuple[int, ...]) -> bytes:
    """``jpeg`` with its frame's component ids replaced by ``ids`` (in SOF0 and the scans)."""
    data = bytearray(jpeg)
    i = data.find(b"\xff\xc0")
    old = [data[i + 10 + 3 * c] for c in range(data[i + 9])]
    for c, v in enumerate(ids):
        data[i + 10 + 3 * c] = v
    j = data.find(b"\xff\xda", i)
    for c in range(data[j + 4]):
        data[j + 5 + 2 * c] = ids[old.index(data[j + 5 + 2 * c])]
    return bytes(data)
