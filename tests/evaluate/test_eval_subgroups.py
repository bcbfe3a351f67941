"""Responder subgroups: cut-off assignment, Wilson intervals, tables, log-rank and plots."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.evaluate.subgroups import (
    assign_subgroups,
    association_test,
    logrank,
    plot_km,
    plot_responder_rates,
    responder_table,
    wilson_ci,
)

ORDER = ["low", "intermediate", "high"]


def test_assign_subgroups_boundaries():
    g = assign_subgroups(np.array([0.1, 0.3, 0.31, 0.6, 0.7, 0.9]), [0.3, 0.7], ORDER)
    assert g.tolist() == ["low", "intermediate", "intermediate", "intermediate", "high", "high"]
    with pytest.raises(ValueError):
        assign_subgroups(np.zeros(2), [0.5], ORDER)


def test_wilson_interval_known_values():
    lo, hi = wilson_ci(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = wilson_ci(0, 20)
    assert lo == pytest.approx(0, abs=1e-12) and hi == pytest.approx(0.1611, abs=1e-4)
    assert all(np.isnan(wilson_ci(0, 0)))


def test_responder_table_and_tests(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    score = rng.random(n)
    resp = (rng.random(n) < 0.1 + 0.7 * score).astype(float)
    resp[:5] = np.nan  # missing outcomes are left out
    phen = rng.choice(["desert", "inflamed"], n)
    groups = assign_subgroups(score, [1 / 3, 2 / 3], ORDER)
    table = responder_table(groups, resp, ORDER, phen, ["desert", "inflamed"], cross_name="immune_phenotype")
    overall = table[table.immune_phenotype == "all"].set_index("subgroup")
    assert overall["n"].sum() == n - 5
    assert overall.loc["low", "responder_rate"] < overall.loc["high", "responder_rate"]
    for lv in ("desert", "inflamed"):
        assert table[table.immune_phenotype == lv]["n"].sum() == int(np.sum((phen == lv) & ~np.isnan(resp)))
    assert ((table.ci_low <= table.responder_rate) & (table.responder_rate <= table.ci_high)).all()
    assert association_test(groups, resp)["p"] < 1e-6

    t = rng.exponential(np.where(groups == "high", 30, 10))
    e = (rng.random(n) < 0.8).astype(float)
    lr = logrank(t, e, groups)
    assert lr["p"] < 1e-3
    pairs = {frozenset(k.split(" vs ")): p for k, p in lr["pairwise"].items()}
    assert set(pairs) == {frozenset(("low", "high")), frozenset(("low", "intermediate")),
                          frozenset(("intermediate", "high"))}
    assert pairs[frozenset(("low", "high"))] < 1e-3
    for path in (plot_responder_rates(table, ORDER, tmp_path / "r.png", "rates", "immune_phenotype"),
                 plot_km(t, e, groups, ORDER, tmp_path / "km.png", "km")):
        assert path.read_bytes()[:4] == b"\x89PNG"
