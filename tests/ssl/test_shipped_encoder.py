"""The shipped demo encoder (issue 6): small, the default, stain-standardised, its card's figures on record,
and better than its own architecture at random initialisation on held-out source images."""

from __future__ import annotations

import json
from pathlib import Path

from wsi_pipeline.formats import api as F

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "models" / "wsip-dino-r10"


def test_shipped_encoder_is_the_default_small_and_recorded() -> None:
    from wsi_pipeline.encoders.registry import create_encoder, default_encoder_name

    assert default_encoder_name() == "wsip-dino-r10"
    assert (FOLDER / "model.safetensors").stat().st_size <= 25e6
    meta = json.loads((FOLDER / "encoder.json").read_text())
    assert meta["mpp"] == 0.5 and meta["stain_norm"]["method"] == "reinhard-lab"
    assert "CC-BY-4.0" in meta["licence"] and "Kather" in (FOLDER / "README.md").read_text()
    enc = create_encoder("wsip-dino-r10")
    assert enc.stain is not None and enc.weights_sha256 == F.file_sha256(FOLDER / "model.safetensors")
    report = json.loads((FOLDER / "eval_kather16.json").read_text())
    assert report["stain_norm"] == meta["stain_norm"] and report["n_test"] > 1000
    assert report["knn_balanced_accuracy"] > report["random_init_knn_balanced_accuracy"] + 0.05
    assert f"{report['knn_balanced_accuracy']:.3f}" in (FOLDER / "README.md").read_text()
    # the shipped MIL model was trained on this encoder's features
    mil = json.loads((REPO / "models" / "wsip-demo-mil" / "model.json").read_text())
    assert mil["encoder"]["weights_sha256"] == enc.weights_sha256


def test_shipped_encoder_beats_random_init_on_held_out_sources(kather_dir: Path) -> None:
    """A small, fixed subsample of the eval-encoder protocol (the full run is recorded in eval_kather16.json)."""
    from wsi_pipeline.ssl.config import EvalConfig
    from wsi_pipeline.ssl.evaluate import run_eval_encoder

    r = run_eval_encoder(EvalConfig(encoder="wsip-dino-r10", data=str(kather_dir), data_mpp=0.495, seed=0,
                                    device="cpu", max_per_class=40, colour_baseline=False))
    assert r["split"]["mode_per_class"]["01_TUMOR"] == "source"
    assert r["knn_balanced_accuracy"] > r["random_init_knn_balanced_accuracy"] + 0.03, r
