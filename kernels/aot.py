"""Compile every kernel ahead of time for NVIDIA sm_80 and sm_90 on a machine without a GPU, and report
registers, shared memory and spills (from ptxas -v on the generated PTX).

    python -m paratime.kernels.aot [--json]

Must run without TRITON_INTERPRET=1 (the interpreter replaces @triton.jit functions).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

__all__ = ["compile_all", "SPECS"]

# (kernel, signature, constexprs) for the variants the samplers launch.
SPECS = {
    "fused_step[guided,noise]": ("step", "fused_step_kernel", {
        "x_ptr": "*fp32", "out_ptr": "*bf16", "unc_ptr": "*bf16", "z_ptr": "*fp32", "x0_ptr": "*fp32",
        "dx_ptr": "*fp32", "cx_ptr": "*fp32", "co_ptr": "*fp32", "kd_ptr": "*fp32", "kz_ptr": "*fp32", "g": "fp32",
        "D": "i32"}, {"HAS_UNCOND": True, "HAS_NOISE": True, "WRITE_X0": True, "WRITE_DX": True, "BLOCK": 1024}),
    "fused_step[x0 only]": ("step", "fused_step_kernel", {
        "x_ptr": "*fp32", "out_ptr": "*fp16", "unc_ptr": "*fp16", "z_ptr": "*fp32", "x0_ptr": "*fp32",
        "dx_ptr": "*fp32", "cx_ptr": "*fp32", "co_ptr": "*fp32", "kd_ptr": "*fp32", "kz_ptr": "*fp32", "g": "fp32",
        "D": "i32"}, {"HAS_UNCOND": False, "HAS_NOISE": False, "WRITE_X0": True, "WRITE_DX": False, "BLOCK": 1024}),
    "picard_update[fp32]": ("picard", "picard_update_kernel", {
        "start_ptr": "*fp32", "dx_ptr": "*fp32", "old_ptr": "*fp32", "new_ptr": "*fp32", "errsq_ptr": "*fp32",
        "W": "i32", "B": "i32", "D": "i32"}, {"BLOCK": 1024}),
    "picard_update[bf16]": ("picard", "picard_update_kernel", {
        "start_ptr": "*bf16", "dx_ptr": "*bf16", "old_ptr": "*bf16", "new_ptr": "*bf16", "errsq_ptr": "*fp32",
        "W": "i32", "B": "i32", "D": "i32"}, {"BLOCK": 1024}),
}


def _ptxas_stats(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path          # the ptxas Triton itself used for this arch
    target = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)           # sm_80, sm_90a
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([ptxas, "-v", f"--gpu-name={target}", f.name, "-o", os.devnull],
                           capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(f.name)
    text = r.stdout + r.stderr
    grab = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else None  # noqa: E731
    return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"), "smem_bytes": grab(r"(\d+) bytes smem")}


def compile_all(archs=(80, 90)) -> list[dict]:
    """Compile each spec for each arch; returns one record per (kernel, arch)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: ahead-of-time compilation needs the real @triton.jit")
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = []
    for name, (mod, fn_name, sig, consts) in SPECS.items():
        fn = getattr(importlib.import_module(f"paratime.kernels.{mod}"), fn_name)
        full_sig = {**sig, **{k: "constexpr" for k in consts}}
        for arch in archs:
            k = triton.compile(ASTSource(fn, full_sig, consts), target=GPUTarget("cuda", arch, 32))
            rec = {"kernel": name, "arch": f"sm_{arch}", "cubin_bytes": len(k.asm["cubin"]),
                   "shared_bytes": k.metadata.shared, "num_warps": k.metadata.num_warps}
            rec.update(_ptxas_stats(k.asm["ptx"], arch))
            out.append(rec)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    recs = compile_all()
    if "--json" in argv:
        print(json.dumps(recs))
        return 0
    print(f"{'kernel':<26} {'arch':<6} {'regs':>5} {'spill st/ld':>11} {'shared B':>8} {'warps':>5} {'cubin B':>8}")
    for r in recs:
        print(f"{r['kernel']:<26} {r['arch']:<6} {r['registers']!s:>5} {r['spill_stores']!s:>5}/{r['spill_loads']!s:<5} "
              f"{r['shared_bytes']:>8} {r['num_warps']:>5} {r['cubin_bytes']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
