"""Usage errors (unknown option, missing value) print click's short usage message and exit 2, never a
traceback — also with the click copy that recent typer versions vendor."""

from __future__ import annotations

import re
import subprocess
import sys


def test_unknown_option_is_a_usage_error_not_a_traceback() -> None:
    r = subprocess.run([sys.executable, "-m", "wsi_pipeline", "eval-encoder", "--data", "x", "--no-such-flag"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    # click 8.1 writes "No such option: --no-such-flag", click 8.2+ "No such option '--no-such-flag'."
    assert re.search(r"No such option:? '?--no-such-flag", r.stderr), r.stderr
    assert "Traceback" not in r.stderr


def _said(result) -> str:
    """What a CliRunner result showed: its output and the typed error `wsi` prints (one line, unwrapped)."""
    return " ".join(f"{result.output} {result.exception or ''}".split())


def test_a_folder_without_slides_says_what_to_pass(tmp_path, small_svs) -> None:
    """`wsi run` / `wsi tile` on a folder whose slides sit in subfolders suggest --recursive; an empty one names
    the extensions looked for."""
    import shutil

    from typer.testing import CliRunner

    from wsi_pipeline.cli import build_app

    (tmp_path / "cohort" / "site-a").mkdir(parents=True)
    shutil.copy(small_svs, tmp_path / "cohort" / "site-a" / "s1.svs")
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    for cmd in (["run", str(tmp_path / "cohort"), "--out", str(tmp_path / "r1")],
                ["tile", str(tmp_path / "cohort"), "--out", str(tmp_path / "r2")]):
        r = runner.invoke(build_app(), cmd)
        assert r.exit_code != 0 and "pass --recursive" in _said(r), _said(r)
    r = runner.invoke(build_app(), ["run", str(tmp_path / "empty"), "--out", str(tmp_path / "r3")])
    assert r.exit_code != 0 and ".svs" in _said(r) and "--recursive" not in _said(r)


def test_a_target_mpp_the_model_was_not_trained_at_names_the_one_it_was(tmp_path, small_svs) -> None:
    from typer.testing import CliRunner

    from wsi_pipeline.cli import build_app

    r = CliRunner().invoke(build_app(), ["run", str(small_svs), "--out", str(tmp_path / "r"), "--target-mpp", "0.25"])
    text = _said(r)
    assert r.exit_code != 0 and "trained on tiles at 0.5 µm/px" in text and "pass --target-mpp 0.5" in text
