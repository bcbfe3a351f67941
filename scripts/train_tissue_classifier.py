"""Train the shipped tile tissue classifier ``models/wsip-tissue-kather16`` and write its model card.

A linear head on frozen features of the demo encoder (``wsip-dino-r10``), fitted on the TRAIN source images
of Kather et al. 2016 (``../shared/data/kather16``; source split seed 0, 30 % of each class's tiles held out
by source image — the split of ``wsi eval-encoder`` and of the demo encoder's pretraining), evaluated on the
held-out sources. Tiles are embedded at the encoder's 0.5 µm/px (150 px @ 0.495 → 148 px, not stretched).

    nice python scripts/train_tissue_classifier.py
    nice python scripts/train_tissue_classifier.py --encoder timm:resnet18 --out /tmp/clf   # plumbing only

Same as ``wsi tissue-train --data ../shared/data/kather16 --mpp 0.495 --encoder wsip-dino-r10
--out models/wsip-tissue-kather16`` plus the model card. The head is fitted on the training sources only, so
``scripts/eval_tme.py`` can build its held-out mosaics from the test sources.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wsi_pipeline.tme.classifier import TissueClassifier

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "kather16"
OUT = REPO / "models" / "wsip-tissue-kather16"

CARD = """# {name}: tile tissue classifier (8 colorectal tissue classes)

A {head} head on frozen features of the demo encoder `{encoder}` ({embed_dim}-d), classifying a tile into
the 8 classes of Kather et al. 2016: {classes}.
Used by `wsi tme` for tissue-composition maps, TIL fraction and the spatial immune phenotype.

**For demonstrations and tests only. Not for clinical use.**

## Physical scale
Trained at **{mpp:g} µm/px** (the encoder's scale): each 150-px kather16 tile at 0.495 µm/px (74 µm) was
resized by 0.495/{mpp:g} only (→ {scaled} px) and fed to the convolutional encoder at that size (`fit: {fit}`),
never stretched to the nominal {input_size}-px input. `wsi tme` checks the scale: it uses
`RUN/features/{encoder}/` only when they were made at {mpp:g} µm/px (± 5 %) with the same encoder weights
(sha256 `{sha}`), and otherwise reads each tile's own extent from the slide at {mpp:g} µm/px.

## Data and split
`../shared/data/kather16`: {n_tiles} tiles, 150 × 150 px at 0.495 µm/px, 8 classes. Split by source image
(`wsi_pipeline.tiles.split.source_split`, seed {seed}, test fraction {test_fraction}): {n_train} training tiles,
{n_test} held-out tiles from source images not used for training (07_ADIPOSE and 08_EMPTY have too few
source images and are split by tile).{encoder_note}
The head is fitted on the training tiles only ({fit_on}).

## Evaluation (held-out source images)
- balanced accuracy: **{bacc:.3f}** (accuracy {acc:.3f}, n = {n_eval})
- colour-only baseline (logistic regression on RGB mean/std + HSV histograms, same split): balanced
  accuracy {colour:.3f} — colour alone separates these classes partly (a known bias of this data set)
- training balanced accuracy: {train_bacc:.3f}

Per-class recall:

| class | recall |
|---|---|
{recall_rows}

Confusion matrix (rows = truth, columns = predicted):

```
{confusion}
```

## Recipe
`nice python scripts/train_tissue_classifier.py` ({head} head, class-balanced cross-entropy, full-batch
AdamW, {epochs} steps, lr {lr}, weight decay {wd}; features standardised). CPU, {seconds:.0f} s.
Then `nice python scripts/eval_tme.py --json models/{name}/eval_tme.json --card models/{name}/README.md`
adds the held-out mosaic evaluation below. A retrained demo encoder (new weights checksum) needs both
steps again: `wsi tme` refuses a classifier whose encoder weights changed.

## Files
`classifier.json` (class names, encoder, embed dim, µm/px, fit, metrics, split, training summary) and
`model.safetensors` (feature mean/std and the head weights).

## Attribution and licence
Trained on the tiles of Kather JN, Weis CA, Bianconi F, Melchers SM, Schad LR, Gaiser T, Marx A,
Zöllner FG. *Multi-class texture analysis in colorectal cancer histology.* Sci Rep 6:27988 (2016),
doi:10.1038/srep27988; data doi:10.5281/zenodo.53169, licensed CC BY 4.0. The weights are derived from that
data: cite it when you use them. Not for clinical use.
"""


def write_card(clf: TissueClassifier, out: Path) -> Path:
    from wsi_pipeline.tme.classifier import format_confusion

    held = clf.metrics["held_out"]
    tr = clf.training
    cfg = tr["config"]
    recall_rows = "\n".join(f"| {c} | {r:.3f} |" if r is not None else f"| {c} | – |"
                            for c, r in held["per_class_recall"].items())
    text = CARD.format(
        name=out.name, head=clf.head, encoder=clf.encoder, embed_dim=clf.embed_dim,
        classes=", ".join(clf.class_names), mpp=clf.mpp, scaled=tr["scaled_tile_px"], fit=clf.fit,
        input_size=clf.input_size, sha=clf.encoder_weights_sha256[:16] or "random-init", n_tiles=tr["n_tiles"],
        seed=tr["split"]["seed"], test_fraction=tr["split"]["test_fraction"], n_train=tr["n_train"],
        n_test=tr["n_test"], fit_on=tr["fit_on"], bacc=held["balanced_accuracy"], acc=held["accuracy"],
        n_eval=held["n"], colour=clf.metrics["colour_baseline_held_out"]["balanced_accuracy"],
        train_bacc=clf.metrics["train_balanced_accuracy"], recall_rows=recall_rows,
        confusion=format_confusion(held), epochs=cfg["epochs"], lr=cfg["lr"], wd=cfg["weight_decay"],
        seconds=tr["seconds"],
        encoder_note=(" The demo encoder was pretrained (without labels) on the same training sources."
                      if clf.encoder == "wsip-dino-r10" else ""),
    )
    path = out / "README.md"
    path.write_text(text)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="wsip-dino-r10")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--head", default="linear", choices=("linear", "mlp"))
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default=str(REPO / "runs" / "tissue-features"),
                    help="cache of embedded training tiles ('' = none)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from wsi_pipeline.tme.classifier import format_confusion
    from wsi_pipeline.tme.config import TissueTrainConfig
    from wsi_pipeline.tme.train import train_tissue_classifier

    cfg = TissueTrainConfig(encoder=args.encoder, weights=args.weights, data=args.data, out=args.out, mpp=0.495,
                            head=args.head, epochs=args.epochs, device=args.device, seed=0, test_fraction=0.3,
                            feature_cache=args.cache)
    clf = train_tissue_classifier(cfg)
    card = write_card(clf, Path(args.out))
    held = clf.metrics["held_out"]
    print(f"held-out balanced accuracy {held['balanced_accuracy']:.3f} (accuracy {held['accuracy']:.3f}, "
          f"n={held['n']}); colour baseline {clf.metrics['colour_baseline_held_out']['balanced_accuracy']:.3f}")
    print(format_confusion(held))
    print(f"wrote {args.out} and {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
