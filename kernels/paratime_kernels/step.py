"""Fused step kernel: guidance, conversion to x0 and the step increment in one pass over the window.

Grid: (rows, ceil(D / BLOCK)). Each program loads one block of one row of x, the network output(s) and the noise,
upcasts to float32 (the interpreter computes bf16 wrongly otherwise), and stores x0 and dx in the storage dtype.
"""

import triton
import triton.language as tl


@triton.jit
def fused_step_kernel(x_ptr, out_ptr, unc_ptr, z_ptr, x0_ptr, dx_ptr, cx_ptr, co_ptr, kd_ptr, kz_ptr, g, D,
                      HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_X0: tl.constexpr,
                      WRITE_DX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    base = row.to(tl.int64) * D
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(out_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    # Guided prediction: o = u + g (c - u).
    if HAS_UNCOND:
        u = tl.load(unc_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        o = u + g * (o - u)
    # Conversion to x0: linear in (x, o) with per-row coefficients.
    x0 = tl.load(cx_ptr + row) * x + tl.load(co_ptr + row) * o
    if WRITE_X0:
        tl.store(x0_ptr + base + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)
    # Step increment: dx = k_d (x - x0) + k_z z.
    if WRITE_DX:
        dx = tl.load(kd_ptr + row) * (x - x0)
        if HAS_NOISE:
            z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            dx = dx + tl.load(kz_ptr + row) * z
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
