"""The tiling and MPP options, defined once: every command that tiles slides (`wsi tile`, `wsi run`) gets them
through :func:`tiling_options`, which appends them to the command's signature and hands the command one
:class:`TilingOptions` instead. ``--slide-dir`` (:func:`slide_dir_option`) is defined here too, for the commands
that read a RUN's slides again after tiling.

An option left unset on the command line keeps the value of the base configuration (the dataclass default,
or a ``--config`` YAML), so the file and the command line combine predictably.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from wsi_pipeline.config import TilingConfig

_D = TilingConfig()


def _opt(*names: str, help: str) -> Any:
    return typer.Option(None, *names, help=help, show_default=False)


# name → (annotation, typer option); None means "not given on the command line"
_OPTIONS: dict[str, tuple[Any, Any]] = {
    "target_mpp": (float | None, _opt("--target-mpp", help=f"Tile resolution in µm/px (default: {_D.target_mpp}).")),
    "tile_size": (int | None, _opt("--tile-size", help=f"Tile side in pixels at --target-mpp (default: {_D.tile_size}).")),
    "overlap": (int | None, _opt("--overlap", help=f"Overlap between neighbouring tiles, in pixels (default: {_D.overlap}).")),
    "min_tissue": (float | None, _opt("--min-tissue", help=f"Minimum tissue fraction to keep a tile (default: {_D.min_tissue}).")),
    "slide_mpp": (float | None, _opt("--slide-mpp", help="Level-0 µm/px for slides whose file has no MPP.")),
    "force_slide_mpp": (float | None, _opt("--force-slide-mpp", help="Level-0 µm/px for every slide, overriding the files.")),
    "tissue_mpp": (float | None, _opt("--tissue-mpp", help=f"Resolution of the tissue mask in µm/px (default: {_D.tissue_mpp}).")),
    "min_tissue_area_um2": (float | None, _opt("--min-tissue-area", help="Drop tissue pieces smaller than this many "
                                                                           f"µm² (default: {_D.min_tissue_area_um2:g}).")),
    "mpp_from_objective": (bool, typer.Option(False, "--mpp-from-objective",
                                              help="Allow MPP = 10 / objective power when a file has none.")),
    "no_pen_rejection": (bool, typer.Option(False, "--no-pen-rejection", help="Keep pen-marked areas.")),
}


def slide_dir_option() -> Any:
    """``--slide-dir DIR`` (repeatable) of every command that reads a RUN's slides after tiling (extract, tme,
    heatmap, view): where slides moved since tiling are now, found by file name."""
    return typer.Option(None, "--slide-dir", show_default=False,
                        help="Folder holding slides moved since tiling (repeatable; found by file name).")


def slide_dir_list(values: list[Path] | None) -> list[str]:
    return [str(v) for v in values or []]


@dataclasses.dataclass(frozen=True)
class TilingOptions:
    """The tiling options as given on the command line (None / False: not given)."""

    values: dict[str, Any]

    def apply(self, base: TilingConfig | None = None) -> TilingConfig:
        """``base`` (default: the dataclass defaults) with every option given on the command line applied."""
        cfg = dataclasses.replace(base) if base is not None else TilingConfig()
        for name, value in self.values.items():
            if name == "no_pen_rejection":
                if value:
                    cfg.reject_pen = False
            elif name == "mpp_from_objective":
                cfg.mpp_from_objective = cfg.mpp_from_objective or bool(value)
            elif value is not None:
                setattr(cfg, name, value)
        return cfg.validate()


def option_names() -> list[str]:
    """The command-line names of the shared tiling options (``--target-mpp``, ...)."""
    return [next(d for d in opt.param_decls if d.startswith("--")) for _, opt in _OPTIONS.values()]


def tiling_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` every tiling option; it receives them as one keyword argument ``tiling``."""
    sig = inspect.signature(command)
    kept = [p for p in sig.parameters.values() if p.name != "tiling"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
             for name, (ann, opt) in _OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name, None) for name in _OPTIONS}
        return command(*args, tiling=TilingOptions(values), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
    return wrapper
