"""Typed exceptions. Every message names the file (where there is one) and says how to fix the problem."""

from __future__ import annotations

from pathlib import Path


class WSIPipelineError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(WSIPipelineError, ValueError):
    """A configuration value or command-line option is invalid."""


class SlideError(WSIPipelineError):
    """Something is wrong with one slide; batch runners record it and go on."""

    def __init__(self, path: str | Path, reason: str, fix: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        msg = f"{self.path}: {reason}"
        if fix:
            msg += f" — {fix}"
        super().__init__(msg)


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide path does not exist."""

    def __init__(self, path: str | Path, fix: str = "") -> None:
        super().__init__(path, "no such file or folder",
                         fix or f"check the path (a relative path starts from the current folder, {Path.cwd()})")


class UnsupportedFormatError(SlideError):
    """No backend can read this file."""


class CorruptSlideError(SlideError):
    """The file looks like a slide format but cannot be decoded (truncated, empty, malformed)."""


class MissingMPPError(SlideError):
    """The slide carries no microns-per-pixel; physical scale cannot be trusted."""

    def __init__(self, path: str | Path, objective_power: float | None = None) -> None:
        fix = "pass --slide-mpp VALUE (µm per level-0 pixel, e.g. 0.25 for 40x, 0.5 for 20x)"
        if objective_power:
            fix += (
                f", or --mpp-from-objective to derive it from the objective power "
                f"({objective_power:g}x → {10.0 / objective_power:g} µm/px)"
            )
        super().__init__(path, "the slide has no MPP (µm per pixel) in its metadata", fix)
        self.objective_power = objective_power


class RegionOutOfBoundsError(SlideError, ValueError):
    """A requested region lies entirely outside the slide."""


class TilesNotFoundError(WSIPipelineError, FileNotFoundError):
    """A stage needs tile coordinates that were not made yet."""


class WeightsError(WSIPipelineError):
    """Model weights cannot be found, downloaded or loaded."""


class UnknownNameError(WSIPipelineError, KeyError):
    """A registry was asked for a name it does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class FormatError(WSIPipelineError):
    """An on-disk file of this package is missing fields or has an unsupported format version."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {reason}")


class LabelsError(WSIPipelineError, ValueError):
    """The labels CSV or the target specification is inconsistent."""


class ScaleMismatchError(WSIPipelineError, ValueError):
    """A model trained at one µm/px is about to be applied to tiles or features at another µm/px."""


class MissingExtraError(WSIPipelineError, ImportError):
    """A command needs an optional extra of the package that is not installed."""

    def __init__(self, extra: str, what: str, requirement: str) -> None:
        self.extra = extra
        super().__init__(f"{what} needs the optional extra [{extra}] ({requirement}), which is not installed: "
                         f"pip install 'wsi-pipeline[{extra}]' (from a checkout: pip install -e '.[{extra}]')")


class FederatedError(WSIPipelineError):
    """A federated training run could not go on (too few sites, a refused site, a failed round)."""
