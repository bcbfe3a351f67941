"""The package's structure: one ``__init__`` style (a docstring, nothing else), whose one exception is the
registration import of ``encoders`` (timm style), and registries filled by the modules that define entries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_pipeline"
# the only statements an __init__ holds besides its docstring
ALLOWED = {
    ".": ["from wsi_pipeline._version import __version__", "__all__ = ['__version__']"],
    "encoders": ["from wsi_pipeline.encoders import presets"],
}


def test_every_init_is_its_docstring() -> None:
    inits = sorted(PACKAGE.rglob("__init__.py"))
    assert len(inits) > 15
    for path in inits:
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path}: no docstring"
        rel = str(path.parent.relative_to(PACKAGE))
        body = [ast.unparse(node) for node in tree.body[1:]]
        assert body == ALLOWED.get(rel, []), f"{path}: an __init__ holds its docstring only, found {body}"


def test_registry_is_full_whatever_is_imported_first() -> None:
    """The registry never imports its presets; importing it by name still finds them, without torch."""
    code = ("import sys; from wsi_pipeline.encoders.registry import get_entry, list_encoders; "
            "assert 'uni' in list_encoders(include_project=False); get_entry('virchow2'); "
            "assert 'torch' not in sys.modules, 'the registry and presets load without torch'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_lint_imports_sees_function_level_and_type_checking_imports() -> None:
    """The layer contracts cover every import statement: the pyproject setting keeps TYPE_CHECKING imports
    in the graph, and grimp reads imports inside functions."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    grimp = pytest.importorskip("grimp")  # installed with import-linter (the dev extras)
    cfg = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert cfg["exclude_type_checking_imports"] is False
    graph = grimp.build_graph("wsi_pipeline", exclude_type_checking_imports=False, cache_dir=None)
    imported = graph.find_modules_directly_imported_by("wsi_pipeline.api")
    assert "wsi_pipeline.slide.open" in imported  # inside api.tile() only
    assert "wsi_pipeline.tme.classifier" in imported  # under TYPE_CHECKING only
    layers = next(c for c in cfg["contracts"] if c["type"] == "layers")
    named = {n.strip() for line in layers["layers"] for n in line.split("|")}
    packages = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
                if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.name != "__init__.py"}
    assert named == packages  # every package has its layer
