"""Opening a slide: :func:`open_slide` picks a backend (OpenSlide, tifffile, Pillow), checks the file is
complete and resolves the MPP; :func:`find_slides` expands files and folders into slide files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from wsi_pipeline.errors import CorruptSlideError, SlideNotFoundError, UnsupportedFormatError
from wsi_pipeline.slide.base import Slide
from wsi_pipeline.slide.dicom import dicom_wsi_problem
from wsi_pipeline.slide.integrity import check_complete, is_tiff

OPENSLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
TIFF_EXTENSIONS = (".ome.tif", ".ome.tiff", ".ome.btf", ".tif", ".tiff", ".btf")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
SLIDE_EXTENSIONS = tuple(sorted(set(OPENSLIDE_EXTENSIONS + TIFF_EXTENSIONS + IMAGE_EXTENSIONS)))
_SUPPORTED_MSG = "supported: SVS, NDPI, MRXS, SCN, BIF, VMS, generic/OME TIFF, DICOM WSI, PNG/JPEG"


def _lower_name(path: Path) -> str:
    return path.name.lower()


def open_slide(
    path: str | Path,
    mpp: float | None = None,
    mpp_from_objective: bool = False,
    backend: str = "auto",
    mpp_fallback: float | None = None,
) -> Slide:
    """Open a slide with the best backend.

    ``mpp`` overrides the file's µm/px (``--force-slide-mpp``); ``mpp_fallback`` is used only when the file
    has none (``--slide-mpp``); ``mpp_from_objective`` allows MPP = 10 / objective power as a last resort. Raises :class:`SlideNotFoundError`, :class:`UnsupportedFormatError` or
    :class:`CorruptSlideError` naming the file and the reason.
    """
    from wsi_pipeline.slide.openslide_backend import OpenSlideSlide, openslide_vendor
    from wsi_pipeline.slide.tiff_backend import ImageSlide, TiffSlide

    path = Path(path)
    if not path.exists():
        raise SlideNotFoundError(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CorruptSlideError(path, "empty file (0 bytes)", "the copy or download failed; copy it again")
    if path.is_file():
        check_complete(path)  # a truncated file is reported as damaged, before its metadata (MPP) is trusted
    name = _lower_name(path)
    kwargs = {"mpp": mpp, "mpp_from_objective": mpp_from_objective, "mpp_fallback": mpp_fallback}
    if backend == "openslide":
        return OpenSlideSlide(path, **kwargs)
    if backend == "tifffile":
        return TiffSlide(path, **kwargs)
    if backend == "pillow":
        return ImageSlide(path, **kwargs)
    if backend != "auto":
        raise ValueError(f"unknown backend {backend!r}: auto, openslide, tifffile or pillow")

    if name.endswith((".ome.tif", ".ome.tiff", ".ome.btf")):
        return TiffSlide(path, **kwargs)
    vendor = None
    if not name.endswith(IMAGE_EXTENSIONS):
        try:
            vendor = openslide_vendor(path)
        except OSError as e:
            raise CorruptSlideError(path, f"cannot read the file ({e})", "check permissions and the file") from e
    if vendor is not None:
        return OpenSlideSlide(path, **kwargs)
    if name.endswith(TIFF_EXTENSIONS) or is_tiff(path):
        return TiffSlide(path, **kwargs)
    if name.endswith(IMAGE_EXTENSIONS):
        return ImageSlide(path, **kwargs)
    dicom = dicom_wsi_problem(path)
    if dicom:
        raise CorruptSlideError(path, *dicom)
    if name.endswith(OPENSLIDE_EXTENSIONS):
        raise CorruptSlideError(
            path, f"has a slide extension ({path.suffix}) but no reader recognises its content",
            "the file is truncated, damaged or mislabelled; re-export it",
        )
    raise UnsupportedFormatError(path, f"unsupported file type ({path.suffix or 'no extension'})", _SUPPORTED_MSG)


MOVED_SLIDE_FIX = ("the RUN recorded this path when it was tiled; if the slides have moved, pass --slide-dir FOLDER "
                   "(where they are now)")


def require_recorded_slide(recorded: str | None, slide_dirs: Sequence[str | Path] = ()) -> str:
    """The slide path a RUN recorded at tiling when it exists, else the first of ``slide_dirs`` holding a file (or
    an MRXS/DICOM folder) of the same name: a RUN reviewed on another machine, or after the slides moved.
    Raises :class:`SlideNotFoundError` with the ``--slide-dir`` fix when the slide is found nowhere."""
    recorded = str(recorded or "")
    if recorded and Path(recorded).exists():
        return recorded
    name = Path(recorded).name
    found = next((Path(d) / name for d in slide_dirs if name and (Path(d) / name).exists()), None)
    if found is None:
        looked = f" (not in {', '.join(map(str, slide_dirs))} either)" if slide_dirs else ""
        raise SlideNotFoundError(recorded or "<no path>", MOVED_SLIDE_FIX + looked)
    return str(found)


def open_recorded_slide(recorded: str | None, mpp: float | None, slide_dirs: Sequence[str | Path] = ()) -> Slide:
    """:func:`open_slide` on the path the RUN recorded at tiling (:func:`require_recorded_slide`) with the MPP the
    tiling used."""
    return open_slide(require_recorded_slide(recorded, slide_dirs), mpp=mpp)


def no_slides_message(inputs: Sequence[str | Path], recursive: bool) -> str:
    """Why ``inputs`` gave :func:`find_slides` no slide files, and what to pass instead (``--recursive`` when
    subfolders hold slides)."""
    names = ", ".join(map(str, inputs))
    msg = f"{names}: no slide files found ({', '.join(SLIDE_EXTENSIONS)})"
    if not recursive and find_slides([p for p in inputs if Path(p).is_dir()], recursive=True):
        return msg + "; its subfolders hold slides: pass --recursive"
    return msg + "; point it at a folder of slides or one slide (`wsi info FILE` says whether a file can be read)"


def find_slides(inputs: list[str | Path], recursive: bool = False) -> list[Path]:
    """Expand files and folders into a sorted list of candidate slide files (MRXS companion folders and
    hidden files skipped). An input that does not exist raises :class:`SlideNotFoundError` naming it."""
    out: list[Path] = []
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise SlideNotFoundError(p)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            for f in it:
                if f.is_file() and not f.name.startswith(".") and _lower_name(f).endswith(SLIDE_EXTENSIONS):
                    out.append(f)
        else:
            out.append(p)
    return sorted(dict.fromkeys(out))
