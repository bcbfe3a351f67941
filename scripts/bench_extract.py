#!/usr/bin/env python
"""Feature-extraction benchmark on the 40000×30000, 0.25-MPP bench slide (built once by
``wsi_pipeline.synth.make_bench_slide``, then reused), tiled at 224 px @ 0.5 µm/px.

Prints:
  * model-only throughput: preprocess + forward on tiles already in memory (same batch size, precision,
    device), tiles/s;
  * end-to-end `wsi extract` throughput (reader processes + model + writing the features file), tiles/s;
  * their ratio (targets: ≥ 0.95 on a 2-core CPU, ≥ 0.8 on a GPU);
  * the reader alone, tiles/s per core (process CPU time), against OpenSlide ``read_region`` + resize on
    the same tiles (target ≥ 3×);
  * peak RSS of this process and of its largest child process (target ≤ 2 GB).

    python scripts/bench_extract.py --encoder timm:vit_small_patch16_224 [--max-tiles 1500] [--device cpu]
    python scripts/bench_extract.py --encoder timm:vit_base_patch16_224 --device cuda --repeat-slides 8
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

import numpy as np


def _tile_bench_slide(slide: Path, run: Path, max_tiles: int, repeat_slides: int) -> list[str]:
    """RUN/tiles for the bench slide (tiling reused), optionally cut to ``max_tiles`` and repeated under
    several slide ids (to measure a steady stream on fast GPUs)."""
    from wsi_pipeline import formats as F
    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.tiling.stage import tile_slide

    full = RunLayout(run.parent / (run.name + "_full"))
    res = tile_slide(slide, full, TilingConfig(), slide_id="bench")
    tiles = F.read_tiles_h5(full.tiles_h5(res.slide_id))
    xy = tiles.l0_xy
    if max_tiles and len(xy) > max_tiles:
        keep = np.sort(np.random.default_rng(0).choice(len(xy), max_tiles, replace=False))
        xy = xy[keep]
    layout = RunLayout(run)
    ids = [f"bench{i}" for i in range(repeat_slides)]
    for sid in ids:
        if not layout.tiles_h5(sid).exists():
            F.write_tiles_h5(layout.tiles_h5(sid), xy, {**tiles.attrs, F.A_SLIDE_ID: sid})
    return ids


def _model_only(encoder, tiles: np.ndarray, batch_size: int, precision: str, device, compile_model: bool,
                seconds: float) -> tuple[float, float]:
    """(tiles/s, CPU seconds per tile) of preprocess + forward on uint8 tiles already in (pinned) memory,
    like the engine does."""
    import torch

    from wsi_pipeline.encoders import autocast, prepare_for_inference

    model = prepare_for_inference(encoder, device)
    fwd = torch.compile(model, dynamic=False) if compile_model else model
    batches = [torch.from_numpy(tiles[i:i + batch_size]) for i in range(0, len(tiles) - batch_size + 1, batch_size)]
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]

    def run_one(b):
        x = model.preprocess(b.to(device, non_blocking=True))
        if encoder.is_cnn:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            return fwd(x)

    with torch.inference_mode():
        for b in batches[:2]:  # warm-up (and compilation)
            run_one(b).float().cpu()
        n, t0, i, c0 = 0, time.perf_counter(), 0, time.process_time()
        prev = None
        while time.perf_counter() - t0 < seconds or n < 4 * batch_size:
            y = run_one(batches[i % len(batches)])
            if prev is not None:
                prev.float().cpu()
            prev = y
            n += batch_size
            i += 1
        prev.float().cpu()
        return n / (time.perf_counter() - t0), (time.process_time() - c0) / n


def _cpu_with_children() -> float:
    self_, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + kids.ru_utime + kids.ru_stime


def _end_to_end(run: Path, args: argparse.Namespace) -> tuple[float, int, float, float, float, float]:
    """(tiles/s, tiles, CPU seconds per tile of this process and its reader processes, steady-state tiles/s
    from the third batch on, fraction of the loop spent waiting for tiles, fraction spent in the model)."""
    from wsi_pipeline.features import ExtractConfig, run_extract

    cfg = ExtractConfig(encoder=args.encoder, weights=args.weights, batch_size=args.batch_size,
                        num_workers=args.num_workers, device=args.device, precision=args.precision,
                        compile=args.compile, force=True, allow_mpp_mismatch=True)
    marks: list[tuple[float, int]] = []
    c0 = _cpu_with_children()
    s = run_extract(run, cfg, progress=lambda ev: marks.append((time.perf_counter(), ev.units)) if ev.kind == "units"
                    else None)
    cpu = _cpu_with_children() - c0
    if not s.ok:
        raise SystemExit(f"extraction failed: {s.failed}")
    steady = sum(n for _, n in marks[3:]) / (marks[-1][0] - marks[2][0]) if len(marks) > 4 else float("nan")
    f = s.figures
    loop = max(f["loop_s"], 1e-9)
    return (f["tiles_per_s"], f["tiles"], cpu / max(1, f["tiles"]), steady, f["wait_s"] / loop, f["compute_s"] / loop)


def _reader(slide: Path, run: Path, sid: str, n: int, n_openslide: int) -> dict[str, float]:
    from wsi_pipeline import formats as F
    from wsi_pipeline.features.dataset import read_order
    from wsi_pipeline.features.reader import ReadSpec, open_tile_reader
    from wsi_pipeline.runfolder.layout import RunLayout
    from wsi_pipeline.slide import open_slide

    full = RunLayout(run.parent / (run.name + "_full"))  # every tile of the slide, in the engine's order
    tiles = F.read_tiles_h5(full.tiles_h5(sid))
    order = read_order(tiles.l0_xy, tiles.tile_size_l0)
    start = (len(order) - n) // 2 if len(order) > n else 0  # a run of neighbours from the middle of the list
    xy = tiles.l0_xy[order[start:start + n]]
    rs = ReadSpec(tiles.target_mpp, tiles.tile_size, tiles.slide_mpp)
    out: dict[str, float] = {}
    with open_tile_reader(slide, rs) as r:
        r.read_many(xy[:32])  # warm the page cache and the codec
        c0, w0 = time.process_time(), time.perf_counter()
        r.read_many(xy)
        out["fast_cpu_s"] = time.process_time() - c0
        out["fast_wall_s"] = time.perf_counter() - w0
        out["kind"] = r.kind  # type: ignore[assignment]
        out["decoded_stored_tiles"] = r.decoded_tiles
    sub = xy[:n_openslide]
    with open_slide(slide, mpp=rs.slide_mpp) as s:
        s.read_region_at_mpp(tuple(int(v) for v in sub[0]), rs.target_mpp, rs.tile_size)
        c0 = time.process_time()
        for x, y in sub:
            s.read_region_at_mpp((int(x), int(y)), rs.target_mpp, rs.tile_size)
        out["openslide_cpu_s"] = time.process_time() - c0
    out["fast_tiles_per_core_s"] = len(xy) / out["fast_cpu_s"]
    out["openslide_tiles_per_core_s"] = len(sub) / out["openslide_cpu_s"]
    out["n"], out["n_openslide"] = len(xy), len(sub)
    return out


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
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    import torch

    from wsi_pipeline import formats as F
    from wsi_pipeline.encoders import create_encoder, resolve_device
    from wsi_pipeline.features.reader import ReadSpec, open_tile_reader
    from wsi_pipeline.runfolder.layout import RunLayout

    t = time.perf_counter()
    if args.slide is None:
        from wsi_pipeline.synth.bench import make_bench_slide

        args.slide = make_bench_slide()
    print(f"bench slide: {args.slide} (ready in {time.perf_counter() - t:.1f} s)", flush=True)
    run = args.work / f"RUN_{args.max_tiles}x{args.repeat_slides}"
    ids = _tile_bench_slide(args.slide, run, args.max_tiles, args.repeat_slides)
    device = resolve_device(args.device)
    tiles = F.read_tiles_h5(RunLayout(run).tiles_h5(ids[0]))
    n_total = len(tiles) * len(ids)
    print(f"tiles: {len(tiles)} per slide id x {len(ids)} = {n_total} (224 px @ 0.5 µm/px); device {device}, "
          f"torch threads {torch.get_num_threads()}, batch {args.batch_size}, {args.precision}", flush=True)

    # in-memory tiles for the model-only figure: real pixels from the slide
    spec = ReadSpec(tiles.target_mpp, tiles.tile_size, tiles.slide_mpp)
    with open_tile_reader(args.slide, spec) as r:
        mem = r.read_many(tiles.l0_xy[: max(4 * args.batch_size, 256)])
    encoder = create_encoder(args.encoder, args.weights, device="cpu")
    model_s, e2e_s, model_cpu, e2e_cpu, steady_s, waits, shares = [], [], [], [], [], [], []
    model_seconds = 10.0 if device.type == "cpu" else 8.0
    for k in range(args.rounds):
        m, mc = _model_only(encoder, mem, args.batch_size, args.precision, device, args.compile, model_seconds)
        model_s.append(m)
        model_cpu.append(mc)
        print(f"  round {k + 1}: model-only {m:,.1f} tiles/s ({1e3 * mc:.1f} CPU-ms/tile)", flush=True)
        e, n, ec, st, wf, cf = _end_to_end(run, args)
        waits.append(wf)
        shares.append(cf)
        e2e_s.append(e)
        e2e_cpu.append(ec)
        steady_s.append(st)
        print(f"  round {k + 1}: end-to-end {e:,.1f} tiles/s ({n} tiles, {1e3 * ec:.1f} CPU-ms/tile; "
              f"steady state {st:,.1f} tiles/s; loop time: model {100 * cf:.1f}%, waiting for tiles "
              f"{100 * wf:.1f}%)", flush=True)
    reader = _reader(args.slide, run, "bench", args.reader_tiles, args.openslide_tiles)
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
        "reader": reader["kind"],
        "reader_tiles_per_core_s": round(reader["fast_tiles_per_core_s"], 1),
        "reader_wall_tiles_per_s": round(reader["n"] / reader["fast_wall_s"], 1),
        "openslide_tiles_per_core_s": round(reader["openslide_tiles_per_core_s"], 1),
        "reader_speedup": round(reader["fast_tiles_per_core_s"] / reader["openslide_tiles_per_core_s"], 2),
        "stored_tiles_decoded_per_output_tile": round(reader["decoded_stored_tiles"] / reader["n"], 2),
        "peak_rss_main_mb": round(self_rss), "peak_rss_child_mb": round(child_rss),
        "rounds": {"model_only": [round(v, 2) for v in model_s], "end_to_end": [round(v, 2) for v in e2e_s]},
    }
    print()
    print(f"model-only      {model_tps:10,.1f} tiles/s   (rounds: {', '.join(f'{v:.1f}' for v in model_s)})")
    print(f"end-to-end      {e2e_tps:10,.1f} tiles/s   (rounds: {', '.join(f'{v:.1f}' for v in e2e_s)})")
    print(f"ratio           {e2e_tps / model_tps:10.3f}      (target ≥ {0.95 if device.type == 'cpu' else 0.8}); "
          f"steady state (from the 3rd batch) {statistics.mean(steady_s) / model_tps:.3f}; "
          f"the loop waited for tiles {100 * statistics.mean(waits):.1f}% of its time")
    if device.type == "cpu":
        print(f"in-loop ratio   {statistics.mean(shares):10.3f}      (share of the end-to-end loop spent in "
              "preprocess + forward: the ratio measured under one and the same CPU contention)")
    print(f"CPU-time ratio  {cpu_ratio:10.3f}      (model-only / end-to-end CPU seconds per tile, "
          f"{1e3 * statistics.mean(model_cpu):.1f} / {1e3 * statistics.mean(e2e_cpu):.1f} ms: "
          "the wall ratio reachable when the cores are not shared)")
    print(f"reader ({reader['kind']}) {reader['fast_tiles_per_core_s']:8,.1f} tiles/s/core  "
          f"vs OpenSlide read_region+resize {reader['openslide_tiles_per_core_s']:,.1f} tiles/s/core  "
          f"→ {figures['reader_speedup']:.2f}x (target ≥ 3x); "
          f"{figures['stored_tiles_decoded_per_output_tile']} stored tiles decoded per output tile")
    print(f"peak RSS        main {self_rss:,.0f} MB (target ≤ 2048 MB); largest child process {child_rss:,.0f} MB "
          "(reader processes, if any; a forked child's RSS counts the pages it shares with this one)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
