"""Why a DICOM file is not a slide OpenSlide can read: its header, checked against what a DICOM whole-slide
image (VL Whole Slide Microscopy Image, Supplement 145) must carry.

OpenSlide's own message for such a file names a libdicom step ("Couldn't get image flavor"), not the
missing attribute, and not what to do. :func:`dicom_wsi_problem` reads the file's header (the data
elements before the pixel data; sequences skipped, frames never read, so milliseconds) and names the
first attribute that a conformant file has and this one lacks, with the program that wrote it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
# the third value of ImageType: what a DICOM WSI instance holds (a pyramid level, or an associated image)
IMAGE_FLAVORS = ("VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL")
PIXEL_DATA = (0x7FE0, 0x0010)
# VRs whose explicit-VR length is 4 bytes after 2 reserved bytes (PS3.5 §7.1.2)
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
UNDEFINED = 0xFFFFFFFF
HEADER_BYTES = 1 << 22  # read at most this much: the attributes checked come before any per-frame sequence
TAGS = {  # (group, element) → keyword, of the attributes read
    (0x0002, 0x0002): "MediaStorageSOPClassUID", (0x0002, 0x0010): "TransferSyntaxUID",
    (0x0002, 0x0013): "ImplementationVersionName", (0x0008, 0x0008): "ImageType",
    (0x0028, 0x0010): "Rows", (0x0028, 0x0011): "Columns",
    (0x0048, 0x0006): "TotalPixelMatrixColumns", (0x0048, 0x0007): "TotalPixelMatrixRows",
}
BINARY = {(0x0028, 0x0010): "<H", (0x0028, 0x0011): "<H", (0x0048, 0x0006): "<I", (0x0048, 0x0007): "<I"}  # US, UL
CONVERT_FIX = ("convert the scanner's original file to a conformant DICOM WSI (e.g. with wsidicomizer) or to a "
               "tiled TIFF, and run the command again")
TRUNCATED_FIX = "the file is incomplete (an interrupted copy or download?); copy or export it again"


@dataclass(frozen=True)
class DicomHeader:
    """The attributes of :data:`TAGS` found before the pixel data (strings; US values as decimal text);
    ``ended``: the bytes read ran out before the pixel data (a truncated file, or a header longer than read)."""

    values: dict[str, str]
    ended: bool = False

    def get(self, keyword: str) -> str | None:
        return self.values.get(keyword)


def is_dicom(path: Path) -> bool:
    """The file is DICOM Part 10: a 128-byte preamble, then ``DICM``."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


class _Reader:
    """Data elements of one encoding (explicit or implicit VR, little endian) from a byte buffer."""

    def __init__(self, buf: bytes, pos: int, explicit: bool) -> None:
        self.buf, self.pos, self.explicit = buf, pos, explicit

    def element(self) -> tuple[tuple[int, int], bytes, int] | None:
        """(tag, VR, value length) of the next element, with ``pos`` at its value; None at the buffer's end."""
        if self.pos + 8 > len(self.buf):
            return None
        group, elem = struct.unpack_from("<HH", self.buf, self.pos)
        if group == 0xFFFE or not self.explicit:  # item delimiters are always implicit
            (length,) = struct.unpack_from("<I", self.buf, self.pos + 4)
            self.pos += 8
            return (group, elem), b"", length
        vr = self.buf[self.pos + 4:self.pos + 6]
        if vr in LONG_VRS:
            if self.pos + 12 > len(self.buf):
                return None
            (length,) = struct.unpack_from("<I", self.buf, self.pos + 8)
            self.pos += 12
        else:
            (length,) = struct.unpack_from("<H", self.buf, self.pos + 6)
            self.pos += 8
        return (group, elem), vr, length

    def skip_undefined(self) -> bool:
        """Skip a sequence or item of undefined length, nested ones included, past its delimiter; False when
        the buffer ends first."""
        while (el := self.element()) is not None:
            tag, _, length = el
            if tag in ((0xFFFE, 0xE0DD), (0xFFFE, 0xE00D)):  # sequence / item delimiter
                return True
            if length == UNDEFINED:
                if not self.skip_undefined():
                    return False
            else:
                self.pos += length
        return False


def _value(tag: tuple[int, int], raw: bytes) -> str:
    fmt = BINARY.get(tag)
    if fmt is None:
        return raw.decode("ascii", "replace").strip("\x00 ")
    return str(struct.unpack_from(fmt, raw)[0]) if len(raw) >= struct.calcsize(fmt) else ""


def read_dicom_header(path: Path, max_bytes: int = HEADER_BYTES) -> DicomHeader:
    """The attributes of :data:`TAGS` from the first ``max_bytes`` of a DICOM Part 10 file (file meta
    information always explicit VR little endian; the data set in its transfer syntax; big endian stops after
    the meta group). Raises ``ValueError`` when the file is not DICOM Part 10."""
    with open(path, "rb") as f:
        buf = f.read(max_bytes)
    if buf[128:132] != b"DICM":
        raise ValueError("no DICM marker after the 128-byte preamble")
    values: dict[str, str] = {}
    r = _Reader(buf, 132, explicit=True)
    while (el := r.element()) is not None:
        tag, _, length = el
        if tag == PIXEL_DATA:
            return DicomHeader(values)
        if length == UNDEFINED:
            if not r.skip_undefined():
                break
            continue
        if r.pos + length > len(buf):
            break
        if tag in TAGS:
            values[TAGS[tag]] = _value(tag, buf[r.pos:r.pos + length])
        r.pos += length
        if tag[0] == 0x0002 and r.pos + 2 <= len(buf) and struct.unpack_from("<H", buf, r.pos)[0] != 0x0002:
            ts = values.get("TransferSyntaxUID", "")  # the meta group ends: the data set's encoding starts
            if ts == EXPLICIT_VR_BE:
                return DicomHeader(values)
            r.explicit = ts != IMPLICIT_VR_LE
    return DicomHeader(values, ended=True)


def dicom_wsi_problem(path: Path, max_bytes: int = HEADER_BYTES) -> tuple[str, str] | None:
    """(cause, fix) when ``path`` is a DICOM file that is not a conformant DICOM WSI, naming the first thing
    missing; None when it is not DICOM, or its header has everything checked here."""
    if not is_dicom(path):
        return None
    try:
        h = read_dicom_header(path, max_bytes)
    except (ValueError, OSError) as e:
        return f"a DICOM file whose header cannot be read ({e})", CONVERT_FIX
    size = path.stat().st_size
    if h.ended and size < max_bytes:
        return f"a DICOM file that ends inside its header, before any pixel data ({size:,} bytes)", TRUNCATED_FIX
    writer = h.get("ImplementationVersionName")
    by = f" (written by {writer})" if writer else ""
    sop = h.get("MediaStorageSOPClassUID")
    if sop != WSI_SOP_CLASS:
        return (f"a DICOM file but not a whole-slide image: its SOP class is {sop or 'missing'}, not VL Whole Slide "
                f"Microscopy Image ({WSI_SOP_CLASS}){by}", "give a whole-slide image; " + CONVERT_FIX)
    image_type = h.get("ImageType")
    flavors = (image_type or "").split("\\")
    if len(flavors) < 3 or flavors[2] not in IMAGE_FLAVORS:
        what = f"ImageType is {image_type!r}" if image_type else "ImageType (0008,0008) is missing"
        return (f"a non-conformant DICOM WSI{by}: its {what}, so OpenSlide cannot tell whether it holds a pyramid "
                f"level (VOLUME), a label or an overview", CONVERT_FIX)
    missing = [k for k in ("TotalPixelMatrixColumns", "TotalPixelMatrixRows", "Rows", "Columns") if not h.get(k)]
    if missing:
        return (f"a non-conformant DICOM WSI{by}: it lacks {', '.join(missing)}, so the frames cannot be placed on "
                "the slide", CONVERT_FIX)
    if h.get("Rows") != h.get("Columns"):
        return (f"a DICOM WSI with {h.get('Columns')}×{h.get('Rows')}-px frames{by}; OpenSlide reads square frames "
                "only", "re-export it with square tiles (e.g. wsidicomizer --tile-size 512) and run the command again")
    return None
