"""GPU benchmark of exactly the kernel variants the samplers launch (``paratime.kernels.SAMPLER_LAUNCHES``) against
their torch references (CUDA only).

    python benchmarks/kernels_bench.py [--peak-gbs GB/s] [--quick]

Sizes are those of Stable Diffusion latents: 4x64x64 per sample, a Picard window of 16 points x 4 samples (64 rows)
and 64 x 8 (512 rows) for the fused step; the Picard update at one latent (the small block) and at 64 samples (the
large block). Reports time per call (CUDA events, median of 20) and achieved GB/s (the bytes each variant must move
at least, over the time) against the device's peak memory bandwidth (known devices are looked up; else
``--peak-gbs``).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "A10": 600.0}


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


def _fused_case(launch, M, D):
    """Tensors and bytes moved for one fused_step launch of M rows x D features."""
    kw = dict(device="cuda")
    x = torch.randn(M, D, dtype=launch.state, **kw)
    out = torch.randn(M, D, **kw).to(launch.out)
    unc = torch.randn(M, D, **kw).to(launch.out) if launch.uncond else None
    z = torch.randn(M, D, dtype=launch.state, **kw) if launch.noise else None
    coef = [torch.rand(M, **kw) for _ in range(4)]
    es, eo = x.element_size(), out.element_size()
    nbytes = M * D * (es + eo * (2 if launch.uncond else 1) + (es if launch.noise else 0)
                      + es * (int(launch.x0) + int(launch.dx)))
    args = (x, out, unc, 7.5, *coef)
    kwargs = dict(noise=z, want_x0=launch.x0, want_dx=launch.dx)
    return args, kwargs, nbytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peak-gbs", type=float, default=None, help="device memory bandwidth, GB/s")
    ap.add_argument("--quick", action="store_true", help="one size per variant")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_bench: no CUDA device here; this benchmark runs only on a GPU (nothing measured)")
        return 0
    from paratime.kernels import SAMPLER_LAUNCHES, fused_step, picard_update, set_kernel_mode

    name = torch.cuda.get_device_name(0)
    peak = args.peak_gbs or next((v for k, v in PEAK_GBS.items() if k in name), None)
    print(f"device: {name}; peak {peak or float('nan'):.0f} GB/s")
    print(f"{'variant':<46} {'rows x D':>14} {'impl':<7} {'ms':>8} {'GB/s':>8} {'% peak':>7}")
    D = 4 * 64 * 64
    for launch in SAMPLER_LAUNCHES:
        if launch.kernel == "fused_step":
            cases = [(M, D) for M in ((64,) if args.quick else (64, 512))]
        else:                                   # (W, B) at which the dispatcher picks this block
            cases = [(16, 1) if launch.block < 1024 else (16, 64)]
        for a, b in cases:
            if launch.kernel == "fused_step":
                fargs, fkw, nbytes = _fused_case(launch, a, b)
                fn = lambda: fused_step(*fargs, **fkw)  # noqa: E731
                size = f"{a}x{b}"
            else:
                W, B = a, b
                start = torch.randn(B, D, device="cuda", dtype=launch.state)
                dx, old = (torch.randn(W, B, D, device="cuda", dtype=launch.state) for _ in range(2))
                nbytes = start.numel() * start.element_size() + 3 * dx.numel() * dx.element_size()
                fn = lambda: picard_update(start, dx, old, block=launch.block)  # noqa: E731
                size = f"{W}x{B}x{D}"
            for impl in ("torch", "triton"):
                set_kernel_mode(impl)
                t = _time(fn)
                gbs = nbytes / t / 1e9
                pct = f"{100 * gbs / peak:>6.1f}%" if peak else "   n/a"
                print(f"{launch.name:<46} {size:>14} {impl:<7} {1e3 * t:>8.3f} {gbs:>8.0f} {pct:>7}")
    set_kernel_mode("auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
