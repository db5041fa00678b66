#!/usr/bin/env bash
# Prepare, on a machine that reaches the package registry, the wheels benchmarks/gpu_checks.sh needs on a GPU
# machine that reaches none: diffusers and what it needs beyond that machine's image (which has torch, triton,
# transformers, safetensors, huggingface-hub, numpy, pillow, regex, requests, filelock, pytest, hypothesis; see
# /work/.library/device/KINDS.md), for CPython 3.12 on x86-64 Linux. torch and triton are NOT carried: the GPU
# machine's own CUDA builds are used. The wheels go to .whl/ at the repository root (ignored by git: listed in
# .git/info/exclude), which travels with the working tree when named in `carry`.
#
#   bash benchmarks/prepare_gpu_wheels.sh            # here, once (needs the registry)
#   device run, carry [".whl"]:  bash benchmarks/gpu_checks.sh     # there (installs from .whl/, no registry)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.whl"
mkdir -p "$dest"
exclude=$(git -C "$root" rev-parse --git-path info/exclude)
case $exclude in /*) ;; *) exclude="$root/$exclude" ;; esac
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
# name==version: one version of each (two stop the install there).
PKGS=(diffusers==0.42.1 importlib_metadata==8.7.0)     # zipp, its one need, is in the image
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${PKGS[@]}"
ls -la "$dest"
du -sh "$dest"
