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
