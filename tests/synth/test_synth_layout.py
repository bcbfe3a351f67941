"""Class maps: phenotype geometry, count overlap, determinism and truth read-outs."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.synth.layout import (
    PHENOTYPES,
    LayoutParams,
    TissueClass,
    class_map_truth,
    lymph_geometry,
    make_class_map,
)

SHAPE = (14, 18)
SEEDS = range(12)


def _map(phenotype: str, seed: int, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    return make_class_map(shape, phenotype, np.random.default_rng(seed))


@pytest.mark.parametrize("seed", SEEDS)
def test_inflamed_lymphocytes_sit_inside_tumour_nests(seed: int) -> None:
    g = lymph_geometry(_map("inflamed", seed))
    assert g["n_lymph"] > 0
    assert g["intratumoural_share"] >= 0.6
    assert g["n_lymph_distant"] == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_excluded_lymphocytes_sit_in_the_band_never_inside(seed: int) -> None:
    g = lymph_geometry(_map("excluded", seed))
    assert g["n_lymph"] > 0
    assert g["n_lymph_intratumoural"] == 0
    assert g["n_lymph_peritumoural"] == g["n_lymph"]


@pytest.mark.parametrize("seed", SEEDS)
def test_desert_has_few_lymphocytes_away_from_nests(seed: int) -> None:
    cm = _map("desert", seed)
    g = lymph_geometry(cm)
    assert class_map_truth(cm)["til_fraction"] <= LayoutParams().desert_til[1] + 0.01
    assert g["n_lymph_intratumoural"] == 0 and g["n_lymph_peritumoural"] == 0


def test_lymphocyte_count_does_not_tell_inflamed_from_excluded() -> None:
    # the same layout draw gives the same number of lymphocyte cells whatever the geometry
    n_inf = [lymph_geometry(_map("inflamed", s))["n_lymph"] for s in SEEDS]
    n_exc = [lymph_geometry(_map("excluded", s))["n_lymph"] for s in SEEDS]
    n_des = [lymph_geometry(_map("desert", s))["n_lymph"] for s in SEEDS]
    assert n_inf == n_exc
    assert np.mean(n_des) < 0.5 * np.mean(n_inf)


def test_tumour_amount_does_not_tell_inflamed_from_excluded() -> None:
    # lymphocytes moving into nests are compensated by nest growth: same tumour cells per layout draw
    for s in SEEDS:
        inf, exc = _map("inflamed", s), _map("excluded", s)
        assert (inf == TissueClass.TUMOUR).sum() == (exc == TissueClass.TUMOUR).sum()
        stroma = [((m == TissueClass.STROMA) | (m == TissueClass.COMPLEX) | (m == TissueClass.ADIPOSE)).sum()
                  for m in (inf, exc)]
        assert stroma[0] == stroma[1]


def test_class_maps_are_deterministic_and_seed_dependent() -> None:
    for ph in PHENOTYPES:
        assert np.array_equal(_map(ph, 3), _map(ph, 3))
    assert not np.array_equal(_map("inflamed", 3), _map("inflamed", 4))


def test_tissue_keeps_a_glass_frame_and_sensible_coverage() -> None:
    for s in SEEDS:
        cm = _map("excluded", s)
        assert (cm[0] == 0).all() and (cm[-1] == 0).all() and (cm[:, 0] == 0).all() and (cm[:, -1] == 0).all()
        assert 0.3 <= class_map_truth(cm)["tissue_coverage"] <= 0.75


def test_truth_and_geometry_on_a_hand_made_map() -> None:
    G, T, S, L = (int(c) for c in (TissueClass.GLASS, TissueClass.TUMOUR, TissueClass.STROMA, TissueClass.LYMPHO))
    cm = np.array([
        [G, G, G, G, G, G, G],
        [G, S, S, S, S, L, G],
        [G, S, T, T, T, S, G],
        [G, S, T, L, T, S, G],
        [G, S, T, T, T, S, G],
        [G, S, S, S, S, S, G],
        [G, L, S, S, S, S, G],
        [G, G, G, G, G, G, G],
    ], np.int8)
    t = class_map_truth(cm)
    assert t["tissue_cells"] == 30
    assert t["til_fraction"] == pytest.approx(3 / 30)
    assert t["tumour_fraction"] == pytest.approx(8 / 30)
    assert t["stroma_fraction"] == pytest.approx(19 / 30)
    g = lymph_geometry(cm, band_cells=1)
    assert g["nest_cells"] == 9  # the lymphocyte hole counts as nest
    assert (g["n_lymph_intratumoural"], g["n_lymph_peritumoural"], g["n_lymph_distant"]) == (1, 1, 1)
    assert g["band_cells"] == 16
    assert g["intratumoural_density"] == pytest.approx(1 / 9)


def test_unknown_phenotype_is_rejected() -> None:
    with pytest.raises(ValueError, match="phenotype"):
        make_class_map(SHAPE, "hot", np.random.default_rng(0))
