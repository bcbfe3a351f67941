"""CLI conventions (issue 16): `wsi --version`, help with plain metavars and flags shown as flags, `wsi info` exits 0
once it has shown a slide (missing MPP is a warning there), other libraries' log lines kept off the screen, and
the README's slides.csv columns are the file's."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from wsi_pipeline._version import __version__
from wsi_pipeline.cli import build_app

REPO = Path(__file__).resolve().parents[1]


def _invoke(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(build_app(), [str(a) for a in args], env={"COLUMNS": "200"})
    return res.exit_code, res.output


def _wsi(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "wsi_pipeline", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_version() -> None:
    code, out = _invoke("--version")
    assert code == 0 and out.strip() == f"wsi-pipeline {__version__}"


def _commands() -> list[str]:
    return [c.name for c in build_app().registered_commands]


@pytest.mark.parametrize("command", _commands())
def test_help_shows_flags_as_flags_and_plain_argument_metavars(command: str) -> None:
    code, out = _invoke(command, "--help")
    assert code == 0, out
    assert "<bool>" not in out  # --force, not --force <bool>
    usage = next(line for line in out.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage  # SLIDE, not {slide}
    assert re.search(r"Usage: wsi \S+ \[OPTIONS\]( [A-Z_]+(\.\.\.)?| \[[A-Z_]+(\.\.\.)?\])*\s*$", usage.strip()), usage


def test_root_help_and_usage_name_the_program_wsi() -> None:
    res = _wsi("tile", "--help")
    assert res.returncode == 0 and "Usage: wsi tile [OPTIONS] INPUTS..." in res.stdout
    assert "--force " in res.stdout and "<bool>" not in res.stdout


def test_info_exits_0_with_a_missing_mpp_warning(tcga_svs: Path) -> None:
    res = _wsi("info", tcga_svs)
    assert res.returncode == 0, res.stderr
    assert "4443 × 3567" in res.stdout and "missing" in res.stdout
    assert "warning:" in res.stderr and "no MPP" in res.stderr and "--slide-mpp" in res.stderr
    res = _wsi("info", tcga_svs, "--json")
    assert res.returncode == 0 and '"mpp": null' in res.stdout


def _tiff_with_a_damaged_private_tag(path: Path) -> Path:
    """A readable TIFF (MPP in its resolution tags) whose private tag 65000 points past the end of the file:
    tifffile logs an ERROR for that tag and reads the image all the same."""
    import struct

    import tifffile

    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), extratags=[(65000, "s", 0, "x" * 100, False)],
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    data = bytearray(path.read_bytes())
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry:entry + 2])[0] == 65000:
            data[entry + 8:entry + 12] = struct.pack("<I", 10_000_000)
    path.write_bytes(bytes(data))
    return path


def test_other_libraries_log_lines_stay_off_the_screen(tmp_path: Path) -> None:
    """tifffile logs an ERROR for a damaged tag of a readable file and PIL DEBUG lines for every PNG it opens:
    shown only when asked for with more -v than the package's own messages need."""
    damaged = _tiff_with_a_damaged_private_tag(tmp_path / "tag.tif")
    quiet = _wsi("info", damaged)
    assert quiet.returncode == 0, quiet.stderr
    assert "invalid value offset" not in quiet.stderr and "tifffile" not in quiet.stderr, quiet.stderr
    assert "invalid value offset" in _wsi("-v", "info", damaged).stderr  # the record is kept, one level down

    png = tmp_path / "plain.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    debug = _wsi("-vv", "info", png)
    assert debug.returncode == 0, debug.stderr
    assert "STREAM" not in debug.stderr, debug.stderr  # PIL.PngImagePlugin's chunk-by-chunk DEBUG lines
    assert "STREAM" in _wsi("-vvv", "info", png).stderr


def test_readme_slides_csv_columns_are_the_files(tmp_path: Path, small_svs: Path) -> None:
    code, out = _invoke("tile", small_svs, "--out", tmp_path / "RUN", "--workers", "0")
    assert code == 0, out
    with open(tmp_path / "RUN" / "slides.csv", newline="") as f:
        header = next(csv.reader(f))
    line = next(x for x in (REPO / "README.md").read_text().splitlines() if x.strip().startswith("slides.csv "))
    documented = [re.sub(r"\s*\(.*\)", "", c).strip() for c in line.strip().removeprefix("slides.csv").split(",")]
    assert documented == header


def test_stage_progress_names_each_stage_s_own_units(capsys: pytest.CaptureFixture[str]) -> None:
    """`wsi run` shows extraction's rate in tiles/s (the unit its start event names), other stages by slide."""
    import time

    from wsi_pipeline.commands.stageview import stage_progress
    from wsi_pipeline.runfolder.executor import StageEvent

    with stage_progress() as hook:
        hook(StageEvent("tile", "start", total=2))
        hook(StageEvent("extract", "start", total=2, units_total=10, unit="tiles"))
        for _ in range(3):
            hook(StageEvent("extract", "units", units=2))
            time.sleep(0.05)
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    assert re.search(r"6/10 +[\d,]+ tiles/s", lines["extract"]) and "slides/s" not in lines["extract"]
    assert "0/2" in lines["tile"] and "/s" not in lines["tile"]
