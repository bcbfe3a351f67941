"""A RUN whose slides moved after tiling (a cohort re-organised, a RUN copied to a review workstation): the
commands that read the slides again (extract, tme, heatmap; the viewer in tests/review) say to pass --slide-dir,
and with it find them by file name and keep the outputs' resume keys."""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from wsi_pipeline.cli import build_app
from wsi_pipeline.runfolder.status import read_status

REPO = Path(__file__).resolve().parents[2]
SLIDE = "P003_1"


def _wsi(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(build_app(), [str(a) for a in args])
    return r.exit_code, " ".join(f"{r.output} {r.exception or ''}".split())


def _failure(run: Path, stage: str) -> str:
    (row,) = [r for r in read_status(run / "slides.csv") if r.stage == stage and r.status == "failed"]
    return f"{row.error_type}: {row.error}"


def test_extract_tme_and_heatmap_find_moved_slides_with_slide_dir(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    shutil.copy(REPO / "data_samples" / f"{SLIDE}.svs", tmp_path / "old")
    run, new = tmp_path / "RUN", tmp_path / "new"
    assert _wsi("tile", tmp_path / "old", "--out", run)[0] == 0
    shutil.move(tmp_path / "old", new)

    assert _wsi("extract", run, "--device", "cpu")[0] != 0
    msg = _failure(run, "extract")
    assert msg.startswith("SlideNotFoundError: ") and "pass --slide-dir FOLDER" in msg and msg.count("SlideNotFound") == 1
    assert _wsi("extract", run, "--device", "cpu", "--slide-dir", new)[0] == 0
    assert _wsi("tme", run, "--device", "cpu")[0] != 0 and "pass --slide-dir" in _failure(run, "tme")
    assert _wsi("tme", run, "--device", "cpu", "--slide-dir", new)[0] == 0
    assert _wsi("predict", run, "--model", "wsip-demo-mil")[0] == 0
    assert _wsi("heatmap", run, "--top-k", "1", "--slide-dir", new)[0] == 0
    assert (run / "heatmaps" / SLIDE / "index.json").is_file()
    # nothing extracted again: the features' resume key names the slide by its file name, not its folder
    (features,) = (run / "features").rglob(f"{SLIDE}.h5")
    mtime = features.stat().st_mtime_ns
    assert _wsi("extract", run, "--device", "cpu", "--slide-dir", new)[0] == 0
    assert features.stat().st_mtime_ns == mtime
