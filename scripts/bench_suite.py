"""``bench_extract.py --suite gpu``: the tables of issue #19 in one command, on a bench slide it builds.

Parts (each one's figures go to ``OUT/gpu_suite.json`` as soon as they exist, and a failing part records its
error and lets the others run):

1. ``slide``: build a 24000×18000 Aperio-style JPEG slide at 0.25 µm/px (``--quick``: 4096×3072) and tile it
   at 224 px @ 0.5 µm/px;
2. ``reader``: output tiles/s per core for each decode mode (one thread, process CPU time);
3. ``encoders``: for resnet50-trunc, ViT-B/16 and ViT-L/16 (random weights): model-only and end-to-end
   tiles/s, their ratio, the GPU's mean utilisation and the loop breakdown per stage (decode ``auto`` =
   cpu-scaled; resnet50-trunc also with the opt-in ``gpu``);
4. ``whole_process``: ``wsi extract`` as a command with resnet50-trunc: tiles/s over its wall time and as it
   reports, and the main process's peak RSS (14 reader processes on a GPU machine).

    python scripts/bench_extract.py --suite gpu --out OUT               # on the GPU machine, ~4-6 min
    python scripts/bench_extract.py --suite gpu --out OUT --quick       # smoke test, CPU is fine (~2 min)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ENCODERS = ("resnet50-trunc", "timm:vit_base_patch16_224", "timm:vit_large_patch16_224")
FULL = {"size": (24000, 18000), "reader_tiles": 600, "model_seconds": 6.0, "batch_size": 256, "workers": 14,
        "slides": {"resnet50-trunc": 40, "timm:vit_base_patch16_224": 30, "timm:vit_large_patch16_224": 16},
        "whole_process_slides": 100}
QUICK = {"size": (4096, 3072), "reader_tiles": 60, "model_seconds": 1.0, "batch_size": 16, "workers": 1,
         "slides": {"resnet50-trunc": 3, "timm:vit_tiny_patch16_224": 3}, "whole_process_slides": 4}


NO_GPU_NOTE = ("NOTE: no GPU here (device {device}): this run does NOT refresh the GPU table. Its figures are CPU "
               "figures; the README's GPU table stays the last one measured on a GPU.")


class Report:
    """The suite's JSON, rewritten after every part."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"meta": meta, "parts": {}}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def part(self, name: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            out = fn(*args)
            self.data["parts"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), **(out or {})}
        except Exception as e:  # noqa: BLE001 - record it, go on with the other parts
            traceback.print_exc()
            out = None
            self.data["parts"][name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 1),
                                        "error": f"{type(e).__name__}: {e}"}
        self.save()
        return out


def run_suite(args: Any) -> None:
    import torch

    from wsi_pipeline.encoders.base import resolve_device

    plan = QUICK if args.quick else FULL
    out = args.out or Path(os.environ.get("OUT", ".")) / "bench"
    work = args.work / ("suite_quick" if args.quick else "suite")
    device = resolve_device(args.device)
    meta = {"device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "torch": torch.__version__, "cores": os.cpu_count(), "quick": bool(args.quick),
            "batch_size": plan["batch_size"], "precision": args.precision, "reader_workers": plan["workers"],
            "load_avg": os.getloadavg()}
    rep = Report(out / "gpu_suite.json", meta)
    if device.type != "cuda":
        print(NO_GPU_NOTE.format(device=device), flush=True)
    slide = rep.part("slide", _slide, work, plan)
    if slide is None:
        return
    slide_path = Path(slide["path"])
    rep.part("device_decode", _device_decode, slide_path, work, device)
    rep.part("reader", _reader, slide_path, work, plan)
    encoders = plan["slides"]
    for name, n_slides in encoders.items():
        rep.part(f"encoder:{name}", _encoder, name, slide_path, work, plan, device, args, n_slides)
    rep.part("whole_process", _whole_process, slide_path, work, plan, device, args, "auto")
    rep.part("whole_process[gpu]", _whole_process, slide_path, work, plan, device, args, "gpu")
    print(tables(rep.data), flush=True)
    (out / "gpu_suite.md").write_text(tables(rep.data))
    if device.type != "cuda":
        print(NO_GPU_NOTE.format(device=device), flush=True)


def _slide(work: Path, plan: dict[str, Any]) -> dict[str, Any]:
    from bench_common import tile_bench_slide

    from wsi_pipeline.synth.bench import BenchSlideParams, make_bench_slide

    params = BenchSlideParams(size=plan["size"])
    t = time.perf_counter()
    path = make_bench_slide(work / f"bench_{params.size[0]}x{params.size[1]}.svs", params)
    built = time.perf_counter() - t
    ids = tile_bench_slide(path, work / "RUN_reader", 0, 1)
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout

    n = len(F.read_tiles_h5(RunLayout(work / "RUN_reader").tiles_h5(ids[0])))
    return {"path": str(path), "size": list(params.size), "mpp": params.mpp, "build_s": round(built, 1),
            "tiles_per_slide": n}


def _device_decode(slide: Path, work: Path, device: Any) -> dict[str, Any]:
    """nvJPEG against libjpeg-turbo: the flavour probe, then 256 bench tiles cut on the device against the
    cpu-full reader's pixels (mean / max absolute difference), and the device path's time per batch."""
    import dataclasses

    import numpy as np
    import torch

    from wsi_pipeline.features.gpu_decode import assemble_tiles, decode_streams, probe_gpu_decoding
    from wsi_pipeline.features.reader import ReadSpec, open_tile_reader
    from wsi_pipeline.formats import api as F
    from wsi_pipeline.runfolder.layout import RunLayout

    probe = probe_gpu_decoding(device)
    tiles = F.read_tiles_h5(RunLayout(work / "RUN_reader_full").tiles_h5("bench"))  # every tile of the slide
    xy = tiles.l0_xy[: min(256, len(tiles))]
    spec = ReadSpec(tiles.target_mpp, tiles.tile_size, tiles.slide_mpp)
    with open_tile_reader(slide, spec, decode="gpu") as r:
        jb = r.jpeg_batch(xy)
    with open_tile_reader(slide, spec, decode="cpu-full") as r:
        ref = r.read_many(xy)
    data = torch.from_numpy(jb.data)
    fields = dataclasses.asdict(jb)
    got = assemble_tiles(decode_streams(data, jb.offsets, device), fields, device).cpu().numpy()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        got = assemble_tiles(decode_streams(data, jb.offsets, device), fields, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_batch = (time.perf_counter() - t0) / 5
    diff = np.abs(got.cpu().numpy().astype(np.int16) - ref)
    return {"probe_mad": probe, "tiles": len(xy), "stored_tiles": jb.n_streams,
            "mad_vs_cpu_full": round(float(diff.mean()), 4), "max_vs_cpu_full": int(diff.max()),
            "device_decode_tiles_per_s": round(len(xy) / per_batch, 1)}


def _reader(slide: Path, work: Path, plan: dict[str, Any]) -> dict[str, Any]:
    from bench_common import reader_per_core

    res = reader_per_core(slide, work / "RUN_reader", plan["reader_tiles"], n_openslide=plan["reader_tiles"] // 3)
    for m, v in res.items():
        print(f"  {m:<11} {v['reader_tiles_per_core_s']:10,.1f} output tiles/s per core", flush=True)
    return {"reader_by_decode": res, "load_avg": os.getloadavg()}


def _encoder(name: str, slide: Path, work: Path, plan: dict[str, Any], device: Any, args: Any,
             n_slides: int) -> dict[str, Any]:
    from bench_common import bench_weights, end_to_end, in_memory_tiles, model_only, tile_bench_slide

    from wsi_pipeline.encoders.registry import create_encoder

    run = work / f"RUN_x{n_slides}"
    ids = tile_bench_slide(slide, run, 0, n_slides, work / "RUN_reader_full")
    weights = bench_weights(name, work)
    encoder = create_encoder(name, weights, device="cpu")
    bs = plan["batch_size"]
    mem = in_memory_tiles(slide, run, ids[0], max(2 * bs, 64))
    m, mc = model_only(encoder, mem, bs, args.precision, device, False, plan["model_seconds"])
    print(f"  model-only {m:,.1f} tiles/s", flush=True)
    res: dict[str, Any] = {"model_only_tiles_per_s": round(m, 1), "model_only_cpu_ms_per_tile": round(1e3 * mc, 2)}
    modes = ["auto", "gpu"] if name == "resnet50-trunc" else ["auto"]
    for mode in modes:
        kw = {"encoder": name, "weights": weights, "batch_size": bs, "num_workers": plan["workers"],
              "device": str(device), "precision": args.precision, "decode": mode}
        e = end_to_end(run, kw, gpu=device.type == "cuda")
        e["ratio"] = round(e["tiles_per_s"] / m, 3)
        e["steady_ratio"] = round(e["steady_tiles_per_s"] / m, 3)
        res[f"end_to_end[{mode}]"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in e.items()}
        print(f"  end-to-end decode={e['decode']}: {e['tiles_per_s']:,.1f} tiles/s (ratio {e['ratio']:.3f}, "
              f"steady {e['steady_ratio']:.3f}), GPU busy {e['gpu_busy_pct']}%, loop {e['loop_breakdown']}",
              flush=True)
    res["tiles"] = e["tiles"]
    return res


def _whole_process(slide: Path, work: Path, plan: dict[str, Any], device: Any, args: Any, decode: str) -> dict[str, Any]:
    import psutil
    from bench_common import bench_weights, tile_bench_slide

    name = "resnet50-trunc"
    run = work / f"RUN_x{plan['whole_process_slides']}"
    tile_bench_slide(slide, run, 0, plan["whole_process_slides"], work / "RUN_reader_full")
    weights = bench_weights(name, work)
    cmd = [sys.executable, "-m", "wsi_pipeline", "extract", str(run), "--encoder", name, "--weights", str(weights),
           "--device", str(device), "--batch-size", str(plan["batch_size"]), "--num-workers", str(plan["workers"]),
           "--precision", args.precision, "--decode", decode, "--force", "--allow-mpp-mismatch"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    main = psutil.Process(proc.pid)
    peak_main = peak_child = 0
    lines: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            peak_main = max(peak_main, main.memory_info().rss)
            for c in main.children():
                peak_child = max(peak_child, c.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    reader.join(5)
    text = "".join(lines)
    if proc.returncode != 0:
        raise RuntimeError(f"wsi extract exited {proc.returncode}: {text[-2000:]}")
    m = re.search(r"\(([\d,]+) tiles, ([\d,\.]+) tiles/s\)", " ".join(text.split()))
    tiles = int(m.group(1).replace(",", "")) if m else None
    reported = float(m.group(2).replace(",", "")) if m else None
    res = {"decode": decode, "tiles": tiles, "wall_s": round(wall, 1), "tiles_per_s_wall": round(tiles / wall, 1) if tiles else None,
           "tiles_per_s_reported": reported, "peak_rss_main_mb": round(peak_main / 2**20),
           "peak_rss_largest_child_mb": round(peak_child / 2**20), "num_workers": plan["workers"],
           "cmd": " ".join(cmd[1:])}
    print(f"  {res}", flush=True)
    return res


def tables(data: dict[str, Any]) -> str:
    """The suite's figures as markdown tables."""
    parts = data["parts"]
    meta = data["meta"]
    lines = [f"device {meta['device']} ({meta.get('gpu')}), {meta['cores']} cores, batch {meta['batch_size']}, "
             f"{meta['precision']}, {meta['reader_workers']} reader workers", ""]
    if not meta.get("gpu"):
        lines += [NO_GPU_NOTE.format(device=meta["device"]), ""]
    lines += [f"part {k} failed: {v.get('error', '')[:300]}" for k, v in parts.items() if not v.get("ok")]
    d = parts.get("device_decode", {})
    if d.get("ok"):
        lines += [f"device decode: probe MAD {d['probe_mad']}, {d['tiles']} tiles vs cpu-full MAD {d['mad_vs_cpu_full']} "
                  f"(max {d['max_vs_cpu_full']}), {d['device_decode_tiles_per_s']:,.0f} output tiles/s decoded + cut", ""]
    r = parts.get("reader", {})
    if r.get("ok"):
        lines += ["| decode mode | output tiles/s per core | stored tiles / output tile |", "|---|---|---|"]
        for m, v in r["reader_by_decode"].items():
            lines.append(f"| {m} | {v['reader_tiles_per_core_s']:,.0f} | {v.get('stored_tiles_per_output_tile', '')} |")
        lines.append("")
    lines += ["| encoder | decode | model only | end to end | ratio | steady ratio | GPU busy | loop breakdown |",
              "|---|---|---|---|---|---|---|---|"]
    for key, v in parts.items():
        if not key.startswith("encoder:"):
            continue
        if not v.get("ok"):
            lines.append(f"| {key[8:]} | – | failed: {v.get('error', '')[:80]} | | | | | |")
            continue
        for k, e in v.items():
            if not k.startswith("end_to_end"):
                continue
            bd = ", ".join(f"{s} {100 * f:.1f}%" for s, f in e["loop_breakdown"].items() if f >= 0.001)
            lines.append(f"| {key[8:]} | {e['decode']} | {v['model_only_tiles_per_s']:,.0f} | {e['tiles_per_s']:,.0f} | "
                         f"{e['ratio']:.3f} | {e['steady_ratio']:.3f} | {e['gpu_busy_pct']} | {bd} |")
    for key in ("whole_process", "whole_process[gpu]"):
        w = parts.get(key, {})
        if w.get("ok"):
            lines += ["", f"whole process `wsi extract` resnet50-trunc --decode {w['decode']}: {w['tiles']} tiles, "
                      f"{w['tiles_per_s_wall']} tiles/s over {w['wall_s']} s wall ({w['tiles_per_s_reported']} tiles/s "
                      f"in its loop); peak RSS main {w['peak_rss_main_mb']} MB, largest reader "
                      f"{w['peak_rss_largest_child_mb']} MB ({w['num_workers']} reader processes)"]
    return "\n".join(lines) + "\n"
