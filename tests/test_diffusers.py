"""paratime reproduces diffusers' own scheduler loops on tiny models built from a config (no download)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

from paratime import ParallelSampler  # noqa: E402
from paratime.diffusers_adapter import from_diffusers, solver_for  # noqa: E402
from paratime.noise import INITIAL, STEP, draw_noise  # noqa: E402


def _unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def _cond_unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4).eval()


def _scheduler(kind, prediction, spacing):
    common = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type=prediction, timestep_spacing=spacing)
    if kind == "ddim":
        return diffusers.DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1 if spacing == "leading" else 0,
                                       clip_sample=False)
    if kind == "ddpm":
        return diffusers.DDPMScheduler(**common)
    return diffusers.DPMSolverMultistepScheduler(**common)


def _diffusers_loop(unet, sch, steps, x, step_noise=None, cond=None, guidance=None, uncond=None):
    sch.set_timesteps(steps)
    x = x * sch.init_noise_sigma
    orig = None
    if step_noise is not None:   # feed diffusers' DDPM the same pre-drawn noise, step by step
        import diffusers.schedulers.scheduling_ddpm as mod

        it = iter(step_noise)
        orig = mod.randn_tensor
        mod.randn_tensor = lambda *a, **k: next(it).to(torch.float32)
    try:
        with torch.no_grad():
            for t in sch.timesteps:
                if step_noise is not None and t == 0:
                    next(it)        # paratime draws noise for every step; diffusers adds none at t = 0
                if guidance is None:
                    out = unet(x, t, **(cond or {})).sample
                else:
                    both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, uncond])).sample
                    c, u = both.chunk(2)
                    out = u + guidance * (c - u)
                x = sch.step(out, t, x).prev_sample
    finally:
        if orig is not None:
            mod.randn_tensor = orig
    return x


CASES = [(k, p, s) for k in ("ddim", "ddpm", "dpm") for p in ("epsilon", "v_prediction")
         for s in ("leading", "trailing", "linspace") if not (k == "ddim" and s == "linspace")]


@pytest.mark.parametrize("kind, prediction, spacing", CASES)
def test_sequential_reproduces_the_diffusers_loop(kind, prediction, spacing):
    unet, sch = _unet(), _scheduler(kind, prediction, spacing)
    steps, B = 8, 3
    den = from_diffusers(unet, sch)
    x_T = draw_noise(0, B, (2, 8, 8), None, INITIAL)
    z = draw_noise(0, B, (2, 8, 8), steps, STEP) if kind == "ddpm" else None
    want = _diffusers_loop(unet, sch, steps, x_T.float(), step_noise=z)
    s = ParallelSampler(den, solver=solver_for(sch), steps=steps, method="sequential", progress=False)
    got = s.sample(B, seed=0).samples
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)
    par = ParallelSampler(den, solver=solver_for(sch), steps=steps, tol=0.0, progress=False).sample(B, seed=0)
    torch.testing.assert_close(par.samples.float(), want, rtol=1e-4, atol=1e-4)


def test_cfg_on_a_conditional_unet_reproduces_the_diffusers_loop():
    unet, sch = _cond_unet(), _scheduler("ddim", "epsilon", "trailing")
    B, steps = 2, 8
    g = torch.Generator().manual_seed(5)
    emb, neg = torch.randn(B, 4, 8, generator=g), torch.randn(B, 4, 8, generator=g)
    x_T = draw_noise(1, B, (2, 8, 8), None, INITIAL)
    want = _diffusers_loop(unet, sch, steps, x_T.float(), cond=emb, guidance=5.0, uncond=neg)
    den = from_diffusers(unet, sch, guidance=5.0)
    for method, tol in (("sequential", 0.1), ("picard", 0.0)):
        got = ParallelSampler(den, solver="ddim", steps=steps, method=method, tol=tol, progress=False).sample(
            B, seed=1, encoder_hidden_states=emb, uncond={"encoder_hidden_states": neg}).samples
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)


def test_unsupported_schedulers_are_named():
    with pytest.raises(ValueError, match="scheduler"):
        from_diffusers(_unet(), diffusers.EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="spacing"):
        from_diffusers(_unet(), _scheduler("ddim", "epsilon", "leading")).schedule.grid(5, "trailing")
