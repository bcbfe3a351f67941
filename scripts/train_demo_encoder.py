"""Train the shipped demo encoder ``models/wsip-dino-r10`` (DINO, timm resnet10t) on the TRAIN sources of
Kather 2016 (``../shared/data/kather16``; source split seed 0, 30 % of each class's tiles held out by
source image — the split `wsi eval-encoder` uses), then evaluate it on the held-out sources.

    nice python scripts/train_demo_encoder.py                 # train (resumes from runs/ssl-demo), then eval
    nice python scripts/train_demo_encoder.py --eval-only

It is the same as::

    wsi ssl-train --data ../shared/data/kather16 --subset train --mpp 0.495 --out models/wsip-dino-r10 \\
        --checkpoint-dir runs/ssl-demo --arch resnet10t --steps 1200 --batch-size 32 --global-size 80 \\
        --local-size 40 --n-local 4 --lr 6e-3 --momentum-teacher 0.99 --teacher-temp 0.06 --koleo 0.1 \\
        --threads 1 --checkpoint-every 100 --resume
    wsi eval-encoder --encoder models/wsip-dino-r10 --data ../shared/data/kather16 --mpp 0.495 \\
        --json models/wsip-dino-r10/eval_kather16.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "kather16"
OUT = REPO / "models" / "wsip-dino-r10"
CKPT = REPO / "runs" / "ssl-demo"

DESCRIPTION = (
    "Demo tile encoder: timm resnet10t trained from scratch with DINO on the training source images of "
    "Kather et al. 2016 (CRC H&E tiles, CC BY 4.0) at 0.5 µm/px. For demos and tests; not for clinical use."
)


def train_config(steps: int = 1000):
    from wsi_pipeline.ssl.augment import AugmentConfig
    from wsi_pipeline.ssl.config import SSLConfig

    return SSLConfig(
        data=str(DATA), out=str(OUT), name="wsip-dino-r10", arch="resnet10t", steps=steps, batch_size=32,
        augment=AugmentConfig(global_size=80, local_size=40, n_local=4, mpp=0.5, hed_sigma=0.1, hed_bias=0.02,
                              brightness=0.25, contrast=0.25, saturation=0.25, hue=0.04, gray_p=0.1),
        data_mpp=0.495, subset="train", split_seed=0, test_fraction=0.3,
        lr=6e-3, momentum_teacher=0.99, teacher_temp=0.05, koleo=0.1, out_dim=1024,
        threads=1, checkpoint_every=100, checkpoint_dir=str(CKPT), resume=True, seed=0,
        licence="CC-BY-4.0 (weights derived from Kather et al. 2016 data; cite it)",
        description=DESCRIPTION,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--stop-at-step", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from wsi_pipeline.ssl.trainer import ssl_train

    if not args.eval_only:
        cfg = train_config(args.steps)
        cfg.stop_at_step = args.stop_at_step
        res = ssl_train(cfg)
        print(f"trained {res.steps_done} steps in {res.seconds / 60:.1f} min; encoder in {res.out_dir}")
        if not res.completed:
            return 0
    from wsi_pipeline.ssl.config import EvalConfig
    from wsi_pipeline.ssl.evaluate import evaluate_encoder, format_table

    report = evaluate_encoder(EvalConfig(encoder=str(OUT), data=str(DATA), data_mpp=0.495, seed=0,
                                         device="cpu", json_path=str(OUT / "eval_kather16.json")))
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
