#!/usr/bin/env bash
# Every GPU check in one run (for a session that has a GPU): compiled-kernel tests, kernel bandwidth, a batched
# window timing, NCCL with one rank. Writes logs to ${OUT:-gpu_out}.
set -uo pipefail
out=${OUT:-gpu_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q tests/test_gpu.py 2>&1 | tee "$out/tests.txt"
python -m paratime.kernels.aot 2>&1 | tee "$out/aot.txt"
python benchmarks/kernels_bench.py 2>&1 | tee "$out/kernels_bench.txt"
# Batched window timing on the GPU: digits, DDIM-100, 64 samples, Picard window 100 vs sequential.
python -m paratime sample --model digits --steps 100 --batch 64 --device cuda --no-progress --out "" \
    --json "$out/window_timing.json" 2>&1 | tee "$out/window_timing.txt"
