"""Federated fixtures: a small generated feature cohort split over sites, each site with its own RUN folder
and labels CSV, plus a site whose features are at another µm/px."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedtools import SITES, make_site


@pytest.fixture(scope="session")
def fed_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Sites A, B, C (14 patients each, one encoder at 0.5 µm/px) and D (features at 1.0 µm/px)."""
    root = tmp_path_factory.mktemp("fed_cohort")
    sites = {n: make_site(root, n, 20 + i) for i, n in enumerate(SITES)}
    sites["D"] = make_site(root, "D", 30, target_mpp=1.0, n_patients=6)
    return sites
