"""Is the file whole? Checked before anything is read from its metadata, so that a truncated or damaged file
is reported as such — never as a slide without MPP, which is what its half-read metadata would say.

For TIFF-structured files (SVS, NDPI, SCN, BIF, generic and OME TIFF) every image file directory is read
and the end of every tile or strip is compared with the file's size. Only the directories are read, not
the pixels: milliseconds even for a large pyramid.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

from wsi_pipeline.errors import CorruptSlideError

log = logging.getLogger(__name__)

FIX = "the file is incomplete or damaged (an interrupted copy or download?); copy or export it again"


def is_tiff(path: Path) -> bool:
    """The file starts with a TIFF or BigTIFF header."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+")


def ifd_chain(path: Path) -> int:
    """Walk the chain of image file directories (classic TIFF and BigTIFF); return how many there are.
    Raises :class:`CorruptSlideError` when a directory, or the pointer to the next one, lies past the end
    of the file. NDPI files over 4 GiB keep offset high bits outside the chain: not walked here."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        order = "<" if head[:2] == b"II" else ">"
        big = struct.unpack(order + "H", head[2:4])[0] == 43
        offset = struct.unpack(order + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
        count_fmt, entry_size, next_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
        count_size, next_size = struct.calcsize(count_fmt), struct.calcsize(next_fmt)
        seen: set[int] = set()
        while offset:
            if offset in seen:
                raise CorruptSlideError(path, f"damaged: its image directories loop back to byte {offset:,}", FIX)
            seen.add(offset)
            if offset + count_size > size:
                raise CorruptSlideError(path, f"truncated or damaged: image directory {len(seen)} starts at byte "
                                              f"{offset:,} but the file has only {size:,} bytes", FIX)
            f.seek(offset)
            n = struct.unpack(order + count_fmt, f.read(count_size))[0]
            end = offset + count_size + n * entry_size + next_size
            if end > size:
                raise CorruptSlideError(path, f"truncated or damaged: image directory {len(seen)} ends at byte "
                                              f"{end:,} but the file has only {size:,} bytes", FIX)
            f.seek(end - next_size)
            offset = struct.unpack(order + next_fmt, f.read(next_size))[0]
    if not seen:
        raise CorruptSlideError(path, "damaged: the TIFF header points to no image directory", FIX)
    return len(seen)


def tiff_data_end(path: Path) -> int:
    """The largest byte offset at which any tile or strip of any page ends. Raises
    :class:`CorruptSlideError` when the directories themselves cannot be parsed."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            return int(max((o + n for page in tif.pages for o, n in
                            zip(page.dataoffsets, page.databytecounts, strict=False)), default=0))
    except (tifffile.TiffFileError, ValueError, IndexError, KeyError, OSError, RuntimeError) as e:
        raise CorruptSlideError(path, f"truncated or damaged: its TIFF directories cannot be read ({e})", FIX) from e


def check_complete(path: str | Path) -> None:
    """Raise :class:`CorruptSlideError` ("truncated/damaged") when a TIFF-structured slide's image data
    runs past the end of the file or its directories cannot be read. Other formats pass (their backend
    reports what it cannot decode)."""
    path = Path(path)
    if not is_tiff(path):
        return
    size = path.stat().st_size
    n_pages = None
    if not (path.suffix.lower() == ".ndpi" and size >= 1 << 32):
        n_pages = ifd_chain(path)
    end = tiff_data_end(path)
    if end > size:
        where = f" ({n_pages} image directories)" if n_pages else ""
        raise CorruptSlideError(path, f"truncated or damaged: its image data ends at byte {end:,} but the file has "
                                      f"only {size:,} bytes{where}", FIX)
