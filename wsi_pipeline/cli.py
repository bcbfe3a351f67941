"""The `wsi` command line: a thin typer app. Each command module under ``wsi_pipeline.commands`` defines
``register(app)`` and calls one library function; heavy imports stay inside the command bodies."""

from __future__ import annotations

import importlib
import logging
import sys

import typer

COMMAND_MODULES = (
    "info",
    "tile",
    "extract",
    "ssl",
    "train",
    "tme",
    "review",
    "analysis",
    "report",
    "run",
)


def _setup_logging(verbose: int) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(message)s", handlers=[RichHandler(show_path=False)])


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="wsi",
        help="wsi-pipeline: MPP-true tiling, feature extraction, MIL prediction, heatmaps and reports for whole-slide images.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )

    @app.callback()
    def _root(verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging (-v, -vv).")) -> None:
        _setup_logging(verbose)

    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"wsi_pipeline.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"wsi_pipeline.commands.{name}":
                continue  # command module not built yet
            raise
        mod.register(app)
    return app


def main() -> None:
    from wsi_pipeline.errors import WSIPipelineError

    app = build_app()
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except WSIPipelineError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
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
