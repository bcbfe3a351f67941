"""The immune-phenotype rule table: each phenotype from constructed metrics, boundaries and order."""

from __future__ import annotations

import pytest

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.tme.config import PhenotypeRules, tme_config_from_dict
from wsi_pipeline.tme.rules import immune_phenotype

RULES = PhenotypeRules(min_tumour_tiles=3, inflamed_min_tumour_density=0.10, excluded_min_margin_density=0.20)


@pytest.mark.parametrize(
    ("n_tum", "d_tum", "d_mar", "expected"),
    [
        (50, 0.30, 0.50, "inflamed"),  # inside wins even with a busy margin
        (50, 0.10, 0.00, "inflamed"),  # boundary: ≥
        (50, 0.099, 0.25, "excluded"),
        (50, 0.00, 0.20, "excluded"),  # boundary: ≥
        (50, 0.05, 0.19, "desert"),
        (50, 0.00, float("nan"), "desert"),  # no band at all
        (2, 0.90, 0.90, "not_evaluable"),  # too little tumour
    ],
)
def test_rule_table(n_tum: int, d_tum: float, d_mar: float, expected: str) -> None:
    metrics = {"n_tumour_tiles": n_tum, "lymph_density_tumour": d_tum, "lymph_density_margin": d_mar}
    phenotype, reason = immune_phenotype(metrics, RULES)
    assert phenotype == expected
    assert reason


def test_thresholds_are_configurable() -> None:
    metrics = {"n_tumour_tiles": 10, "lymph_density_tumour": 0.05, "lymph_density_margin": 0.3}
    assert immune_phenotype(metrics, RULES)[0] == "excluded"
    assert immune_phenotype(metrics, PhenotypeRules(inflamed_min_tumour_density=0.04))[0] == "inflamed"
    assert immune_phenotype(metrics, PhenotypeRules(excluded_min_margin_density=0.5))[0] == "desert"


def test_config_from_yaml_mapping_and_validation() -> None:
    cfg = tme_config_from_dict({"spatial": {"band_um": 300}, "rules": {"min_tumour_tiles": 5},
                                "roles": {"tumour": ["tumour"]}, "batch_size": 8}).validate()
    assert cfg.spatial.band_um == 300 and cfg.rules.min_tumour_tiles == 5 and cfg.roles.tumour == ("tumour",)
    with pytest.raises(ConfigError):
        tme_config_from_dict({"rules": {"inflamed_min_tumour_density": 2.0}}).validate()
    with pytest.raises(ConfigError):
        tme_config_from_dict({"no_such_option": 1})
