"""End-to-end: the real viewer (uvicorn on a loopback port) driven in headless Debian Chromium with Selenium.

Opens the slide list and a slide, checks that the first target's heatmap is shown from the start, toggles it
and checks by pixels in screenshots that it disappears and comes back at the hot tile's place, checks the
tooltip value and the top-k jump.
Runs in CI (CI set): a missing chromium there is a failure, not a skip.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,860", "--force-device-scale-factor=1",
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _require_chromium() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        msg = f"headless browser test needs Debian chromium + chromium-driver; missing {', '.join(missing)}"
        if _in_ci():
            pytest.fail(msg + " (CI is set: install them, .ci/run does)")
        pytest.skip(msg)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def live_server(review_run) -> Iterator[str]:
    import uvicorn

    from wsi_pipeline.review.server import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(review_run.root), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the viewer server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    _require_chromium()
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def _wait(drv: object, script: str, timeout: float = 60.0) -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout, poll_frequency=0.1).until(lambda d: d.execute_script(script))


def _wait_ready(drv: object) -> None:
    # two animation frames after "ready" so the drawn frame is on screen
    _wait(drv, "return window.wsiViewer && window.wsiViewer.ready && document.body.dataset.ready === '1'")
    drv.execute_async_script("const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(done));")


def _screenshot(drv: object) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(drv.get_screenshot_as_png())).convert("RGB")).astype(int)


def _patch(img: np.ndarray, x: float, y: float, r: int = 3) -> np.ndarray:
    xi, yi = round(x), round(y)
    return img[yi - r:yi + r + 1, xi - r:xi + r + 1].reshape(-1, 3).mean(axis=0)


def test_viewer_overlay_tooltip_and_topk(live_server: str, driver, review_run) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from wsi_pipeline.review.raster import colormap_lut

    drv = driver
    # the slide list shows the slide with its predictions, and links to the viewer
    drv.get(live_server + "/")
    _wait(drv, "return document.querySelectorAll('#slides-body tr[data-slide-id]').length > 0")
    row = drv.find_element(By.CSS_SELECTOR, "#slides-body tr[data-slide-id='blob']")
    assert "excluded" in row.text or "inflamed" in row.text or "desert" in row.text
    row.find_element(By.LINK_TEXT, "blob").click()
    _wait(drv, "return location.pathname === '/slide/blob'")
    _wait_ready(drv)

    toggle = drv.find_element(By.ID, "overlay-toggle")
    assert toggle.is_selected(), "a model's scores exist: the overlay is shown without ticking it"
    assert Select(drv.find_element(By.ID, "channel")).first_selected_option.get_attribute("value") == "response"
    Select(drv.find_element(By.ID, "channel")).select_by_value("response")
    drv.execute_script("const o = document.getElementById('opacity'); o.value = 100;"
                       "o.dispatchEvent(new Event('input'));")
    _wait_ready(drv)
    hx, hy = review_run.centre(review_run.hot)
    hot = drv.execute_script("return wsiViewer.l0ToClient(arguments[0], arguments[1]);", hx, hy)
    glass = drv.execute_script("return wsiViewer.l0ToClient(40, 40);")
    zoom = drv.execute_script("return wsiViewer.state.zoom;")
    assert review_run.tile_size_l0 * zoom > 40, "a tile should cover enough screen pixels to test"

    on = _screenshot(drv)
    toggle.click()
    _wait_ready(drv)
    off = _screenshot(drv)
    toggle.click()
    _wait_ready(drv)
    on_again = _screenshot(drv)

    top_colour = colormap_lut("RdYlBu_r")[-1].astype(int)  # the hot tile is the slide's top percentile
    on_px, off_px = _patch(on, hot["x"], hot["y"]), _patch(off, hot["x"], hot["y"])
    assert np.abs(on_px - top_colour).max() < 12, (on_px, top_colour)  # opacity 100%: the heat colour
    assert np.abs(off_px - top_colour).max() > 60, off_px  # without overlay: tissue, not heat
    assert np.abs(_patch(on_again, hot["x"], hot["y"]) - on_px).max() < 4  # back again
    # glass outside every tile is never coloured
    assert np.abs(_patch(on, glass["x"], glass["y"]) - _patch(off, glass["x"], glass["y"])).max() < 4
    # the overlay covers the tiles only: more of the image changes than the hot tile, but not all of it
    changed = np.abs(on - off).max(axis=2) > 30
    assert 0.01 < changed.mean() < 0.6

    # the tooltip under the cursor shows the hot tile's known score
    canvas = drv.find_element(By.ID, "view")
    rect = drv.execute_script("const r = arguments[0].getBoundingClientRect();"
                              "return {x: r.left, y: r.top, w: r.width, h: r.height};", canvas)
    dx = round(hot["x"] - (rect["x"] + rect["w"] / 2))
    dy = round(hot["y"] - (rect["y"] + rect["h"] / 2))
    ActionChains(drv).move_to_element_with_offset(canvas, dx, dy).perform()
    _wait(drv, "return !document.getElementById('tooltip').hidden", timeout=10)
    tip = drv.find_element(By.ID, "tooltip")
    assert tip.get_attribute("data-tile-index") == str(review_run.hot)
    assert float(tip.get_attribute("data-value")) == pytest.approx(0.97, abs=1e-4)
    assert "response: 0.970" in tip.text and "p100" in tip.text

    # the first top-k thumbnail is the hot tile; clicking it centres the view on that tile
    first = drv.find_element(By.CSS_SELECTOR, "#topk figure")
    assert first.get_attribute("data-tile-index") == str(review_run.hot)
    assert "0.970" in first.text
    first.click()
    _wait_ready(drv)
    centre = drv.execute_script("return wsiViewer.l0ToClient(arguments[0], arguments[1]);", hx, hy)
    assert abs(centre["x"] - (rect["x"] + rect["w"] / 2)) < 2 and abs(centre["y"] - (rect["y"] + rect["h"] / 2)) < 2
    assert drv.execute_script("return wsiViewer.state.zoom;") > zoom

    # legend drawn with the channel's label
    assert "response" in drv.find_element(By.ID, "legend-label").text
    if os.environ.get("WSI_VIEWER_SCREENSHOT"):
        drv.execute_script("const o = document.getElementById('opacity'); o.value = 55;"
                           "o.dispatchEvent(new Event('input')); wsiViewer.fitView();")
        _wait_ready(drv)
        drv.save_screenshot(os.environ["WSI_VIEWER_SCREENSHOT"])
