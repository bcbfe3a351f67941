"""`wsi tissue-train` → `wsi tile` → (`wsi extract`) → `wsi tme` on a small kather16 mosaic slide.

Real components throughout: a seeded resnet10t saved as a weights file (so checksums can be matched),
real kather16 tiles, a real pyramid TIFF, the real tiler, extractor and tile reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from wsi_pipeline.cli import build_app
from wsi_pipeline.formats import api as F
from wsi_pipeline.formats.geojson import read_geojson, validate_feature_collection
from wsi_pipeline.runfolder.layout import RunLayout
from wsi_pipeline.runfolder.status import read_status

ENCODER = "timm:resnet10t"
T, S, L = 0, 1, 3  # kather16 class indices: 01_TUMOR, 02_STROMA, 04_LYMPHO
MOSAIC = np.array([
    [S, S, S, S, S, S],
    [S, L, L, L, S, S],
    [S, L, T, T, L, S],
    [S, L, T, T, L, S],
    [S, S, L, L, S, S],
    [S, S, S, S, S, S],
])


def _invoke(args: list[str]) -> str:
    res = CliRunner().invoke(build_app(), args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, kather_dir: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    from wsi_pipeline.encoders.registry import create_encoder
    from wsi_pipeline.synth.pyramid import array_painter, write_pyramid_tiff
    from wsi_pipeline.tiles.folders import load_labelled_folder, read_rgb

    root = tmp_path_factory.mktemp("tme")
    torch.manual_seed(0)
    enc = create_encoder(ENCODER)
    weights = root / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in enc.trunk.state_dict().items()}, str(weights))
    clf_dir = root / "clf"
    out = _invoke(["tissue-train", "--data", str(kather_dir), "--out", str(clf_dir), "--encoder", ENCODER,
                   "--weights", str(weights), "--max-per-class", "5", "--epochs", "50", "--device", "cpu"])
    assert "held-out balanced accuracy" in out
    tiles = load_labelled_folder(kather_dir)
    rng = np.random.default_rng(0)
    img = np.zeros((6 * 150, 6 * 150, 3), np.uint8)
    for (r, c), cls in np.ndenumerate(MOSAIC):
        pick = rng.choice(np.flatnonzero(tiles.labels == cls))
        img[r * 150 : (r + 1) * 150, c * 150 : (c + 1) * 150] = read_rgb(tiles.paths[pick])
    slide = write_pyramid_tiff(root / "slides" / "mosaic.svs", array_painter(img), (900, 900), mpp=0.495,
                               downsamples=(1, 4))
    return {"root": root, "weights": weights, "clf": clf_dir, "slide": slide, "kather": kather_dir}


def test_tissue_train_records_classes_encoder_and_scale(setup: dict[str, Path]) -> None:
    from wsi_pipeline.tme.classifier import load_classifier

    clf = load_classifier(setup["clf"])
    assert clf.class_names[0] == "01_TUMOR" and len(clf.class_names) == 8
    assert clf.encoder == ENCODER and clf.embed_dim == 512 and clf.mpp == 0.5 and clf.fit == "native"
    assert clf.tile_um == pytest.approx(150 * 0.495)
    assert clf.encoder_weights_sha256 == F.file_sha256(setup["weights"])
    held = clf.metrics["held_out"]
    assert np.asarray(held["confusion_matrix"]).shape == (8, 8) and 0.0 <= held["balanced_accuracy"] <= 1.0
    split = clf.training["split"]
    assert split["mode"]["08_EMPTY"] == "tile"
    # what the head saw is recorded, so evaluations can prove they are held out: with 5 tiles per class
    # every class has < 8 sources and is split by tile, so the training files are listed one by one
    assert not set(split["train_sources"]) & set(split["test_sources"])
    assert len(split["train_files_split_by_tile"]) == clf.training["n_train"]
    assert all(n.endswith(".jpg") for n in split["train_files_split_by_tile"])
    assert "balanced_accuracy" in clf.metrics["colour_baseline_held_out"]


def test_tme_on_aligned_tiles_embeds_from_the_slide(setup: dict[str, Path]) -> None:
    run = setup["root"] / "run_aligned"
    _invoke(["tile", str(setup["slide"]), "--out", str(run), "--target-mpp", "0.495", "--tile-size", "150",
             "--min-tissue", "0", "--workers", "0"])
    layout = RunLayout(run)
    # features from the same encoder and weights but at the wrong scale (150 px @0.495 → 224 px = 0.33 µm/px)
    _invoke(["extract", str(run), "--encoder", ENCODER, "--weights", str(setup["weights"]),
             "--allow-mpp-mismatch", "--device", "cpu", "--num-workers", "0", "--precision", "fp32"])
    # the classifier's encoder has no default weights: a random init would not match its checksum
    res = CliRunner().invoke(build_app(), ["tme", str(run), "--classifier", str(setup["clf"]), "--no-reuse-features",
                                           "--device", "cpu", "--footprint", "tile"])
    assert res.exit_code != 0
    assert any(r.stage == "tme" and r.status == "failed" and "checksum" in r.error
               for r in read_status(layout.slides_csv))
    _invoke(["tme", str(run), "--classifier", str(setup["clf"]), "--encoder-weights", str(setup["weights"]),
             "--device", "cpu", "--footprint", "tile"])
    tiles = F.read_tiles_h5(layout.tiles_h5("mosaic"))
    xy, probs, attrs = F.read_tme_h5(layout.tme_h5("mosaic"))
    np.testing.assert_array_equal(xy, tiles.l0_xy)
    assert probs.shape == (len(tiles), 8) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert attrs[F.A_CLASS_NAMES][3] == "04_LYMPHO" and attrs["classifier_mpp"] == 0.5
    assert attrs["feature_source"] == "slide"  # the 0.33 µm/px RUN features were refused
    df = pd.read_csv(layout.tme_csv)
    assert list(df["slide_id"]) == ["mosaic"] and df.columns[0] == "slide_id"
    row = df.iloc[0]
    assert row["immune_phenotype"] in ("inflamed", "excluded", "desert", "not_evaluable")
    assert row["n_tiles"] == len(tiles) and row["tile_stride_um"] == pytest.approx(150 * 0.495, rel=0.01)
    lym = probs.argmax(1) == 3
    tissue = probs.argmax(1) != 7
    assert row["til_fraction"] == pytest.approx(lym.sum() / tissue.sum(), rel=1e-5)
    for col in ("lymph_density_tumour", "lymph_density_margin", "tumour_stroma_ratio", "area_frac_tumor"):
        assert col in df.columns
    fc = read_geojson(layout.tme_geojson("mosaic"))
    assert validate_feature_collection(fc) == [] and len(fc["features"]) == len(tiles)
    props = fc["features"][0]["properties"]
    assert props["objectType"] == "detection" and "p_lympho" in props["measurements"]
    assert props["classification"]["name"] in attrs[F.A_CLASS_NAMES]
    from PIL import Image

    with Image.open(layout.tme_map_png("mosaic")) as im:
        assert im.size[0] > im.size[1]  # thumbnail + legend panel
    assert any(r.stage == "tme" and r.status == "done" for r in read_status(layout.slides_csv))

    # a second run reuses the stored probabilities; new rules only rewrite the table
    before = layout.tme_h5("mosaic").stat().st_mtime_ns
    _invoke(["tme", str(run), "--classifier", str(setup["clf"]), "--band-um", "500", "--device", "cpu",
             "--footprint", "tile"])
    assert layout.tme_h5("mosaic").stat().st_mtime_ns == before
    assert pd.read_csv(layout.tme_csv).iloc[0]["n_margin_tiles"] >= row["n_margin_tiles"]

    # joined to labels for `wsi train`: TME columns prefixed, label columns untouched, all label rows kept
    labels = setup["root"] / "labels.csv"
    pd.DataFrame({"slide_id": ["mosaic", "other"], "til_fraction": [0.3, 0.1], "response": [1, 0]}).to_csv(
        labels, index=False)
    _invoke(["tme", str(run), "--classifier", str(setup["clf"]), "--labels", str(labels), "--device", "cpu",
             "--footprint", "tile"])
    joined = pd.read_csv(layout.tme_labels_csv)
    assert list(joined["slide_id"]) == ["mosaic", "other"] and list(joined["til_fraction"]) == [0.3, 0.1]
    assert joined.loc[0, "tme_til_fraction"] == pytest.approx(row["til_fraction"])
    assert joined.loc[0, "tme_immune_phenotype"] == row["immune_phenotype"]
    assert pd.isna(joined.loc[1, "tme_til_fraction"])


@pytest.fixture(scope="module")
def default_run(setup: dict[str, Path]) -> Path:
    """The mosaic tiled at the encoder input (resnet10t: 176 px) and µm/px, with extracted features."""
    run = setup["root"] / "run_default"
    _invoke(["tile", str(setup["slide"]), "--out", str(run), "--target-mpp", "0.5", "--tile-size", "176",
             "--min-tissue", "0", "--workers", "0"])
    _invoke(["extract", str(run), "--encoder", ENCODER, "--weights", str(setup["weights"]), "--device", "cpu",
             "--num-workers", "0", "--precision", "fp32", "--dtype", "float32"])
    return run


def test_tme_reuses_run_features_at_the_classifier_scale(setup: dict[str, Path], default_run: Path) -> None:
    run = default_run
    layout = RunLayout(run)
    # the RUN's features were extracted in fp32: embed from the slide in fp32 too, so only the route differs
    args = ["tme", str(run), "--classifier", str(setup["clf"]), "--encoder-weights", str(setup["weights"]),
            "--device", "cpu", "--footprint", "tile", "--precision", "fp32"]
    _invoke(args)
    _, from_features, attrs = F.read_tme_h5(layout.tme_h5("mosaic"))
    assert attrs["feature_source"] == "run-features"
    _invoke([*args, "--no-reuse-features", "--overwrite"])
    _, from_slide, attrs = F.read_tme_h5(layout.tme_h5("mosaic"))
    assert attrs["feature_source"] == "slide"
    # same pixels at the same scale through either route
    np.testing.assert_allclose(from_features, from_slide, atol=2e-3)


def test_footprint_classifies_tile_centres_at_the_training_field_of_view(setup: dict[str, Path],
                                                                         default_run: Path) -> None:
    """Tiles much wider than the classifier's training tiles straddle several tissue cells: `--footprint
    classifier` classifies each tile's centre over the training field of view, read from the slide, instead
    of reusing whole-tile features; `auto` is the grid for a classifier not validated for the dense map (one
    trained on pure tiles only), whatever the tile size."""
    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.config import TMEConfig
    from wsi_pipeline.tme.run import resolve_footprint

    run = default_run  # 176 px at 0.5 µm/px = 88 µm: 1.19× the classifier's 74.25 µm
    layout = RunLayout(run)
    tiles = F.read_tiles_h5(layout.tiles_h5("mosaic"))
    clf = load_classifier(str(setup["clf"]))
    assert clf.tile_um == pytest.approx(74.25)
    assert resolve_footprint(TMEConfig(), clf, tiles) == "grid"  # auto: no context training, no evaluation
    assert resolve_footprint(TMEConfig(footprint="classifier"), clf, tiles) == "classifier"
    assert resolve_footprint(TMEConfig(footprint="tile"), clf, tiles) == "tile"
    assert resolve_footprint(TMEConfig(footprint="grid"), clf, tiles) == "grid"
    wide = F.TileSet(tiles.l0_xy, {**tiles.attrs, F.A_PATCH_SIZE_L0: 227})  # 112 µm: 1.5×
    assert resolve_footprint(TMEConfig(), clf, wide) == "grid"
    assert resolve_footprint(TMEConfig(footprint="dense"), clf, wide) == "dense"
    args = ["tme", str(run), "--classifier", str(setup["clf"]), "--encoder-weights", str(setup["weights"]),
            "--device", "cpu", "--overwrite"]
    _invoke([*args, "--footprint", "tile"])
    _, whole, _ = F.read_tme_h5(layout.tme_h5("mosaic"))
    _invoke([*args, "--footprint", "classifier"])
    _, centre, attrs = F.read_tme_h5(layout.tme_h5("mosaic"))
    assert attrs["feature_source"] == "slide-centre"
    assert centre.shape == whole.shape and np.allclose(centre.sum(1), 1.0, atol=1e-4)
    assert not np.allclose(centre, whole, atol=1e-3)
    with pytest.raises(Exception, match="footprint"):
        TMEConfig(footprint="centre").validate()


def test_centre_footprint_reads_the_centre_of_each_tile(setup: dict[str, Path], default_run: Path) -> None:
    """Reading only the centre square equals reading the whole tile and cropping its centre."""
    from wsi_pipeline.features.reader import ReadSpec, open_tile_reader
    from wsi_pipeline.tiles.embed import embed_tiles
    from wsi_pipeline.tiles.transform import fit_tile
    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.run import create_classifier_encoder, embed_slide_tiles

    tiles = F.read_tiles_h5(RunLayout(default_run).tiles_h5("mosaic"))  # 176 px @ 0.5
    clf = load_classifier(str(setup["clf"]))
    enc = create_classifier_encoder(clf, str(setup["weights"]), "cpu")
    got = embed_slide_tiles(tiles, enc, clf.fit, precision="fp32", centre_um=clf.tile_um)
    side = round(clf.tile_um / enc.meta.mpp)  # 148 px
    with open_tile_reader(tiles.attrs[F.A_SLIDE_PATH], ReadSpec(0.5, 176, tiles.slide_mpp)) as reader:
        whole = reader.read_many(tiles.l0_xy)
    o = (176 - side) // 2
    ref = embed_tiles(enc, [fit_tile(im[o : o + side, o : o + side], enc.meta.input_size, clf.fit) for im in whole],
                      64, "fp32", "cpu")
    cos = np.sum(got * ref, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    # same pixels up to resampling (a read 14 level-0 px off-centre gives cos 0.997 and 8× the deviation)
    assert got.shape == ref.shape and cos.min() > 0.9995, cos.min()


def test_fov_grid_covers_the_run_tiles_at_the_classifier_field_of_view() -> None:
    from wsi_pipeline.tme.run import fov_grid

    # 3×2 RUN tiles of 224 px at 0.5 µm/px on a 0.25 µm/px slide (448 level-0 px), the middle top one missing
    xy = np.array([[1000 + 448 * c, 2000 + 448 * r] for r in range(2) for c in range(3) if (r, c) != (0, 1)])
    attrs = {F.A_TARGET_MPP: 0.5, F.A_SLIDE_MPP: 0.25, F.A_TILE_SIZE: 224, F.A_PATCH_SIZE_L0: 448, F.A_OVERLAP: 0}
    grid = fov_grid(F.TileSet(xy, attrs), 74.25, 0.5)
    assert grid.tile_size_l0 == 297 and grid.tile_size == 148 and grid.target_mpp == 0.5
    assert grid.attrs[F.A_OVERLAP] == 0 and grid.slide_mpp == 0.25
    centres = grid.l0_xy + 297 / 2
    inside = [(xy <= c).all(1) & (c < xy + 448).all(1) for c in centres]
    assert all(m.sum() == 1 for m in inside)  # every cell centre lies in exactly one RUN tile ...
    assert not any(((1448 <= c[0] < 1896) and (2000 <= c[1] < 2448)) for c in centres)  # ... never in the gap
    # ... and every RUN tile is covered: 5 × 3 cells over the full 1344 × 896 box, minus those in the gap
    full = fov_grid(F.TileSet(np.array([[1000 + 448 * c, 2000 + 448 * r] for r in range(2) for c in range(3)]),
                              attrs), 74.25, 0.5)
    assert len(full) == 15 and len(grid) < len(full)
    assert np.all((full.l0_xy - [1000, 2000]) % 297 == 0)  # anchored at the RUN tiles' corner
    empty = fov_grid(F.TileSet(np.zeros((0, 2), np.int64), attrs), 74.25, 0.5)
    assert len(empty) == 0 and empty.tile_size_l0 == 297


def test_grid_footprint_classifies_the_area_at_the_field_of_view(setup: dict[str, Path], default_run: Path) -> None:
    """`--footprint grid`: the TME's own cells, one classifier field of view wide, over the area the RUN's
    88-µm tiles cover. On this mosaic they coincide with the 74-µm mosaic cells, so each cell's probabilities
    equal those of a RUN tiled at exactly the classifier's field of view."""
    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.run import fov_grid

    clf = load_classifier(str(setup["clf"]))
    layout = RunLayout(default_run)
    common = ["--classifier", str(setup["clf"]), "--encoder-weights", str(setup["weights"]), "--device", "cpu",
              "--overwrite"]
    _invoke(["tme", str(default_run), *common, "--footprint", "grid"])
    xy, probs, attrs = F.read_tme_h5(layout.tme_h5("mosaic"))
    tiles = F.read_tiles_h5(layout.tiles_h5("mosaic"))
    expected = fov_grid(tiles, clf.tile_um, clf.mpp)
    np.testing.assert_array_equal(xy, expected.l0_xy)
    assert attrs["feature_source"] == "slide-grid" and len(xy) > len(tiles)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    row = pd.read_csv(layout.tme_csv).iloc[0]
    assert row["n_tiles"] == len(xy) and row["tile_stride_um"] == pytest.approx(74.25, rel=0.01)
    assert len(read_geojson(layout.tme_geojson("mosaic"))["features"]) == len(xy)

    aligned = setup["root"] / "run_fov"
    _invoke(["tile", str(setup["slide"]), "--out", str(aligned), "--target-mpp", "0.495", "--tile-size", "150",
             "--min-tissue", "0", "--workers", "0"])
    _invoke(["tme", str(aligned), *common, "--footprint", "tile", "--no-reuse-features"])
    axy, aprobs, _ = F.read_tme_h5(RunLayout(aligned).tme_h5("mosaic"))
    where = {tuple(p): i for i, p in enumerate(axy)}
    shared = [(i, where[tuple(p)]) for i, p in enumerate(xy) if tuple(p) in where]
    assert len(shared) >= 0.8 * len(xy)
    a, b = zip(*shared, strict=True)
    np.testing.assert_allclose(probs[list(a)], aprobs[list(b)], atol=2e-3)


def _record_footprint_eval(clf: Any, dense_better: bool, sha: str | None = None) -> None:
    """A misaligned-mosaic evaluation record in the classifier's classifier.json (figures as
    scripts/eval_tme.py --record writes them)."""
    from wsi_pipeline.tme.classifier import CLASSIFIER_JSON, WEIGHTS_FILE
    from wsi_pipeline.tme.run import FOOTPRINT_EVAL

    grid = {"phenotype_accuracy": 0.8, "til_spearman": 0.85, "area_fraction_mae": 0.06}
    dense = {"phenotype_accuracy": 0.9 if dense_better else 0.7, "til_spearman": 0.9, "area_fraction_mae": 0.04}
    clf.metrics[FOOTPRINT_EVAL] = {"cohort": "misaligned", "n_slides": 30, "grid": grid, "dense": dense,
                                   "classifier_sha256": sha or F.file_sha256(Path(clf.path) / WEIGHTS_FILE)}
    F.write_classifier_json(Path(clf.path) / CLASSIFIER_JSON, clf.to_json())


def test_auto_footprint_is_dense_only_for_a_validated_classifier(setup: dict[str, Path], default_run: Path) -> None:
    """`--footprint auto` → dense only for a classifier trained on context windows whose own weights were at
    least as good as grid on misaligned mosaics; otherwise grid."""
    import shutil

    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.config import TMEConfig
    from wsi_pipeline.tme.run import dense_validated, resolve_footprint

    tiles = F.read_tiles_h5(RunLayout(default_run).tiles_h5("mosaic"))
    folder = setup["root"] / "clf_auto"
    shutil.copytree(setup["clf"], folder, dirs_exist_ok=True)
    clf = load_classifier(folder)
    _record_footprint_eval(clf, dense_better=True)
    clf = load_classifier(folder)
    ok, why = dense_validated(clf)  # evaluated, but trained on pure tiles only
    assert not ok and "context" in why and resolve_footprint(TMEConfig(), clf, tiles) == "grid"
    clf.training["context"] = {"method": "fcn", "n_mosaics": 2}
    assert dense_validated(clf)[0] and resolve_footprint(TMEConfig(), clf, tiles) == "dense"
    _record_footprint_eval(clf, dense_better=False)
    ok, why = dense_validated(clf)
    assert not ok and "phenotype_accuracy" in why and resolve_footprint(TMEConfig(), clf, tiles) == "grid"
    _record_footprint_eval(clf, dense_better=True, sha="0" * 64)  # an evaluation of other weights
    ok, why = dense_validated(clf)
    assert not ok and "these weights" in why
    _record_footprint_eval(clf, dense_better=True)
    clf.metrics["footprint_eval"]["map_refinement"] = True  # evaluated refined; this classifier has no refinement
    ok, why = dense_validated(clf)
    assert not ok and "map refinement" in why and resolve_footprint(TMEConfig(), clf, tiles) == "grid"
    assert resolve_footprint(TMEConfig(footprint="dense"), clf, tiles) == "dense"  # explicit always wins


def test_context_trained_classifier_and_the_default_dense_read_out(setup: dict[str, Path],
                                                                   default_run: Path) -> None:
    """`wsi tissue-train --context-mosaics --area-correction` records how its context windows were computed and
    its soft confusion matrix; once its misaligned evaluation is recorded (dense at least as good as grid),
    `wsi tme` with every default reads the slide as a dense map with the same windows, corrects the composition
    and writes class polygons."""
    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.config import TMEConfig
    from wsi_pipeline.tme.run import resolve_footprint

    clf_dir = setup["root"] / "clf_ctx"
    out = _invoke(["tissue-train", "--data", str(setup["kather"]), "--out", str(clf_dir), "--encoder", ENCODER,
                   "--weights", str(setup["weights"]), "--max-per-class", "6", "--epochs", "30", "--device", "cpu",
                   "--context-mosaics", "2", "--context-windows", "40", "--area-correction",
                   "--scale-jitter", "0.1", "--scale-copies", "1", "--context-scale-jitter", "0.05"])
    assert "held-out context windows" in out
    clf = load_classifier(clf_dir)
    ctx = clf.training["context"]
    assert ctx["method"] == "fcn" and ctx["window_cells"] == 5 and ctx["cell_px"] == 32 and ctx["n_mosaics"] == 2
    assert ctx["scale_jitter"] == 0.05 and clf.training["config"]["scale_copies"] == 1
    assert clf.training["config"]["scale_jitter"] == 0.1
    assert set(clf.metrics["held_out_magnified"]) == {"0.93", "1.07"}
    m = np.asarray(clf.area_correction["matrix"])
    assert m.shape == (8, 8) and np.allclose(m.sum(1), 1.0, atol=1e-3)
    assert 0 <= clf.metrics["held_out_context"]["composition_mae"] <= 1
    assert resolve_footprint(TMEConfig(), clf, F.read_tiles_h5(RunLayout(default_run).tiles_h5("mosaic"))) == \
        "grid"  # not evaluated yet

    run = setup["root"] / "run_dense"
    _invoke(["tile", str(setup["slide"]), "--out", str(run), "--min-tissue", "0", "--workers", "0"])
    _record_footprint_eval(clf, dense_better=True)  # what scripts/eval_tme.py --record writes
    _invoke(["tme", str(run), "--classifier", str(clf_dir), "--encoder-weights", str(setup["weights"]),
             "--device", "cpu"])
    layout = RunLayout(run)
    row = pd.read_csv(layout.tme_csv).iloc[0]
    assert row["footprint"] == "dense" and row["feature_source"] == "slide-dense-fcn" and bool(row["area_corrected"])
    dense = F.read_tme_dense(layout.tme_h5("mosaic"))
    assert dense is not None and dense.cell_um == pytest.approx(16.0)
    frac = [float(v) for c, v in row.items() if str(c).startswith("area_frac_")]
    assert len(frac) == 7 and sum(frac) == pytest.approx(1.0, abs=1e-6)
    fc = read_geojson(layout.tme_geojson("mosaic"))
    assert validate_feature_collection(fc) == []
    assert all(f["geometry"]["type"] == "MultiPolygon" for f in fc["features"])
    # without the correction the composition is the map's raw expected areas (til_fraction_soft)
    _invoke(["tme", str(run), "--classifier", str(clf_dir), "--encoder-weights", str(setup["weights"]),
             "--device", "cpu", "--no-area-correction"])
    raw = pd.read_csv(layout.tme_csv).iloc[0]
    assert not bool(raw["area_corrected"]) and raw["til_fraction"] == pytest.approx(raw["til_fraction_soft"])



def test_context_mosaics_are_magnified_by_the_scale_jitter(kather_dir: Path) -> None:
    """A magnified context mosaic has larger cells (the same tiles read as if their pixels were larger), and its
    windows' class fractions are computed on those cells."""
    from wsi_pipeline.tiles.folders import load_labelled_folder
    from wsi_pipeline.tme.context import compose, window_fractions

    tiles = load_labelled_folder(kather_dir)
    pools = [[p for p, y in zip(tiles.paths, tiles.labels, strict=True) if y == c][:3] for c in range(2)]
    layout = np.array([[0, 1], [1, 0]])
    _, cell = compose(layout, pools, np.random.default_rng(0), 0.495, 0.5)
    big, cell_big = compose(layout, pools, np.random.default_rng(0), 0.495, 0.5, magnify=1.1)
    assert cell == 148 and cell_big == 163 and big.shape[:2] == (2 * 163, 2 * 163)
    frac = window_fractions(layout, 2, cell_big, np.array([0.0]), np.array([0.0]), float(cell_big))
    assert frac[0] == pytest.approx([1.0, 0.0])


def test_source_fold_classifiers_leave_out_each_training_source_once(setup: dict[str, Path]) -> None:
    """Cross-fitting (scripts/train_map_refiner.py --cross-fit): the recipe refit once per fold of the training
    source images, each without its fold; every training tile is left out by exactly one fold classifier, never
    a test tile, and what a fold classifier was fitted on never includes what it left out."""
    from wsi_pipeline.errors import ConfigError
    from wsi_pipeline.tiles.folders import load_labelled_folder
    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.config import TissueTrainConfig
    from wsi_pipeline.tme.train import source_fold_classifiers

    cfg = TissueTrainConfig(data=str(setup["kather"]), out=str(setup["root"] / "folds"), encoder=ENCODER,
                            weights=str(setup["weights"]), max_per_class=6, epochs=20, device="cpu",
                            context_mosaics=1, context_windows=20, scale_jitter=0.1, scale_copies=1)
    folds = source_fold_classifiers(cfg, 2)
    assert [Path(f.path).name for f in folds] == ["fold-0", "fold-1"]
    tiles = load_labelled_folder(setup["kather"])
    left_out: list[str] = []
    for k, f in enumerate(load_classifier(setup["root"] / "folds" / f"fold-{k}") for k in range(2)):
        cf, split = f.training["cross_fit"], f.training["split"]
        assert cf["fold"] == k and cf["folds"] == 2 and (cf["held_out_sources"] or cf["held_out_files"])
        assert not set(cf["held_out_sources"]) & set(split["train_sources"])
        assert not set(cf["held_out_files"]) & set(split["train_files_split_by_tile"])
        assert not (set(cf["held_out_sources"]) | set(split["train_sources"])) & set(split["test_sources"])
        assert f.training["context"]["n_mosaics"] == 1 and f.class_names == list(tiles.class_names)
        left_out += cf["held_out_sources"] + cf["held_out_files"]
    assert len(left_out) == len(set(left_out))  # each left out once
    with pytest.raises(ConfigError, match="at least 2 folds"):
        source_fold_classifiers(cfg, 1)
