"""Stable Diffusion size on one GPU: an SD-1.5-config ``UNet2DConditionModel`` (random weights from the config, no
download) in fp16 at batch 1, DDIM-50 with the SD scheduler config, float32 state, local backend:

- sequential vs Picard at several windows vs the planner's choice (``method="auto"``): wall time (min of
  ``--repeats``, CUDA-synchronised), rounds, NFE, max |sample - sequential|;
- peak memory of each run (``torch.cuda.max_memory_allocated`` over the run's start) against the sampler's
  pre-flight bound (``SamplerConfig.check_memory``);
- host syncs per round and per network call (``torch.cuda.set_sync_debug_mode("warn")``: one warning per sync);
- Parareal against sequential, and the torch backend over NCCL with one rank against the local backend.

    python benchmarks/gpu_sd.py [--steps 50] [--windows 8 16 50] [--repeats 2]

Exits 1 without a CUDA device or without diffusers (benchmarks/prepare_gpu_wheels.sh carries it).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
import warnings

import torch

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def _model():
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from paratime.integrations.diffusers import from_diffusers, solver_for

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to("cuda", torch.float16).eval()
    sched = DDIMScheduler(**SD15_SCHEDULER)
    return from_diffusers(unet, sched, dtype=torch.float16), solver_for(sched)


def _run(sampler, emb, repeats):
    """(result, min wall s, peak bytes over the start, syncs per round, syncs per network call)."""
    walls, syncs = [], []
    for _ in range(repeats):
        rounds = []
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = sampler.sample(1, seed=0, encoder_hidden_states=emb, callback=lambda info: rounds.append(1))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        peak = torch.cuda.max_memory_allocated() - base
    # stats.rounds: network calls in sequence; the callbacks: rounds (sequential: steps, Parareal: iterations)
    return out, min(walls), peak, len(syncs) / max(len(rounds), 1), len(syncs) / max(out.stats.rounds, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--windows", type=int, nargs="+", default=[8, 16, 50])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sd: no CUDA device here; this benchmark runs only on a GPU", file=sys.stderr)
        return 1
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("gpu_sd: diffusers is not installed (benchmarks/prepare_gpu_wheels.sh prepares its wheels)",
              file=sys.stderr)
        return 1
    from paratime import ParallelSampler

    den, solver = _model()
    emb = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)).to("cuda", torch.float16)
    common = dict(solver=solver, steps=args.steps, state_dtype=torch.float32, progress=False, device="cuda")
    print(f"device: {torch.cuda.get_device_name(0)}; SD-1.5 UNet fp16 (random weights), batch 1, DDIM-{args.steps}, "
          "float32 state")
    print(f"{'run':<22} {'wall s':>8} {'speed-up':>8} {'rounds':>6} {'NFE':>6} {'max|Δ|':>9} {'peak MiB':>9} "
          f"{'bound MiB':>9} {'syncs/round':>11} {'syncs/call':>10}")
    ref = t_seq = None
    runs = [("sequential", dict(method="sequential"))]
    runs += [(f"picard W={w}", dict(method="picard", window=w)) for w in args.windows]
    runs += [("planner (auto)", dict(method="auto")), ("parareal", dict(method="parareal"))]
    for name, opts in runs:
        sampler = ParallelSampler(den, **common, **opts)
        out, wall, peak, per_round, per_call = _run(sampler, emb, args.repeats)
        if ref is None:
            ref, t_seq = out.samples, wall
        bound = sampler.config.check_memory((1, 4, 64, 64), torch.device("cuda"), torch.float32, sampler.solver)
        delta = (out.samples - ref).abs().max().item()
        print(f"{name:<22} {wall:>8.3f} {t_seq / wall:>8.2f} {out.stats.rounds:>6} {out.stats.nfe:>6.0f} "
              f"{delta:>9.2e} {peak / 2**20:>9.0f} {bound / 2**20:>9.0f} {per_round:>11.2f} {per_call:>10.2f}")
    # The torch backend over NCCL, one rank, against the local backend's Picard.
    from paratime.backends.torch_dist import TorchDistributedBackend

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with TorchDistributedBackend(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                 dist_backend="nccl", timeout_s=60) as backend:
        local = ParallelSampler(den, **common, method="picard", window=args.windows[0])
        dist_ = ParallelSampler(den, **common, method="picard", window=args.windows[0], backend=backend)
        a = local.sample(1, seed=0, encoder_hidden_states=emb).samples
        b = dist_.sample(1, seed=0, encoder_hidden_states=emb).samples
        print(f"nccl one rank vs local (picard W={args.windows[0]}): max|Δ| {(a - b).abs().max().item():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
