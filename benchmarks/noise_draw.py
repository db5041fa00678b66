"""Time drawing a sampler's step-noise table: Stable Diffusion size (4 x 64 x 64 latents), DDPM-1000, per batch.

    python benchmarks/noise_draw.py [--batch 1 4] [--steps 1000] [--threads 1] [--device cpu|cuda] [--repeats 3]
                                    [--module PATH]

Prints min / median / max seconds over the repeats for ``draw_noise(seed, B, (4, 64, 64), steps, STEP)`` on the
device (CUDA timings synchronise before and after). ``--module PATH`` times the ``draw_noise`` of another copy of
``paratime/noise.py`` (e.g. ``git show HEAD~1:paratime/noise.py > /tmp/old_noise.py``) for a before/after figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch


def load_draw(module: str | None):
    if module is None:
        from paratime.noise import draw_noise
        return draw_noise
    spec = importlib.util.spec_from_file_location("noise_under_test", module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.draw_noise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--module", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    draw = load_draw(args.module)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"threads={args.threads} device={device} steps={args.steps} shape=(4, 64, 64) "
          f"module={args.module or 'paratime.noise'}")
    for B in args.batch:
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            z = draw(0, B, (4, 64, 64), args.steps, 1, dtype=torch.float32, device=device)
            sync()
            times.append(time.perf_counter() - t0)
        print(f"batch {B}: min {min(times):.3f} s  median {statistics.median(times):.3f} s  max {max(times):.3f} s  "
              f"({z.numel() / 1e6:.1f} M numbers, {z.device})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
