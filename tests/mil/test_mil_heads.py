"""MIL heads: registry, typed outputs for every target kind, per-tile scores, losses, memory on a 100k bag."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from wsi_pipeline.errors import UnknownNameError
from wsi_pipeline.mil.data import neighbour_context
from wsi_pipeline.mil.heads import MILOutput, create_head, list_heads
from wsi_pipeline.mil.losses import cox_loss, multitask_loss
from wsi_pipeline.mil.targets import parse_targets

HEADS = ["abmil", "chowder", "meanpool", "transmil"]
TASKS = {"response": 1, "phen": 3, "til": 1, "os": 1}


def _bag(n: int = 37, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    side = int(np.ceil(np.sqrt(n)))
    idx = torch.arange(n)
    coords = torch.stack([idx % side, idx // side], 1) * 224
    return x, coords


def test_registry_lists_and_rejects():
    assert set(HEADS) <= set(list_heads())
    with pytest.raises(UnknownNameError, match="available: abmil"):
        create_head("nope", 8, TASKS)


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("n", [1, 3, 37])
def test_every_head_gives_typed_outputs(name, n):
    torch.manual_seed(0)
    head = create_head(name, 16, TASKS, hidden=32).eval()
    x, coords = _bag(n)
    with torch.no_grad():
        out = head(x, coords=coords)
        out_nc = head(x)  # coordinates are optional
    assert isinstance(out, MILOutput) and isinstance(out_nc, MILOutput)
    for t, k in TASKS.items():
        assert out.logits[t].shape == (k,)
        assert out.instance_scores[t].shape == (n, k)
        assert torch.isfinite(out.logits[t]).all() and torch.isfinite(out.instance_scores[t]).all()
        if t in out.attention:
            assert out.attention[t].shape == (n,)
            assert float(out.attention[t].sum()) == pytest.approx(1.0, abs=1e-5)
    has_attention = name in ("abmil", "transmil")
    assert bool(out.attention) == has_attention


def test_abmil_slide_logit_is_attention_weighted_tile_logits():
    torch.manual_seed(0)
    head = create_head("abmil", 16, TASKS, hidden=32).eval()
    x, _ = _bag(50)
    with torch.no_grad():
        out = head(x)
    for t in TASKS:
        recon = out.attention[t] @ out.instance_scores[t]
        torch.testing.assert_close(recon, out.logits[t], rtol=1e-5, atol=1e-5)


def test_meanpool_slide_logit_is_mean_of_tile_logits():
    head = create_head("meanpool", 16, TASKS, hidden=32).eval()
    x, _ = _bag(20)
    with torch.no_grad():
        out = head(x)
    torch.testing.assert_close(out.instance_scores["phen"].mean(0), out.logits["phen"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", HEADS)
def test_heads_with_covariates_and_backward(name):
    torch.manual_seed(0)
    head = create_head(name, 16, TASKS, hidden=32, cov_dim=3)
    x, coords = _bag(30)
    out = head(x, coords=coords, covariates=torch.randn(3))
    sum(v.sum() for v in out.logits.values()).backward()
    assert all(p.grad is not None for n, p in head.named_parameters() if "res_conv" not in n)
    with pytest.raises(ValueError, match="covariates"):
        head(x, coords=coords)


def test_ppeg_mixes_on_the_tile_grid():
    """TransMIL's position encoding runs on the slide's tile grid: it is equivariant to the order of the
    tiles, and a tile's output depends on its spatial neighbours only (also across row bands)."""
    from wsi_pipeline.mil.grid import grid_positions
    from wsi_pipeline.mil.heads import PPEG

    torch.manual_seed(0)
    ppeg = PPEG(8, band_elems=8 * 6 * 8).eval()  # tiny bands: exercise the banded path
    xs, ys = np.meshgrid(np.arange(6), np.arange(20))
    xy = np.stack([xs.ravel(), ys.ravel()], 1) * 224
    tok = torch.randn(len(xy), 8)
    rc, h, w = grid_positions(xy)
    grid = (torch.as_tensor(rc), h, w)
    full = PPEG(8, band_elems=1 << 24).eval()
    full.load_state_dict(ppeg.state_dict())
    with torch.no_grad():
        a = ppeg(tok, grid)
        torch.testing.assert_close(a, full(tok, grid))  # bands = one pass
        perm = torch.randperm(len(xy))
        torch.testing.assert_close(ppeg(tok[perm], (grid[0][perm], h, w)), a[perm])
        far = tok.clone()
        far[0] += 10  # tile (row 0, col 0): outside the 7×7 window of row 19
        b = ppeg(far, grid)
    assert torch.equal(b[rc[:, 0] >= 4], a[rc[:, 0] >= 4]) and not torch.equal(b[1], a[1])


def test_neighbour_context_rings():
    xy = np.array([[0, 0], [224, 0], [0, 224], [224, 224], [896, 896]])
    f = np.arange(5, dtype=np.float32)[:, None]
    ctx = neighbour_context(f, xy, rings=2)
    assert ctx.shape == (5, 3)
    np.testing.assert_allclose(ctx[:, 0], f[:, 0])
    np.testing.assert_allclose(ctx[0, 1], (1 + 2 + 3) / 3)  # ring 1 of tile 0: tiles 1, 2, 3
    assert ctx[4, 1] == 0 and ctx[4, 2] == 0  # isolated tile: no neighbours within 2 rings
    np.testing.assert_allclose(ctx[3, 2], 0.0)  # tile 4 is (896-224)/224 = 3 grid steps from tile 3
    ctx3 = neighbour_context(f, xy, rings=3)
    assert ctx3.shape == (5, 4)
    np.testing.assert_allclose(ctx3[3, 3], 4.0)  # ... so it is in tile 3's ring 3
    np.testing.assert_allclose(ctx3[4, 3], 3.0)


def _fit_cox_coefficient(x: np.ndarray, t: np.ndarray, e: np.ndarray) -> float:
    beta = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta], lr=0.5, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)
    xt, tt, et = (torch.tensor(v, dtype=torch.float64) for v in (x, t, e))

    def closure():
        opt.zero_grad()
        loss = cox_loss(beta * xt, tt, et)
        loss.backward()
        return loss

    opt.step(closure)
    return float(beta.detach())


def test_cox_loss_is_the_partial_likelihood():
    """Minimising our Cox loss over one coefficient recovers lifelines' CoxPH estimate (no ties) and
    statsmodels' PHReg with Breslow ties (tied times)."""
    import pandas as pd
    from lifelines import CoxPHFitter
    from statsmodels.duration.hazard_regression import PHReg

    rng = np.random.default_rng(0)
    n = 150
    x = rng.normal(size=n)
    t = rng.exponential(np.exp(-0.8 * x)) * 10
    e = (rng.random(n) < 0.7).astype(float)
    cph = CoxPHFitter().fit(pd.DataFrame({"x": x, "t": t, "e": e}), "t", "e")
    assert _fit_cox_coefficient(x, t, e) == pytest.approx(cph.params_["x"], abs=1e-4)
    t_tied = np.round(t) + 1
    ph = PHReg(t_tied, x[:, None], status=e, ties="breslow").fit()
    assert _fit_cox_coefficient(x, t_tied, e) == pytest.approx(ph.params[0], abs=1e-4)


def test_multitask_loss_masks_missing_labels():
    specs = parse_targets("r:binary,p:multiclass,v:regression")
    specs[1].classes = ["a", "b", "c"]
    logits = {"r": torch.zeros(3, 1, requires_grad=True), "p": torch.zeros(3, 3), "v": torch.zeros(3, 1)}
    ys = {"r": torch.tensor([1.0, float("nan"), 0.0]), "p": torch.tensor([float("nan")] * 3),
          "v": torch.tensor([1.0, 2.0, float("nan")])}
    loss, parts = multitask_loss(specs, logits, ys, {})
    assert set(parts) == {"r", "v"}  # p has no label in the batch: no loss, no NaN
    assert parts["r"] == pytest.approx(np.log(2)) and parts["v"] == pytest.approx(2.5)
    loss.backward()
    assert logits["r"].grad[1].abs().sum() == 0  # the unlabelled slide gets no gradient


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, psutil, torch
    from wsi_pipeline.mil.heads import create_head
    torch.set_num_threads(2)
    n, d = 100_000, 384
    x = torch.randn(n, d)
    xs, ys = np.meshgrid(np.arange(400), np.arange(250))
    coords = torch.as_tensor(np.stack([xs.ravel(), ys.ravel()], 1) * 224)
    out = {}
    for name in sys.argv[1:]:
        head = create_head(name, d, {"response": 1, "phen": 3, "til": 1, "os": 1}).eval()
        with torch.no_grad():
            head(x[:64], coords=coords[:64])
            before = psutil.Process().memory_info().rss
            res = head(x, coords=coords)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        assert res.instance_scores["phen"].shape == (n, 3)
        # peak-so-far minus current RSS before the call bounds this forward's extra memory from above
        out[name] = (peak - before) / 2**20
        del res
    print(json.dumps(out))
""")


def test_100k_bag_forward_within_2gb():
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, "meanpool", "chowder", "abmil", "transmil"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    extra_mb = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(extra_mb) == {"meanpool", "chowder", "abmil", "transmil"}
    for name, mb in extra_mb.items():
        assert mb < 2048, f"{name}: {mb:.0f} MB above the input for a 100k × 384 bag"


@pytest.mark.parametrize("name", HEADS)
def test_context_interaction_encoder(name):
    torch.manual_seed(0)
    head = create_head(name, 48, TASKS, hidden=32, encoder="interact", context_dim=32)
    x, coords = _bag(25, 48)
    out = head(x, coords=coords)
    assert out.instance_scores["phen"].shape == (25, 3)
    sum(v.sum() for v in out.logits.values()).backward()
    assert head.encoder.context.weight.grad is not None
    with pytest.raises(ValueError, match="context_dim"):
        create_head(name, 48, TASKS, encoder="interact", context_dim=0)


def test_feature_standardisation_per_block():
    head = create_head("meanpool", 6, {"r": 1}, hidden=8, norm_dim=3)
    head.set_feature_stats(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 2.0]))
    x = torch.tensor([[1.0, 2.0, 5.0, 3.0, 2.0, 3.0], [3.0, 0.0, 3.0, 0.0, 0.0, 0.0]])
    z = head.normalize(x)
    torch.testing.assert_close(z[0], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(z[1], torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0]))  # empty context stays 0
    state = head.state_dict()
    assert "feat_mean" in state and "feat_std" in state  # saved with the weights
    with pytest.raises(ValueError, match="multiple"):
        create_head("meanpool", 7, {"r": 1}, norm_dim=3)


def test_weights_without_standardisation_buffers_load_as_identity(tmp_path):
    """Models saved before feat_mean/feat_std existed (e.g. models/wsip-demo-mil) still load and predict."""
    from safetensors.torch import save_file

    from wsi_pipeline.errors import WeightsError
    from wsi_pipeline.mil.model_io import load_weights

    torch.manual_seed(0)
    old = create_head("abmil", 12, TASKS, hidden=8)
    state = {k: v.clone() for k, v in old.state_dict().items() if k not in ("feat_mean", "feat_std")}
    save_file(state, str(tmp_path / "old.safetensors"))
    new = create_head("abmil", 12, TASKS, hidden=8)
    load_weights(tmp_path / "old.safetensors", new)
    torch.testing.assert_close(new.feat_mean, torch.zeros(12))
    torch.testing.assert_close(new.feat_std, torch.ones(12))
    x, _ = _bag(7, 12)
    old.eval()
    new.eval()
    torch.testing.assert_close(new(x).logits["response"], old(x).logits["response"])
    del state["att_w.weight"]  # a missing learned weight is still an error
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(WeightsError, match=r"broken\.safetensors"):
        load_weights(tmp_path / "broken.safetensors", create_head("abmil", 12, TASKS, hidden=8))
