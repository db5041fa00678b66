#!/usr/bin/env bash
# Every GPU check in one run, under 9 minutes on one H100/H200, on a bare GPU machine that reaches no package
# registry. Prepare here first (needs the registry):  bash benchmarks/prepare_gpu_wheels.sh   (wheels -> .whl/)
# Then on the GPU machine, with .whl/ carried along:  bash benchmarks/gpu_checks.sh
#   0. installs the carried wheels (diffusers) into /tmp/site and paratime itself without build isolation, no index
#   1. tests/test_gpu.py: every compiled kernel variant vs its torch reference, bitwise-repeatable Picard residuals,
#      Picard and Parareal on CUDA with a diffusers UNet in fp16 and bf16, host syncs per round
#      (torch.cuda.set_sync_debug_mode), derived max_batch and the memory refusal, NCCL with one rank
#   2. ahead-of-time compilation of exactly those variants (registers, spills)
#   3. kernel-only time and GB/s against the device's HBM peak on HBM-sized inputs (benchmarks/kernels_bench.py)
#   4. an SD-1.5-config UNet in fp16 at batch 1: sequential vs Picard at several windows vs the planner's choice,
#      peak memory against the pre-flight bound, syncs per round and per call, Parareal, NCCL with one rank
#      (benchmarks/gpu_sd.py)
# Logs go to ${OUT:-gpu_out}; each step has its own time limit so that one hang cannot eat the budget; the script
# exits non-zero if any step failed, and at once, with a message, where there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
t0=$(date +%s)
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1 \
        || ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_checks: no CUDA GPU here (nvidia-smi or torch.cuda.is_available() says none); these checks need one" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# 0. Offline install: the carried wheels, then paratime from this tree (no registry, no build isolation).
site=/tmp/paratime_site
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "gpu_checks: installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_checks: no .whl/ here (run benchmarks/prepare_gpu_wheels.sh and carry .whl): diffusers checks will skip"
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site/pt" . \
    || { echo "gpu_checks: installing paratime from the tree failed" >&2; exit 3; }
export PYTHONPATH="$site/pt:$PYTHONPATH"
fail=0
step() {   # step NAME SECONDS CMD...: run with a time limit, log to $out/NAME.txt, remember a failure
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "gpu_checks: $name failed (exit $rc)" | tee -a "$out/failed.txt"; fail=1; }
}
# python -P: the current folder is not put first on sys.path, so the installed paratime (with paratime.kernels
# mapped from kernels/) is imported, not the tree's paratime/ folder.
step tests 200 "$PY" -P -m pytest -q -rA -s -p no:cacheprovider tests/test_gpu.py
step aot 60 "$PY" -P -m paratime.kernels.aot
step kernels_bench 60 "$PY" -P benchmarks/kernels_bench.py
step gpu_sd 180 "$PY" -P benchmarks/gpu_sd.py --steps 50 --windows 8 16 50 --repeats 2
echo "gpu_checks: $(( $(date +%s) - t0 )) s" | tee "$out/elapsed.txt"
exit $fail
