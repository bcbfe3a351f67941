"""Map refinement (wsi_pipeline.tme.refine): identity when untrained, learns a context-dependent confusion that a
global correction cannot undo, round trip through the classifier folder, typed errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsi_pipeline.errors import ConfigError, WeightsError
from wsi_pipeline.tme.classifier import TissueClassifier, fit_head, load_classifier
from wsi_pipeline.tme.refine import (
    STATE_PREFIX,
    RefinerExample,
    RefinerSpec,
    build_refiner,
    fit_refiner,
    geometry_matches,
    refine_probs,
)

A, B, LYM, MIX = 0, 1, 2, 3  # tumour-like, stroma-like, lymphocytes, "complex stroma" (what mixed windows read as)


def _truth_map(rng: np.random.Generator, size: int = 24, block: int = 4) -> np.ndarray:
    """H×W×4 one-hot truth of blocks of A / B with lymphocyte blocks, each cell one class."""
    n = size // block
    cls = rng.choice([A, B, LYM], size=(n, n), p=[0.4, 0.4, 0.2])
    cells = np.kron(cls, np.ones((block, block), int))
    return np.eye(4, dtype=np.float32)[cells]


def _window_map(truth: np.ndarray) -> np.ndarray:
    """What a window classifier reports: each cell the mean of its 3 × 3 neighbourhood, and lymphocytes that share
    a neighbourhood with B read half as the mixed class (a confusion that depends on what lies around them)."""
    from scipy.ndimage import uniform_filter

    blur = np.stack([uniform_filter(truth[..., c], 3, mode="nearest") for c in range(4)], -1)
    near_b = blur[..., B] > 0
    moved = np.where(near_b, 0.5 * blur[..., LYM], 0.0)
    blur[..., LYM] -= moved
    blur[..., MIX] += moved
    return np.clip(blur, 1e-3, None) / np.clip(blur, 1e-3, None).sum(-1, keepdims=True)


def _examples(n: int, seed: int) -> list[RefinerExample]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = _truth_map(rng)
        out.append(RefinerExample(_window_map(t), np.ones(t.shape[:2], bool), t))
    return out


def _lymph_share_error(exs: list[RefinerExample], maps: list[np.ndarray]) -> float:
    return float(np.mean([abs(m[..., LYM].mean() - ex.truth[..., LYM].mean()) for ex, m in zip(exs, maps, strict=True)]))


def test_untrained_refinement_is_the_identity() -> None:
    ex = _examples(1, seed=0)[0]
    area = np.ones(ex.area.shape, bool)
    area[:3] = False
    out = refine_probs(build_refiner(RefinerSpec(), 4), ex.probs, area)
    np.testing.assert_allclose(out[area], ex.probs[area], atol=2e-3)  # log(p) then softmax, p clamped at 1e-4
    np.testing.assert_array_equal(out[~area], ex.probs[~area])  # outside the area: untouched


def test_refinement_learns_a_context_dependent_confusion() -> None:
    """Lymphocytes beside B are read half as MIX: the lymphocyte share is under-read. Fitted on other maps, the
    refinement restores the per-cell truth and the slide's lymphocyte share far better than the window map."""
    fit, test = _examples(24, seed=1), _examples(8, seed=2)
    state, summary = fit_refiner(fit, RefinerSpec(hidden=16, dilations=(1, 2, 1), epochs=30, seed=0))
    assert summary["loss_last_epoch"] < 0.7 * summary["loss_unrefined"], summary
    net = build_refiner(RefinerSpec(hidden=16, dilations=(1, 2, 1)), 4)
    import torch

    net.load_state_dict({k[len(STATE_PREFIX):]: torch.from_numpy(v) for k, v in state.items()})
    refined = [refine_probs(net, ex.probs, ex.area) for ex in test]
    raw_err = float(np.mean([np.abs(ex.probs - ex.truth).mean() for ex in test]))
    ref_err = float(np.mean([np.abs(m - ex.truth).mean() for ex, m in zip(test, refined, strict=True)]))
    assert ref_err < 0.6 * raw_err, (ref_err, raw_err)
    raw_lym = _lymph_share_error(test, [ex.probs for ex in test])
    assert _lymph_share_error(test, refined) < 0.5 * raw_lym, (raw_lym, _lymph_share_error(test, refined))
    for m in refined:
        np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)


def _slide_prior_examples(n: int, seed: int) -> list[RefinerExample]:
    """Maps whose left half reads 50/50 between A and B everywhere: on a slide with LYM in its right half the
    left half is truly A, on a slide with MIX there it is B. Only the slide's composition tells them apart: the
    right half is beyond the receptive field of most of the left half."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        kind = LYM if rng.random() < 0.5 else MIX
        truth = np.zeros((8, 48, 4), np.float32)
        truth[:, :24, A if kind == LYM else B] = 1.0
        truth[:, 24:, kind] = 1.0
        probs = truth.copy()
        probs[:, :24] = [0.5, 0.5, 0.0, 0.0]
        probs = np.clip(probs + rng.uniform(0, 0.02, probs.shape), 1e-3, None)
        out.append(RefinerExample((probs / probs.sum(-1, keepdims=True)).astype(np.float32),
                                  np.ones((8, 48), bool), truth))
    return out


def test_global_context_reads_the_slide_composition() -> None:
    """With ``global_context`` every cell also sees the slide's mean window probabilities, so a class share that
    local evidence cannot decide is read from the rest of the slide; the local refinement stays at 50/50 far from
    the telling half. Untrained, it is still the identity; the setting round-trips through its JSON."""
    import torch

    spec = RefinerSpec(hidden=16, dilations=(1, 2, 1), epochs=25, seed=0, global_context=True)
    assert RefinerSpec.from_json(spec.to_json()) == spec
    assert not RefinerSpec.from_json({"hidden": 8, "dilations": [1]}).global_context  # refinements fitted before
    ex0 = _examples(1, seed=0)[0]
    np.testing.assert_allclose(refine_probs(build_refiner(spec, 4), ex0.probs, ex0.area), ex0.probs, atol=2e-3)
    fit, test = _slide_prior_examples(24, seed=5), _slide_prior_examples(8, seed=6)
    errors = {}
    for use_global in (False, True):
        sp = RefinerSpec(hidden=16, dilations=(1, 2, 1), epochs=25, seed=0, global_context=use_global)
        state, _ = fit_refiner(fit, sp)
        net = build_refiner(sp, 4)
        net.load_state_dict({k[len(STATE_PREFIX):]: torch.from_numpy(v) for k, v in state.items()})
        far = slice(0, 16)  # columns whose receptive field (± 4 cells) does not reach the right half
        errors[use_global] = float(np.mean([np.abs(refine_probs(net, ex.probs, ex.area)[:, far] - ex.truth[:, far])
                                            .sum(-1).mean() for ex in test]))
    assert errors[False] > 0.8, errors  # about 1: the local refinement cannot tell A from B there
    assert errors[True] < 0.3, errors


def _classifier_with_refinement(tmp_path: Path) -> tuple[TissueClassifier, Path]:
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, (40, 8)).astype(np.float32), np.arange(40) % 4
    clf = TissueClassifier(["01_TUMOR", "02_STROMA", "04_LYMPHO", "03_COMPLEX"], "enc", 8, mpp=0.5, tile_um=74.25,
                           state=fit_head(x, y, 4, epochs=5))
    spec = RefinerSpec(hidden=8, dilations=(1, 2), epochs=3)
    state, summary = fit_refiner(_examples(4, seed=3), spec)
    clf.state.update(state)
    clf.map_refinement = {"architecture": spec.to_json(), "training": summary}
    return clf, clf.save(tmp_path / "clf")


def test_refinement_round_trips_through_the_classifier_folder(tmp_path: Path) -> None:
    clf, folder = _classifier_with_refinement(tmp_path)
    ex = _examples(1, seed=4)[0]
    before = clf.refine_map(ex.probs, ex.area)
    back = load_classifier(folder)
    assert back.has_map_refinement and back.map_refinement["architecture"]["dilations"] == [1, 2]
    np.testing.assert_array_equal(back.refine_map(ex.probs, ex.area), before)
    assert not np.allclose(before, ex.probs, atol=1e-3)  # fitted: not the identity


def test_refinement_errors_are_typed(tmp_path: Path) -> None:
    clf, folder = _classifier_with_refinement(tmp_path)
    meta = json.loads((folder / "classifier.json").read_text())
    meta["map_refinement"]["architecture"]["hidden"] = 12  # tensors of 8 channels
    (folder / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match=r"(?s)map refinement.*train_map_refiner"):
        load_classifier(folder)
    plain = TissueClassifier(clf.class_names, "enc", 8, mpp=0.5,
                             state={k: v for k, v in clf.state.items() if not k.startswith(STATE_PREFIX)})
    with pytest.raises(ConfigError, match="no-map-refinement"):
        plain.refine_map(np.full((4, 4, 4), 0.25, np.float32), np.ones((4, 4), bool))
    with pytest.raises(ConfigError, match="no maps"):
        fit_refiner([])


def test_refinement_applies_only_to_maps_of_its_geometry() -> None:
    fitted = {"map_cell_um": 16.0, "window_um": 80.0, "method": "fcn"}
    assert geometry_matches(fitted, 16.0, 80.0, "fcn") == (True, "")
    ok, why = geometry_matches(fitted, 37.0, 74.0, "window")  # `--dense-method window`: 37-µm cells
    assert not ok and "map_cell_um 16" in why and "37" in why
    ok, why = geometry_matches(fitted, 16.0, 80.0, "window")
    assert not ok and "fcn" in why
    assert geometry_matches({}, 37.0, 74.0, "window")[0]  # a refinement that records no geometry is not checked


def _load(spec: RefinerSpec, state: dict[str, np.ndarray]) -> Any:  # a torch module
    import torch

    net = build_refiner(spec, 4)
    net.load_state_dict({k[len(STATE_PREFIX):]: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return net


def test_an_ensemble_is_its_members_fitted_alike_and_their_geometric_mean(tmp_path: Path) -> None:
    """``members`` = 3: member i is exactly the single fit with seed ``seed + i``; the refined map is the
    normalised geometric mean of the members' maps, so its soft cross-entropy against the truth is at most the
    members' mean (log of a normaliser ≤ 1); untrained it is the identity; it round-trips through the JSON and
    the classifier folder; a refinement fitted before (no ``members``) reads as one network."""
    fit, test = _examples(12, seed=7), _examples(6, seed=8)
    spec = RefinerSpec(hidden=8, dilations=(1, 2), epochs=6, seed=10, members=3)
    assert RefinerSpec.from_json(spec.to_json()) == spec
    assert RefinerSpec.from_json({"hidden": 8, "dilations": [1]}).members == 1
    ex0 = test[0]
    np.testing.assert_allclose(refine_probs(build_refiner(spec, 4), ex0.probs, ex0.area), ex0.probs, atol=2e-3)

    ticks: list[tuple[int, int]] = []
    state, summary = fit_refiner(fit, spec, progress=lambda done, total: ticks.append((done, total)))
    assert ticks[-1] == (18, 18) and len(summary["members_loss_last_epoch"]) == 3
    single = RefinerSpec(hidden=8, dilations=(1, 2), epochs=6)
    members = []
    for i in range(3):
        alone, _ = fit_refiner(fit, RefinerSpec(hidden=8, dilations=(1, 2), epochs=6, seed=10 + i))
        prefix = f"{STATE_PREFIX}members.{i}."
        mine = {STATE_PREFIX + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        assert mine.keys() == alone.keys()
        for k, v in alone.items():
            np.testing.assert_array_equal(mine[k], v)
        members.append(_load(single, alone))
    assert len(state) == 3 * len(alone)

    ens = _load(spec, state)
    for ex in test:
        maps = [refine_probs(m, ex.probs, ex.area) for m in members]
        geo = np.exp(np.mean(np.log(maps), axis=0))
        geo /= geo.sum(-1, keepdims=True)
        out = refine_probs(ens, ex.probs, ex.area)
        np.testing.assert_allclose(out, geo, atol=1e-5)
        ce = [float(-(ex.truth * np.log(m)).sum(-1).mean()) for m in maps]
        assert float(-(ex.truth * np.log(out)).sum(-1).mean()) <= np.mean(ce) + 1e-6

    clf = TissueClassifier(["01_TUMOR", "02_STROMA", "04_LYMPHO", "03_COMPLEX"], "enc", 8, mpp=0.5, tile_um=74.25,
                           state={**fit_head(np.random.default_rng(0).normal(0, 1, (40, 8)).astype(np.float32),
                                             np.arange(40) % 4, 4, epochs=5), **state})
    clf.map_refinement = {"architecture": spec.to_json(), "training": summary}
    back = load_classifier(clf.save(tmp_path / "clf"))
    assert back.map_refinement["architecture"]["members"] == 3
    np.testing.assert_array_equal(back.refine_map(ex0.probs, ex0.area), refine_probs(ens, ex0.probs, ex0.area))
