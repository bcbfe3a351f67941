"""The viewer app through FastAPI's TestClient: pages, JSON, DZI tiles, overlays, 404s and traversal."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.review.config import ViewerConfig

LOCAL = "http://127.0.0.1"  # the viewer answers only to loopback names (and --host / --allow-host)


@pytest.fixture(scope="module")
def client(review_run):
    from fastapi.testclient import TestClient

    from wsi_pipeline.review.server import create_app

    with TestClient(create_app(review_run.root, ViewerConfig(tile_cache=64)), base_url=LOCAL) as c:
        yield c


def test_pages_and_static(client) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and "list.js" in r.text
    r = client.get("/slide/blob")
    assert r.status_code == 200 and "viewer.js" in r.text
    for name in ("viewer.js", "list.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    js = client.get("/static/viewer.js").text
    assert "http://" not in js and "https://" not in js  # no CDN, nothing fetched from elsewhere


@pytest.mark.parametrize("url", [
    "/slide/nope", "/api/slides/nope", "/api/slides/nope/tiles", "/dzi/nope.dzi", "/dzi/nope_files/0/0_0.jpeg",
    "/api/slides/blob/overlay/nope.png", "/api/slides/blob/tile/99999.jpg", "/api/slides/blob/tile/-1.jpg",
    "/dzi/blob_files/99/0_0.jpeg", "/dzi/blob_files/11/999_0.jpeg", "/dzi/blob_files/11/0_0.png",
    "/dzi/blob.xml", "/static/server.py", "/static/nope.js", "/nope",
])
def test_unknown_ids_and_files_are_404(client, url: str) -> None:
    assert client.get(url).status_code == 404


@pytest.mark.parametrize("url", [
    "/static/../server.py", "/static/..%2fserver.py", "/static/%2e%2e%2fserver.py", "/static/..%5cserver.py",
    "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/slide/..%2f..%2fetc%2fpasswd", "/api/slides/..%2fblob",
    "/dzi/..%2fblob.dzi", "/dzi/..%2f..%2fscores%2fdemo-mil%2fblob.h5", "/api/slides/blob/tile/..%2f0.jpg",
    "/static/%2fetc%2fpasswd", "//etc/passwd",
])
def test_path_traversal_is_404(client, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 404
    assert b"root:" not in r.content and b"HDF" not in r.content


def test_slide_list_has_predictions(client) -> None:
    data = client.get("/api/slides").json()
    assert data["model"] == "demo-mil"
    (row,) = data["slides"]
    assert row["slide_id"] == "blob" and row["has_scores"]
    assert 0 <= row["prediction"]["response_prob"] <= 1
    assert row["prediction"]["immune_phenotype_pred"] in ("inflamed", "excluded", "desert")
    assert "response_prob" in data["columns"]


def test_slide_info_and_tile_scores(client, review_run) -> None:
    info = client.get("/api/slides/blob").json()
    assert (info["width"], info["height"]) == (2048, 1536)
    assert info["mpp"] == pytest.approx(0.5)
    assert info["channels"][0]["key"] == "response"  # plain scores first
    keys = {c["key"] for c in info["channels"]}
    assert {"response", "til_fraction", "immune_phenotype.inflamed", "response.attention"} <= keys
    resp = next(c for c in info["channels"] if c["key"] == "response")
    assert resp["top"][0]["index"] == review_run.hot and resp["top"][0]["score"] == pytest.approx(0.97)
    assert len(resp["top"]) == 8 and len(resp["lut"] if "lut" in resp else info["lut"]) == 256
    tiles = client.get(info["tiles"]).json()
    assert tiles["tile_size_l0"] == review_run.tile_size_l0
    assert tiles["x"][review_run.hot] == int(review_run.l0_xy[review_run.hot, 0])
    assert tiles["values"]["response"][review_run.hot] == pytest.approx(0.97)
    assert tiles["percentiles"]["response"][review_run.hot] == 1.0


def test_dzi_and_tiles(client) -> None:
    r = client.get("/dzi/blob.dzi")
    assert r.status_code == 200 and 'Width="2048"' in r.text and 'Height="1536"' in r.text
    top = Image.open(io.BytesIO(client.get("/dzi/blob_files/11/0_0.jpeg").content))  # level 11 = level 0 (2^11)
    assert top.size == (255, 255)  # 254 + 1 px overlap on the right and bottom
    whole = Image.open(io.BytesIO(client.get("/dzi/blob_files/7/0_0.jpeg").content))
    assert whole.size == (128, 96)  # 2048/16 × 1536/16: the whole slide in one tile
    px = np.asarray(whole.convert("RGB")).astype(int)
    assert px[48, 64, 1] < 180 < px[3, 3, 1]  # pink tissue in the centre, glass in the corner
    cache = client.app.state.viewer.dz_tiles
    hits = cache.hits
    client.get("/dzi/blob_files/7/0_0.jpeg")
    assert cache.hits == hits + 1  # served from the tile cache


def test_overlay_raster_is_level0_aligned(client, review_run) -> None:
    from wsi_pipeline.review.raster import colormap_lut

    info = client.get("/api/slides/blob").json()
    g = info["grid"]
    img = np.asarray(Image.open(io.BytesIO(client.get("/api/slides/blob/overlay/response.png").content)))
    assert img.shape == (g["height"], g["width"], 4)
    hx, hy = review_run.centre(review_run.hot)
    px = img[int(hy // g["cell_l0"]), int(hx // g["cell_l0"])]
    assert px[3] == 255 and px[:3].tolist() == colormap_lut("RdYlBu_r")[-1].tolist()
    assert img[0, 0, 3] == 0
    absolute = client.get("/api/slides/blob/overlay/response.png?scale=absolute&smooth=true")
    assert absolute.status_code == 200
    assert client.get("/api/slides/blob/overlay/response.png?scale=weird").status_code == 404


def test_tile_thumbnail(client, review_run) -> None:
    r = client.get(f"/api/slides/blob/tile/{review_run.hot}.jpg?size=64")
    assert r.status_code == 200
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)


def test_viewer_binds_loopback_by_default() -> None:
    assert ViewerConfig().host == "127.0.0.1"
    from wsi_pipeline.errors import ConfigError

    with pytest.raises(ConfigError):
        ViewerConfig(port=0).validate()


def test_run_without_scores_still_lists_slides(review_run, tmp_path) -> None:
    import shutil

    from fastapi.testclient import TestClient

    from wsi_pipeline.review.server import create_app

    root = tmp_path / "run"
    shutil.copytree(review_run.root, root, ignore=shutil.ignore_patterns("scores"))
    with TestClient(create_app(root), base_url=LOCAL) as c:
        assert c.get("/api/slides").json()["slides"][0]["has_scores"] is False
        assert c.get("/api/slides/blob").json()["channels"] == []
        assert c.get("/api/slides/blob/tiles").status_code == 404


def test_non_openslide_slide_is_served_through_the_adapter(tmp_path) -> None:
    """A PNG 'slide' (Pillow backend, MPP given at tiling) still gets DZI tiles and overlays."""
    from fastapi.testclient import TestClient

    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.review.server import create_app
    from wsi_pipeline.review.synthetic import build_scored_run

    img = np.full((600, 800, 3), 240, np.uint8)
    img[100:500, 150:650] = (190, 110, 180)
    slide = tmp_path / "plain.png"
    Image.fromarray(img).save(slide)
    run = build_scored_run(tmp_path / "run", slide, tiling=TilingConfig(slide_mpp=0.5, min_tissue_area_um2=100))
    assert len(run.l0_xy) > 0
    with TestClient(create_app(tmp_path / "run"), base_url=LOCAL) as c:
        info = c.get("/api/slides/plain").json()
        assert (info["width"], info["height"]) == (800, 600)
        whole = np.asarray(Image.open(io.BytesIO(c.get("/dzi/plain_files/8/0_0.jpeg").content)).convert("RGB"))
        assert whole.shape == (150, 200, 3)  # level 8 of 10 (2^10 ≥ 800): 800/4 × 600/4 in one tile
        assert abs(int(whole[75, 100, 0]) - 190) < 12 and abs(int(whole[5, 5, 0]) - 240) < 12
        assert c.get("/api/slides/plain/overlay/response.png").status_code == 200


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example",
                                  "localhost.attacker.example", "", "testserver"])
def test_other_host_names_are_refused(client, host: str) -> None:
    """DNS rebinding: a page on attacker.example whose name resolves to 127.0.0.1 gets nothing."""
    for url in ("/", "/api/slides", "/api/slides/blob"):
        r = client.get(url, headers={"Host": host})
        assert r.status_code == 400, (url, r.status_code)
        assert "not allowed" in r.text and "DNS rebinding" in r.text and "--allow-host" in r.text
        assert "blob" not in r.text


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000",
                                  "localhost."])
def test_loopback_host_names_are_served(client, host: str) -> None:
    assert client.get("/api/slides", headers={"Host": host}).status_code == 200


def test_host_given_and_allowed_names_are_served(review_run) -> None:
    from fastapi.testclient import TestClient

    from wsi_pipeline.review.server import allowed_hosts, create_app

    cfg = ViewerConfig(host="10.1.2.3", allow_hosts=["viewer.lab.example"])
    assert {"10.1.2.3", "viewer.lab.example", "localhost", "127.0.0.1", "::1"} <= allowed_hosts(cfg)
    with TestClient(create_app(review_run.root, cfg), base_url=LOCAL) as c:
        for host in ("10.1.2.3:8000", "viewer.lab.example", "localhost:8000"):
            assert c.get("/api/slides", headers={"Host": host}).status_code == 200, host
        assert c.get("/api/slides", headers={"Host": "attacker.example"}).status_code == 400


def test_wsi_view_prints_its_url_once_the_port_is_bound(review_run, tmp_path) -> None:
    """The URL `wsi view` prints answers at once; a second viewer on the same port is a typed error."""
    import http.client
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "wsi_pipeline", "view", str(review_run.root), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"wsi view: http://127.0.0.1:{port}/"), (line, proc.stderr.read() if proc.poll() else "")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # no retry: bound when printed
        conn.request("GET", "/api/slides")
        assert conn.getresponse().status == 200
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/slides", headers={"Host": "attacker.example"})
        resp = conn.getresponse()
        assert resp.status == 400 and b"DNS rebinding" in resp.read()
        conn.close()

        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "wsi view:" not in second.stdout
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr and "--port" in second.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
