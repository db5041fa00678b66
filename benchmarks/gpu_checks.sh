#!/usr/bin/env bash
# Every GPU check in one run (on one H100, 2026-12-06, about 5 minutes: tests 61 s, curves 53 s, the two SD runs
# 80 s each, kernels 6 s, AOT 12 s), on a bare GPU machine that reaches no package registry.
# Prepare here first (needs the registry):  bash benchmarks/prepare_gpu_wheels.sh   (wheels -> .whl/)
# Then on the GPU machine, with .whl/ carried along:  bash benchmarks/gpu_checks.sh
#   0. installs the carried wheels (diffusers) into /tmp/site and paratime itself without build isolation, no index
#   1. tests/test_gpu.py: every compiled kernel variant vs its torch reference, bitwise-repeatable Picard residuals,
#      Picard and Parareal on CUDA with a diffusers UNet in fp16 and bf16, host syncs per round
#      (torch.cuda.set_sync_debug_mode), derived max_batch and the memory refusal, NCCL with one rank
#   2. ahead-of-time compilation of exactly those variants (registers, spills)
#   3. kernel-only time and GB/s against the device's HBM peak on HBM-sized inputs (benchmarks/kernels_bench.py)
#   4. the cost curve c(r) of an SD-1.5-config UNet (fp16, bf16; 64x64 and 128x128 latents), the digits U-Net and
#      the policy (float32, fp16) at 1..128 rows (128x128: to 32) (benchmarks/gpu_curves.py; curves.json holds the
#      tables ParallelSampler(cost=) takes)
#   5. an SD-1.5-config UNet in fp16 at batch 1: sequential vs Picard at several windows vs the planner's choice,
#      peak memory against the pre-flight bound, syncs per round and per call and where they are, Parareal, NCCL
#      with one rank (benchmarks/gpu_sd.py), without guidance and with SD's 7.5 (two rows a point)
#      and at 1024x1024 (128x128 latents), where a call is compute-bound sooner (the 128x128 curve and run were
#      added after the H100 lease and have not run on a GPU yet)
# GPU_CHECKS="tests gpu_sd" runs only the steps named (tests curves gpu_sd gpu_sd_cfg gpu_sd_1024 kernels_bench aot).
# The log goes to ${OUT:-gpu_out}/log.txt (one file: the device tool brings back at most 8), the curves to
# curves.json; each step has its own time limit so that one hang cannot eat the budget (12 minutes in all at most,
# over the device tool's 10 a command: with the 1024x1024 run, expect about 8, or run a GPU_CHECKS subset); the
# script exits non-zero if any step failed, and at once, with a message, where there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS="tests curves gpu_sd gpu_sd_cfg gpu_sd_1024 kernels_bench aot"
for name in ${GPU_CHECKS:-}; do
    [[ " $STEPS " == *" $name "* ]] || { echo "GPU_CHECKS: unknown step '$name'; the steps: $STEPS" >&2; exit 2; }
done
out=${OUT:-gpu_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
t0=$(date +%s)
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1 \
        || ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_checks: no CUDA GPU here (nvidia-smi or torch.cuda.is_available() says none); these checks need one" >&2
    exit 2
fi
log="$out/log.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)' | tee -a "$log"
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
step() {   # step NAME SECONDS CMD...: run with a time limit, append to the log, remember a failure
    local name=$1 limit=$2 t=$(date +%s); shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $(( $(date +%s) - t )) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || { echo "gpu_checks: $name failed (exit $rc)" | tee -a "$log"; fail=1; }
}
# python -P: the current folder is not put first on sys.path, so the installed paratime (with paratime.kernels
# mapped from kernels/) is imported, not the tree's paratime/ folder.
want() { [ -z "${GPU_CHECKS:-}" ] || [[ " $GPU_CHECKS " == *" $1 "* ]]; }   # GPU_CHECKS="tests gpu_sd": a subset
want tests && step tests 150 "$PY" -P -m pytest -q -rA -s -p no:cacheprovider tests/test_gpu.py
want curves && step curves 120 "$PY" -P benchmarks/gpu_curves.py --sizes 64 128 --json "$out/curves.json"
want gpu_sd && step gpu_sd 120 "$PY" -P benchmarks/gpu_sd.py --steps 50 --windows 8 16 32 50 --repeats 2
want gpu_sd_cfg && step gpu_sd_cfg 120 "$PY" -P benchmarks/gpu_sd.py --steps 50 --windows 8 16 32 --repeats 2 \
    --guidance 7.5
want gpu_sd_1024 && step gpu_sd_1024 150 "$PY" -P benchmarks/gpu_sd.py --size 128 --steps 50 --windows 4 8 16 \
    --repeats 2
want kernels_bench && step kernels_bench 40 "$PY" -P benchmarks/kernels_bench.py
want aot && step aot 40 "$PY" -P -m paratime.kernels.aot
echo "gpu_checks: $(( $(date +%s) - t0 )) s" | tee -a "$log"
exit $fail
