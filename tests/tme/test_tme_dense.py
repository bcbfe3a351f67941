"""The dense TME map: window geometry, overlap-add, fully convolutional windows against per-window
classification, invariance to where the grid falls, area corrections, class polygons for QuPath.

Real components: kather16 tiles in a pyramid TIFF written by the synth generator, the real tiler and tile
reader, the shipped demo encoder and tissue classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.formats import api as F
from wsi_pipeline.tme.dense import (
    DenseGeometry,
    box_sum_valid,
    choose_chunk,
    column_runs,
    fcn_regions,
    needed_windows,
    overlap_add,
    region_cost,
)

T, S, L, E = 0, 1, 3, 7  # kather16 class indices: 01_TUMOR, 02_STROMA, 04_LYMPHO, 08_EMPTY
# an inflamed layout: lymphocytes inside a tumour nest, stroma around, glass frame
LAYOUT = np.array([
    [E, E, E, E, E, E, E, E],
    [E, S, S, S, S, S, S, E],
    [E, S, T, T, T, T, S, E],
    [E, S, T, L, L, T, S, E],
    [E, S, T, L, T, T, S, E],
    [E, S, T, T, T, T, S, E],
    [E, S, S, S, S, S, S, E],
    [E, E, E, E, E, E, E, E],
])


def test_window_index_grid_and_overlap_add() -> None:
    area = np.zeros((3, 4), bool)
    area[1, 2] = True
    need = needed_windows(area, 2)  # window t covers cells t-1 … t
    assert need.shape == (4, 5)
    assert set(map(tuple, np.argwhere(need))) == {(1, 2), (1, 3), (2, 2), (2, 3)}
    x = np.arange(20, dtype=float).reshape(4, 5)
    assert box_sum_valid(x, 2)[1, 2] == x[1:3, 2:4].sum()
    # each map cell is the mean of the windows covering it: window probabilities equal to their index
    probs = np.stack([x, 100 - x], axis=-1)
    done = np.ones(x.shape, bool)
    m = overlap_add(probs, done, 2)
    assert m.shape == (3, 4, 2)
    np.testing.assert_allclose(m[1, 2, 0], x[1:3, 2:4].mean())
    done[2, 3] = False  # a missing window is left out of the mean
    np.testing.assert_allclose(overlap_add(probs, done, 2)[1, 2, 0], (x[1, 2] + x[1, 3] + x[2, 2]) / 3)


def _square_block_cost(need: np.ndarray, geo: DenseGeometry, chunk: int) -> int:
    """Cells computed by square regions of ``chunk`` windows on a fixed grid (the planner before strips)."""
    blocks = sum(bool(need[a:a + chunk, b:b + chunk].any())
                 for a in range(0, need.shape[0], chunk) for b in range(0, need.shape[1], chunk))
    return blocks * (chunk + geo.halo_cells) ** 2


def test_fcn_regions_cover_each_needed_window_once_within_the_memory_bound() -> None:
    """The fully convolutional regions: every needed window in exactly one region, no region over the cell
    bound, and far fewer cells than square regions on a fixed grid for a ragged tissue outline."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:150]
    # two blobs with ragged outlines and a hole, like tissue fragments
    area = ((yy - 45) ** 2 + (xx - 50) ** 2 < 35 ** 2 + rng.integers(-300, 300, yy.shape)) | \
        ((yy - 85) ** 2 / 2 + (xx - 120) ** 2 < 25 ** 2)
    area &= ~(((yy - 45) ** 2 + (xx - 50) ** 2) < 8 ** 2)
    geo = DenseGeometry(mpp=0.5, cell_px=32, window_cells=5, window_px=148, max_region_cells=48 * 48)
    need = needed_windows(area, geo.window_cells)
    geo = choose_chunk(need, geo)
    cover = np.zeros(need.shape, np.int64)
    for a, b, h, w in fcn_regions(need, geo):
        assert h <= geo.chunk and (h + geo.halo_cells) * (w + geo.halo_cells) <= geo.max_region_cells
        cover[a:a + h, b:b + w] += 1
    assert cover.max() == 1 and cover[need].min() == 1
    cells = region_cost(need, geo)
    best_square = min(_square_block_cost(need, geo, c) for c in range(8, 41, 4))
    assert cells < 0.8 * best_square, (cells, best_square)
    assert column_runs(np.array([1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1], bool), gap=2, max_len=3) == \
        [(0, 3), (3, 5), (9, 12), (12, 13)]


def _mosaic_slide(root: Path, kather_dir: Path, offset: tuple[int, int], name: str) -> Path:
    """LAYOUT in kather16 test-split tiles (fixed picks), shifted by ``offset`` px of white glass."""
    from wsi_pipeline.synth.pyramid import array_painter, write_pyramid_tiff
    from wsi_pipeline.tiles.folders import load_labelled_folder, read_rgb

    tiles = load_labelled_folder(kather_dir)
    rng = np.random.default_rng(3)
    pick = {c: rng.choice(np.flatnonzero(tiles.labels == c), LAYOUT.size) for c in np.unique(LAYOUT)}
    img = np.full((LAYOUT.shape[0] * 150 + offset[1], LAYOUT.shape[1] * 150 + offset[0], 3), 255, np.uint8)
    for k, ((r, c), cls) in enumerate(np.ndenumerate(LAYOUT)):
        y, x = offset[1] + r * 150, offset[0] + c * 150
        img[y:y + 150, x:x + 150] = read_rgb(tiles.paths[pick[cls][k]])
    return write_pyramid_tiff(root / f"{name}.svs", array_painter(img), (img.shape[1], img.shape[0]), mpp=0.495,
                              downsamples=(1, 4))


@pytest.fixture(scope="module")
def shifted_runs(tmp_path_factory: pytest.TempPathFactory, kather_dir: Path) -> dict[str, Path]:
    """One mosaic at three origins, each tiled with the defaults (224 px at 0.5 µm/px) and read by `wsi tme`
    with the shipped classifier and `--footprint dense` (whatever `auto` resolves to)."""
    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.tiling.stage import run_tile
    from wsi_pipeline.tme.config import TMEConfig
    from wsi_pipeline.tme.run import run_tme

    root = tmp_path_factory.mktemp("dense")
    runs = {}
    for name, offset in (("origin", (0, 0)), ("shift37", (37, 91)), ("shift113", (113, 20))):
        slide = _mosaic_slide(root / "slides", kather_dir, offset, name)
        run = root / f"run-{name}"
        assert run_tile([slide], run, TilingConfig(min_tissue=0.05).validate(), workers=0).ok
        summary = run_tme(run, TMEConfig(device="cpu", footprint="dense", write_png=True, write_geojson=True))
        assert summary.ok, summary.failed
        runs[name] = run
    return runs


def test_dense_map_is_stored_with_its_geometry(shifted_runs: dict[str, Path]) -> None:
    from wsi_pipeline.runfolder.layout import RunLayout

    layout = RunLayout(shifted_runs["origin"])
    dense = F.read_tme_dense(layout.tme_h5("origin"))
    xy, probs, attrs = F.read_tme_h5(layout.tme_h5("origin"))
    tiles = F.read_tiles_h5(layout.tiles_h5("origin"))
    assert dense is not None and dense.method == "fcn" and attrs["feature_source"] == "slide-dense-fcn"
    assert dense.cell_um == pytest.approx(16.0) and dense.window_um == pytest.approx(80.0)
    assert dense.origin_l0 == (float(tiles.l0_xy[:, 0].min()), float(tiles.l0_xy[:, 1].min()))
    assert dense.cell_l0 == pytest.approx(16.0 / 0.495)
    assert dense.probs.shape[:2] == dense.area.shape and dense.area.mean() > 0.5
    np.testing.assert_allclose(dense.probs[dense.area].sum(-1), 1.0, atol=2e-3)  # float16 storage
    np.testing.assert_array_equal(xy, tiles.l0_xy)  # per RUN tile: the mean of its cells
    assert probs.shape == (len(tiles), 8) and np.allclose(probs.sum(1), 1.0, atol=2e-3)


def test_fcn_windows_agree_with_per_window_classification(shifted_runs: dict[str, Path]) -> None:
    """The fully convolutional window probabilities against the same windows read and embedded one by one:
    padding and receptive field differ, the classes mostly do not."""
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.dense import fcn_window_agreement
    from wsi_pipeline.tme.run import create_classifier_encoder

    layout = RunLayout(shifted_runs["shift37"])
    tiles = F.read_tiles_h5(layout.tiles_h5("shift37"))
    clf = load_classifier(None)
    enc = create_classifier_encoder(clf, None, "cpu")
    a = fcn_window_agreement(tiles.attrs[F.A_SLIDE_PATH], tiles, enc, clf, n_windows=48, seed=0)
    assert a["n_windows"] == 48 and a["read_um"] == pytest.approx(74.0)
    # measured with the shipped (context-trained, scale-jittered) classifier: probability MAE 0.093, same top class
    # 0.625 on this slide's 48 windows (an 8 × 8 layout: most windows straddle class borders; 0.63 on 200); 0.076
    # and 0.70 on 600 windows of 3 misaligned held-out mosaics (scripts/eval_tme.py --agreement 3). The fully convolutional window is 80 µm
    # with real tissue in its receptive field, the per-window read a 74-µm tile with zero padding at its edges.
    assert a["prob_mae"] < 0.10, a
    assert a["argmax_agreement"] >= 0.6, a


def test_reading_threads_and_read_ahead_leave_the_map_unchanged(shifted_runs: dict[str, Path]) -> None:
    """On a GPU the map's regions are read by a thread pool, the next region while the current one is computed
    (reader_threads); the map must be the same bit for bit as read in turn, over several regions."""
    import dataclasses

    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.dense import (
        METHOD_FCN,
        dense_geometry,
        dense_slide_map,
        map_grid,
        reader_threads,
    )
    from wsi_pipeline.tme.run import create_classifier_encoder

    assert reader_threads("cpu") == 1 and reader_threads("cuda") >= 1
    tiles = F.read_tiles_h5(RunLayout(shifted_runs["shift37"]).tiles_h5("shift37"))
    clf = load_classifier(None)
    enc = create_classifier_encoder(clf, None, "cpu")
    geo = dataclasses.replace(dense_geometry(clf, enc, METHOD_FCN), max_region_cells=30 * 30)
    _, area = map_grid(tiles, geo.cell_px * geo.mpp / tiles.slide_mpp)
    need = needed_windows(area, geo.window_cells)
    assert len(fcn_regions(need, choose_chunk(need, geo))) >= 3  # the read-ahead has regions to overlap
    maps = [dense_slide_map(tiles, enc, clf, METHOD_FCN, "bf16", geo=geo, threads=t) for t in (1, 3)]
    np.testing.assert_array_equal(maps[0].probs, maps[1].probs)
    np.testing.assert_array_equal(maps[0].area, maps[1].area)


def test_tme_num_workers_option_reads_the_same_map(shifted_runs: dict[str, Path], tmp_path: Path) -> None:
    """`wsi tme --num-workers N` (reading threads) gives the row the stage wrote with the default; a negative
    count is a typed configuration error."""
    import shutil

    import pandas as pd
    from typer.testing import CliRunner

    from wsi_pipeline.cli import build_app
    from wsi_pipeline.errors import ConfigError
    from wsi_pipeline.tme.config import TMEConfig

    run = tmp_path / "run"
    shutil.copytree(shifted_runs["origin"], run)
    before = pd.read_csv(run / "tme.csv")
    res = CliRunner().invoke(build_app(), ["tme", str(run), "--device", "cpu", "--footprint", "dense",
                                           "--overwrite", "--num-workers", "3"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(pd.read_csv(run / "tme.csv"), before)
    with pytest.raises(ConfigError, match="num_workers"):
        TMEConfig(num_workers=-1).validate()


def test_read_ahead_reads_in_order_one_at_a_time_and_ahead_of_the_caller() -> None:
    import threading
    import time

    from wsi_pipeline.tme.dense import read_ahead

    busy, events, lock = [0], [], threading.Lock()

    def read(i: int) -> np.ndarray:
        with lock:
            busy[0] += 1
            assert busy[0] == 1  # never two reads at once: the reader is not shared between threads
        events.append(("read", i))
        time.sleep(0.01)
        with lock:
            busy[0] -= 1
        return np.full(2, i)

    out = []
    for i, arr in read_ahead(range(4), read, prefetch=True):
        time.sleep(0.03)  # the caller computes; the next read is done meanwhile
        events.append(("used", i))
        out.append(int(arr[0]))
    assert out == [0, 1, 2, 3]
    assert events.index(("read", 1)) < events.index(("used", 0))  # item 1 was read while item 0 was used
    assert [i for i, _ in read_ahead(range(3), lambda i: np.zeros(1), prefetch=False)] == [0, 1, 2]


def test_map_refinement_can_be_left_out(shifted_runs: dict[str, Path], tmp_path: Path) -> None:
    """The shipped classifier's map refinement gives the composition; `--no-map-refinement` reads it from the
    window map with the classifier's global area correction. The phenotype comes from the window map either way."""
    import shutil

    import pandas as pd

    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.config import TMEConfig
    from wsi_pipeline.tme.run import run_tme

    assert load_classifier(None).has_map_refinement
    run = tmp_path / "raw"
    shutil.copytree(shifted_runs["shift113"], run)
    assert run_tme(run, TMEConfig(device="cpu", footprint="dense", map_refinement=False, write_png=False,
                                  write_geojson=False)).ok
    raw, refined = (pd.read_csv(r / "tme.csv").iloc[0] for r in (run, shifted_runs["shift113"]))
    # a read-out setting: the stored window map is reused, not recomputed
    h5 = "tme/shift113.h5"
    assert (run / h5).stat().st_mtime_ns == (shifted_runs["shift113"] / h5).stat().st_mtime_ns
    assert not raw["map_refined"] and raw["area_corrected"]
    assert refined["map_refined"] and not refined["area_corrected"]
    assert raw["phenotype_reason"] == refined["phenotype_reason"]
    assert raw["til_fraction_soft"] == pytest.approx(refined["til_fraction_soft"], abs=1e-6)
    assert abs(raw["area_frac_stroma"] - refined["area_frac_stroma"]) > 1e-3  # a different composition


def test_rows_of_an_older_release_are_recomputed_from_the_stored_map(shifted_runs: dict[str, Path], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A RUN whose tme.csv rows were written before `phenotype_margin` existed (older ROW_VERSION): a rerun
    recomputes the rows (they gain the column) and reuses the stored dense map; a second rerun does nothing."""
    import shutil

    import pandas as pd

    import wsi_pipeline.tme.run as tme_run
    from wsi_pipeline.tme.config import TMEConfig

    run = tmp_path / "old"
    shutil.copytree(shifted_runs["shift37"], run)
    cfg = TMEConfig(device="cpu", footprint="dense", write_png=False, write_geojson=False)
    monkeypatch.setattr(tme_run, "ROW_VERSION", 1)
    assert tme_run.run_tme(run, cfg).ok  # rows keyed as an older release would key them
    record = run / "tme" / "shift37.json"
    old = F.read_stage_record(record)
    old["row"].pop("phenotype_margin")  # what that release wrote
    F.write_stage_record(record, old)
    monkeypatch.setattr(tme_run, "ROW_VERSION", 2)
    h5 = run / "tme" / "shift37.h5"
    mtime = h5.stat().st_mtime_ns
    assert tme_run.run_tme(run, cfg).ok
    row = pd.read_csv(run / "tme.csv").iloc[0]
    assert np.isfinite(row["phenotype_margin"]) and h5.stat().st_mtime_ns == mtime
    summary = tme_run.run_tme(run, cfg)
    assert summary.ok and not summary.done and summary.skipped == ["shift37"]


def test_refitting_only_the_map_refinement_reuses_the_stored_maps(shifted_runs: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """The stored dense map is keyed on what makes the window probabilities (the head), not on the whole
    classifier file: a classifier whose map refinement alone was refitted recomputes the rows from the stored
    map (its composition changes), while a changed head recomputes the map."""
    import shutil

    import pandas as pd

    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.config import TMEConfig
    from wsi_pipeline.tme.refine import STATE_PREFIX
    from wsi_pipeline.tme.run import run_tme

    run, folder = tmp_path / "run", tmp_path / "clf"
    shutil.copytree(shifted_runs["shift37"], run)
    shutil.copytree(load_classifier().path, folder)
    cfg = TMEConfig(classifier=str(folder), device="cpu", footprint="dense", write_png=False, write_geojson=False)
    assert run_tme(run, cfg).ok
    h5 = run / "tme" / "shift37.h5"
    mtime, before = h5.stat().st_mtime_ns, pd.read_csv(run / "tme.csv").iloc[0]
    clf = load_classifier(folder)
    head_key = clf.window_map_sha256()
    last = max(k for k in clf.state if k.startswith(STATE_PREFIX) and k.endswith("bias"))
    clf.state[last] = clf.state[last] + np.linspace(-1, 1, len(clf.state[last]), dtype=np.float32)  # a refit
    clf.save(folder)
    assert load_classifier(folder).window_map_sha256() == head_key
    summary = run_tme(run, cfg)
    after = pd.read_csv(run / "tme.csv").iloc[0]
    assert summary.done == ["shift37"] and h5.stat().st_mtime_ns == mtime  # the row again, from the stored map
    assert after["til_fraction"] != before["til_fraction"]
    assert after["immune_phenotype"] == before["immune_phenotype"]  # the phenotype reads the window map
    head = next(k for k in clf.state if not k.startswith(STATE_PREFIX) and k.endswith("bias"))
    clf.state[head] = clf.state[head] + 0.5
    clf.save(folder)
    assert load_classifier(folder).window_map_sha256() != head_key
    assert run_tme(run, cfg).done == ["shift37"] and h5.stat().st_mtime_ns != mtime  # a new head: a new map


def test_map_refinement_is_left_out_for_maps_of_another_geometry(shifted_runs: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    """`--dense-method window` makes maps of 37-µm cells; the refinement was fitted on 16-µm fcn maps, so the
    composition falls back to the area-corrected window map (and says so) instead of a refinement at the wrong
    scale."""
    import shutil

    import pandas as pd

    from wsi_pipeline.tme.config import TMEConfig
    from wsi_pipeline.tme.run import run_tme

    run = tmp_path / "window"
    shutil.copytree(shifted_runs["shift37"], run)
    assert run_tme(run, TMEConfig(device="cpu", footprint="dense", dense_method="window", write_png=False,
                                  write_geojson=False)).ok
    row = pd.read_csv(run / "tme.csv").iloc[0]
    assert row["map_cell_um"] == pytest.approx(37.0) and row["feature_source"] == "slide-dense-window"
    assert not row["map_refined"] and row["area_corrected"]


def test_read_out_does_not_depend_on_where_the_grid_falls(shifted_runs: dict[str, Path]) -> None:
    import pandas as pd

    rows = {k: pd.read_csv(Path(r) / "tme.csv").iloc[0] for k, r in shifted_runs.items()}
    truth_til = float((LAYOUT == L).sum() / (LAYOUT != E).sum())
    for name, row in rows.items():
        assert row["footprint"] == "dense"
        assert row["immune_phenotype"] == "inflamed", (name, row["phenotype_reason"])
        assert "lymph_density_tumour=" in row["phenotype_reason"] and "inflamed_min_tumour_density" in \
            row["phenotype_reason"]
    tils = np.array([r["til_fraction"] for r in rows.values()])
    assert np.ptp(tils) < 0.02, tils  # moving the origin moves the TIL fraction by less than 2 points
    assert np.all(np.abs(tils - truth_til) < 0.05), (tils, truth_til)
    tumour = np.array([r["area_frac_tumor"] for r in rows.values()])
    assert np.ptp(tumour) < 0.04, tumour


def test_class_polygons_are_valid_qupath_geojson(shifted_runs: dict[str, Path]) -> None:
    from wsi_pipeline.runfolder.layout import RunLayout

    layout = RunLayout(shifted_runs["shift113"])
    fc = F.read_geojson(layout.tme_geojson("shift113"))
    F.check_feature_collection(fc)
    dense = F.read_tme_dense(layout.tme_h5("shift113"))
    top = np.where(dense.area, dense.probs.argmax(-1), -1)
    by_name = {f["properties"]["name"]: f for f in fc["features"]}
    assert "01_TUMOR" in by_name and "tumour_region" in by_name
    tumour = by_name["01_TUMOR"]
    assert tumour["geometry"]["type"] == "MultiPolygon" and tumour["properties"]["objectType"] == "annotation"
    assert tumour["properties"]["classification"]["name"] == "01_TUMOR"
    # the polygons cover the tumour cells of the map: their area (shoelace, holes negative) ≈ the cell area
    area_l0 = 0.0
    for poly in tumour["geometry"]["coordinates"]:
        for ring in poly:
            a = np.asarray(ring, float)
            area_l0 += 0.5 * float(np.dot(a[:-1, 0], a[1:, 1]) - np.dot(a[1:, 0], a[:-1, 1]))
    cells = float((top == 0).sum()) * dense.cell_l0 ** 2
    assert area_l0 == pytest.approx(cells, rel=0.1)
    assert tumour["properties"]["measurements"]["area_um2"] == pytest.approx((top == 0).sum() * dense.cell_um ** 2)
    # polygons lie on the map, in level-0 pixels (x against the map's columns, y against its rows)
    pts = np.concatenate([np.asarray(r, float) for p in tumour["geometry"]["coordinates"] for r in p])
    lo = np.asarray(dense.origin_l0, float)
    hi = lo + np.array([dense.area.shape[1], dense.area.shape[0]]) * dense.cell_l0
    assert np.all(pts.min(axis=0) >= lo - 1) and np.all(pts.max(axis=0) <= hi + 1), (pts.min(0), pts.max(0), lo, hi)
    # and on the tumour cells: every vertex lies on the edge of a tumour cell (none off in other tissue)
    from scipy import ndimage as ndi

    near = ndi.binary_dilation(top == 0, np.ones((3, 3), bool))
    col, row = (np.clip(np.floor((pts[:, i] - lo[i]) / dense.cell_l0 + 1e-6).astype(int), 0, n - 1)
                for i, n in ((0, top.shape[1]), (1, top.shape[0])))
    assert near[row, col].all()


def test_soft_adjusted_areas_undo_a_known_confusion() -> None:
    from wsi_pipeline.tme.classifier import soft_adjusted_areas

    m = np.array([[0.8, 0.2, 0.0], [0.3, 0.6, 0.1], [0.0, 0.1, 0.9]])  # row: true class → mean predicted
    true = np.array([50.0, 30.0, 20.0])
    expected = m.T @ true  # what the map's probabilities add up to
    np.testing.assert_allclose(soft_adjusted_areas(m, expected), true, rtol=1e-6)
    np.testing.assert_allclose(soft_adjusted_areas(np.eye(3), expected), expected, rtol=1e-6)
    out = soft_adjusted_areas(m, np.array([0.0, 10.0, 0.0]))  # never negative, same total
    assert np.all(out >= 0) and out.sum() == pytest.approx(10.0)


def test_map_metrics_use_expected_areas_and_the_correction() -> None:
    from wsi_pipeline.tme.config import ClassRoles, SpatialConfig
    from wsi_pipeline.tme.spatial import map_metrics

    names = ["01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE", "08_EMPTY"]
    roles = ClassRoles().resolve(names)
    probs = np.zeros((20, 20, 8))
    probs[..., 1] = 1.0  # stroma
    probs[5:15, 5:15] = 0.0
    probs[5:15, 5:15, 0] = 0.7  # a tumour nest, each cell 30 % lymphocytes by probability
    probs[5:15, 5:15, 3] = 0.3
    area = np.ones((20, 20), bool)
    m, comp = map_metrics(probs, area, names, roles, 16.0, 74.0, SpatialConfig())
    assert comp.tumour_region[5:15, 5:15].all() and not comp.tumour_region[0, 0]
    assert m["area_frac_lympho"] == pytest.approx(0.3 * 100 / 400)  # expected areas, not votes (0 by argmax)
    assert m["lymph_density_tumour"] == pytest.approx(0.3)
    assert m["n_tumour_tiles"] == pytest.approx(100 * (16 / 74) ** 2, rel=0.01)
    doubled, _ = map_metrics(probs, area, names, roles, 16.0, 74.0, SpatialConfig(),
                             correct=lambda v: v * np.where(np.arange(8) == 3, 2.0, 1.0))
    # the correction applies to the slide's composition; the compartment densities stay expected areas
    assert doubled["til_fraction"] == pytest.approx(60 / 430) and doubled["til_fraction_soft"] == pytest.approx(0.075)
    assert doubled["lymph_density_tumour"] == pytest.approx(0.3)
