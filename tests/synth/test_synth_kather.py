"""kather16 mosaics: source-image split, mosaic slides with MPP 0.495, truth and geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_pipeline.synth.kather import (
    CLASS_FOLDERS,
    KATHER_CLASSES,
    SPLIT_BY_TILE_CLASSES,
    KatherDataError,
    KatherWriteOptions,
    MosaicParams,
    build_kather_mosaic_cohort,
    kather_cohort_params,
    parse_source,
    split_kather_by_source,
    write_kather_cohort,
)
from wsi_pipeline.synth.layout import lymph_geometry


def test_parse_source_from_file_names() -> None:
    assert parse_source("10009_CRC-Prim-HE-03_009.tif_Row_301_Col_151.jpg") == "CRC-Prim-HE-03_009"
    assert parse_source("1000E_CRC-Prim-HE-07.tif_Row_901_Col_4201.jpg") == "CRC-Prim-HE-07"
    with pytest.raises(KatherDataError, match="not a kather16 tile name"):
        parse_source("tile_0001.jpg")


@pytest.fixture(scope="module")
def split(kather_dir: Path) -> pd.DataFrame:
    return split_kather_by_source(kather_dir, test_fraction=0.3, seed=0)


def test_split_never_shares_a_source_between_train_and_test(split: pd.DataFrame) -> None:
    by_source = split[split.split_unit == "source"]
    assert set(by_source.class_name) == set(KATHER_CLASSES) - set(SPLIT_BY_TILE_CLASSES)
    assert (by_source.groupby("source").split.nunique() == 1).all()
    assert set(split[split.split_unit == "tile"].class_name) == set(SPLIT_BY_TILE_CLASSES)


def test_every_class_has_train_and_test_tiles(split: pd.DataFrame) -> None:
    frac = split.groupby("class_name").split.apply(lambda s: (s == "test").mean())
    assert set(frac.index) == set(KATHER_CLASSES)
    assert ((frac > 0.15) & (frac < 0.5)).all(), frac


def test_split_is_deterministic_and_seeded(kather_dir: Path, split: pd.DataFrame) -> None:
    again = split_kather_by_source(kather_dir, test_fraction=0.3, seed=0)
    assert (again.split.to_numpy() == split.split.to_numpy()).all()
    other = split_kather_by_source(kather_dir, test_fraction=0.3, seed=1)
    assert (other.split.to_numpy() != split.split.to_numpy()).any()


def test_split_is_the_one_source_split_of_the_project(kather_dir: Path, split: pd.DataFrame) -> None:
    """The mosaic split is ``tiles.split.source_split``: the split the demo encoder and the shipped tissue
    classifier were trained with, so a ``test`` mosaic holds no tile either model saw."""
    import json

    from wsi_pipeline.tiles.folders import load_labelled_folder
    from wsi_pipeline.tiles.split import source_split

    tiles = load_labelled_folder(kather_dir)
    is_test, _ = source_split(tiles, 0.3, seed=0)
    side = {p.name: bool(t) for p, t in zip(tiles.paths, is_test, strict=True)}
    assert (split.split == "test").tolist() == [side[f] for f in split.file]
    card = Path(__file__).resolve().parents[2] / "models" / "wsip-tissue-kather16" / "classifier.json"
    recorded = json.loads(card.read_text())["training"]["split"]
    test = split[split.split == "test"]
    assert not set(test[test.split_unit == "source"].source) & set(recorded["train_sources"])
    assert not set(test.file) & set(recorded["train_files_split_by_tile"])
    train_by_tile = split[(split.split == "train") & (split.split_unit == "tile")]
    assert set(train_by_tile.file) == set(recorded["train_files_split_by_tile"])


def test_missing_class_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "01_TUMOR").mkdir()
    with pytest.raises(KatherDataError, match="missing class folder"):
        split_kather_by_source(tmp_path)


@pytest.fixture(scope="module")
def mosaics(kather_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("kather_mosaics")
    df = build_kather_mosaic_cohort(kather_dir, out, n_slides=3, split="test", seed=4, grid=(10, 12))
    return out, df


def test_mosaic_slides_open_with_mpp_0495(mosaics: tuple[Path, pd.DataFrame]) -> None:
    import openslide

    out, df = mosaics
    for sid in df.slide_id:
        with openslide.OpenSlide(str(out / f"{sid}.svs")) as s:
            assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.495)
            assert s.dimensions == (12 * 150, 10 * 150)
            assert s.level_count == 3


def test_mosaic_uses_only_test_pool_tiles_of_the_right_class(mosaics: tuple[Path, pd.DataFrame]) -> None:
    out, df = mosaics
    table = pd.read_csv(out / "tile_split.csv")
    split_of = dict(zip(table.file, table.split, strict=True))
    class_of = dict(zip(table.file, table.class_name, strict=True))
    for sid in df.slide_id:
        t = np.load(out / "truth" / f"{sid}.npz")
        cm, tiles = t["class_map"], t["tiles"]
        assert {split_of[f] for f in tiles.ravel()} == {"test"}
        for (r, c), f in np.ndenumerate(tiles):
            assert class_of[f] == CLASS_FOLDERS[cm[r, c]]


def test_mosaic_truth_and_labels_agree(mosaics: tuple[Path, pd.DataFrame]) -> None:
    out, _ = mosaics
    labels = pd.read_csv(out / "labels.csv")
    assert {"slide_id", "patient_id", "response", "immune_phenotype", "til_fraction", "split"} <= set(labels.columns)
    for _, row in labels.iterrows():
        t = np.load(out / "truth" / f"{row.slide_id}.npz")
        cm = t["class_map"]
        tissue = (cm != 0).sum()
        assert row.til_fraction == pytest.approx((cm == 4).sum() / tissue, abs=1e-4)
        assert row.frac_01_TUMOR == pytest.approx((cm == 1).sum() / tissue, abs=1e-4)
        assert str(t["immune_phenotype"]) == row.immune_phenotype
        g = lymph_geometry(cm)
        if row.immune_phenotype == "excluded":
            assert g["n_lymph_intratumoural"] == 0
        elif row.immune_phenotype == "inflamed":
            assert g["intratumoural_share"] >= 0.6


def test_mosaic_pixels_follow_the_class_map(mosaics: tuple[Path, pd.DataFrame]) -> None:
    import openslide

    out, df = mosaics
    sid = df.slide_id.iloc[int(np.argmax(df.til_fraction))]
    cm = np.load(out / "truth" / f"{sid}.npz")["class_map"]
    assert (cm == 4).any()
    with openslide.OpenSlide(str(out / f"{sid}.svs")) as s:
        img = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB")).astype(float)
    cells = img.reshape(cm.shape[0], 150, cm.shape[1], 150, 3).mean(axis=(1, 3)).mean(axis=2)
    assert cells[cm == 0].mean() > 220  # 08_EMPTY is near-white background
    assert cells[cm == 4].mean() < cells[cm == 0].mean() - 60  # lymphocyte tiles are dark


def test_mosaic_survival_is_drawn_from_phenotype_and_tumour_fraction(mosaics: tuple[Path, pd.DataFrame]) -> None:
    out, _ = mosaics
    labels = pd.read_csv(out / "labels.csv")
    om = MosaicParams().outcome
    assert om.os_til_log_hr == 0.0  # what the mosaic shows: phenotype and tumour fraction
    for _, r in labels.iterrows():
        t = np.load(out / "truth" / f"{r.slide_id}.npz")
        h = om.os_log_hazard(float(t["til_fraction"]), float(t["tumour_fraction"]), r.immune_phenotype)
        assert r.os_true_log_hazard == pytest.approx(h, abs=1e-3)
    assert om.os_log_hazard(0.1, 0.3, "inflamed") < om.os_log_hazard(0.1, 0.3, "desert")
    assert om.os_log_hazard(0.1, 0.4, "excluded") > om.os_log_hazard(0.1, 0.2, "excluded")


def test_kather_cohort_follows_the_cohort_model(kather_dir: Path, tmp_path: Path) -> None:
    """write_kather_cohort: plan_cohort's patients, arms and on-treatment slides, class maps filled with tiles
    of the chosen split; cropped to the tissue; the truth keeps the keys of the synthetic slides' truth."""
    import openslide

    from wsi_pipeline.synth.cohort import labels_frame, plan_cohort
    from wsi_pipeline.synth.slides import save_truth

    params = kather_cohort_params(3, seed=2, grid=(10, 12), two_arms=True, timepoint_fraction=1.0,
                                  multi_slide_fraction=0.0)
    df = write_kather_cohort(kather_dir, tmp_path, params, KatherWriteOptions(split="test", crop_to_tissue=True))
    pd.testing.assert_frame_equal(df, labels_frame(plan_cohort(params)))
    assert set(df.timepoint) == {"baseline", "on_treatment"} and "os_true_log_hazard" in df.columns
    table = pd.read_csv(tmp_path / "tile_split.csv")
    split_of = dict(zip(table.file, table.split, strict=True))
    class_of = dict(zip(table.file, table.class_name, strict=True))
    planned = {p.spec.slide_id: p.spec for p in plan_cohort(params)}
    save_truth(next(iter(planned.values())), tmp_path / "reference.npz")
    reference_keys = set(np.load(tmp_path / "reference.npz").files)
    for sid in df.slide_id:
        t = np.load(tmp_path / "truth" / f"{sid}.npz")
        cm, tiles = t["class_map"], t["tiles"]
        assert reference_keys <= set(t.files) and float(t["cell_px"]) == 150
        assert cm.shape == tiles.shape and (cm[0] != 0).any() and (cm[:, 0] != 0).any()  # tissue at the top-left
        full = planned[sid].class_map
        assert (full != 0).sum() == (cm != 0).sum()  # only glass was cropped
        assert {split_of[f] for f in tiles.ravel()} == {"test"}
        assert all(class_of[f] == CLASS_FOLDERS[c] for f, c in zip(tiles.ravel(), cm.ravel(), strict=True))
        with openslide.OpenSlide(str(tmp_path / f"{sid}.svs")) as s:
            assert s.dimensions == (cm.shape[1] * 150, cm.shape[0] * 150)
            assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.495)


def test_sites_draw_from_disjoint_source_images(kather_dir: Path, split: pd.DataFrame,
                                                tmp_path: Path) -> None:
    """`MosaicParams(sites=N)`: the split's source images dealt to N sites (whole images where a class has at
    least N of them), every slide drawn from one site only and labelled with it."""
    from wsi_pipeline.synth.kather import site_pools
    from wsi_pipeline.synth.tissue import stable_seed

    train = split[split.split == "train"]
    pools = site_pools(train, 3, seed=0)
    source_of = dict(zip(train.path, train.source, strict=True))
    for c in KATHER_CLASSES:
        sets = [{source_of[p] for p in site[c]} for site in pools]
        assert all(site[c] for site in pools), c
        assert sum(len(site[c]) for site in pools) == (train.class_name == c).sum()
        if train[train.class_name == c].source.nunique() >= 3:
            assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2]), c
    df = build_kather_mosaic_cohort(kather_dir, tmp_path, n_slides=3, split="train", seed=4, grid=(6, 8),
                                    params=MosaicParams(sites=3))
    assert df.site.tolist() == ["site-1", "site-2", "site-3"]
    name_to_path = {Path(p).name: p for p in train.path}
    pools = site_pools(train, 3, seed=stable_seed("kather-sites", 4, "train"))  # the generator's draw
    for i, sid in enumerate(df.slide_id):
        with np.load(tmp_path / "truth" / f"{sid}.npz") as z:
            used = {name_to_path[str(t)] for t in z["tiles"].ravel()}
        mine = {p for paths in pools[i].values() for p in paths}
        assert used <= mine, sid
