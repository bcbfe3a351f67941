#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has no network): fetched here into .gpu_wheels/ (git-ignored), carried
# there by the device tool (carry: [".gpu_wheels"]) and installed by scripts/gpu_check.sh. About 31 MB.
# The machine's python3 is 3.12 on manylinux_2_28+ x86_64 and has torch, torchvision, timm, tifffile, h5py,
# pillow, psutil, nvidia-ml-py; it lacks openslide-python, openslide-bin, imagecodecs and simplejpeg.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_wheels
python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
  -d .gpu_wheels openslide-python openslide-bin imagecodecs simplejpeg
ls -la .gpu_wheels
