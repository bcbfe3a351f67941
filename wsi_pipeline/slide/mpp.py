"""Resolve microns-per-pixel from slide metadata. Pure functions over property dictionaries."""

from __future__ import annotations

from collections.abc import Mapping

from wsi_pipeline.slide.base import MPPInfo

MPP_RANGE = (0.02, 50.0)  # plausible µm/px for any microscope scan; outside → ignored as bogus
_UNIT_TO_UM = {"centimeter": 1e4, "cm": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0, "millimeter": 1e3, "mm": 1e3}


def _plausible(v: float | None) -> float | None:
    if v is None or not (MPP_RANGE[0] <= v <= MPP_RANGE[1]):
        return None
    return v


def _float(v: object) -> float | None:
    try:
        f = float(str(v).strip())
    except (TypeError, ValueError):
        return None
    return f if f > 0 else None


def mpp_from_resolution(x_resolution: object, unit: object) -> float | None:
    """µm/px from a TIFF XResolution (pixels per unit) and ResolutionUnit; None for 'none'/missing."""
    res = _float(x_resolution)
    um_per_unit = _UNIT_TO_UM.get(str(unit).strip().lower()) if unit is not None else None
    if res is None or um_per_unit is None:
        return None
    return _plausible(um_per_unit / res)


def mpp_from_openslide_properties(props: Mapping[str, str], vendor: str) -> MPPInfo:
    """openslide.mpp-x (vendor metadata, or TIFF tags for generic TIFF), then aperio.MPP, then TIFF tags."""
    mpp = _plausible(_float(props.get("openslide.mpp-x")))
    if mpp is not None:
        return MPPInfo(mpp, "tiff-tags" if vendor == "generic-tiff" else "metadata")
    mpp = _plausible(_float(props.get("aperio.MPP")))
    if mpp is not None:
        return MPPInfo(mpp, "metadata")
    mpp = mpp_from_resolution(props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit"))
    if mpp is not None:
        return MPPInfo(mpp, "tiff-tags")
    return MPPInfo(None, "none")


def objective_from_openslide_properties(props: Mapping[str, str]) -> float | None:
    for key in ("openslide.objective-power", "aperio.AppMag", "hamamatsu.SourceLens"):
        v = _float(props.get(key))
        if v is not None:
            return v
    return None


def finalize_mpp(
    found: MPPInfo,
    override: float | None,
    objective_power: float | None,
    from_objective: bool,
    fallback: float | None = None,
) -> MPPInfo:
    """Apply the user's override (always wins), then the file's MPP, then the user's fallback for files
    without one (``--slide-mpp``), then the opt-in objective-power fallback (10 / power)."""
    if override is not None:
        return MPPInfo(float(override), "override")
    if found.mpp is not None:
        return found
    if fallback is not None:
        return MPPInfo(float(fallback), "user (--slide-mpp)")
    if from_objective and objective_power:
        return MPPInfo(10.0 / objective_power, "objective")
    return found
