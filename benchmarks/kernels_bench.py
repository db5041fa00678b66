"""GPU benchmark of exactly the kernel variants the samplers launch (``paratime.kernels.SAMPLER_LAUNCHES``): the
Triton kernels alone, launched directly on pre-allocated outputs (no Python dispatcher, no allocation inside the
timing), against the device's peak memory bandwidth, and the torch references beside them (CUDA only).

    python benchmarks/kernels_bench.py [--peak-gbs GB/s] [--quick]

Sizes are HBM-sized (every case moves far more than the 50-60 MB of L2), built from Stable Diffusion latents
(4x64x64 = 16,384 features per sample): the fused step over 1,000 rows (a window of 500 points x 2 samples, 64 MB per
fp32 tensor); the Picard update over a window of 500 points of one latent (the small block) and of 100 points x 64
samples (the large block). Reports time per launch (CUDA events, median of 20) and achieved GB/s (the bytes each
variant must move at least, over the time) against the device's peak (known devices are looked up; else
``--peak-gbs``). Exits 1 without a CUDA device.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "A10": 600.0}
D = 4 * 64 * 64


def _time(fn, reps=20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return statistics.median(times)


def _fused_case(launch, M):
    """``(kernel launch, torch reference, bytes moved)`` for one fused_step variant on ``M`` rows x D."""
    from paratime.kernels.dispatch import BLOCK, triton_cdiv
    from paratime.kernels.reference import fused_step_reference
    from paratime.kernels.step import fused_step_kernel

    kw = dict(device="cuda")
    x = torch.randn(M, D, dtype=launch.state, **kw)
    out = torch.randn(M, D, **kw).to(launch.out)
    unc = torch.randn(M, D, **kw).to(launch.out) if launch.uncond else None
    z = torch.randn(M, D, dtype=launch.state, **kw) if launch.noise else None
    coef = [torch.rand(M, **kw) for _ in range(4)]
    x0, dx = torch.empty_like(x), torch.empty_like(x)
    es, eo = x.element_size(), out.element_size()
    nbytes = M * D * (es + eo * (2 if launch.uncond else 1) + (es if launch.noise else 0)
                      + es * (int(launch.x0) + int(launch.dx)))
    grid = (M, triton_cdiv(D, BLOCK))

    def kernel():
        fused_step_kernel[grid](x, out, unc if unc is not None else x, z if z is not None else x, x0, dx, *coef, 7.5,
                                D, HAS_UNCOND=unc is not None, HAS_NOISE=z is not None, WRITE_X0=launch.x0,
                                WRITE_DX=launch.dx, BLOCK=BLOCK)

    def reference():
        fused_step_reference(x, out, unc, 7.5, *coef, z, launch.x0, launch.dx)

    return kernel, reference, nbytes


def _picard_case(launch, W, B):
    """``(kernel launch, torch reference, bytes moved)`` for the Picard update of ``W`` points x ``B`` samples."""
    from paratime.kernels.dispatch import picard_tile, triton_cdiv
    from paratime.kernels.picard import picard_update_kernel
    from paratime.kernels.reference import picard_update_reference

    start = torch.randn(B, D, device="cuda", dtype=launch.state)
    dx, old = (torch.randn(W, B, D, device="cuda", dtype=launch.state) for _ in range(2))
    new = torch.empty_like(dx)
    nblk = triton_cdiv(D, launch.block)
    part = torch.empty((W, B, nblk), device="cuda", dtype=torch.float32)
    nbytes = start.numel() * start.element_size() + 3 * dx.numel() * dx.element_size()

    def kernel():
        picard_update_kernel[(B, nblk)](start, dx, old, new, part, W, B, D, nblk, BLOCK=launch.block,
                                        WT=picard_tile(launch.block))

    return kernel, (lambda: picard_update_reference(start, dx, old)), nbytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peak-gbs", type=float, default=None, help="device memory bandwidth, GB/s")
    ap.add_argument("--quick", action="store_true", help="one case per kernel")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_bench: no CUDA device here; this benchmark runs only on a GPU (nothing measured)",
              file=sys.stderr)
        return 1
    from paratime.kernels import SAMPLER_LAUNCHES

    name = torch.cuda.get_device_name(0)
    peak = args.peak_gbs or next((v for k, v in PEAK_GBS.items() if k in name), None)
    print(f"device: {name}; peak {peak or float('nan'):.0f} GB/s; kernels launched directly (no dispatcher)")
    print(f"{'variant':<46} {'size':>16} {'impl':<7} {'ms':>8} {'GB/s':>8} {'% peak':>7}")
    launches = SAMPLER_LAUNCHES
    if args.quick:
        launches = [next(x for x in launches if x.kernel == "fused_step"),
                    *(x for x in launches if x.kernel == "picard_update")]
    for launch in launches:
        if launch.kernel == "fused_step":
            kernel, reference, nbytes = _fused_case(launch, 1000)
            size = f"1000x{D}"
        else:                                   # (W, B) at which the dispatcher picks this block
            W, B = (500, 1) if launch.block < 1024 else (100, 64)
            kernel, reference, nbytes = _picard_case(launch, W, B)
            size = f"{W}x{B}x{D}"
        for impl, fn in (("triton", kernel), ("torch", reference)):
            t = _time(fn)
            gbs = nbytes / t / 1e9
            pct = f"{100 * gbs / peak:>6.1f}%" if peak else "   n/a"
            print(f"{launch.name:<46} {size:>16} {impl:<7} {1e3 * t:>8.3f} {gbs:>8.0f} {pct:>7}")
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
