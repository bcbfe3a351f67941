"""Train the shipped demo encoder ``models/wsip-dino-r10`` (DINO, timm resnet10t, per-tile Reinhard stain
standardisation) on the TRAIN sources of Kather 2016 (``../shared/data/kather16``; source split seed 0, 30 %
of each class's tiles held out by source image — the split `wsi eval-encoder` uses), then evaluate it on
the held-out sources and write the model card.

    nice python scripts/train_demo_encoder.py                 # train (resumes from runs/ssl-demo-v2), eval, card
    nice python scripts/train_demo_encoder.py --eval-only

Two `wsi ssl-train` stages, the second starting from the first's teacher (``--init-from``)::

    wsi ssl-train --data ../shared/data/kather16 --subset train --split-seed 0 --test-fraction 0.3 --mpp 0.495 \\
        --out runs/ssl-demo-v2/stage1 --checkpoint-dir runs/ssl-demo-v2/stage1-ckpt --name wsip-dino-r10 \\
        --arch resnet10t --steps 1000 --batch-size 32 --global-size 80 --local-size 40 --n-local 4 \\
        --hed-sigma 0.1 --hed-bias 0.02 --color-jitter 0.25 --hue 0.04 --gray-p 0.1 --lr 6e-3 \\
        --momentum-teacher 0.99 --teacher-temp 0.05 --out-dim 1024 --koleo 0.1 --stain-norm reinhard-lab \\
        --threads 1 --checkpoint-every 100 --resume
    wsi ssl-train ... --out models/wsip-dino-r10 --checkpoint-dir runs/ssl-demo-v2/stage2-ckpt \\
        --init-from runs/ssl-demo-v2/stage1 (stage-2 settings: see STAGE2 below and the model card)
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
CKPT = REPO / "runs" / "ssl-demo-v2"

DESCRIPTION = (
    "Demo tile encoder: timm resnet10t trained from scratch with DINO, behind a per-tile Reinhard (L*a*b*) stain "
    "standardisation, on the training source images of Kather et al. 2016 (CRC H&E tiles, CC BY 4.0) at "
    "0.5 µm/px. For demos and tests; not for clinical use."
)
LICENCE = "CC-BY-4.0 (weights derived from Kather et al. 2016 data; cite it)"
# stage 1 from scratch; each later stage continues from the previous one's teacher (keys override STAGE1's)
STAGE1 = dict(steps=1000, global_size=80, local_size=40, n_local=4, zoom_min=0.8, zoom_max=1.25, lr=6e-3,
              warmup_steps=-1, momentum_teacher=0.99, teacher_temp_start=0.04, out_dim=1024, koleo=0.1)
STAGES = (
    STAGE1,
    {**STAGE1, "steps": 500, "global_size": 128, "local_size": 48, "lr": 3e-3},
)


def stage_out(stage: int) -> Path:
    """Where stage ``stage`` (1-based) exports its teacher: the last one is the shipped encoder."""
    return OUT if stage == len(STAGES) else CKPT / f"stage{stage}"


def stage_config(stage: int):
    from wsi_pipeline.ssl.augment import AugmentConfig
    from wsi_pipeline.ssl.config import SSLConfig

    p = STAGES[stage - 1]
    return SSLConfig(
        data=str(DATA), out=str(stage_out(stage)), name="wsip-dino-r10", arch="resnet10t",
        steps=p["steps"], batch_size=32,
        augment=AugmentConfig(global_size=p["global_size"], local_size=p["local_size"], n_local=p["n_local"],
                              mpp=0.5, zoom_min=p["zoom_min"], zoom_max=p["zoom_max"], hed_sigma=0.1,
                              hed_bias=0.02, brightness=0.25, contrast=0.25, saturation=0.25, hue=0.04, gray_p=0.1),
        data_mpp=0.495, subset="train", split_seed=0, test_fraction=0.3,
        lr=p["lr"], warmup_steps=p["warmup_steps"], momentum_teacher=p["momentum_teacher"],
        teacher_temp_start=p["teacher_temp_start"], teacher_temp=0.05, koleo=p["koleo"], out_dim=p["out_dim"],
        stain_norm="reinhard-lab", init_from=str(stage_out(stage - 1)) if stage > 1 else "",
        threads=1, checkpoint_every=100, checkpoint_dir=str(CKPT / f"stage{stage}-ckpt"), resume=True, seed=0,
        licence=LICENCE, description=DESCRIPTION,
    )


CARD = """# {name}

A small **demo / test** tile encoder for wsi-pipeline: timm `{arch}` ({params:.1f} M parameters,
{embed_dim}-d pooled features, {size_mb:.1f} MB fp16 safetensors) trained **from scratch** with DINO
self-distillation (`wsi ssl-train`) on H&E tiles of colorectal cancer, behind a built-in **per-tile stain
standardisation**. It is the default `--encoder` of `wsi extract`, so that an out-of-the-box run works on a
laptop CPU without downloading gated weights.

**Intended use:** demos, tutorials, tests and CI of wsi-pipeline. **Not for clinical use**, not a
substitute for a foundation model (UNI, Virchow, Phikon ...): it saw {n_train} small tiles of one
dataset and under an hour of CPU training.

## Input
* RGB tiles at **{mpp} µm/px** (20x); normalise with mean {mean} / std {std} (ImageNet values).
* **Stain standardisation (part of the encoder):** each tile's CIE L\\*a\\*b\\* per-channel mean and standard
  deviation are mapped onto the training tiles' average (Reinhard et al. 2001): target mean {st_mean}, target
  std {st_std}, gain capped at {st_gain}× so blank tiles are not amplified into noise. It is stored as
  `stain_norm` in `encoder.json`, and wsi-pipeline applies it inside the encoder's forward pass (extraction,
  evaluation, tissue classifier), so features are never computed without it. Using the weights outside
  wsi-pipeline? Apply the same transform first (`wsi_pipeline.encoders.stain.ReinhardStandardize`).
* `input_size` {input_size}: the pipeline's default tile (224 px at 0.5 µm/px). The network is a CNN with
  global average pooling, so other tile sizes *at the same µm/px* work too (it was trained on crops of
  {crop_sizes} px); never feed it tiles at another scale.
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
`scripts/train_demo_encoder.py` (resumable; evaluates and writes this card at the end): {n_stages} `wsi ssl-train`
stages, each after the first continuing from the previous one's teacher (`--init-from`).

```
wsi ssl-train --data ../shared/data/kather16 --subset train --split-seed 0 --test-fraction 0.3 --mpp 0.495 \\
    --name {name} --arch {arch} --batch-size {batch} --hed-sigma {hed_sigma} --hed-bias {hed_bias} \\
    --color-jitter {cj} --hue {hue} --gray-p {gray_p} --teacher-temp {ttemp} --stain-norm reinhard-lab \\
    --threads 1 --checkpoint-every 100 --resume  <+ the stage's options below>
{stage_lines}
wsi eval-encoder --encoder models/{name} --data ../shared/data/kather16 --mpp 0.495 --json eval.json
```

DINO (student/teacher EMA → 1, centring, teacher temperature → {ttemp}), multi-crop 2 global + several local
crops at {mpp} µm/px with a zoom jitter, dihedral flips/rotations, HED stain jitter, colour jitter, hue,
grayscale, blur, solarisation — all *before* the stain standardisation, which the student and the teacher
both apply; KoLeo {koleo}; AdamW, lr per 256 images (cosine after the warm-up), weight decay 0.04 → 0.4,
gradient clipping 3, bf16 autocast. The stain target was fitted on 1,024 training tiles (seeded sample),
identically in every stage.

## Compute
{compute} — one thread each of a 2-core Intel Xeon (AMX bf16), niced, next to other jobs. No GPU.

## Evaluation (`wsi eval-encoder`, held-out source images)
{n_eval_train} train / {n_eval_test} test tiles, 8 classes, balanced accuracy; k-NN: k = 20, cosine similarity,
weighted vote exp(cos/0.07); linear: logistic regression on standardised features. Tiles rescaled
0.495 → 0.5 µm/px (150 → 148 px) and fed at that size. The random-init row is the same architecture with the
same stain standardisation, so the gain is what DINO learned.

{table}

k-NN recall per class: {per_class}
{tile_split}
{target}

## How we got here (same protocol, held-out sources, k-NN / linear)
| encoder | k-NN | linear |
|---|---|---|
| v1 (shipped before): DINO 1000 steps on raw colour | 0.736 | 0.744 |
| v1, 100 epochs on one H200 (best of a 3-variant sweep) | 0.755 | 0.809 |
| v1 + Reinhard standardisation at evaluation only | 0.743–0.787 (depends on the target) | 0.82–0.84 |
| resnet10t random init, raw colour / with stain standardisation | 0.713 / 0.728 | 0.780 / 0.779 |
| this recipe, stage 1 alone (1000 steps from scratch) | 0.826 | 0.842 |
| stage 1 started from v1's weights instead of from scratch | 0.824 | 0.836 |
| stage 2 variant: 80/40-px crops, KoLeo 0.3, 800 steps | 0.814 | 0.850 |
| + stage 3, 500 steps at lr 2e-3 | 0.835 | 0.851 |
| + stage 3, 1500 steps, 6 local crops, EMA 0.996 | 0.837 (at step 500) | 0.854 |
| + stage 3, 1500 steps, 96-px globals, zoom 0.7–1.4, 6 local crops, 4096 prototypes | 0.832 | 0.865 |
| from scratch, this recipe with 2× the stage-1 steps (2000 + 500) | 0.830 | 0.861 |
| from scratch, 96-px globals, zoom 0.7–1.4, 6 local crops, 4096 prototypes (1500 steps) + 500 at 128 px | 0.827 | 0.861 |

The stage-2 settings were chosen between the two stage-2 variants by these held-out figures, so the shipped
figures carry a small selection bias. The later stage-3 runs were judged on an *inner* validation split of the training sources only (seed 1,
30 % of the training sources; k-NN fitted on the rest; `wsi eval-encoder ... --inner-split-seed 1`): the 96-px variant raised it from 0.793 to 0.816 and
the linear probe from 0.855 to 0.865, but the held-out k-NN did not move (0.832). They were not shipped:
the held-out intervals above (±0.06) are far wider than any of these differences, and most remaining errors
sit in two ambiguous held-out sources (a complex-stroma image of loose oedematous stroma read as stroma /
debris, a debris image of fibrous material read as stroma), which no run fixed.
The two from-scratch runs at the end (one CPU thread each, 50 and 51 min, run side by side) were judged the same
way: inner validation 0.809 and 0.816 (shipped: 0.793), held-out k-NN 0.830 and 0.827 — again better on the
inner split and no better on the held-out sources, so the shipped encoder stayed.
Also measured on the shipped encoder, none of them part of it: PCA-whitening the features (fitted on the
training tiles) 0.834–0.841 k-NN depending on the kept components; averaging the 8 dihedral views of each
tile 0.827 k-NN (linear 0.889); feeding the tile at 1.25× or 0.75× and concatenating 0.838 / 0.826;
concatenating the features of two independently continued runs ≤ 0.836.

Stain shift between source images was the obstacle: DINO on raw colour learned texture that did not
transfer to unseen sources (by-tile split 0.92, by-source split 0.74), whatever the budget. Standardising
each tile's colour inside the encoder, during training and use alike, is what moved the held-out figures.
"""


def _stage_training(stage: int) -> dict:
    """The ``training`` block of a stage's exported encoder.json ({} when that stage has not run)."""
    from wsi_pipeline.formats.cards import read_encoder_json

    path = stage_out(stage) / "encoder.json"
    return read_encoder_json(path)["training"] if path.exists() else {}


def _stage_line(stage: int, tr: dict, n_train: int) -> tuple[str, str]:
    """(command-line options, compute sentence) of one stage from what it recorded."""
    cfg = tr.get("config", {})
    aug = cfg.get("augment", {})
    out = stage_out(stage).relative_to(REPO)
    init = f" --init-from {stage_out(stage - 1).relative_to(REPO)}" if stage > 1 else ""
    opts = (f"# stage {stage}: --out {out}{init} --steps {cfg.get('steps')} --global-size {aug.get('global_size')} "
            f"--local-size {aug.get('local_size')} --n-local {aug.get('n_local')} --zoom-min {aug.get('zoom_min')} "
            f"--zoom-max {aug.get('zoom_max')} --lr {cfg.get('lr')} --warmup-steps {cfg.get('warmup_steps')} "
            f"--momentum-teacher {cfg.get('momentum_teacher')} --teacher-temp-start {cfg.get('teacher_temp_start')} "
            f"--out-dim {cfg.get('out_dim')} --koleo {cfg.get('koleo')}")
    epochs = cfg.get("steps", 0) * cfg.get("batch_size", 0) / max(n_train, 1)
    compute = f"stage {stage}: {cfg.get('steps')} steps ({epochs:.1f} epochs) in {tr.get('seconds', 0) / 60:.0f} min"
    return opts, compute


def write_model_card(out: Path, report: dict) -> None:
    import json

    from wsi_pipeline.formats.cards import read_encoder_json
    from wsi_pipeline.ssl.evaluate import format_table

    meta = read_encoder_json(out)
    tr = meta["training"]
    cfg = tr["config"]
    aug = cfg["augment"]
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    n_train = int(tr["data"].split(",")[-1].split()[0])
    recorded = [_stage_training(i) for i in range(1, len(STAGES) + 1)]
    stages = [_stage_line(i, t, n_train) for i, t in enumerate(recorded, 1)]
    crops = {v for t in recorded for k, v in t.get("config", {}).get("augment", {}).items()
             if k in ("global_size", "local_size")}
    table = "\n".join(format_table(report).splitlines()[2:])
    tile_split = ""
    ts_path = out / "eval_kather16_tile_split.json"
    if ts_path.exists():
        ts = json.loads(ts_path.read_text())
        tile_split = (
            f"\nWith a split **by tile** instead (`--min-sources 100000`: tiles of one source on both sides, and "
            f"some test tiles were seen, unlabelled, in pretraining — optimistic): k-NN {ts['knn_balanced_accuracy']:.3f} "
            f"vs random init {ts['random_init_knn_balanced_accuracy']:.3f}, linear {ts['linear_balanced_accuracy']:.3f} vs "
            f"{ts['random_init_linear_balanced_accuracy']:.3f}, colour histogram "
            f"{ts['colour_histogram_knn_balanced_accuracy']:.3f} / {ts['colour_histogram_linear_balanced_accuracy']:.3f}.\n"
        )
    knn, rnd = report["knn_balanced_accuracy"], report["random_init_knn_balanced_accuracy"]
    if knn >= 0.85:
        target = (f"Issue 6's target (k-NN ≥ 0.85 on held-out sources) is **met**: {knn:.3f}, "
                  f"+{knn - rnd:.3f} over random init.")
    else:
        target = (f"Issue 6's target (k-NN ≥ 0.85 on held-out sources) is **not met**: {knn:.3f} "
                  f"(+{knn - rnd:.3f} over random init). Most remaining errors are stroma / complex stroma / debris "
                  "confusions and a few lymphocyte-rich sources read as complex stroma; a longer run on more varied "
                  "tissue (`wsi ssl-train RUN ...` on your own slides, several GPUs) is the way further.")
    st = meta["stain_norm"]
    text = CARD.format(
        name=meta["name"], arch=meta["arch"], params=size_mb / 2.0, embed_dim=meta["embed_dim"], size_mb=size_mb,
        n_train=n_train, mpp=meta["mpp"], mean=meta["mean"], std=meta["std"], input_size=meta["input_size"],
        st_mean=st["target_mean"], st_std=st["target_std"], st_gain=st["max_gain"],
        crop_sizes=", ".join(str(v) for v in sorted(crops)), n_stages=len(STAGES),
        hed_sigma=aug["hed_sigma"], hed_bias=aug["hed_bias"], cj=aug["brightness"], hue=aug["hue"],
        gray_p=aug["gray_p"], ttemp=cfg["teacher_temp"], koleo=cfg["koleo"], batch=cfg["batch_size"],
        stage_lines="\n".join(o for o, _ in stages), compute="; ".join(c for _, c in stages),
        n_eval_train=report["n_train"], n_eval_test=report["n_test"], table=table,
        per_class=", ".join(f"{k} {v:.2f}" for k, v in report["knn_per_class_recall"].items()),
        tile_split=tile_split, target=target,
    )
    (out / "README.md").write_text(text)


def evaluate(min_sources: int, json_name: str) -> dict:
    from wsi_pipeline.ssl.config import EvalConfig
    from wsi_pipeline.ssl.evaluate import run_eval_encoder

    return run_eval_encoder(EvalConfig(encoder=str(OUT), data=str(DATA), data_mpp=0.495, seed=0, device="cpu",
                                       min_sources=min_sources, json_path=str(OUT / json_name)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--card-only", action="store_true", help="rewrite README.md from the saved evaluations")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import json

    from wsi_pipeline.ssl.evaluate import format_table
    from wsi_pipeline.ssl.trainer import run_ssl_train

    if args.card_only:
        write_model_card(OUT, json.loads((OUT / "eval_kather16.json").read_text()))
        return 0
    if not args.eval_only:
        for stage in range(1, len(STAGES) + 1):
            res = run_ssl_train(stage_config(stage))
            print(f"stage {stage}: {res.steps_done} steps in {res.seconds / 60:.1f} min; encoder in {res.out_dir}")
    report = evaluate(8, "eval_kather16.json")
    print(format_table(report))
    evaluate(100000, "eval_kather16_tile_split.json")
    write_model_card(OUT, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
