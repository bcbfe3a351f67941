#!/usr/bin/env python
"""Feature-extraction benchmark on the 40000×30000, 0.25-MPP bench slide (built once by
``wsi_pipeline.synth.make_bench_slide``, then reused), tiled at 224 px @ 0.5 µm/px.

Prints:
  * model-only throughput: preprocess + forward on tiles already in memory (same batch size, precision,
    device), tiles/s;
  * end-to-end `wsi extract` throughput (reader processes + model + writing the features file), tiles/s,
    with the loop breakdown per stage;
  * their ratio (targets: ≥ 0.93 for ViT-S bf16 on a 2-core CPU; on one H200 ≥ 0.9 for resnet50-trunc and
    ≥ 0.95 for ViT-B/16 and ViT-L/16);
  * the reader alone, output tiles/s per core (process CPU time) for each decode mode (cpu-full,
    cpu-scaled, and the reader's share of gpu), against OpenSlide ``read_region`` + resize;
  * peak RSS of this process and of its largest child process.

    python scripts/bench_extract.py --encoder timm:vit_small_patch16_224 [--max-tiles 1500] [--device cpu]
    python scripts/bench_extract.py --encoder timm:vit_base_patch16_224 --device cuda --repeat-slides 8
    python scripts/bench_extract.py --suite gpu --out OUT_DIR [--quick]   # the GPU tables (bench_suite.py)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="timm:vit_small_patch16_224")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--slide", type=Path, default=None, help="default: the cached bench slide")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--max-tiles", type=int, default=1500, help="tiles per slide id (0 = all)")
    ap.add_argument("--repeat-slides", type=int, default=1, help="slide ids sharing the bench slide")
    ap.add_argument("--rounds", type=int, default=2, help="model-only / end-to-end rounds, interleaved")
    ap.add_argument("--reader-tiles", type=int, default=600)
    ap.add_argument("--openslide-tiles", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi_bench_extract")
    ap.add_argument("--decode", default="auto", help="end-to-end decode mode: auto, cpu-full, cpu-scaled, gpu")
    ap.add_argument("--reader-modes", default="cpu-full,cpu-scaled,gpu", help="decode modes of the reader table")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--suite", choices=["gpu"], default=None,
                    help="gpu: build a 24000x18000 bench slide and measure the GPU tables (see bench_suite.py)")
    ap.add_argument("--out", type=Path, default=None, help="--suite: folder for the JSON figures (written as they come)")
    ap.add_argument("--quick", action="store_true", help="--suite: a small slide and few tiles (a smoke test)")
    args = ap.parse_args()
    if args.suite:
        from bench_suite import run_suite

        run_suite(args)
        return

    import torch
    from bench_common import end_to_end, in_memory_tiles, model_only, reader_per_core, tile_bench_slide

    from wsi_pipeline.encoders.base import resolve_device
    from wsi_pipeline.encoders.registry import create_encoder
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout

    t = time.perf_counter()
    if args.slide is None:
        from wsi_pipeline.synth.bench import make_bench_slide

        args.slide = make_bench_slide()
    print(f"bench slide: {args.slide} (ready in {time.perf_counter() - t:.1f} s)", flush=True)
    run = args.work / f"RUN_{args.max_tiles}x{args.repeat_slides}"
    ids = tile_bench_slide(args.slide, run, args.max_tiles, args.repeat_slides)
    device = resolve_device(args.device)
    tiles = F.read_tiles_h5(RunLayout(run).tiles_h5(ids[0]))
    n_total = len(tiles) * len(ids)
    print(f"tiles: {len(tiles)} per slide id x {len(ids)} = {n_total} (224 px @ 0.5 µm/px); device {device}, "
          f"torch threads {torch.get_num_threads()}, batch {args.batch_size}, {args.precision}", flush=True)

    # in-memory tiles for the model-only figure: real pixels from the slide
    mem = in_memory_tiles(args.slide, run, ids[0], max(4 * args.batch_size, 256))
    encoder = create_encoder(args.encoder, args.weights, device="cpu")
    model_s, e2e_s, model_cpu, e2e_cpu, steady_s, waits, shares, breakdowns = [], [], [], [], [], [], [], []
    model_seconds = 10.0 if device.type == "cpu" else 8.0
    cfg_kwargs = {"encoder": args.encoder, "weights": args.weights, "batch_size": args.batch_size,
                  "num_workers": args.num_workers, "device": args.device, "precision": args.precision,
                  "compile": args.compile, "decode": args.decode}
    decode_ran = ""
    for k in range(args.rounds):
        m, mc = model_only(encoder, mem, args.batch_size, args.precision, device, args.compile, model_seconds)
        model_s.append(m)
        model_cpu.append(mc)
        print(f"  round {k + 1}: model-only {m:,.1f} tiles/s ({1e3 * mc:.1f} CPU-ms/tile)", flush=True)
        e = end_to_end(run, cfg_kwargs, gpu=device.type == "cuda")
        bd = e["loop_breakdown"]
        waits.append(bd.get("wait", 0.0))
        shares.append(bd.get("compute", 0.0))
        breakdowns.append(bd)
        e2e_s.append(e["tiles_per_s"])
        e2e_cpu.append(e["cpu_ms_per_tile"] / 1e3)
        steady_s.append(e["steady_tiles_per_s"])
        decode_ran = e["decode"]
        print(f"  round {k + 1}: end-to-end {e['tiles_per_s']:,.1f} tiles/s ({e['tiles']} tiles, "
              f"{e['cpu_ms_per_tile']:.1f} CPU-ms/tile; steady state {e['steady_tiles_per_s']:,.1f} tiles/s; "
              f"decode {decode_ran}; loop: " + ", ".join(f"{k2} {100 * v:.1f}%" for k2, v in bd.items()) + ")",
              flush=True)
    modes = tuple(m for m in args.reader_modes.split(",") if m)
    by_mode = reader_per_core(args.slide, run, args.reader_tiles, modes, n_openslide=args.openslide_tiles)
    default_mode = "cpu-scaled" if "cpu-scaled" in by_mode else modes[0]
    reader = by_mode[default_mode]
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    model_tps, e2e_tps = statistics.mean(model_s), statistics.mean(e2e_s)
    cpu_ratio = statistics.mean(model_cpu) / statistics.mean(e2e_cpu)
    figures = {
        "encoder": args.encoder, "device": str(device), "precision": args.precision, "batch_size": args.batch_size,
        "tiles": n_total,
        "model_only_tiles_per_s": round(model_tps, 2),
        "end_to_end_tiles_per_s": round(e2e_tps, 2),
        "ratio": round(e2e_tps / model_tps, 3),
        "end_to_end_steady_tiles_per_s": round(statistics.mean(steady_s), 2),
        "steady_ratio": round(statistics.mean(steady_s) / model_tps, 3),
        "end_to_end_wait_fraction": round(statistics.mean(waits), 4),
        "end_to_end_model_fraction": round(statistics.mean(shares), 4),
        "model_only_cpu_ms_per_tile": round(1e3 * statistics.mean(model_cpu), 2),
        "end_to_end_cpu_ms_per_tile": round(1e3 * statistics.mean(e2e_cpu), 2),
        "cpu_ratio": round(cpu_ratio, 3),
        "decode": decode_ran,
        "loop_breakdown": {k: round(statistics.mean(b.get(k, 0.0) for b in breakdowns), 4) for k in breakdowns[0]},
        "reader": reader["reader"],
        "reader_decode_mode": default_mode,
        "reader_tiles_per_core_s": reader["reader_tiles_per_core_s"],
        "reader_wall_tiles_per_s": reader["wall_tiles_per_s"],
        "reader_by_decode": {m: v for m, v in by_mode.items() if m != "openslide"},
        "openslide_tiles_per_core_s": by_mode.get("openslide", {}).get("reader_tiles_per_core_s"),
        "reader_speedup": (round(reader["reader_tiles_per_core_s"] / by_mode["openslide"]["reader_tiles_per_core_s"], 2)
                           if "openslide" in by_mode else None),
        "stored_tiles_decoded_per_output_tile": reader["stored_tiles_per_output_tile"],
        "peak_rss_main_mb": round(self_rss), "peak_rss_child_mb": round(child_rss),
        "rounds": {"model_only": [round(v, 2) for v in model_s], "end_to_end": [round(v, 2) for v in e2e_s]},
    }
    print()
    print(f"model-only      {model_tps:10,.1f} tiles/s   (rounds: {', '.join(f'{v:.1f}' for v in model_s)})")
    print(f"end-to-end      {e2e_tps:10,.1f} tiles/s   (rounds: {', '.join(f'{v:.1f}' for v in e2e_s)})")
    print(f"ratio           {e2e_tps / model_tps:10.3f}      (target ≥ {0.93 if device.type == 'cpu' else 0.9}); "
          f"steady state (from the 3rd batch) {statistics.mean(steady_s) / model_tps:.3f}; "
          f"the loop waited for tiles {100 * statistics.mean(waits):.1f}% of its time")
    if device.type == "cpu":
        print(f"in-loop ratio   {statistics.mean(shares):10.3f}      (share of the end-to-end loop spent in "
              "preprocess + forward: the ratio measured under one and the same CPU contention)")
    print(f"CPU-time ratio  {cpu_ratio:10.3f}      (model-only / end-to-end CPU seconds per tile, "
          f"{1e3 * statistics.mean(model_cpu):.1f} / {1e3 * statistics.mean(e2e_cpu):.1f} ms: "
          "the wall ratio reachable when the cores are not shared)")
    print("loop breakdown  " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in figures["loop_breakdown"].items()))
    print("reader, output tiles/s per core (one thread, process CPU time):")
    for m, v in by_mode.items():
        note = " (read + splice only; decoded on the GPU)" if m == "gpu" else ""
        extra = f", DCT {v['dct_scale']}, {v['stored_tiles_per_output_tile']} stored tiles/output tile" if "dct_scale" in v else ""
        print(f"  {m:<11} {v['reader_tiles_per_core_s']:10,.1f}{extra}{note}")
    print(f"peak RSS        main {self_rss:,.0f} MB (target ≤ 2048 MB); largest child process {child_rss:,.0f} MB "
          "(reader processes, if any; a forked child's RSS counts the pages it shares with this one)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
