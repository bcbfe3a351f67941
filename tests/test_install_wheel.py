"""The package installs like any other (issue 16): a wheel built from this checkout, installed with
``pip install --no-deps --target DIR`` and run with only DIR on ``PYTHONPATH`` from a folder outside the
repository, finds the shipped models (``models/`` ships inside the wheel as ``wsi_pipeline/models``).

``.ci/run`` runs this file as its own step. The wheel is built with this environment's setuptools when it can
(no network), and ``wsi run`` runs once on a copy of ``data_samples/`` (about a minute).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md")
SHIPPED = (
    "wsi_pipeline/models/wsip-dino-r10/encoder.json",
    "wsi_pipeline/models/wsip-dino-r10/model.safetensors",
    "wsi_pipeline/models/wsip-tissue-kather16/classifier.json",
    "wsi_pipeline/models/wsip-demo-mil/model.json",
    "wsi_pipeline/models/wsip-demo-mil/weights/meanpool/fold0.safetensors",  # the head --head auto chose
    "wsi_pipeline/review/static/index.html",
)
MAX_WHEEL_MB = 40  # the shipped models are ~18 MB compressed


def _build_wheel(tmp: Path) -> Path:
    """Build from a copy of the build inputs, so stale ``build/`` folders of the checkout cannot leak in."""
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "wsi_pipeline", src / "wsi_pipeline", ignore=ignore)
    shutil.copytree(REPO / "models", src / "models", ignore=ignore)
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *_isolation(), "-w", str(dist), str(src)],
                   check=True, cwd=tmp)
    (wheel,) = dist.glob("wsi_pipeline-*.whl")
    return wheel


def _isolation() -> list[str]:
    """Build with this environment's setuptools when it can build wheels (no network needed), else let pip
    fetch the build requirements into an isolated environment."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("setuptools").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return []
    has_wheel = importlib.util.find_spec("wheel") is not None
    return ["--no-build-isolation"] if (major, minor) >= (70, 1) or has_wheel else []


def _clean_env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WSI_MODELS_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    return env


@pytest.mark.slow
def test_wheel_installed_with_target_runs_from_outside_the_repo(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [n for n in SHIPPED if n not in names]
    assert not [n for n in names if n.startswith(("data_samples", "tests/", "models/", "scripts/"))]
    assert wheel.stat().st_size < MAX_WHEEL_MB * 2**20

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path)
    work = tmp_path / "elsewhere"
    shutil.copytree(REPO / "data_samples", work / "samples")
    env = _clean_env(site)

    where = subprocess.run([sys.executable, "-c", "import wsi_pipeline; print(wsi_pipeline.__file__)"],
                           env=env, cwd=work, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site)

    r = subprocess.run([sys.executable, "-m", "wsi_pipeline", "run", "samples", "--out", "out"],
                       env=env, cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = work / "out"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert Path(config["model_dir"]).is_relative_to(site / "wsi_pipeline" / "models")
    n_slides = len(list((work / "samples").glob("*.svs")))
    assert len(list((out / "features" / "wsip-dino-r10").glob("*.h5"))) == n_slides
    assert (out / "tme.csv").is_file() and (out / "report.html").is_file()
    # the wheel's tissue classifier carries its map refinement and its recorded evaluation: `auto` reads dense maps
    with (out / "tme.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_slides and {r["footprint"] for r in rows} == {"dense"}
    assert {r["map_refined"] for r in rows} == {"True"}
    assert len((out / "predictions.csv").read_text().strip().splitlines()) == n_slides + 1


def test_readme_install_is_what_ci_runs_and_offers_cpu_wheels_below() -> None:
    """The README's first install command is `.ci/run`'s; the CPU-only alternative comes after the set-up
    commands, with the same torch pins, from PyTorch's CPU index."""
    import re

    readme = (REPO / "README.md").read_text()
    ci_install = next(line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("pip install"))
    ci_cmd = ci_install.replace(" -q", "")
    installs = [line for line in readme.splitlines() if line.startswith("pip install")]
    assert installs[0].split(" && ")[0] == ci_cmd
    pins = re.findall(r"torch(?:vision)?==[\w.]+", ci_cmd)
    cpu = [i for i, line in enumerate(readme.splitlines()) if "download.pytorch.org/whl/cpu" in line]
    assert cpu, "README: no CPU-only torch install"
    setup_end = readme.splitlines().index("python -m pytest -q")
    assert cpu[0] > setup_end
    assert re.findall(r"torch(?:vision)?==[\w.]+", readme.splitlines()[cpu[0]]) == pins
