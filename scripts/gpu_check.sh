#!/usr/bin/env bash
# Issue #19's GPU check, in one go on a fresh GPU machine (run from the repository root; writes under $OUT):
#   1. installs the carried wheels (scripts/gpu_wheels.sh) that the machine lacks;
#   2. checks the encoder's stain standardisation on the device against the CPU path ($OUT/stain_gpu.log);
#   3. runs `scripts/bench_extract.py --suite gpu` (builds a 24000x18000 bench slide; device-decode check,
#      reader table per decode mode, resnet50-trunc / ViT-B/16 / ViT-L/16 model-only vs end-to-end with the
#      loop breakdown and GPU busy, whole-process `wsi extract` tiles/s and main-process peak RSS at 14
#      reader processes). Figures go to $OUT/bench/gpu_suite.json part by part (a failing part keeps the
#      others), the tables to $OUT/bench/gpu_suite.md; the log to $OUT/suite.log;
#   4. issue #21's speed target on the device: `scripts/bench_tme.py --device auto` (CUDA there) on the suite's slide
#      (`wsi extract` against `wsi tme` dense and grid, seconds and ratios) → $OUT/tme.log.
# Usage: bash scripts/gpu_check.sh [--quick]      (--quick: a small slide, a smoke test; works on CPU too)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT/bench"
PY=${PYTHON:-python3}
{
  date; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  $PY -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
if compgen -G ".gpu_wheels/*.whl" > /dev/null; then
  $PY -m pip install --no-deps --no-index --quiet .gpu_wheels/*.whl >> "$OUT/env.txt" 2>&1 || echo "wheel install failed" >> "$OUT/env.txt"
fi
$PY -c "import openslide, simplejpeg, imagecodecs; print('openslide', openslide.__version__, openslide.__library_version__, 'simplejpeg', simplejpeg.__version__)" >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 WSI_BENCH_DIR=/tmp/wsi_bench
# the encoder's stain standardisation on the device (one piece, float64 window moments) against the CPU path
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/encoders/test_stain_norm.py -k accelerator 2>&1 | tail -3 \
  | tee "$OUT/stain_gpu.log"
timeout "${SUITE_TIMEOUT:-400}" $PY scripts/bench_extract.py --suite gpu --out "$OUT/bench" --work /tmp/wsi_bench "$@" \
  2>&1 | grep -v -e "DeprecationWarning" -e "warnings.warn" | tee "$OUT/suite.log"
echo "suite exit: ${PIPESTATUS[0]}" | tee -a "$OUT/suite.log"
SLIDE=$(ls /tmp/wsi_bench/suite*/bench_*.svs 2>/dev/null | head -1)
if [ -n "$SLIDE" ]; then
  timeout "${TME_TIMEOUT:-150}" $PY scripts/bench_tme.py --slide "$SLIDE" --rounds 2 --device auto \
    --work /tmp/wsi_bench_tme 2>&1 | grep -v -e "DeprecationWarning" -e "warnings.warn" | tee "$OUT/tme.log"
  echo "tme exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tme.log"
else
  echo "no bench slide under /tmp/wsi_bench: bench_tme skipped" | tee "$OUT/tme.log"
fi
