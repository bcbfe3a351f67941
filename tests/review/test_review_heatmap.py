"""`wsi heatmap` on a generated slide: outputs, level-0 alignment in the PNGs and the zarr, resume, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.review import raster as R
from wsi_pipeline.review.config import HeatmapConfig
from wsi_pipeline.review.heatmap import heatmap_slide, run_heatmaps
from wsi_pipeline.runfolder.layout import RunLayout


@pytest.fixture(scope="module")
def heat(review_run, tmp_path_factory):
    """A private copy of the scored run with heatmaps made (top-3 galleries, zarr, GeoJSON)."""
    root = tmp_path_factory.mktemp("heat") / "run"
    shutil.copytree(review_run.root, root)
    summary = run_heatmaps(root, HeatmapConfig(model=review_run.model, top_k=3, targets=["response", "immune_phenotype"]))
    assert summary.ok and summary.done == [review_run.slide_id]
    layout = RunLayout(root)
    index = json.loads(layout.heatmap_index_json(review_run.slide_id).read_text())
    return root, layout, index


def _channel(index: dict, key: str) -> dict:
    return next(c for c in index["channels"] if c["key"] == key)


def test_outputs_exist(heat, review_run) -> None:
    root, layout, index = heat
    sid = review_run.slide_id
    keys = [c["key"] for c in index["channels"]]
    assert keys == ["response", "immune_phenotype.inflamed", "immune_phenotype.excluded", "immune_phenotype.desert"]
    for c in index["channels"]:
        for name in ("png", "overlay_png", "top_png", "bottom_png"):
            assert (layout.heatmap_dir(sid) / c[name]).is_file()
        assert len(c["top_tiles"]) == 3
    assert _channel(index, "response")["top_tiles"][0] == review_run.hot
    assert _channel(index, "response")["bottom_tiles"][0] == review_run.cold
    assert layout.heatmap_zarr(sid).is_dir() and layout.qupath_geojson(sid).is_file()
    status = (root / "slides.csv").read_text()
    assert f"{sid},heatmap," in status
    top = Image.open(layout.gallery_png(sid, "response", "top"))
    assert top.size[0] > 300 and top.size[1] > 150


def _colour_of(review_run, i: int, lut: np.ndarray) -> np.ndarray:
    """The overlay colour of tile ``i`` on the percentile scale (ties share their mid-rank)."""
    norm = R.make_normalizer(review_run.response, "percentile")
    return R.colorize(norm(review_run.response[i:i + 1]), lut)[0, :3]


def test_zarr_is_level0_aligned(heat, review_run) -> None:
    import zarr

    _, layout, index = heat
    z = zarr.open_group(str(layout.heatmap_zarr(review_run.slide_id)), mode="r")
    meta = z.attrs["wsi_pipeline"]
    cell = meta["cell_l0"]
    assert cell == index["cell_l0"] == review_run.tile_size_l0  # the tiles are on a 224-px grid from 0
    assert meta["frame"] == "level0_pixels" and "covers level-0" in meta["alignment"]
    s0 = np.asarray(z["response/0"][:])
    assert s0.shape == (int(np.ceil(1536 / cell)), int(np.ceil(2048 / cell)))
    # every tile's score sits at the cell that holds its centre (level-0 coordinates / cell size)
    for i, (x, y) in enumerate(review_run.l0_xy):
        row, col = int((y + cell // 2) // cell), int((x + cell // 2) // cell)
        assert s0[row, col] == pytest.approx(review_run.response[i], abs=1e-6)
    hx, hy = review_run.centre(review_run.hot)
    assert s0[int(hy // cell), int(hx // cell)] == pytest.approx(0.97, abs=1e-6)
    assert np.nanmax(s0) == pytest.approx(0.97, abs=1e-6)
    assert np.isfinite(s0).sum() == len(review_run.l0_xy)
    # coarser scales are NaN-aware 2×2 means, and their NGFF transforms double each time
    s1 = np.asarray(z["response/1"][:])
    np.testing.assert_allclose(s1, R.downsample2(s0), rtol=1e-6)
    ms = z["response"].attrs["ome"]["multiscales"][0]
    assert ms["axes"][0]["unit"] == "micrometer"
    scales = [d["coordinateTransformations"][0]["scale"][0] for d in ms["datasets"]]
    assert scales[:2] == pytest.approx([cell * 0.5, cell * 1.0])  # cell · 2^s · 0.5 µm/px
    assert len(ms["datasets"]) == len([k for k in z["response"].array_keys()])


def test_overlay_png_is_aligned(heat, review_run) -> None:
    _, layout, index = heat
    fx, fy = index["thumbnail_l0_per_px"]
    ov = np.asarray(Image.open(layout.heatmap_overlay_png(review_run.slide_id, "response")).convert("RGBA"))
    assert ov.shape[1::-1] == tuple(index["thumbnail_size"])
    lut = R.colormap_lut("RdYlBu_r")
    hx, hy = review_run.centre(review_run.hot)
    px = ov[int(hy / fy), int(hx / fx)]
    assert px[3] == 255 and px[:3].tolist() == lut[-1].tolist()  # top percentile = last colour
    cx, cy = review_run.centre(review_run.cold)
    cold_colour = _colour_of(review_run, review_run.cold, lut)
    assert ov[int(cy / fy), int(cx / fx)][:3].tolist() == cold_colour.tolist()
    assert np.abs(cold_colour.astype(int) - lut[-1].astype(int)).max() > 100
    assert ov[2, 2, 3] == 0  # glass corner: no tile, transparent


def test_figure_png_is_aligned(heat, review_run, small_svs) -> None:
    from wsi_pipeline.slide.open import open_slide

    _, layout, index = heat
    ch = _channel(index, "response")
    fig = np.asarray(Image.open(layout.heatmap_png(review_run.slide_id, "response")).convert("RGB")).astype(int)
    x0, y0, x1, y1 = ch["figure_image_box_px"]
    tw, th = index["thumbnail_size"]
    fx, fy = index["thumbnail_l0_per_px"]
    with open_slide(small_svs) as slide:
        thumb, _ = slide.thumbnail(1024)
    lut = R.colormap_lut("RdYlBu_r").astype(int)

    def fig_px(i: int) -> tuple[np.ndarray, np.ndarray]:
        lx, ly = review_run.centre(i)
        tx, ty = lx / fx, ly / fy
        px, py = x0 + tx / tw * (x1 - x0), y0 + ty / th * (y1 - y0)
        patch = fig[int(py) - 3:int(py) + 4, int(px) - 3:int(px) + 4].reshape(-1, 3).mean(axis=0)
        under = thumb[int(ty) - 4:int(ty) + 5, int(tx) - 4:int(tx) + 5].reshape(-1, 3).mean(axis=0)
        return patch, under

    hot_px, under = fig_px(review_run.hot)
    expected = under * 0.5 + lut[-1] * 0.5  # alpha 0.5 over the thumbnail
    assert np.abs(hot_px - expected).max() < 20, (hot_px, expected)
    cold_px, under_c = fig_px(review_run.cold)
    assert np.abs(cold_px - (under_c * 0.5 + _colour_of(review_run, review_run.cold, lut) * 0.5)).max() < 20
    # a neighbouring tile (lower score) does not carry the hot colour
    s = review_run.tile_size_l0
    hx, hy = review_run.l0_xy[review_run.hot]
    nb = next(i for i, (x, y) in enumerate(review_run.l0_xy.tolist()) if (x, y) == (hx - s, hy))
    nb_px, _ = fig_px(nb)
    assert np.abs(nb_px - expected).max() > 20


def test_rerun_is_skipped_and_force_redoes(heat, review_run) -> None:
    root, layout, _ = heat
    cfg = HeatmapConfig(model=review_run.model, top_k=3, targets=["response", "immune_phenotype"])
    png = layout.heatmap_png(review_run.slide_id, "response")
    mtime = png.stat().st_mtime_ns
    assert run_heatmaps(root, cfg).skipped == [review_run.slide_id]
    assert png.stat().st_mtime_ns == mtime
    # other parameters → redone (no galleries, no zarr here to keep it quick)
    res = heatmap_slide(root, review_run.slide_id,
                        HeatmapConfig(model=review_run.model, targets=["response"], scale="absolute", smooth=True,
                                      top_k=0, zarr=False, geojson=False))
    assert not res.skipped and res.index["scale"] == "absolute"
    assert _channel(res.index, "response")["vmin"] == 0.0 and _channel(res.index, "response")["vmax"] == 1.0


def test_unknown_target_is_a_clear_error(heat, review_run) -> None:
    from wsi_pipeline.errors import ConfigError

    root, _, _ = heat
    with pytest.raises(ConfigError, match="unknown target"):
        heatmap_slide(root, review_run.slide_id, HeatmapConfig(model=review_run.model, targets=["nope"]))


def test_cli_heatmap_and_export(review_run, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsi_pipeline.cli import build_app

    root = tmp_path / "run"
    shutil.copytree(review_run.root, root)
    model_dir = tmp_path / "models" / review_run.model  # --model DIR: the folder name picks the scores
    model_dir.mkdir(parents=True)
    runner = CliRunner()
    r = runner.invoke(build_app(), ["heatmap", str(root), "--model", str(model_dir), "--targets", "til_fraction",
                                    "--scale", "absolute", "--top-k", "0", "--no-zarr"])
    assert r.exit_code == 0, r.output
    layout = RunLayout(root)
    assert layout.heatmap_png(review_run.slide_id, "til_fraction").is_file()
    assert not layout.heatmap_zarr(review_run.slide_id).exists()
    assert (root / "configs" / "heatmap.yaml").is_file()
    r = runner.invoke(build_app(), ["heatmap", str(root), "--scale", "sideways"])
    assert r.exit_code != 0
    layout.qupath_geojson(review_run.slide_id).unlink()
    r = runner.invoke(build_app(), ["export-qupath", str(root)])
    assert r.exit_code == 0, r.output
    assert layout.qupath_geojson(review_run.slide_id).is_file()


def test_scores_with_other_coordinates_than_the_tiles_file(review_run, tmp_path: Path) -> None:
    """Scores computed on a subset of the tiles (e.g. features of readable tiles only) map by their own
    coordinates."""
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.review.scores import load_slide_scores

    root = tmp_path / "run"
    shutil.copytree(review_run.root, root)
    layout = RunLayout(root)
    path = layout.scores_h5(review_run.model, review_run.slide_id)
    ss = F.read_scores_h5(path)
    keep = np.arange(len(ss.l0_xy)) != 0
    F.write_scores_h5(path, F.ScoreSet(ss.l0_xy[keep], {k: v[keep] for k, v in ss.scores.items()},
                                       {k: v[keep] for k, v in ss.attention.items()}, ss.attrs))
    sc = load_slide_scores(layout, review_run.slide_id, review_run.model)
    assert len(sc) == len(review_run.l0_xy) - 1
    assert sc.channel("response").target_kind == "binary" and sc.channel("til_fraction").is_probability is False
    res = heatmap_slide(root, review_run.slide_id, HeatmapConfig(model=review_run.model, targets=["response"],
                                                                 top_k=0, geojson=False))
    import zarr

    s0 = np.asarray(zarr.open_group(str(layout.heatmap_zarr(review_run.slide_id)), mode="r")["response/0"][:])
    x, y = review_run.l0_xy[0]
    cell = res.index["cell_l0"]
    assert np.isnan(s0[y // cell, x // cell])  # the dropped tile has no score
    assert np.isfinite(s0).sum() == len(review_run.l0_xy) - 1


def test_parallel_slides_draw_the_same_files(small_svs: Path, tmp_path: Path) -> None:
    """`--workers 2` (forked per-slide processes) writes byte-identical outputs to drawing in this process."""
    from wsi_pipeline.review.synthetic import build_scored_run

    slides = []
    for name in ("a", "b", "c"):
        slides.append(tmp_path / f"{name}.svs")
        shutil.copy(small_svs, slides[-1])
    outputs = {}
    for workers in (0, 2):
        root = tmp_path / f"run{workers}"
        for s in slides:
            build_scored_run(root, s, model="demo-mil")
        cfg = HeatmapConfig(model="demo-mil", top_k=2, targets=["response"], workers=workers)
        summary = run_heatmaps(root, cfg)
        assert summary.ok and sorted(summary.done) == ["a", "b", "c"]
        out = root / "heatmaps"
        outputs[workers] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*"))
                            if p.is_file() and p.suffix in (".png", ".geojson")}
    assert len(outputs[0]) >= 3 * 4 and outputs[0] == outputs[2]
    with pytest.raises(ConfigError, match="--workers must be"):
        HeatmapConfig(workers=-1).validate()


def test_slides_moved_since_tiling_are_found_with_slide_dir(small_svs: Path, tmp_path: Path) -> None:
    """A RUN reviewed after its slides moved: heatmaps and the viewer say to pass --slide-dir, and find the
    slides by file name there when it is given."""
    from fastapi.testclient import TestClient

    from wsi_pipeline.review.config import ViewerConfig
    from wsi_pipeline.review.server import create_app
    from wsi_pipeline.review.synthetic import build_scored_run

    (tmp_path / "old").mkdir()
    slide = tmp_path / "old" / "s1.svs"
    shutil.copy(small_svs, slide)
    root = tmp_path / "run"
    build_scored_run(root, slide, model="demo-mil")
    (tmp_path / "new").mkdir()
    slide.rename(tmp_path / "new" / "s1.svs")
    cfg = HeatmapConfig(model="demo-mil", top_k=1, targets=["response"], workers=0)
    (failed,) = run_heatmaps(root, cfg).failed
    assert failed.error_type == "SlideNotFoundError" and "pass --slide-dir FOLDER" in failed.error
    cfg.slide_dirs = [str(tmp_path / "new")]
    assert run_heatmaps(root, cfg).done == ["s1"]
    for dirs, status in (([], 404), ([str(tmp_path / "new")], 200)):
        with TestClient(create_app(root, ViewerConfig(slide_dirs=dirs)), base_url="http://127.0.0.1") as client:
            r = client.get("/dzi/s1.dzi")
        assert r.status_code == status and ("--slide-dir" in r.text if status == 404 else "<Image" in r.text)
