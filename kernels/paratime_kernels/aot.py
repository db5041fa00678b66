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

import torch

from .dispatch import SAMPLER_LAUNCHES, Launch, picard_tile

__all__ = ["compile_all", "SPECS", "spec"]

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def spec(launch: Launch) -> tuple[str, str, dict, dict]:
    """``(module, kernel function, signature, constexprs)`` of one :class:`~paratime.kernels.dispatch.Launch`,
    with the pointer dtypes exactly as the dispatcher passes them (unused pointers alias ``x``)."""
    st = _PTR[launch.state]
    if launch.kernel == "picard_update":
        return "picard", "picard_update_kernel", {
            "start_ptr": st, "dx_ptr": st, "old_ptr": st, "new_ptr": st, "part_ptr": "*fp32",
            "W": "i32", "B": "i32", "D": "i32", "NBLK": "i32"}, {"BLOCK": launch.block,
                                                                "WT": picard_tile(launch.block)}
    out = _PTR[launch.out]
    return "step", "fused_step_kernel", {
        "x_ptr": st, "out_ptr": out, "unc_ptr": out if launch.uncond else st, "z_ptr": st, "x0_ptr": st,
        "dx_ptr": st, "cx_ptr": "*fp32", "co_ptr": "*fp32", "kd_ptr": "*fp32", "kz_ptr": "*fp32", "g": "fp32",
        "D": "i32"}, {"HAS_UNCOND": launch.uncond, "HAS_NOISE": launch.noise, "WRITE_X0": launch.x0,
                      "WRITE_DX": launch.dx, "BLOCK": launch.block}


#: name -> (module, kernel function, signature, constexprs): exactly the variants the samplers launch.
SPECS = {launch.name: spec(launch) for launch in SAMPLER_LAUNCHES}


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
    print(f"{'kernel':<44} {'arch':<6} {'regs':>5} {'spill st/ld':>11} {'shared B':>8} {'warps':>5} {'cubin B':>8}")
    for r in recs:
        print(f"{r['kernel']:<44} {r['arch']:<6} {r['registers']!s:>5} "
              f"{r['spill_stores']!s:>5}/{r['spill_loads']!s:<5} "
              f"{r['shared_bytes']:>8} {r['num_warps']:>5} {r['cubin_bytes']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
