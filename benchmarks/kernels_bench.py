"""GPU benchmark of the fused kernels against their torch references (CUDA only).

    python benchmarks/kernels_bench.py [--peak-gbs 4800]

Window and feature sizes typical of Stable Diffusion latents: 4x64x64 and 4x128x128 per sample, P up to 64 time
points, B up to 8 samples; fp32 state, bf16 network outputs, guidance on. Reports time per call and achieved GB/s
(bytes each implementation must move at least, over the time) against the device's peak (H200: ~4.8 TB/s).
"""

import argparse
import sys

import torch


def _time(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peak-gbs", type=float, default=4800.0, help="device memory bandwidth, GB/s")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernels_bench: no CUDA device here; this benchmark runs only on a GPU (nothing measured)")
        return 0
    from paratime.kernels import fused_step, picard_update, set_kernel_mode

    print(f"device: {torch.cuda.get_device_name(0)}; peak {args.peak_gbs:.0f} GB/s")
    print(f"{'kernel':<14} {'latent':<10} {'P':>3} {'B':>2} {'impl':<7} {'ms':>8} {'GB/s':>8} {'% peak':>7}")
    for feat in ((4, 64, 64), (4, 128, 128)):
        for P, B in ((16, 4), (64, 8)):
            M, D = P * B, 4 * feat[1] * feat[2]
            x = torch.randn(M, D, device="cuda")
            c, u = (torch.randn(M, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            z = torch.randn(M, D, device="cuda")
            coef = [torch.rand(M, device="cuda") for _ in range(4)]
            step_bytes = M * D * (4 + 2 + 2 + 4 + 4 + 4)            # x, c, u, z in; x0, dx out
            start, dx, old = torch.randn(B, D, device="cuda"), torch.randn(P, B, D, device="cuda"), \
                torch.randn(P, B, D, device="cuda")
            pic_bytes = B * D * 4 + 3 * P * B * D * 4                  # start, dx, old in; new out
            for impl in ("torch", "triton"):
                set_kernel_mode(impl)
                t = _time(lambda: fused_step(x, c, u, 7.5, *coef, noise=z))
                print(f"{'fused_step':<14} {'x'.join(map(str, feat)):<10} {P:>3} {B:>2} {impl:<7} {1e3 * t:>8.3f} "
                      f"{step_bytes / t / 1e9:>8.0f} {100 * step_bytes / t / 1e9 / args.peak_gbs:>6.1f}%")
                t = _time(lambda: picard_update(start, dx, old))
                print(f"{'picard_update':<14} {'x'.join(map(str, feat)):<10} {P:>3} {B:>2} {impl:<7} {1e3 * t:>8.3f} "
                      f"{pic_bytes / t / 1e9:>8.0f} {100 * pic_bytes / t / 1e9 / args.peak_gbs:>6.1f}%")
    set_kernel_mode("auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
