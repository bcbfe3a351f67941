"""Train the shipped demo encoder ``models/wsip-dino-r10`` (DINO, timm resnet10t) on the TRAIN sources of
Kather 2016 (``../shared/data/kather16``; source split seed 0, 30 % of each class's tiles held out by
source image — the split `wsi eval-encoder` uses), then evaluate it on the held-out sources.

    nice python scripts/train_demo_encoder.py                 # train (resumes from runs/ssl-demo), then eval
    nice python scripts/train_demo_encoder.py --eval-only

It is the same as::

    wsi ssl-train --data ../shared/data/kather16 --subset train --split-seed 0 --test-fraction 0.3 --mpp 0.495 \\
        --out models/wsip-dino-r10 --checkpoint-dir runs/ssl-demo --arch resnet10t --steps 1000 --batch-size 32 \\
        --global-size 80 --local-size 40 --n-local 4 --hed-sigma 0.1 --hed-bias 0.02 --color-jitter 0.25 \\
        --hue 0.04 --gray-p 0.1 --lr 6e-3 --momentum-teacher 0.99 --teacher-temp 0.05 --out-dim 1024 --koleo 0.1 \\
        --threads 1 --checkpoint-every 100 --resume --licence "CC-BY-4.0 (...)" --description "..."
    wsi eval-encoder --encoder models/wsip-dino-r10 --data ../shared/data/kather16 --mpp 0.495 \\
        --json models/wsip-dino-r10/eval_kather16.json

(`--threads 1`: on a shared 2-core machine one thread per process was 3-10x faster than two.)
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


CARD = """# {name}

A small **demo / test** tile encoder for wsi-pipeline: timm `{arch}` ({params:.1f} M parameters,
{embed_dim}-d pooled features, {size_mb:.1f} MB fp16 safetensors) trained **from scratch** with DINO
self-distillation (`wsi ssl-train`) on H&E tiles of colorectal cancer. It is the default `--encoder` of
`wsi extract` so that an out-of-the-box run works on a laptop CPU without downloading gated weights.

**Intended use:** demos, tutorials, tests and CI of wsi-pipeline. **Not for clinical use**, not a
substitute for a foundation model (UNI, Virchow, Phikon ...): it saw {n_train} small tiles of one
dataset and a few CPU-minutes of training.

## Input
* RGB tiles at **{mpp} µm/px** (20x); normalise with mean {mean} / std {std} (ImageNet values).
* `input_size` {input_size}: the pipeline's default tile (224 px at 0.5 µm/px). The network is a CNN with
  global average pooling, so other tile sizes *at the same µm/px* work too (it was trained on
  {global_size}-px and {local_size}-px crops); never feed it tiles at another scale.
* Output: {embed_dim}-d feature vector per tile (teacher backbone, `num_classes=0`).

## Training data and attribution
Kather JN, Weis CA, Bianconi F, Melchers SM, Schad LR, Gaiser T, Marx A, Zöllner FG. *Multi-class
texture analysis in colorectal cancer histology.* Sci Rep 6:27988 (2016), doi:10.1038/srep27988;
data: doi:10.5281/zenodo.53169. Licence **CC BY 4.0** — these weights are derived from that data;
cite it when you use them.

Only the **training side** of the deterministic source split (seed 0, ≈30 % of each class's tiles held
out by source image; 07_ADIPOSE and 08_EMPTY, which have very few source images, split by tile) was
used: {n_train} of 3,627 tiles (150 px at 0.495 µm/px). Labels were not used for training. The held-out
tiles are the evaluation set below.

## Recipe
`scripts/train_demo_encoder.py` (resumable; evaluates at the end). The same as:

```
wsi ssl-train --data ../shared/data/kather16 --subset train --split-seed 0 --test-fraction 0.3 --mpp 0.495 \\
    --out models/{name} --checkpoint-dir runs/ssl-demo --arch {arch} --steps {steps} --batch-size {batch} \\
    --global-size {global_size} --local-size {local_size} --n-local {n_local} --hed-sigma {hed_sigma} \\
    --hed-bias {hed_bias} --color-jitter {cj} --hue {hue} --gray-p {gray_p} --lr {lr} \\
    --momentum-teacher {mom} --teacher-temp {ttemp} --out-dim {out_dim} --koleo {koleo} --threads 1 \\
    --checkpoint-every 100 --resume
wsi eval-encoder --encoder models/{name} --data ../shared/data/kather16 --mpp 0.495 --json eval.json
```

DINO (student/teacher EMA {mom} → 1, centring, teacher temperature {ttemp_text}), multi-crop
2 × {global_size} px + {n_local} × {local_size} px at {mpp} µm/px (zoom jitter 0.8–1.25), dihedral flips/rotations,
HED stain jitter, colour jitter, hue, grayscale, blur, solarisation; KoLeo {koleo}; AdamW, lr {lr} per 256
images (cosine, warm-up 10 %), weight decay 0.04 → 0.4, gradient clipping 3, bf16 autocast.

## Compute
{steps} steps × {batch} images ({epochs:.1f} epochs of the training tiles) in **{minutes:.0f} min** wall time on one
thread of a shared 2-core Intel Xeon (AMX bf16), niced, next to ~6 other jobs. No GPU. Before it, about
1 h of the same machine went into three aborted pilots (mild / strong colour augmentation, 4096
prototypes, 112 / 96 / 80-px crops: k-NN stalled near random init). A later run with stronger stain
augmentation (`--hed-sigma 0.2 --hed-bias 0.03 --color-jitter 0.3 --hue 0.05 --gray-p 0.3
--teacher-temp 0.04`, 1000 steps, 34 min) scored k-NN 0.742 / linear 0.760 — within noise of this one; it
was not shipped because the demo tissue classifier and MIL model were already trained on these weights.

## Evaluation (`wsi eval-encoder`, held-out source images)
{n_eval_train} train / {n_eval_test} test tiles, 8 classes, balanced accuracy; k-NN: k = 20, cosine similarity,
weighted vote exp(cos/0.07); linear: logistic regression on standardised features. Tiles rescaled
0.495 → 0.5 µm/px (150 → 148 px) and fed at that size.

{table}

k-NN recall per class: {per_class}
{tile_split}
The source split is hard: a few held-out source images look unlike any training source (e.g. a
lymphocyte-rich source predicted as tumour), and the colour histogram alone reaches similar figures.
The target of issue 6 (k-NN ≥ 0.85 on held-out sources, clear gain over random init) is **not met**
with this CPU budget: the gain over random init is small for k-NN and absent for the linear probe. A
longer run (e.g. `torchrun --nproc_per_node=8 -m wsi_pipeline ssl-train ... --steps 20000` on GPUs, or on
your own slides via a RUN folder) is the way to a useful encoder.
"""


def write_model_card(out: Path, report: dict) -> None:
    import json

    from wsi_pipeline.ssl.evaluate import format_table

    meta = json.loads((out / "encoder.json").read_text())
    tr = meta["training"]
    cfg = tr["config"]
    aug = cfg["augment"]
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    n_train = int(tr["data"].split(",")[-1].split()[0])
    table = "\n".join(format_table(report).splitlines()[2:])
    tile_split = ""
    ts_path = out / "eval_kather16_tile_split.json"
    if ts_path.exists():
        ts = json.loads(ts_path.read_text())
        tile_split = (
            f"\nWith a split **by tile** instead (`--min-sources 100000`: tiles of one source on both sides, and "
            f"some test tiles were seen, unlabelled, in pretraining — optimistic): k-NN {ts['knn_balanced_accuracy']:.3f} vs random init "
            f"{ts['random_init_knn_balanced_accuracy']:.3f}, linear {ts['linear_balanced_accuracy']:.3f} vs "
            f"{ts['random_init_linear_balanced_accuracy']:.3f}, colour histogram "
            f"{ts['colour_histogram_knn_balanced_accuracy']:.3f} / {ts['colour_histogram_linear_balanced_accuracy']:.3f}"
            " — the encoder learned tissue texture, but much of it does not transfer to unseen source images "
            "(stain, scanner, patient).\n"
        )
    ttemp_text = (f"{cfg['teacher_temp']} (constant)" if cfg["teacher_temp_start"] == cfg["teacher_temp"]
                  else f"{cfg['teacher_temp_start']} → {cfg['teacher_temp']}")
    text = CARD.format(
        name=meta["name"], arch=meta["arch"], params=size_mb / 2.0, embed_dim=meta["embed_dim"], size_mb=size_mb,
        n_train=n_train, mpp=meta["mpp"], mean=meta["mean"], std=meta["std"], input_size=meta["input_size"],
        global_size=aug["global_size"], local_size=aug["local_size"], n_local=aug["n_local"],
        hed_sigma=aug["hed_sigma"], hed_bias=aug["hed_bias"], cj=aug["brightness"], hue=aug["hue"],
        gray_p=aug["gray_p"], lr=cfg["lr"], mom=cfg["momentum_teacher"], ttemp=cfg["teacher_temp"],
        out_dim=cfg["out_dim"], koleo=cfg["koleo"], steps=cfg["steps"], batch=cfg["batch_size"],
        epochs=cfg["steps"] * cfg["batch_size"] / n_train, minutes=tr["seconds"] / 60,
        n_eval_train=report["n_train"], n_eval_test=report["n_test"], table=table,
        per_class=", ".join(f"{k} {v:.2f}" for k, v in report["knn_per_class_recall"].items()),
        tile_split=tile_split, ttemp_text=ttemp_text,
    )
    (out / "README.md").write_text(text)


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
    write_model_card(OUT, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
