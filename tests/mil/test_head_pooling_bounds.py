"""scripts/eval_head_bounds.py: on the kather mosaic generator, a read-out of slide means gets close to the true
P(response) with a perfect cell reader, while top/bottom-k extremes of a cell score cannot count the TIL fraction."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_mean_pooling_reaches_the_oracle_and_extremes_do_not() -> None:
    cmd = [sys.executable, str(REPO / "scripts" / "eval_head_bounds.py"), "--n-train", "500", "--n-test", "300",
           "--search", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    rows = {m[1]: float(m[2]) for m in re.finditer(r"^\| (.+?) \| ([\d.]+) \|$", out, re.M)}
    oracle, mean = rows["image-only oracle (no model)"], rows["mean-pool of the 4 fixed scores"]
    counts = rows["top/bottom-5 of 'lymphocyte'"]
    assert oracle < 0.05 and mean < oracle + 0.02  # means hold the TIL fraction and the phenotype
    assert counts > mean + 0.04  # the top 5 lymphocyte cells say little about how many there are
