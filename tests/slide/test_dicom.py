"""DICOM headers written here (explicit and implicit VR, nested sequences of undefined length) and what
:func:`dicom_wsi_problem` says of each; the real malformed TCGA DICOM is in test_open_slide."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from wsi_pipeline.errors import CorruptSlideError
from wsi_pipeline.slide.dicom import WSI_SOP_CLASS, dicom_wsi_problem, read_dicom_header
from wsi_pipeline.slide.open import open_slide

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def _text(s: str) -> bytes:
    b = s.encode("ascii")
    return b + (b"\x00" if len(b) % 2 else b"")


def _el(group: int, elem: int, vr: str, value: bytes, explicit: bool = True) -> bytes:
    if not explicit:
        return struct.pack("<HHI", group, elem, len(value)) + value
    if vr in ("OB", "SQ", "UN", "UT"):
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value


def _nested_sequence() -> bytes:
    """(5200,9229) of undefined length: one item of undefined length holding another such sequence."""
    item_delim, seq_delim = struct.pack("<HHI", 0xFFFE, 0xE00D, 0), struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    inner = (struct.pack("<HH2sHI", 0x0028, 0x9110, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
             + _el(0x0028, 0x0030, "DS", _text("0.25\\0.25")) + item_delim + seq_delim)
    return (struct.pack("<HH2sHI", 0x5200, 0x9229, b"SQ", 0, 0xFFFFFFFF)
            + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + item_delim + seq_delim)


def write_dicom(path: Path, *, sop: str = WSI_SOP_CLASS, image_type: str | None = "ORIGINAL\\PRIMARY\\VOLUME\\NONE",
                rows: int = 256, cols: int = 256, explicit: bool = True) -> Path:
    ts = EXPLICIT_LE if explicit else IMPLICIT_LE
    meta = (_el(0x0002, 0x0002, "UI", _text(sop)) + _el(0x0002, 0x0010, "UI", _text(ts))
            + _el(0x0002, 0x0013, "SH", _text("TESTWRITER 1")))
    meta = _el(0x0002, 0x0000, "UL", struct.pack("<I", len(meta))) + meta
    e = explicit
    ds = b""
    if image_type is not None:
        ds += _el(0x0008, 0x0008, "CS", _text(image_type), e)
    ds += _el(0x0028, 0x0010, "US", struct.pack("<H", rows), e) + _el(0x0028, 0x0011, "US", struct.pack("<H", cols), e)
    ds += _el(0x0048, 0x0006, "UL", struct.pack("<I", 4096), e) + _el(0x0048, 0x0007, "UL", struct.pack("<I", 3072), e)
    if explicit:
        ds += _nested_sequence()
    ds += struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) if explicit else struct.pack("<HHI", 0x7FE0, 0x0010, 8)
    path.write_bytes(b"\x00" * 128 + b"DICM" + meta + ds + b"\x00" * 8)
    return path


def test_a_conformant_header_is_read_past_nested_sequences(tmp_path: Path) -> None:
    p = write_dicom(tmp_path / "ok.dcm")
    h = read_dicom_header(p)
    assert h.get("ImageType") == "ORIGINAL\\PRIMARY\\VOLUME\\NONE" and h.get("Rows") == "256"
    assert h.get("TotalPixelMatrixColumns") == "4096" and h.get("ImplementationVersionName") == "TESTWRITER 1"
    assert dicom_wsi_problem(p) is None


def test_implicit_vr_headers_are_read_too(tmp_path: Path) -> None:
    p = write_dicom(tmp_path / "implicit.dcm", explicit=False, image_type=None)
    assert read_dicom_header(p).get("TotalPixelMatrixRows") == "3072"
    cause, fix = dicom_wsi_problem(p)
    assert "ImageType (0008,0008) is missing" in cause and "TESTWRITER 1" in cause and "wsidicomizer" in fix


@pytest.mark.parametrize(("kw", "cause"), [
    ({"image_type": None}, "ImageType (0008,0008) is missing"),
    ({"image_type": "ORIGINAL\\PRIMARY"}, "ImageType is 'ORIGINAL\\\\PRIMARY'"),
    ({"sop": "1.2.840.10008.5.1.4.1.1.2"}, "not a whole-slide image: its SOP class is 1.2.840.10008.5.1.4.1.1.2"),
    ({"rows": 256, "cols": 512}, "512×256-px frames"),
])
def test_each_missing_piece_is_named(tmp_path: Path, kw: dict, cause: str) -> None:
    problem = dicom_wsi_problem(write_dicom(tmp_path / "x.dcm", **kw))
    assert problem is not None and cause in problem[0]


def test_not_dicom_and_truncated_dicom(tmp_path: Path, small_svs: Path) -> None:
    assert dicom_wsi_problem(small_svs) is None
    whole = write_dicom(tmp_path / "whole.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"  # an interrupted copy: the header ends inside the nested sequence
    cut.write_bytes(whole[: len(whole) - 40])
    cause, fix = dicom_wsi_problem(cut)
    assert "ends inside its header" in cause and "copy or export it again" in fix
    # a header longer than what is read is not called truncated: the attributes checked come first
    assert dicom_wsi_problem(write_dicom(tmp_path / "long.dcm"), max_bytes=len(whole) - 40) is None


def test_open_slide_names_the_dicom_cause(tmp_path: Path) -> None:
    """Whichever way OpenSlide fails on it, the error names what the header lacks and how to fix it."""
    p = write_dicom(tmp_path / "ct.dcm", sop="1.2.840.10008.5.1.4.1.1.2")
    with pytest.raises(CorruptSlideError) as exc:
        open_slide(p)
    assert str(p) in str(exc.value) and "not a whole-slide image" in str(exc.value) and "run the command again" in str(exc.value)


def test_the_named_cause_is_the_true_one(bad_dcm: Path, tmp_path: Path) -> None:
    """The real malformed TCGA DICOM lacks ImageType: a copy with only that element added (before SOPClassUID,
    (0008,0016), in tag order) opens in OpenSlide, and the diagnosis then finds nothing to name."""
    data = bad_dcm.read_bytes()
    sop_at = data.index(b"\x08\x00\x16\x00UI", 132 + 8)  # the data set's SOPClassUID, past the meta group's
    fixed = tmp_path / "fixed.dcm"
    fixed.write_bytes(data[:sop_at] + _el(0x0008, 0x0008, "CS", _text("ORIGINAL\\PRIMARY\\VOLUME\\NONE")) + data[sop_at:])
    assert "ImageType (0008,0008) is missing" in dicom_wsi_problem(bad_dcm)[0]
    assert dicom_wsi_problem(fixed) is None
    with open_slide(fixed, mpp_fallback=0.5) as s:
        assert s.dimensions == (3236, 2638)
