"""Screenshot of the viewer (`wsi view`) on a generated slide with the heatmap overlay on.

Generates a 4096×3072 slide at 0.5 µm/px with a few tissue pieces, tiles it with the real tiler, writes
per-tile response scores with a known spatial pattern (no trained model), starts the viewer on a free
loopback port and saves a headless-Chromium screenshot. Needs Debian chromium + chromium-driver.

    python scripts/viewer_screenshot.py --out docs/viewer_screenshot.png
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def tissue_image(w: int, h: int, seed: int = 3) -> np.ndarray:
    """White glass with three H&E-like tissue pieces: pink stroma with purple nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    inside = np.zeros((h, w), bool)
    for cx, cy, rx, ry in ((0.30, 0.42, 0.22, 0.30), (0.66, 0.50, 0.20, 0.34), (0.50, 0.84, 0.14, 0.10)):
        wob = 1 + 0.08 * np.sin(np.arctan2(yy - cy * h, xx - cx * w) * 5)
        inside |= ((xx - cx * w) / (rx * w)) ** 2 + ((yy - cy * h) / (ry * h)) ** 2 <= wob
    img = np.full((h, w, 3), 242, np.uint8)
    base = np.array([232, 170, 205], np.float32) + rng.normal(0, 10, (h, w, 1)).astype(np.float32)
    nuclei = rng.random((h // 6 + 1, w // 6 + 1)) < 0.08
    nuclei = np.kron(nuclei, np.ones((6, 6), bool))[:h, :w]
    base[nuclei] = np.array([120, 70, 160], np.float32)
    img[inside] = np.clip(base[inside], 0, 255).astype(np.uint8)
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/viewer_screenshot.png"))
    ap.add_argument("--work", type=Path, default=None, help="Folder for the slide and RUN (default: temporary).")
    args = ap.parse_args()

    import uvicorn
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from wsi_pipeline.review.server import create_app
    from wsi_pipeline.review.synthetic import build_scored_run
    from wsi_pipeline.synth.pyramid import array_painter, write_pyramid_tiff

    work = args.work or Path(tempfile.mkdtemp(prefix="wsi-view-"))
    w, h = 4096, 3072
    slide = write_pyramid_tiff(work / "demo_slide.svs", array_painter(tissue_image(w, h)), (w, h), mpp=0.5,
                               downsamples=(1, 4, 16))

    def response(centres: np.ndarray) -> np.ndarray:  # two "responder" hot spots on a low background
        d1 = ((centres - [0.25 * w, 0.35 * h]) ** 2).sum(axis=1) / (0.12 * w) ** 2
        d2 = ((centres - [0.72 * w, 0.62 * h]) ** 2).sum(axis=1) / (0.08 * w) ** 2
        return 0.08 + 0.85 * np.exp(-d1) + 0.6 * np.exp(-d2)

    build_scored_run(work / "run", slide, model="demo-mil", response_fn=response)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(work / "run"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for f in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1280,860", "--force-device-scale-factor=1", f"--user-data-dir={work / 'profile'}"):
        opts.add_argument(f)
    drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        drv.get(f"http://127.0.0.1:{port}/slide/demo_slide")
        ready = "return window.wsiViewer && wsiViewer.ready && document.body.dataset.ready === '1'"
        WebDriverWait(drv, 60).until(lambda d: d.execute_script(ready))
        Select(drv.find_element(By.ID, "channel")).select_by_value("response")
        drv.find_element(By.ID, "overlay-toggle").click()
        drv.execute_script("const o = document.getElementById('opacity'); o.value = 55;"
                           "o.dispatchEvent(new Event('input'));")
        WebDriverWait(drv, 60).until(lambda d: d.execute_script(ready))
        first = drv.find_element(By.CSS_SELECTOR, "#topk figure")
        x, y = drv.execute_script(
            "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top];", first)
        canvas = drv.find_element(By.ID, "view")
        # hover over the hottest tile so the tooltip shows in the picture
        idx = int(first.get_attribute("data-tile-index"))
        pos = drv.execute_script(
            "return fetch(arguments[0]).then(r => r.json()).then(t => wsiViewer.l0ToClient("
            "t.x[arguments[1]] + t.tile_size_l0 / 2, t.y[arguments[1]] + t.tile_size_l0 / 2));",
            "/api/slides/demo_slide/tiles", idx)
        rect = drv.execute_script("const r = arguments[0].getBoundingClientRect();"
                                  "return [r.left + r.width / 2, r.top + r.height / 2];", canvas)
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(drv).move_to_element_with_offset(canvas, int(pos["x"] - rect[0]), int(pos["y"] - rect[1])).perform()
        time.sleep(0.5)
        png = drv.get_screenshot_as_png()
    finally:
        drv.quit()
        server.should_exit = True
    import io

    img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out, optimize=True)
    print(f"saved {args.out} ({args.out.stat().st_size // 1024} KiB); RUN at {work / 'run'}; first top tile at {x},{y}")


if __name__ == "__main__":
    main()
