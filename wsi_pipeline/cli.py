"""The `wsi` command line: a thin typer app. Each command module under ``wsi_pipeline.commands`` defines
``register(app)`` and calls one library function; heavy imports stay inside the command bodies."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

COMMAND_MODULES = (
    "info",
    "tile",
    "extract",
    "ssl",
    "train",
    "federated",
    "tme",
    "review",
    "analysis",
    "report",
    "run",
    "status",
)


PACKAGE_LOGGER = "wsi_pipeline"
# Other libraries' log records (tifffile, PIL, matplotlib, numcodecs, h5py ...) reach the screen one -v later than
# ours: a tifffile ERROR about a damaged file is detail behind the typed error the command prints, and their
# DEBUG chatter (PIL, matplotlib's font scoring) needs -vvv. Index: the number of -v.
THIRD_PARTY_LEVELS = (logging.CRITICAL, logging.WARNING, logging.INFO, logging.DEBUG)


def _setup_logging(verbose: int) -> None:
    """Log to stderr: ours from WARNING (-v: INFO, -vv: DEBUG), other libraries' per
    :data:`THIRD_PARTY_LEVELS`. Leaves logging alone when the host process has configured it (tests, embedding)."""
    from rich.console import Console
    from rich.logging import RichHandler

    root = logging.getLogger()
    if root.handlers:
        return
    root.addHandler(RichHandler(console=Console(stderr=True), show_path=False))  # stdout stays for results
    root.setLevel(THIRD_PARTY_LEVELS[min(verbose, len(THIRD_PARTY_LEVELS) - 1)])
    logging.getLogger(PACKAGE_LOGGER).setLevel(max(logging.WARNING - 10 * verbose, logging.DEBUG))


def _show_version(value: bool) -> None:
    if value:
        from wsi_pipeline._version import __version__

        typer.echo(f"wsi-pipeline {__version__}")
        raise typer.Exit()


class _PlainMetavars:
    """Help text in the usual CLI style, whatever typer's defaults: arguments as ``SLIDE`` / ``INPUTS...``
    (not ``{slide}``), flags without a value type (``--force``, not ``--force <bool>``)."""

    params: list[Any]

    def _plain_metavars(self) -> None:
        for p in self.params:
            if isinstance(p, TyperArgument) and p.metavar is None:
                p.metavar = p.name.upper() + ("..." if p.nargs != 1 else "")
            elif isinstance(p, TyperOption) and (p.is_flag or p.count) and p.metavar is None:
                p.metavar = ""

    def get_help_option(self, ctx: Any) -> Any:
        opt = super().get_help_option(ctx)  # type: ignore[misc]
        if opt is not None and opt.metavar is None:
            opt.metavar = ""
        return opt


class WsiCommand(_PlainMetavars, TyperCommand):
    """Every ``wsi`` command (set in :func:`build_app`): plain metavars, usage ``wsi tile [OPTIONS] INPUTS...``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain_metavars()

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                pieces.append(p.metavar if p.required else f"[{p.metavar}]")
            else:
                pieces.extend(p.get_usage_pieces(ctx))
        return pieces


class WsiGroup(_PlainMetavars, TyperGroup):
    """The ``wsi`` group: its own options (``-v``, ``--version``) in the same style."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain_metavars()


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="wsi",
        help="wsi-pipeline: MPP-true tiling, feature extraction, MIL prediction, heatmaps and reports for whole-slide images.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        cls=WsiGroup,
    )

    @app.callback()
    def _root(
        verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                    help="More logging (-v, -vv; -vvv adds other libraries' debug lines)."),
        version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                     help="Show the version and exit."),
    ) -> None:
        _setup_logging(verbose)

    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"wsi_pipeline.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"wsi_pipeline.commands.{name}":
                continue  # command module not built yet
            raise
        mod.register(app)
    commands = [*app.registered_commands, *(c for g in app.registered_groups  # `wsi federated server` too
                                             for c in g.typer_instance.registered_commands)]
    for info in commands:  # every command gets the plain help style (see _PlainMetavars)
        if info.cls in (None, TyperCommand):
            info.cls = WsiCommand
    for group in app.registered_groups:
        group.typer_instance.info.cls = WsiGroup
    return app


def main() -> None:
    from wsi_pipeline.errors import WSIPipelineError

    app = build_app()
    try:
        rc = app(standalone_mode=False, prog_name="wsi")  # "wsi" in usage lines under python -m / torchrun too
        sys.exit(rc if isinstance(rc, int) else 0)
    except WSIPipelineError as e:
        typer.secho(f"error: {type(e).__name__}: {e}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and the like
        if _is_click_exception(e):
            e.show()  # type: ignore[attr-defined]
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        raise


def _is_click_exception(e: BaseException) -> bool:
    """A usage error of click — or of the click copy that recent typer versions vendor (``typer._click``),
    which is not a subclass of ``click.ClickException``."""
    return any(c.__name__ == "ClickException" for c in type(e).__mro__) and hasattr(e, "show")
