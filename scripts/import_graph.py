#!/usr/bin/env python
"""The import graph of wsi_pipeline: package-level edges, back-edges against the layer order, cycles.

Every import counts, wherever it is written (module level, inside a function, under ``TYPE_CHECKING``),
as ``lint-imports`` counts it. Prints:

- the package-level graph (a *package* is a sub-folder of ``wsi_pipeline`` or a top-level module), each
  edge with its number of module-level imports;
- the back-edges against the layer order of ``[tool.importlinter]`` in pyproject.toml (an import up a
  layer, or sideways between independent siblings);
- the cycles: strongly connected components of the module graph and of the package graph, and the
  package pairs that import each other (2-cycles).

    python scripts/import_graph.py                        # this checkout
    python scripts/import_graph.py --root /tmp/base \\
        --rename run.pipeline=pipeline --rename run=runfolder --rename qupath=review.qupath

``--root`` reads another tree (e.g. an older commit in a ``git worktree``) against this checkout's layer
order; ``--rename OLD=NEW`` maps a module prefix of that tree onto today's name (first match wins).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport import-linter installs
    import tomli as tomllib

PACKAGE = "wsi_pipeline"
REPO = Path(__file__).resolve().parents[1]
Graph = Mapping[str, set[str]]


def module_names(pkg_dir: Path) -> dict[str, Path]:
    """``wsi_pipeline.x.y`` → file, for every ``.py`` file under ``pkg_dir``."""
    out = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        parts = list(path.relative_to(pkg_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(target: str, modules: Iterable[str]) -> str | None:
    """The longest known module that ``target`` names or lies in (``pkg.mod.func`` → ``pkg.mod``)."""
    known = set(modules)
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if name in known:
            return name
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """Modules of the package that ``module`` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                origin = ".".join(stem + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from pkg import name`: the submodule `pkg.name` if there is one, else `pkg` itself
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
        for target in targets:
            if target.split(".")[0] != PACKAGE:
                continue
            hit = _resolve(target, modules)
            if hit and hit != module:
                found.add(hit)
    return found


def rename(module: str, renames: list[tuple[str, str]]) -> str:
    rel = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    for old, new in renames:
        if rel == old or rel.startswith(old + "."):
            return ".".join(x for x in (PACKAGE, new + rel[len(old):]) if x)
    return module


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_graph(root: Path, renames: list[tuple[str, str]]) -> dict[str, set[str]]:
    files = module_names(root / PACKAGE)
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in files.items():
        src = rename(mod, renames)
        graph[src] |= {rename(t, renames) for t in imports_of(mod, path, set(files))} - {src}
    return dict(graph)


def package_graph(mods: Graph) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for src, targets in mods.items():
        for dst in targets:
            a, b = package_of(src), package_of(dst)
            if a != b and "__init__" not in (a, b):
                out[a][b] += 1
    return {k: dict(v) for k, v in out.items()}


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components with more than one node, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return sorted(comps, key=lambda c: (-len(c), c))


def layer_order(pyproject: Path) -> list[list[str]]:
    """The layers (bottom first) of the ``layers`` contract named "Layers" in pyproject.toml."""
    cfg = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    for contract in cfg["tool"]["importlinter"]["contracts"]:
        if contract.get("type") == "layers" and contract.get("containers") == [PACKAGE]:
            return [[n.strip().strip("()") for n in line.replace(":", "|").split("|")] for line in reversed(contract["layers"])]
    raise SystemExit(f"{pyproject}: no layers contract with containers = ['{PACKAGE}']")


def back_edges(pkgs: Mapping[str, Mapping[str, int]], layers: list[list[str]]) -> list[tuple[str, str, int, str]]:
    rank = {name: i for i, line in enumerate(layers) for name in line}
    out = []
    for src, targets in sorted(pkgs.items()):
        for dst, n in sorted(targets.items()):
            if src not in rank or dst not in rank:
                out.append((src, dst, n, "not in the layer list"))
            elif rank[dst] > rank[src]:
                out.append((src, dst, n, "up"))
            elif rank[dst] == rank[src]:
                out.append((src, dst, n, "sideways"))
    return out


def report(root: Path, pyproject: Path, renames: list[tuple[str, str]]) -> None:
    mods = module_graph(root, renames)
    pkgs = package_graph(mods)
    layers = layer_order(pyproject)
    n_edges = sum(len(t) for t in mods.values())
    print(f"# import graph of {root / PACKAGE}: {len(mods)} modules, {n_edges} module imports")
    print("\n## packages (importer -> imported (module imports))")
    for src in sorted(pkgs):
        print(f"{src:>10} -> " + ", ".join(f"{d} ({n})" for d, n in sorted(pkgs[src].items())))
    backs = back_edges(pkgs, layers)
    print(f"\n## back-edges against the layer order: {len(backs)} package edges, {sum(b[2] for b in backs)} imports")
    print("layers, bottom first: " + " < ".join(" | ".join(line) for line in layers))
    for src, dst, n, kind in backs:
        print(f"  {src} -> {dst} ({n}): {kind}")
    root_importers = sorted(m for m, ts in mods.items() if PACKAGE in ts)
    print(f"\n## modules importing the root package `{PACKAGE}` (the top of the tree): {len(root_importers)}")
    for m in root_importers:
        print(f"  {m.removeprefix(PACKAGE + '.')}")
    mod_cycles = strongly_connected(mods)
    print(f"\n## module-level cycles: {len(mod_cycles)} strongly connected components")
    for comp in mod_cycles:
        print(f"  [{len(comp)}] " + ", ".join(m.removeprefix(PACKAGE + ".") for m in comp))
    pkg_graph = {k: set(v) for k, v in pkgs.items()}
    pkg_cycles = strongly_connected(pkg_graph)
    print(f"\n## package-level cycles: {len(pkg_cycles)} strongly connected components")
    for comp in pkg_cycles:
        print(f"  [{len(comp)}] " + ", ".join(comp))
    pairs = sorted({tuple(sorted((a, b))) for a, ts in pkg_graph.items() for b in ts if a in pkg_graph.get(b, ())})
    print(f"\n## package pairs importing each other: {len(pairs)}")
    for a, b in pairs:
        print(f"  {a} <-> {b}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=REPO, help="the tree holding wsi_pipeline/ (default: this checkout)")
    ap.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml", help="where the layer order is read")
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                    help="map a module prefix (relative to wsi_pipeline) of that tree onto today's name")
    args = ap.parse_args(argv)
    renames = [tuple(r.split("=", 1)) for r in args.rename]
    if any(len(r) != 2 for r in renames):
        ap.error("--rename takes OLD=NEW")
    report(args.root.resolve(), args.pyproject, renames)


if __name__ == "__main__":
    sys.exit(main())
