#!/usr/bin/env python
"""Dense TME read-out against feature extraction on the bench slide (40000×30000 px at 0.25 µm/px, about half
tissue; built once by ``scripts/make_bench_slide.py``, then reused): issue #21's "`wsi tme` takes no longer
than `wsi extract` on the same slides".

One RUN, tiled with the defaults (224 px at 0.5 µm/px), then, each ``--rounds`` times, timed as the stages
run (fresh outputs every round):

* ``wsi extract`` with the tissue classifier's encoder (the shipped default);
* ``wsi tme --footprint dense`` (the shipped classifier's default read-out), and ``--footprint grid``.

Prints the median seconds, the ratios to extraction, and the fully convolutional work: the feature-map cells
its regions compute per RUN-tile cell (``wsi_pipeline.tme.dense.fcn_regions``), against the floor (the union
of the input cells that the needed windows read).

    nice python scripts/bench_tme.py [--slide PATH] [--rounds 2] [--work /tmp/wsi_bench_tme] [--device auto]

``--device``: both stages on it (``auto``: CUDA when there is one). On a GPU, `wsi extract` reads with its
default reader processes (all cores but one) and `wsi tme` with as many reading threads, the next region read
while the current one is computed (``wsi_pipeline.tme.dense.reader_threads``); ``scripts/gpu_check.sh``
runs this there.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def region_work(run: Path) -> dict[str, float]:
    """Feature-map cells per RUN-tile cell: the regions' and the floor."""
    from scipy.ndimage import binary_dilation

    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.dense import METHOD_FCN, choose_chunk, dense_geometry, map_grid, needed_windows, region_cost
    from wsi_pipeline.tme.run import create_classifier_encoder

    clf = load_classifier(None)
    geo = dense_geometry(clf, create_classifier_encoder(clf, None, "cpu"), METHOD_FCN)
    tile_cells = regions = floor = 0.0
    for path in sorted(RunLayout(run).tiles_dir.glob("*.h5")):
        tiles = F.read_tiles_h5(path)
        _, area = map_grid(tiles, geo.cell_px * geo.mpp / tiles.slide_mpp)
        need = needed_windows(area, geo.window_cells)
        regions += region_cost(need, choose_chunk(need, geo))
        reach = geo.window_cells + 2 * geo.margin  # input cells of one window, a side
        floor += binary_dilation(np.pad(need, reach), np.ones((reach, reach), bool)).sum()
        tile_cells += len(tiles) * (tiles.tile_size * tiles.target_mpp / (geo.cell_px * geo.mpp)) ** 2
    return {"regions": regions / tile_cells, "floor": floor / tile_cells}


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=None, help="default: the cached bench slide")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi_bench_tme")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (both stages)")
    args = ap.parse_args()

    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.encoders.base import resolve_device
    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.extract import run_extract
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.synth.bench import BenchSlideParams, default_bench_path, make_bench_slide
    from wsi_pipeline.tiling.stage import run_tile
    from wsi_pipeline.tme.classifier import load_classifier
    from wsi_pipeline.tme.config import TMEConfig
    from wsi_pipeline.tme.run import run_tme

    slide = args.slide or make_bench_slide(default_bench_path(BenchSlideParams()), BenchSlideParams())
    run = args.work / f"run-{slide.stem}"  # one RUN per slide, so a --work shared by slides keeps them apart
    if not run_tile([slide], run, TilingConfig().validate(), workers=0).ok:
        raise SystemExit(f"tiling {slide} failed")
    layout = RunLayout(run)
    clf = load_classifier(None)
    secs: dict[str, list[float]] = {"extract": [], "tme dense": [], "tme grid": []}
    for _ in range(args.rounds):
        shutil.rmtree(layout.root / "features", ignore_errors=True)
        secs["extract"].append(timed(lambda: run_extract(run, ExtractConfig(encoder=clf.encoder,
                                                                              device=args.device))))
        for footprint in ("dense", "grid"):
            cfg = TMEConfig(device=args.device, footprint=footprint, overwrite=True)
            secs[f"tme {footprint}"].append(timed(lambda cfg=cfg: run_tme(run, cfg)))
    n_tiles = sum(1 for _ in layout.tiles_dir.glob("*.h5"))
    med = {k: statistics.median(v) for k, v in secs.items()}
    print(f"{slide.name}: {n_tiles} slide(s), classifier {Path(clf.path).name} (encoder {clf.encoder}); "
          f"device {resolve_device(args.device)}; median of {args.rounds} rounds")
    print("| stage | seconds | ratio to extract |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {v / med['extract']:.2f} |")
    w = region_work(run)
    print(f"fully convolutional feature-map cells per RUN-tile cell: {w['regions']:.2f} (floor: {w['floor']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
