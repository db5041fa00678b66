#!/usr/bin/env bash
# Every GPU check of issue 12 in one run (< 8 minutes on one H100/H200), for a session that has a GPU:
#   1. tests/test_gpu.py: every compiled kernel variant the samplers launch vs its torch reference, bitwise-repeatable
#      Picard residuals, Picard and Parareal on CUDA with a diffusers UNet in fp16 and bf16, host syncs per round
#      (torch.cuda.set_sync_debug_mode), derived max_batch and the memory refusal, NCCL with one rank
#   2. ahead-of-time compilation of exactly those variants (registers, spills)
#   3. kernel time and GB/s against the device's peak (exactly the launched variants)
#   4. per-round time, rounds and NFE against the Picard window (digits DDIM-100 and DDPM-1000, batch 64, on CUDA)
# Logs go to ${OUT:-gpu_out}; each step has its own time limit so that one hang cannot eat the budget.
set -uo pipefail
out=${OUT:-gpu_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 240 python -m pytest -q -rA -s tests/test_gpu.py 2>&1 | tee "$out/tests.txt"
timeout 60 python -m paratime.kernels.aot 2>&1 | tee "$out/aot.txt"
timeout 90 python benchmarks/kernels_bench.py 2>&1 | tee "$out/kernels_bench.txt"
timeout 90 python benchmarks/window_sweep.py --device cuda --batch 64 --threads 4 \
    --cases digits/ddim-100 digits/ddpm-1000 --json "$out/window_sweep.json" 2>&1 | tee "$out/window_sweep.txt"
echo "gpu_checks: $(( $(date +%s) - t0 )) s" | tee "$out/elapsed.txt"
