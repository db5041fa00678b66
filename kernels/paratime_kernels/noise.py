"""Counter-based standard-normal noise: one program per (row, block of elements), nothing read but the row's key.

The torch reference (the arithmetic this kernel must reproduce bit for bit, and what CPU users run) is
:func:`paratime.noise.normals_reference`; the notation is defined there:

    z_p = mix64(key + (p + 1) * GOLDEN)                  (splitmix64's p-th output for the row's key; uint64, wrapping)
    u1 = (hi32(z_p) + 0.5) 2^-32,  u2 = (lo32(z_p) + 0.5) 2^-32      (in (0, 1), exact in float64)
    theta = (lo32(z_p) + 0.5) (2 pi 2^-32)                          (= 2 pi u2 rounded once: 2^-32 scales exactly)
    out[2p] = r cos(2 pi u2),  out[2p + 1] = r sin(2 pi u2),  r = sqrt(-2 ln u1)   (Box-Muller in float64)

Grid: (rows, ceil(D / BLOCK)). Each element hashes its own pair p = e // 2 (two programs' lanes share a pair's hash
at most; recomputing it is cheaper than a second store pattern). The float64 Box-Muller is rounded once to float32
on store, so the few-ulp differences between libdevice and the CPU's libm in float64 vanish in the stored float32.
"""

import triton
import triton.language as tl


@triton.jit
def _mix64(z):
    # splitmix64's finaliser (a bijection of 64-bit words): xor-shift, multiply, twice, then xor-shift.
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def counter_normal_kernel(key_ptr, out_ptr, D, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)             # element indices of this block
    mask = e < D
    key = tl.load(key_ptr + row).to(tl.uint64, bitcast=True)        # the row's (seed, stream, sample, step) key
    # The pair's 64 random bits: splitmix64's output number p + 1 for this key.
    p = (e // 2).to(tl.uint64)
    z = _mix64(key + (p + 1) * 0x9E3779B97F4A7C15)
    # Two uniforms in (0, 1) from the high and low 32 bits, then Box-Muller in float64.
    u1 = ((z >> 32).to(tl.float64) + 0.5) * 2.3283064365386963e-10                 # 2^-32
    r = tl.sqrt(-2.0 * tl.log(u1))
    theta = ((z & 0xFFFFFFFF).to(tl.float64) + 0.5) * 1.4629180792671596e-09          # 2 pi 2^-32 = 2 pi u2
    n = tl.where(e % 2 == 0, r * tl.cos(theta), r * tl.sin(theta))
    tl.store(out_ptr + row.to(tl.int64) * D + e, n.to(tl.float32), mask=mask)
