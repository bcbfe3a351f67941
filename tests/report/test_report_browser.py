"""The report in headless Debian Chromium (Selenium): every inlined image decodes, nothing is fetched from
the network, the page renders (header colours, sections laid out). Runs in CI (CI set): a missing
chromium there is a failure, not a skip."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.report.build import build_report
from wsi_pipeline.report.config import ReportConfig

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1000",
         "--force-device-scale-factor=1")


def _require_chromium() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        msg = f"headless browser test needs Debian chromium + chromium-driver; missing {', '.join(missing)}"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(msg + " (CI is set: install them)")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    _require_chromium()
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def test_report_renders_in_chromium(fake_run: Any, driver: Any, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    build_report(ReportConfig(run=str(fake_run.run), labels=str(fake_run.labels), out=str(out), n_boot=200))
    driver.get(out.as_uri())
    n_img, n_ok = driver.execute_script(
        "const im = Array.from(document.images);"
        "return [im.length, im.filter(i => i.complete && i.naturalWidth > 0).length];")
    assert n_img > 20 and n_ok == n_img  # every data: URI decoded
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert all(u.startswith(("data:", "file:")) for u in urls), urls
    ids = driver.execute_script("return Array.from(document.querySelectorAll('section.card')).map(s => s.id);")
    assert {"cohort", "performance", "tme", "predictive", "evolution", "failed"} <= set(ids)
    # laid out, not collapsed: sections stack down the page and the slide table scrolls inside its box
    height = driver.execute_script("return document.body.scrollHeight;")
    assert height > 5000
    shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")).astype(int)
    header = shot[30, 40]
    assert header[2] > header[0] + 30  # the blue header gradient is drawn
    assert shot[:, :, :].std() > 20  # not a blank page
