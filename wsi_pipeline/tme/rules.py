"""The immune-phenotype rule table (pure): inflamed / excluded / desert from the spatial metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from wsi_pipeline.tme.config import (
    PHENOTYPE_DESERT,
    PHENOTYPE_EXCLUDED,
    PHENOTYPE_INFLAMED,
    PHENOTYPE_NOT_EVALUABLE,
    PhenotypeRules,
)


def _value(metrics: Mapping[str, Any], key: str) -> float:
    v = metrics.get(key)
    if v is None:
        return 0.0
    v = float(v)
    return 0.0 if math.isnan(v) else v


def immune_phenotype(metrics: Mapping[str, Any], rules: PhenotypeRules) -> tuple[str, str]:
    """Apply the rule table of :class:`PhenotypeRules` (first match wins); returns (phenotype, reason).

    Missing or NaN densities count as 0 (no band → no lymphocytes held in it).
    """
    n_tum = int(metrics.get("n_tumour_tiles", 0) or 0)
    if n_tum < rules.min_tumour_tiles:
        return PHENOTYPE_NOT_EVALUABLE, f"{n_tum} tumour tiles < min_tumour_tiles={rules.min_tumour_tiles}"
    d_tum = _value(metrics, "lymph_density_tumour")
    if d_tum >= rules.inflamed_min_tumour_density:
        return PHENOTYPE_INFLAMED, (
            f"lymph_density_tumour={d_tum:.3f} >= "
            f"inflamed_min_tumour_density={rules.inflamed_min_tumour_density}"
        )
    d_mar = _value(metrics, "lymph_density_margin")
    if d_mar >= rules.excluded_min_margin_density:
        return PHENOTYPE_EXCLUDED, (
            f"lymph_density_tumour={d_tum:.3f} < {rules.inflamed_min_tumour_density} and "
            f"lymph_density_margin={d_mar:.3f} >= "
            f"excluded_min_margin_density={rules.excluded_min_margin_density}"
        )
    return PHENOTYPE_DESERT, (
        f"lymph_density_tumour={d_tum:.3f} < {rules.inflamed_min_tumour_density} and "
        f"lymph_density_margin={d_mar:.3f} < {rules.excluded_min_margin_density}"
    )
