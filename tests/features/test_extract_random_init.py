"""A random-init encoder (``timm:<arch>`` without ``--weights``) is the same network in every process (issue 16):
seeded on a private RNG, recorded as ``random-init:seed<N>`` in the features and in the resume key, so that
torchrun ranks sharing a RUN folder write features of one network."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsi_pipeline.cli import build_app
from wsi_pipeline.encoders.registry import create_encoder
from wsi_pipeline.formats import api as F
from wsi_pipeline.runfolder.layout import RunLayout

REPO = Path(__file__).resolve().parents[2]
ENCODER = "timm:resnet18"
STATE_DIGEST = """
import hashlib
from wsi_pipeline.encoders.registry import create_encoder
e = create_encoder("timm:resnet18", init_seed={seed})
print(e.weights_id, hashlib.sha256(b"".join(v.numpy().tobytes() for v in e.state_dict().values())).hexdigest())
"""


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _digest_here(seed: int) -> str:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(STATE_DIGEST.format(seed=seed), {})
    return out.getvalue().strip()


def test_random_init_is_the_same_network_in_every_process() -> None:
    torch.manual_seed(1234)  # whatever the caller's RNG state
    res = subprocess.run([sys.executable, "-c", STATE_DIGEST.format(seed=0)], env=_env(), capture_output=True, text=True,
                         check=True, timeout=120)
    other_process, here = res.stdout.strip(), _digest_here(0)
    assert other_process == here and here.startswith("random-init:seed0 ")
    other_seed = _digest_here(1)
    assert other_seed.startswith("random-init:seed1 ") and other_seed.split()[1] != here.split()[1]


def test_random_init_leaves_the_callers_rng_alone() -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    enc = create_encoder(ENCODER)
    assert torch.equal(torch.get_rng_state(), state)
    assert enc.weights_id == "random-init:seed0" and enc.random_init


def _wsi(*args: object) -> str:
    res = CliRunner().invoke(build_app(), [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())


def _features(run: Path) -> dict[str, tuple[np.ndarray, str]]:
    out = {}
    for path in sorted(RunLayout(run).features_dir(ENCODER).glob("*.h5")):
        feats = F.read_features_h5(path)
        out[path.stem] = (feats.features.astype(np.float32), str(feats.attrs[F.A_WEIGHTS_SHA256]))
    return out


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory: pytest.TempPathFactory, small_svs: Path) -> Path:
    """A RUN folder with the tiles of two slides (two copies of the small blob slide)."""
    root = tmp_path_factory.mktemp("randinit")
    slides = root / "slides"
    slides.mkdir()
    for name in ("blob-a", "blob-b"):
        shutil.copy(small_svs, slides / f"{name}.svs")
    _wsi("tile", slides, "--out", root / "RUN")
    return root / "RUN"


def test_torchrun_ranks_equal_one_process_and_the_seed_is_in_the_resume_key(tmp_path: Path, tiled_run: Path) -> None:
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    for run in (single, ranks):
        shutil.copytree(tiled_run, run)
    _wsi("extract", single, "--encoder", ENCODER, "--device", "cpu", "--batch-size", "8", "--num-workers", "0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "wsi_pipeline", "extract", str(ranks), "--encoder", ENCODER, "--device", "cpu",
           "--batch-size", "8", "--num-workers", "0"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "all 2 ranks: extracted 2 slides" in " ".join((res.stdout + res.stderr).split())

    one, two = _features(single), _features(ranks)
    assert sorted(one) == sorted(two) == ["blob-a", "blob-b"]
    for sid in one:
        assert one[sid][1] == two[sid][1] == "random-init:seed0"
        np.testing.assert_allclose(two[sid][0], one[sid][0], rtol=2e-2, atol=2e-2)  # bf16 autocast

    assert "skipped (already done) 2" in _wsi("extract", single, "--encoder", ENCODER, "--device", "cpu")
    reseeded = _wsi("extract", single, "--encoder", ENCODER, "--device", "cpu", "--init-seed", "1")
    assert "extracted 2 slides" in reseeded  # another network: the resume key differs
    other = _features(single)
    assert all(other[sid][1] == "random-init:seed1" for sid in other)
    assert not np.allclose(other["blob-a"][0], one["blob-a"][0], atol=2e-2)
