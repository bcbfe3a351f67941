"""Decoding the JPEG tiles of a TIFF pyramid level: decode modes, standalone streams, CPU decoders.

Decode modes (``wsi extract --decode``):

* ``cpu-full`` — every stored tile decoded at full scale, output tiles resized (area filter) like
  ``Slide.read_region_at_mpp``: the reference pixels.
* ``cpu-scaled`` — when one output pixel covers 2, 4 or 8 level pixels, libjpeg-turbo decodes at 1/2, 1/4
  or 1/8 scale in the DCT (no resize afterwards): a fraction of the cost, nearly the same pixels.
* ``gpu`` (opt-in) — reader processes only read the compressed tiles; the main process decodes them in
  batches on the GPU (nvJPEG through ``torchvision.io.decode_jpeg``) and cuts/resizes the output tiles there
  (:mod:`wsi_pipeline.features.gpu_decode`). Slides whose JPEG colour coding the device does not decode
  right (see below) are decoded by the readers as ``cpu-scaled``.
* ``auto`` (default) — ``cpu-scaled``, on the CPU and on CUDA alike.

Why ``auto`` is ``cpu-scaled`` everywhere, measured on one H200 with 16 cores (14 reader processes,
batch 256, bf16, 224-px tiles at 0.5 µm/px from a 0.25-µm/px JPEG slide; ``scripts/gpu_check.sh``,
December 2026; the bench slide's tiles are YCbCr-coded, so they did go to the device): the device path
decoded and cut 6,056 output tiles/s (about 19,000 stored 256-px tiles/s), on the main process's thread —
torchvision's batched ``decode_jpeg`` sets up every image on the host and synchronises before it returns —
so the loop spent 76-83 % of its time decoding, and resnet50-trunc ran end to end at 3,816 tiles/s
(ViT-B/16 2,749, ViT-L/16 2,070) against 7,701 tiles/s with ``cpu-scaled`` readers (1,143 output tiles/s
per core; cpu-full 342). ``auto`` never
picks a path that measured slower; ``gpu`` stays selectable for machines where it measures faster
(``scripts/bench_extract.py --suite gpu``).

RGB-coded tiles (Aperio) on the device: nvJPEG ignores the Adobe transform-0 marker and converts the R, G, B
components as if they were Y, Cb, Cr (probe: 65 levels off). That cannot be undone afterwards: on CMU-1's
tiles 91 % of the pixels have a channel clipped at 0 or 255 by that conversion. torchvision offers no
unconverted 3-component output (its ``UNCHANGED`` mode asks nvJPEG for RGB), and decoding each component
as a grey image would triple the decode that already limits the device path. So such slides stay on the
CPU (``cpu-scaled``).

TIFF JPEG tiles are often *abbreviated* streams whose quantisation and Huffman tables live in the TIFF
``JPEGTables`` tag; :func:`standalone_jpeg` splices them back in, so any JPEG decoder (libjpeg-turbo,
Pillow, nvJPEG) reads the tile. RGB-coded tiles (Aperio: photometric RGB without JFIF marker) get an Adobe
APP14 marker with transform 0, which tells decoders not to apply a YCbCr → RGB conversion (libtiff and
OpenSlide read the components as R, G, B).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from wsi_pipeline.errors import ConfigError

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "cpu-full", "cpu-scaled", "gpu")
CPU_MODES = ("cpu-full", "cpu-scaled")
AUTO_MODE = "cpu-scaled"  # what auto runs, on every device (module doc: the H200 figures)
SOI, EOI = b"\xff\xd8", b"\xff\xd9"
# APP14 "Adobe", version 100, flags 0/0, transform 0 (components are R, G, B: no colour conversion)
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def check_decode_mode(mode: str) -> str:
    if mode not in DECODE_MODES:
        raise ConfigError(f"--decode {mode!r}: expected one of {', '.join(DECODE_MODES)}")
    return mode


def gpu_decode_available(device: Any) -> tuple[bool, str]:
    """(True, '') when tiles can be decoded on ``device`` with nvJPEG, else (False, why not)."""
    if getattr(device, "type", str(device)) != "cuda":
        return False, f"the model runs on {device}, not on a CUDA device"
    try:
        import torchvision.io as tvio
    except ImportError as e:  # pragma: no cover - torchvision is a dependency
        return False, f"torchvision cannot be imported ({e})"
    if not hasattr(tvio, "decode_jpeg"):
        return False, "this torchvision has no decode_jpeg"
    return True, ""


def resolve_decode_mode(mode: str, device: Any) -> str:
    """The mode that will run: ``auto`` → ``cpu-scaled`` (on CUDA too: see the module doc); ``gpu`` → ``gpu``
    on CUDA, else ``cpu-scaled`` with a warning (features are then recorded as ``cpu-scaled``)."""
    check_decode_mode(mode)
    if mode == "auto":
        return AUTO_MODE
    if mode in CPU_MODES:
        return mode
    ok, why = gpu_decode_available(device)
    if ok:
        return "gpu"
    log.warning("--decode gpu: %s; decoding on the CPU instead (cpu-scaled)", why)
    return "cpu-scaled"


# ---------------------------------------------------------------- streams
def standalone_jpeg(stream: bytes, tables: bytes | None = None, raw_rgb: bool = False) -> bytes:
    """A self-contained JPEG from a TIFF tile stream: SOI, [Adobe APP14 transform 0 for RGB-coded tiles],
    the ``JPEGTables`` segments (DQT/DHT, between their SOI and EOI), then the tile's own segments."""
    if stream[:2] != SOI:
        raise ValueError("not a JPEG stream (no SOI marker)")
    head = SOI
    body = stream[2:]
    if raw_rgb:
        t = _adobe_transform_at(stream)
        if t < 0:
            head += ADOBE_RGB
        elif stream[t] != 0:  # an Adobe marker saying YCbCr: the TIFF says RGB
            patched = bytearray(stream)
            patched[t] = 0
            body = bytes(patched[2:])
    if tables:
        if tables[:2] != SOI:
            raise ValueError("JPEGTables does not start with SOI")
        t = tables[2:-2] if tables[-2:] == EOI else tables[2:]
        head += t
    return head + body


def _adobe_transform_at(jpeg: bytes) -> int:
    """Offset of the transform byte of the stream's Adobe APP14 marker (in its first 4 KiB), or -1."""
    j = jpeg.find(b"Adobe", 0, 4096)
    while j >= 4:
        if jpeg[j - 4:j - 2] == b"\xff\xee" and len(jpeg) > j + 11:
            return j + 11
        j = jpeg.find(b"Adobe", j + 1, 4096)
    return -1


def jpeg_subsampling(jpeg: bytes) -> tuple[int, ...]:
    """Sampling factors (h0, v0, h1, v1, ...) of the frame header (SOF0/1/2), () when none is found."""
    i, n = 2, len(jpeg)
    while i + 4 <= n:
        if jpeg[i] != 0xFF:
            return ()
        marker = jpeg[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg = int.from_bytes(jpeg[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            nc = jpeg[i + 9]
            out: list[int] = []
            for c in range(nc):
                s = jpeg[i + 11 + 3 * c]
                out += [s >> 4, s & 15]
            return tuple(out)
        if marker == 0xDA:
            return ()
        i += 2 + seg
    return ()


# ---------------------------------------------------------------- CPU decoders
def simplejpeg_module() -> Any:
    """simplejpeg (libjpeg-turbo's TurboJPEG API, with DCT scaling) or None when it is not installed."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def decode_cpu(jpeg: bytes, reduce: int, size: tuple[int, int], sj: Any = None) -> np.ndarray:
    """Decode a standalone JPEG (see :func:`standalone_jpeg`) at 1/``reduce`` scale (1, 2, 4, 8) in the DCT
    → uint8 (h, w, 3). ``size`` = (width, height) of the full-scale image. simplejpeg when ``sj`` is given,
    else Pillow's ``draft`` (the same libjpeg-turbo arithmetic, slower). Raises ValueError when the data do
    not decode."""
    w, h = size
    if sj is not None:
        try:
            return sj.decode_jpeg(jpeg, colorspace="RGB", min_factor=reduce, min_width=w // reduce,
                                  min_height=h // reduce)
        except (ValueError, RuntimeError) as e:
            raise ValueError(str(e)) from e
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(jpeg))
        if reduce > 1:
            im.draft("RGB", (im.size[0] // reduce, im.size[1] // reduce))
        arr = np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(str(e)) from e
    return arr
