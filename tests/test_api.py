"""The Python façade (wsi_pipeline.api): the README's ten-line pipeline runs, one function per stage command
named like it, options checked like the YAML configs, and importing it loads no stage."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from wsi_pipeline import api
from wsi_pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
NOT_STAGES = {"info", "encoders", "view", "status"}  # commands that show things rather than run a stage
API_NAME = {"heatmap": "heatmaps"}  # the one function named for what it makes (as run_heatmaps)


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md: the api-example block is missing"
    return m.group(1)


def test_readme_example_is_ten_lines_of_pipeline() -> None:
    lines = [ln for ln in readme_example().splitlines() if ln.strip()]
    assert len(lines) <= 10, lines


def test_readme_pipeline_runs_on_a_generated_slide(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(REPO / "data_samples" / "P002_1.svs", slides / "P002_1.svs")  # a generator slide, 2600×2200 px
    run = tmp_path / "run"
    code = readme_example()
    for old, new in (('"data_samples"', repr(str(slides))), ('"runs/py"', repr(str(run))),
                     ('"models/wsip-demo-mil"', repr(str(REPO / "models" / "wsip-demo-mil")))):
        assert old in code
        code = code.replace(old, new)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)

    assert scope["summary"].ok and (run / "report.html").is_file()
    preds = (run / "predictions.csv").read_text().splitlines()
    assert len(preds) == 2 and preds[1].startswith("P002_1,")
    assert (run / "tme.csv").is_file() and (run / "heatmaps" / "P002_1" / "index.json").is_file()
    fc = json.loads((run / "heatmaps" / "P002_1" / "P002_1_tiles.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and fc["features"]
    again = api.tile(slides, run)  # resumable like the commands
    assert again.skipped == ["P002_1"] and not again.done


def test_one_function_per_stage_command() -> None:
    from wsi_pipeline.cli import build_app

    commands = set(typer.main.get_command(build_app()).commands)
    stages = {c for c in commands if c not in NOT_STAGES}
    names = {API_NAME.get(c, c.replace("-", "_")) for c in stages}
    assert names == set(api.__all__), (names ^ set(api.__all__))
    assert all(callable(getattr(api, n)) for n in api.__all__)


def test_unknown_options_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown ExtractConfig option\(s\): \['batchsize'\]"):
        api.extract(tmp_path, batchsize=8)
    with pytest.raises(ConfigError, match=r"unknown TilingConfig option\(s\): \['mpp'\]"):
        api.tile(tmp_path, tmp_path / "run", mpp=0.5)


def test_importing_the_package_or_the_facade_loads_no_stage() -> None:
    code = ("import sys, json, wsi_pipeline; a = set(sys.modules); from wsi_pipeline import api; "
            "print(json.dumps([sorted(a), sorted(sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    package, facade = (set(x) for x in json.loads(out.stdout))
    for loaded, allowed in ((package, {"wsi_pipeline", "wsi_pipeline._version"}),
                            (facade, {"wsi_pipeline", "wsi_pipeline._version", "wsi_pipeline.api"})):
        assert {m for m in loaded if m.split(".")[0] == "wsi_pipeline"} == allowed
        assert not {"torch", "pandas", "numpy", "h5py", "timm"} & loaded
