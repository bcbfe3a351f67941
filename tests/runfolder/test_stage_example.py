"""The README's "Adding a stage" example is a working per-slide stage on the executor: it runs, resumes on its
key, isolates a failing slide and records one status row per slide."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from wsi_pipeline.config import TilingConfig
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.runfolder.status import read_status
from wsi_pipeline.tiling.stage import run_tile

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def area_module(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- stage-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md: the stage-example block is missing"
    path = tmp_path_factory.mktemp("stage") / "area_stage.py"
    path.write_text(m.group(1))
    spec = importlib.util.spec_from_file_location("area_stage", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_stage_runs_resumes_and_isolates(area_module: ModuleType, small_svs: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for sid in ("a", "b"):
        shutil.copy(small_svs, slides / f"{sid}.svs")
    run = tmp_path / "run"
    assert run_tile(sorted(slides.iterdir()), run, TilingConfig()).ok
    layout = RunLayout(run)
    layout.tiles_h5("b").write_bytes(b"not an h5 file")  # b's input is damaged: b fails, a goes on

    first = area_module.run_area(run, min_mm2=0.1)
    assert first.done == ["a"] and [o.slide_id for o in first.failed] == ["b"]
    record = first.values()["a"]
    n = first.outcomes[0].n_tiles
    assert n > 0 and record["area_mm2"] == pytest.approx(n * 0.112**2) and record["enough"]
    rows = {(r.slide_id, r.status) for r in read_status(layout.slides_csv) if r.stage == "area"}
    assert rows == {("a", "done"), ("b", "failed")}

    again = area_module.run_area(run, min_mm2=0.1)
    assert again.skipped == ["a"] and again.values()["a"]["area_mm2"] == record["area_mm2"]
    changed = area_module.run_area(run, min_mm2=100.0)  # an option in the key: made again
    assert changed.done == ["a"] and not changed.values()["a"]["enough"]
