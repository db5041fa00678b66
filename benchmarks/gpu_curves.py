"""The cost curve ``c(r)`` of one network call of ``r`` rows, measured on a device: is a call compute-bound
(``c(r)`` grows like ``r``: a round of ``r`` rows on K devices costs ``r / K`` one-row calls) or latency-bound
(``c(r)`` flat: a wide window is free)? The planner's choice rests on this curve (``cost="auto"`` measures it on CUDA).

Models: an SD-1.5-config ``UNet2DConditionModel`` (random weights from the config, no download; 64x64 latents, a
77x768 text embedding) in fp16 and bf16, and the shipped digits U-Net and policy network in float32 and fp16. Each
row count is timed as the sampler's planner times it (:func:`paratime.cost.measure_rows`: a warm-up, then the median
of ``--repeats`` calls each right after an untimed one, CUDA-synchronised around each timing). Printed per model:
``c(r)`` in ms, ``c(r) / c(1)`` and the rows a call evaluates per one-row call's time (``r c(1) / c(r)``: 1 when
compute-bound, ``r`` when latency-bound). ``--json`` writes ``{"device": name, "curves": {model: {"rows": [...],
"seconds": [...]}}}``; ``dict(zip(rows, seconds))`` is the table ``ParallelSampler(cost=)`` takes
(``benchmarks/devices.py --curve FILE:MODEL`` reads it).

    python benchmarks/gpu_curves.py [--rows 1 2 4 ... 128] [--repeats 5] [--json curves.json] [--device cuda]
                                    [--sizes 64 128]

``--device cpu --tiny`` runs the same path on a CPU with a small UNet config (the suite's smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from paratime.cost import measure_rows

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 attention_head_dim=8, cross_attention_dim=32, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def sd_unet(device: torch.device, dtype: torch.dtype, tiny: bool = False, size: int | None = None):
    """(denoiser, per-sample shape, text-embedding width): the SD-1.5-config UNet (random weights, seed 0), made on
    ``device`` directly (no slow CPU initialisation of 860M parameters), with diffusers' DDIM scheduler config;
    ``size``: the latents' side (None: the config's, 64 for SD-1.5's 512x512 images; 128 is 1024x1024)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from paratime.integrations.diffusers import from_diffusers

    config = TINY_UNET if tiny else SD15_UNET
    if size is not None:
        config = {**config, "sample_size": size}
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    unet = unet.to(device, dtype).eval()
    size = config["sample_size"]
    return from_diffusers(unet, DDIMScheduler(**SD15_SCHEDULER), dtype=dtype), (4, size, size), \
        config["cross_attention_dim"]


def _call(den, shape, device, cond_for):
    """``call(r)``: one network call of ``r`` rows at the middle of the noise range, as the planner makes it."""
    sigma = torch.tensor(1.0, device=device)
    t = torch.tensor(500.0, device=device)

    def call(r: int):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn((r, *shape), generator=g).to(device)
        with torch.no_grad():
            den(x, sigma.expand(r), t.expand(r), **cond_for(r))
    return call


def rows_for(rows: tuple[int, ...], size: int | None) -> tuple[int, ...]:
    """The row counts measured at latent side ``size``: a call holds no more pixels than ``rows[-1]`` rows at 64x64
    (a 128x128 row holds 4), one row at least; all of ``rows`` at 64x64 and below (None: the config's side)."""
    scale = 1.0 if size is None else max(1.0, (size / 64) ** 2)
    return tuple(r for r in rows if r == 1 or r * scale <= rows[-1])


def curves(device: torch.device, rows: tuple[int, ...], repeats: int, tiny: bool,
           sizes: tuple[int, ...] | None = None) -> dict:
    """Every model's measured curve by name; the SD UNet at each latent side of ``sizes`` (None: the config's), up to
    as many pixels a call as ``rows`` at 64x64 (a 128x128 call of r rows holds 4r rows' pixels)."""
    from paratime.models import load_model

    out = {}
    have_diffusers = True
    try:
        import diffusers  # noqa: F401
    except ImportError:
        have_diffusers = False
        print("gpu_curves: diffusers is not installed: the SD UNet rows are left out", file=sys.stderr)
    half = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    if have_diffusers:
        for size in sizes or (None,):
            for dtype in half:
                den, shape, width = sd_unet(device, dtype, tiny, size)
                emb = torch.randn(1, 77, width, generator=torch.Generator().manual_seed(1)).to(device, dtype)
                call = _call(den, shape, device, lambda r: {"encoder_hidden_states": emb.expand(r, -1, -1)})
                name = f"sd15-unet {str(dtype).split('.')[-1]}" + ("" if size in (None, 64) else f" {size}x{size}")
                out[name] = measure_rows(call, device, rows_for(rows, size), repeats)
                del den
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    for name in ("digits", "policy"):
        for dtype in [torch.float32, *([torch.float16] if device.type == "cuda" else [])]:
            den = load_model(name)
            den.network.to(device, dtype)
            den = dataclasses.replace(den, dtype=dtype)
            cond = {}
            if name == "policy":                 # the observation, (1, obs_dim)
                cond = {"obs": torch.zeros(1, den.network.config["obs_dim"], device=device)}
            call = _call(den, tuple(den.sample_shape), device,
                         lambda r, cond=cond: {k: v.expand(r, *v.shape[1:]) for k, v in cond.items()})
            out[f"{name} {str(dtype).split('.')[-1]}"] = measure_rows(call, device, rows, repeats)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the curves here")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small UNet config (a CPU smoke run)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="the SD UNet's latent sides (default: the config's 64; 128 is 1024x1024 images)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats: at least 1, got {args.repeats}")
    if args.sizes is not None and any(v < 8 or v % 8 for v in args.sizes):
        ap.error(f"--sizes: multiples of 8 from 8 on (the UNet downsamples 8x), got {args.sizes}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_curves: no CUDA device here (--device cpu --tiny runs the path on a CPU)", file=sys.stderr)
        return 1
    rows = tuple(args.rows)
    if rows[0] != 1 or any(b <= a for a, b in zip(rows, rows[1:])):
        print(f"gpu_curves: --rows must increase from 1, got {list(rows)}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; c(r) = the median of {args.repeats} calls of r rows (paratime.cost.measure_rows)")
    res = curves(device, rows, args.repeats, args.tiny, None if args.sizes is None else tuple(args.sizes))
    print(f"{'model':<30} " + " ".join(f"{'r=' + str(r):>9}" for r in rows))
    for model, c in res.items():
        print(f"{model + ' ms':<30} " + " ".join(f"{s * 1e3:>9.3f}" for s in c.seconds))
        print(f"{'  c(r)/c(1)':<30} " + " ".join(f"{s / c.seconds[0]:>9.2f}" for s in c.seconds))
        print(f"{'  r c(1)/c(r)':<30} " + " ".join(f"{r * c.seconds[0] / s:>9.2f}" for r, s in zip(c.rows, c.seconds)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "curves": {m: {"rows": list(c.rows), "seconds": list(c.seconds)}
                                                  for m, c in res.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
