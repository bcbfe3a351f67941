"""The one class palette: every map, legend and QuPath export colours a class the same way.

Named classes (tissue classes of the tissue classifier, immune phenotypes, common QuPath names) have fixed
colours, looked up by :func:`~wsi_pipeline.tiles.folders.class_key` (``01_TUMOR``, ``Tumour`` and ``tumor``
are one class); any other name gets a stable, well-saturated colour hashed from the name itself
(:func:`hash_colour`: the GeoJSON writer's default colour of a classification, so a class written without
a colour still looks the same everywhere).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from wsi_pipeline.formats.geojson import class_color as hash_colour
from wsi_pipeline.tiles.folders import class_key

RGB = tuple[int, int, int]

__all__ = ["NAMED_COLOURS", "RGB", "class_colour", "class_colours", "hash_colour"]

NAMED_COLOURS: Mapping[str, RGB] = MappingProxyType({
    # tissue classes (kather16 and the usual spellings)
    "tumor": (220, 20, 40),
    "tumour": (220, 20, 40),
    "stroma": (0, 175, 175),
    "complex": (250, 150, 20),
    "lympho": (30, 30, 230),
    "lymphocytes": (30, 30, 230),
    "debris": (110, 60, 20),
    "mucosa": (150, 220, 40),
    "adipose": (255, 240, 0),
    "empty": (170, 170, 170),
    "immune": (160, 90, 160),
    "necrosis": (50, 50, 50),
    "other": (255, 200, 0),
    # immune phenotypes
    "inflamed": (220, 50, 47),
    "excluded": (240, 160, 20),
    "desert": (38, 110, 210),
})


def class_colour(name: str) -> RGB:
    """The colour of a class: its fixed colour when named in :data:`NAMED_COLOURS`, else :func:`hash_colour`."""
    return NAMED_COLOURS.get(class_key(name)) or hash_colour(name)


def class_colours(names: Iterable[str]) -> dict[str, RGB]:
    """``{name: colour}`` for a list of class names (see :func:`class_colour`)."""
    return {n: class_colour(n) for n in names}
