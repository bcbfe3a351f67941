"""Train one candidate demo encoder (DINO) within a wall-clock budget, then evaluate it; for short GPU leases.

The budget sets the number of steps: a short calibration run measures images/s, then the real run is planned
so that its cosine schedules (learning rate, weight decay, teacher momentum) complete inside the budget.
Selection between variants must use a *validation* split: pass ``--data`` = a folder holding only the
training sources (e.g. the train side of the Kather source split); `wsi eval-encoder` then splits that folder
by source again (seed 0), and the real held-out sources stay untouched for the final evaluation.

    python scripts/ssl_sweep.py --variant r10-strong --data .gpu/kather_train --out runs/sweep --budget-s 330
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    # strong stain augmentation: the held-out-source gap of the CPU runs was stain/scanner shift
    "r10-strong": {"arch": "resnet10t", "aug": {"hed_sigma": 0.25, "hed_bias": 0.04, "cj": 0.3, "hue": 0.05,
                                                "gray_p": 0.3}},
    "r18-strong": {"arch": "resnet18", "aug": {"hed_sigma": 0.25, "hed_bias": 0.04, "cj": 0.3, "hue": 0.05,
                                               "gray_p": 0.3}},
    "r10-xstrong": {"arch": "resnet10t", "aug": {"hed_sigma": 0.4, "hed_bias": 0.06, "cj": 0.4, "hue": 0.08,
                                                 "gray_p": 0.5}},
}


def make_config(variant: str, data: str, data_mpp: float, out: Path, steps: int, batch: int, workers: int,
                lr: float, stop_at: int = 0, stain_norm: str = "reinhard-lab") -> Any:
    from wsi_pipeline.ssl.augment import AugmentConfig
    from wsi_pipeline.ssl.config import SSLConfig

    v = VARIANTS[variant]
    a = v["aug"]
    aug = AugmentConfig(global_size=112, local_size=48, n_local=6, mpp=0.5, hed_sigma=a["hed_sigma"],
                        hed_bias=a["hed_bias"], brightness=a["cj"], contrast=a["cj"], saturation=a["cj"],
                        hue=a["hue"], gray_p=a["gray_p"])
    return SSLConfig(
        data=data, out=str(out), name=f"wsip-dino-{variant}", arch=v["arch"], steps=steps, batch_size=batch,
        augment=aug, data_mpp=data_mpp, lr=lr, momentum_teacher=0.996, teacher_temp=0.05, koleo=0.1,
        out_dim=2048, workers=workers, checkpoint_every=max(steps // 4, 1), checkpoint_dir=str(out / "ckpt"),
        stop_at_step=stop_at, seed=0, log_every=50, stain_norm=stain_norm,
        licence="CC-BY-4.0 (weights derived from Kather et al. 2016 data; cite it)",
    )


def images_per_second(log_csv: Path, batch: int, skip: int) -> float:
    """Images per second over the logged steps after the first ``skip`` (start-up and warm-up excluded)."""
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))[skip:]
    if len(rows) < 2:
        raise SystemExit(f"{log_csv}: too few calibration steps logged; raise --calibration-steps")
    return batch * (len(rows) - 1) / max(float(rows[-1]["seconds"]) - float(rows[0]["seconds"]), 1e-6)


def main(argv: list[str] | None = None) -> int:
    from wsi_pipeline.encoders.stain import REINHARD, STAIN_NORMS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    ap.add_argument("--data", required=True, help="labelled tile folder of the training sources")
    ap.add_argument("--mpp", type=float, default=0.495, help="µm/px of the tiles (kather16: 0.495)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=300.0, help="wall-clock seconds for the real run")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak AdamW lr per 256 images")
    ap.add_argument("--calibration-steps", type=int, default=30)
    ap.add_argument("--stain-norm", default=REINHARD, choices=("none", *STAIN_NORMS),
                    help="per-tile stain standardisation built into the encoder (the demo encoder's recipe)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from wsi_pipeline.ssl.config import EvalConfig
    from wsi_pipeline.ssl.evaluate import format_table, run_eval_encoder, write_report
    from wsi_pipeline.ssl.trainer import run_ssl_train

    root = a.out / a.variant
    cal = root / "calibration"
    shutil.rmtree(cal, ignore_errors=True)
    t0 = time.perf_counter()
    run_ssl_train(make_config(a.variant, a.data, a.mpp, cal, 100_000, a.batch_size, a.workers, a.lr,
                          a.calibration_steps, a.stain_norm))
    rate = images_per_second(cal / "train_log.csv", a.batch_size, skip=10)
    steps = max(50, int(a.budget_s * rate / a.batch_size))
    print(f"[{a.variant}] calibration: {rate:.0f} img/s ({time.perf_counter() - t0:.0f} s) -> {steps} steps "
          f"of {a.batch_size} images", flush=True)
    shutil.rmtree(cal, ignore_errors=True)
    enc = root / "encoder"
    t1 = time.perf_counter()
    res = run_ssl_train(make_config(a.variant, a.data, a.mpp, enc, steps, a.batch_size, a.workers, a.lr,
                                stain_norm=a.stain_norm))
    train_s = time.perf_counter() - t1
    print(f"[{a.variant}] trained {res.steps_done} steps in {train_s:.0f} s; last loss {res.losses[-1]:.4f}",
          flush=True)
    shutil.rmtree(enc / "ckpt", ignore_errors=True)
    rep = run_eval_encoder(EvalConfig(encoder=str(enc), data=a.data, data_mpp=a.mpp, seed=0))
    rep["sweep"] = {"variant": a.variant, "steps": res.steps_done, "train_seconds": round(train_s, 1),
                    "img_per_s_calibration": round(rate, 1), "validation": "source split of the training sources"}
    write_report(root / "validation.json", rep)
    print(f"[{a.variant}] validation (held-out sources *within the training sources*):\n{format_table(rep)}",
          flush=True)
    return 0 if math.isfinite(res.losses[-1]) else 1


if __name__ == "__main__":
    sys.exit(main())
