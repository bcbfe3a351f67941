"""Train the shipped tile tissue classifier ``models/wsip-tissue-kather16`` and write its model card.

An MLP head on frozen features of the demo encoder (``wsip-dino-r10``), fitted on the TRAIN source images
of Kather et al. 2016 (``../shared/data/kather16``; source split seed 0, 30 % of each class's tiles held out
by source image — the split of ``wsi eval-encoder`` and of the demo encoder's pretraining), evaluated on the
held-out sources. Tiles are embedded at the encoder's 0.5 µm/px (150 px @ 0.495 → 148 px, not stretched).
The head also sees context windows: windows of random mosaics of the training tiles, computed as ``wsi tme``
computes its dense map, labelled with their class-area fractions; its soft confusion matrix (grouped CV on the
training sources) is stored for the area correction of ``wsi tme``.

    nice python scripts/train_tissue_classifier.py
    nice python scripts/train_tissue_classifier.py --encoder timm:resnet18 --out /tmp/clf   # plumbing only

Same as ``wsi tissue-train --data ../shared/data/kather16 --mpp 0.495 --encoder wsip-dino-r10 --head mlp
--epochs 400 --context-mosaics 24 --area-correction --scale-jitter 0.1 --out models/wsip-tissue-kather16`` plus the model card. The head is fitted on the training sources only, so
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

A{n_} {head} head on frozen features of the demo encoder `{encoder}` ({embed_dim}-d), classifying a tile (a
74-µm field of view) into the 8 classes of Kather et al. 2016: {classes}.
Used by `wsi tme` for its dense tissue-class maps (one window per 16-µm cell), composition, TIL fraction and
the spatial immune phenotype.

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

## Training data: tiles and context windows
The head is fitted on the training tiles (one-hot targets) and on {n_windows} context windows ({context}):
windows of {n_mosaics} random mosaics of the training tiles (each tile rescaled to 0.5 µm/px, rotated and
flipped at random, {grid} cells per mosaic), computed exactly as `wsi tme` computes its dense map (the
encoder's feature map over the mosaic, averaged over each window's {window_cells} × {window_cells} cells of
{cell_px} px), with the window's class-area fractions as soft targets. A head trained on pure tiles only calls
a mixed window by its most conspicuous class, so its averaged probabilities under-count lymphocytes and
adipose tissue in mixed fields; with the context windows they estimate areas. Tiles and windows weigh equally
(context weight {context_weight}); classes are balanced by their total target mass.

{jitter_note}

Area correction: the head's soft confusion matrix, by 4-fold cross-validation over the training source images
(each fold's head refit with every context window and magnified copy; scored on the held-out fold's tiles at
their own scale), is stored in `classifier.json` (`area_correction`);
`wsi tme` inverts it on each slide's expected class areas (non-negative least squares, total kept).

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

Context windows of {n_eval_mosaics} mosaics of the held-out tiles ({n_eval_windows} windows): area-fraction MAE
{window_mae:.3f} per window, {composition_mae:.3f} per mosaic (mean of its windows against the mosaic's truth).

Scale robustness: the same held-out tiles magnified (read as if each pixel were that many times larger: a
scanner's µm/px off by a few per cent, or tissue whose cells are larger than the training tiles'):

{magnified_rows}

## Recipe
`nice python scripts/train_tissue_classifier.py` ({head} head{hidden_note}, class-balanced soft cross-entropy,
full-batch AdamW, {epochs} steps, lr {lr}, weight decay {wd}; features standardised). CPU, {seconds:.0f} s.
Then `nice python scripts/train_map_refiner.py --classifier models/{name}` fits the map refinement on mosaics of the training sources (section *Map refinement*), and `nice python scripts/eval_tme.py --extract --agreement 3 --record --json models/{name}/eval_tme.json
--card models/{name}/README.md` adds the held-out mosaic evaluation below and records the misaligned
grid-against-dense figures in `classifier.json` (`metrics.footprint_eval`, with the weights' checksum), which
`wsi tme --footprint auto` decides on. A retrained demo encoder (new weights checksum) needs all three steps again:
`wsi tme` refuses a classifier whose encoder weights changed.

## Files
`classifier.json` (class names, encoder, embed dim, µm/px, fit, metrics, split, training summary) and
`model.safetensors` (feature mean/std, the head weights and the map refinement's `refine.*` tensors;
`classifier.json` `map_refinement` holds its architecture, what it was fitted on and its validation).

## Attribution and licence
Trained on the tiles of Kather JN, Weis CA, Bianconi F, Melchers SM, Schad LR, Gaiser T, Marx A,
Zöllner FG. *Multi-class texture analysis in colorectal cancer histology.* Sci Rep 6:27988 (2016),
doi:10.1038/srep27988; data doi:10.5281/zenodo.53169, licensed CC BY 4.0. The weights are derived from that
data: cite it when you use them. Not for clinical use.
"""


def write_card(clf: TissueClassifier, out: Path) -> Path:
    from wsi_pipeline.tme.classifier import format_confusion
    from wsi_pipeline.tme.config import ROLE_LYMPHOCYTES, ClassRoles

    held = clf.metrics["held_out"]
    tr = clf.training
    cfg = tr["config"]
    recall_rows = "\n".join(f"| {c} | {r:.3f} |" if r is not None else f"| {c} | – |"
                            for c, r in held["per_class_recall"].items())
    ctx = tr.get("context") or {}
    ctx_eval = clf.metrics.get("held_out_context") or {}
    mag = clf.metrics.get("held_out_magnified") or {}
    lymph = next(c for c in clf.class_names if ClassRoles().role_of(c) == ROLE_LYMPHOCYTES)
    magnified_rows = "\n".join(
        ["| magnification | balanced accuracy | " + lymph + " recall |", "|---|---|---|",
         f"| 1 | {held['balanced_accuracy']:.3f} | {held['per_class_recall'][lymph]:.3f} |"]
        + [f"| {f} | {m['balanced_accuracy']:.3f} | {m['per_class_recall'][lymph]:.3f} |" for f, m in mag.items()])
    jitter, cj = cfg.get("scale_jitter", 0.0), cfg.get("context_scale_jitter", 0.0)
    jitter_note = (f"Scale jitter: {cfg.get('scale_copies', 0)} copies of every training tile, each magnified by a "
                   f"random factor in [{1 - jitter:g}, {1 + jitter:g}]"
                   + (f", and every context mosaic magnified by a factor in [{1 - cj:g}, {1 + cj:g}]" if cj else
                      " (the context mosaics stay at their own scale)")
                   + ", so the head does not hinge on the exact size of nuclei (without it, a 7 % magnification "
                   "took the previous head's held-out lymphocyte recall from 0.87 to 0.53: lymphocytes are told "
                   "apart by their small nuclei)." if jitter else "No scale jitter.")
    text = CARD.format(
        name=out.name, head=clf.head, n_=("n" if clf.head[0] in "aeiou" else ""), encoder=clf.encoder,
        embed_dim=clf.embed_dim, classes=", ".join(clf.class_names), mpp=clf.mpp, scaled=tr["scaled_tile_px"],
        fit=clf.fit, input_size=clf.input_size, sha=clf.encoder_weights_sha256[:16] or "random-init",
        n_tiles=tr["n_tiles"], seed=tr["split"]["seed"], test_fraction=tr["split"]["test_fraction"],
        n_train=tr["n_train"], n_test=tr["n_test"], fit_on=tr["fit_on"], bacc=held["balanced_accuracy"],
        acc=held["accuracy"], n_eval=held["n"], colour=clf.metrics["colour_baseline_held_out"]["balanced_accuracy"],
        train_bacc=clf.metrics["train_balanced_accuracy"], recall_rows=recall_rows,
        confusion=format_confusion(held), epochs=cfg["epochs"], lr=cfg["lr"], wd=cfg["weight_decay"],
        seconds=tr["seconds"], hidden_note=f", {clf.hidden} hidden units" if clf.head == "mlp" else "",
        encoder_note=(" The demo encoder was pretrained (without labels) on the same training sources."
                      if clf.encoder == "wsip-dino-r10" else ""),
        n_windows=ctx.get("n_mosaics", 0) * ctx.get("windows_per_mosaic", 0), context=ctx.get("method", "none"),
        n_mosaics=ctx.get("n_mosaics", 0), grid="×".join(str(v) for v in ctx.get("grid", [])),
        window_cells=ctx.get("window_cells", 0), cell_px=ctx.get("cell_px", 0), context_weight=cfg["context_weight"],
        magnified_rows=magnified_rows, jitter_note=jitter_note,
        n_eval_mosaics=ctx_eval.get("n_mosaics", 0), n_eval_windows=ctx_eval.get("n_windows", 0),
        window_mae=ctx_eval.get("window_mae", float("nan")), composition_mae=ctx_eval.get("composition_mae",
                                                                                         float("nan")),
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
    ap.add_argument("--head", default="mlp", choices=("linear", "mlp"))
    ap.add_argument("--epochs", type=int, default=400)
    ap.add_argument("--context-mosaics", type=int, default=24, help="random mosaics of training tiles (0 = none)")
    ap.add_argument("--no-area-correction", action="store_true")
    ap.add_argument("--scale-jitter", type=float, default=0.1,
                    help="also fit on copies of the training tiles magnified by a factor in [1 - J, 1 + J] (0 = off)")
    ap.add_argument("--context-scale-jitter", type=float, default=0.0,
                    help="magnify each context mosaic by a factor in [1 - J, 1 + J] (0 = off)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default=str(REPO / "runs" / "tissue-features"),
                    help="cache of embedded training tiles ('' = none)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from wsi_pipeline.tme.classifier import format_confusion
    from wsi_pipeline.tme.config import TissueTrainConfig
    from wsi_pipeline.tme.train import run_tissue_train

    cfg = TissueTrainConfig(encoder=args.encoder, weights=args.weights, data=args.data, out=args.out, mpp=0.495,
                            head=args.head, epochs=args.epochs, device=args.device, seed=0, test_fraction=0.3,
                            feature_cache=args.cache, context_mosaics=args.context_mosaics,
                            area_correction=not args.no_area_correction, scale_jitter=args.scale_jitter,
                            context_scale_jitter=args.context_scale_jitter)
    clf = run_tissue_train(cfg)
    card = write_card(clf, Path(args.out))
    held = clf.metrics["held_out"]
    print(f"held-out balanced accuracy {held['balanced_accuracy']:.3f} (accuracy {held['accuracy']:.3f}, "
          f"n={held['n']}); colour baseline {clf.metrics['colour_baseline_held_out']['balanced_accuracy']:.3f}")
    print(format_confusion(held))
    print(f"wrote {args.out} and {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
