"""The TME tissue-class map in the viewer: the dense map's top class per cell as a level-0-aligned raster,
its legend and the phenotype (a TME file written with the format's own writer on the review RUN)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

NAMES = ["01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE", "08_EMPTY"]


@pytest.fixture()
def tme_client(review_run, tmp_path):
    from fastapi.testclient import TestClient

    from wsi_pipeline.formats import api as F
    from wsi_pipeline.review.server import create_app
    from wsi_pipeline.runfolder.layout import RunLayout

    root = tmp_path / "run"
    shutil.copytree(review_run.root, root)
    layout = RunLayout(root)
    probs = np.zeros((20, 30, 8), np.float32)
    probs[..., 1] = 1.0  # stroma …
    probs[5:10, 10:20] = np.eye(8)[0]  # … a tumour block …
    probs[12, 3] = np.eye(8)[3]  # … one lymphocyte cell
    area = np.ones((20, 30), bool)
    area[0, :] = False  # a row outside the RUN tiles' area
    dense = F.TMEDenseMap(probs, area, (100.0, 60.0), 32.0, 16.0, 80.0, "fcn")
    F.write_tme_h5(layout.tme_h5("blob"), review_run.l0_xy, np.zeros((len(review_run.l0_xy), 8), np.float32),
                   {F.A_CLASS_NAMES: NAMES, F.A_PATCH_SIZE_L0: review_run.tile_size_l0}, dense=dense)
    F.write_stage_record(layout.tme_record_json("blob"), {"key": "k", "row": {
        "slide_id": "blob", "immune_phenotype": "desert", "phenotype_reason": "lymph_density_tumour=0.000 < 0.1",
        "phenotype_margin": 0.013,
        "area_frac_tumor": 0.1, "area_frac_stroma": 0.9, "footprint": "dense"}})
    with TestClient(create_app(root), base_url="http://127.0.0.1") as c:
        yield c


def test_tme_map_is_placed_at_its_level0_origin(tme_client) -> None:
    from wsi_pipeline.tiles.palette import class_colour

    info = tme_client.get("/api/slides/blob").json()
    t = info["tme"]
    assert t["origin_l0"] == [100.0, 60.0] and t["cell_l0"] == 32.0 and (t["width"], t["height"]) == (30, 20)
    assert t["phenotype"] == "desert" and "lymph_density_tumour" in t["reason"] and t["footprint"] == "dense"
    assert t["margin"] == 0.013 and t["borderline"] is True  # the viewer marks the call borderline (under 0.1)
    legend = {c["name"]: c for c in t["classes"]}
    assert legend["01_TUMOR"]["share"] == 0.1 and legend["04_LYMPHO"]["share"] is None
    assert legend["01_TUMOR"]["color"] == "#" + "".join(f"{v:02x}" for v in class_colour("01_TUMOR"))
    img = np.asarray(Image.open(io.BytesIO(tme_client.get(t["overlay"]).content)))
    assert img.shape == (20, 30, 4)
    assert img[7, 15].tolist() == [*class_colour("01_TUMOR"), 255]
    assert img[12, 3].tolist() == [*class_colour("04_LYMPHO"), 255]
    assert img[3, 3].tolist() == [*class_colour("02_STROMA"), 255]
    assert img[0, 5, 3] == 0  # outside the area: transparent


def test_slides_without_tme_have_no_map(review_run, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from wsi_pipeline.review.server import create_app

    root = tmp_path / "run"
    shutil.copytree(review_run.root, root, ignore=shutil.ignore_patterns("tme"))
    with TestClient(create_app(root), base_url="http://127.0.0.1") as c:
        assert "tme" not in c.get("/api/slides/blob").json()
        assert c.get("/api/slides/blob/tme.png").status_code == 404
        assert c.get("/api/slides/nope/tme.png").status_code == 404
