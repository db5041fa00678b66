"""paratime reproduces diffusers' own scheduler loops (``set_timesteps`` / ``scale_model_input`` / ``step``, same
latents, same generator) on a tiny UNet built from a config (no download), and Picard at tol 0 equals that sequential
result."""

import inspect
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

from paratime import ParallelSampler  # noqa: E402
from paratime.integrations.diffusers import (from_diffusers, sample_latents, solver_for,  # noqa: E402
                                            with_timestep_kwargs)

BOUND = 1e-4    # max |paratime - diffusers| relative to the sample scale
SHAPE = (2, 2, 8, 8)
SD_BETAS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


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


def diffusers_loop(net, sch, steps, seed, step_kwargs=None, **cond):
    """The scheduler's own loop, as a pipeline runs it. Returns (initial latents, final sample)."""
    sch.set_timesteps(steps)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * getattr(sch, "init_noise_sigma", 1)
    x = latents
    step_kwargs = dict(step_kwargs or {})
    if "generator" in inspect.signature(sch.step).parameters:
        step_kwargs["generator"] = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for t in sch.timesteps:
            inp = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
            out = net(inp, t, **cond).sample
            x = sch.step(out, t, x, **step_kwargs).prev_sample
    return latents, x


def compare(sch, steps=8, eta=0.0, methods=(("sequential", None), ("picard", 0.0))):
    """Relative max difference of paratime (each method) from diffusers' loop on the tiny UNet."""
    unet = _unet()
    den = from_diffusers(unet, sch)
    solver = solver_for(sch, eta=eta)
    latents, want = diffusers_loop(unet, sch, steps, seed=3, step_kwargs={"eta": eta} if eta else None)
    errs = {}
    for method, tol in methods:
        opts = {} if tol is None else {"tol": tol}
        s = ParallelSampler(den, solver=solver, steps=steps, method=method, progress=False, **opts)
        got = sample_latents(s, latents, generator=torch.Generator().manual_seed(4)).samples
        errs[method] = float((got - want).abs().max() / want.abs().max().clamp_min(1))
    return errs


def _ddim(**kw):
    return diffusers.DDIMScheduler(**{**SD_BETAS, "clip_sample": False, **kw})


CASES = {
    # DDIM / DDIMParallel: clip_sample on (the default) and off, set_alpha_to_one, steps_offset, spacings, zero SNR.
    "ddim": lambda: _ddim(),
    "ddim-clip": lambda: _ddim(clip_sample=True, clip_sample_range=0.5),
    "ddim-leading-offset": lambda: _ddim(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
    "ddim-trailing-v": lambda: _ddim(timestep_spacing="trailing", prediction_type="v_prediction"),
    "ddim-zero-snr": lambda: _ddim(timestep_spacing="trailing", prediction_type="v_prediction",
                                   rescale_betas_zero_snr=True),
    "ddim-x0": lambda: _ddim(prediction_type="sample", clip_sample=True),
    "ddim-parallel": lambda: diffusers.DDIMParallelScheduler(**SD_BETAS, clip_sample=True),
    # DDPM / DDPMParallel (stochastic: same generator).
    "ddpm": lambda: diffusers.DDPMScheduler(**SD_BETAS),
    "ddpm-small-log-linspace": lambda: diffusers.DDPMScheduler(variance_type="fixed_small_log",
                                                              timestep_spacing="linspace"),
    "ddpm-parallel-v": lambda: diffusers.DDPMParallelScheduler(**SD_BETAS, prediction_type="v_prediction"),
    "ddpm-large": lambda: diffusers.DDPMScheduler(**SD_BETAS, variance_type="fixed_large"),
    "ddpm-large-trailing": lambda: diffusers.DDPMScheduler(**SD_BETAS, variance_type="fixed_large",
                                                          timestep_spacing="trailing"),
    # DPM-Solver++ multistep: orders, SDE, sigma options, final sigma types, lower_order_final.
    **{f"dpm-o{o}{'-sde' if sde else ''}": (lambda o=o, sde=sde: diffusers.DPMSolverMultistepScheduler(
        **SD_BETAS, solver_order=o, algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++"))
       for o in (1, 2, 3) for sde in (False, True)},
    "dpm-karras": lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, use_karras_sigmas=True),
    "dpm-exponential": lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, use_exponential_sigmas=True),
    "dpm-beta": lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, use_beta_sigmas=True),
    "dpm-lu": lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, use_lu_lambdas=True),
    "dpm-o3-sigma-min": lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, solver_order=3,
                                                                      final_sigmas_type="sigma_min"),
    "dpm-sigma-min-no-lof": lambda: diffusers.DPMSolverMultistepScheduler(
        **SD_BETAS, final_sigmas_type="sigma_min", lower_order_final=False),
    "dpm-heun-sde-karras": lambda: diffusers.DPMSolverMultistepScheduler(
        **SD_BETAS, solver_type="heun", algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
    "dpm-v-trailing": lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, prediction_type="v_prediction",
                                                                    timestep_spacing="trailing"),
    # Karras / exponential / beta sigmas ending at sigma_min: a zero-length last step (the identity in diffusers).
    **{f"dpm-{kind}-sigma-min{'-sde' if sde else ''}": (
        lambda kind=kind, sde=sde: diffusers.DPMSolverMultistepScheduler(
            **SD_BETAS, final_sigmas_type="sigma_min", **{f"use_{kind}_sigmas": True},
            algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++"))
       for kind in ("karras", "exponential", "beta") for sde in (False, True) if kind == "karras" or not sde},
    # Euler, Euler ancestral (with and without Karras sigmas), Heun.
    "euler": lambda: diffusers.EulerDiscreteScheduler(**SD_BETAS),
    "euler-karras-v": lambda: diffusers.EulerDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True,
                                                               prediction_type="v_prediction"),
    "euler-leading": lambda: diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1),
    "euler-zero-snr": lambda: diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing",
                                                               prediction_type="v_prediction",
                                                               rescale_betas_zero_snr=True),
    "euler-log-linear": lambda: diffusers.EulerDiscreteScheduler(**SD_BETAS, interpolation_type="log_linear"),
    "euler-ancestral": lambda: diffusers.EulerAncestralDiscreteScheduler(**SD_BETAS),
    "euler-ancestral-trailing": lambda: diffusers.EulerAncestralDiscreteScheduler(**SD_BETAS,
                                                                                  timestep_spacing="trailing"),
    "heun": lambda: diffusers.HeunDiscreteScheduler(**SD_BETAS),
    "heun-karras": lambda: diffusers.HeunDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True),
    # LMS (order 4, Lagrange weights integrated over each step), with Karras sigmas and v prediction.
    "lms": lambda: diffusers.LMSDiscreteScheduler(**SD_BETAS),
    "lms-karras-v": lambda: diffusers.LMSDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True,
                                                           prediction_type="v_prediction", timestep_spacing="trailing"),
    # UniPC (predictor-corrector, D-history weights per grid): orders, Karras, v, partly disabled corrector, flow.
    **{f"unipc-o{o}": (lambda o=o: diffusers.UniPCMultistepScheduler(**SD_BETAS, solver_order=o)) for o in (1, 2, 3)},
    "unipc-karras-v": lambda: diffusers.UniPCMultistepScheduler(**SD_BETAS, use_karras_sigmas=True,
                                                                prediction_type="v_prediction"),
    "unipc-no-corrector-0-2": lambda: diffusers.UniPCMultistepScheduler(**SD_BETAS, disable_corrector=[0, 2]),
    "unipc-flow": lambda: diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                            flow_shift=3.0),
    # EDM preconditioning (c_in, c_noise = ln(sigma) / 4, c_skip x + c_out F): Euler and DPM-Solver++ on EDM sigmas.
    "edm-euler": lambda: diffusers.EDMEulerScheduler(),
    "edm-euler-exponential": lambda: diffusers.EDMEulerScheduler(sigma_schedule="exponential"),
    "edm-dpm-sde": lambda: diffusers.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
    "edm-dpm-o3-sigma-min": lambda: diffusers.EDMDPMSolverMultistepScheduler(solver_order=3,
                                                                             final_sigmas_type="sigma_min"),
    # DEIS (log-rho Lagrange weights in closed form), orders 2 and 3, Karras sigmas with v prediction.
    "deis": lambda: diffusers.DEISMultistepScheduler(**SD_BETAS),
    "deis-o3-karras-v": lambda: diffusers.DEISMultistepScheduler(**SD_BETAS, solver_order=3, use_karras_sigmas=True,
                                                                 prediction_type="v_prediction"),
    # DPM-Solver++ single-step: order groups [1, 2, ...] from diffusers' order list, midpoint and heun.
    "singlestep-o2": lambda: diffusers.DPMSolverSinglestepScheduler(**SD_BETAS, lower_order_final=True),
    "singlestep-o3-heun": lambda: diffusers.DPMSolverSinglestepScheduler(**SD_BETAS, solver_order=3, solver_type="heun",
                                                                         lower_order_final=True),
    # LCM: boundary condition on eps, full re-noise with the generator's noise at every step but the last.
    "lcm": lambda: diffusers.LCMScheduler(**SD_BETAS),
    # PNDM as Stable Diffusion ships it.
    "pndm": lambda: diffusers.PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
    "pndm-trailing": lambda: diffusers.PNDMScheduler(**SD_BETAS, skip_prk_steps=True, timestep_spacing="trailing"),
    # Flow matching (the tiny UNet stands in for a velocity network): shift, dynamic shifting is in test_flow.
    "flow-shift3": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    "flow-heun-shift3": lambda: diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0),   # Heun in flow time t
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sequential_and_picard_reproduce_the_diffusers_loop(case):
    errs = compare(CASES[case]())
    assert errs["sequential"] <= BOUND, errs
    assert errs["picard"] <= BOUND, errs


def test_ddim_eta_and_long_dpm_grids():
    assert max(compare(_ddim(), eta=0.6).values()) <= BOUND              # DDIM's eta noise from the generator
    # 16 steps: diffusers' lower_order_final no longer applies below sigma_min, but does to sigma = 0.
    for kw in ({"solver_order": 3}, {"solver_order": 3, "final_sigmas_type": "sigma_min"}):
        assert max(compare(diffusers.DPMSolverMultistepScheduler(**SD_BETAS, **kw), steps=16).values()) <= BOUND


@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_tcd_takes_its_gamma_from_eta(gamma):
    """TCD: denoise to the intermediate level floor((1 - gamma) t'), re-noise with the generator's noise."""
    assert max(compare(diffusers.TCDScheduler(**SD_BETAS), steps=4, eta=gamma).values()) <= BOUND


def test_cfg_with_nested_conditioning_reproduces_the_guided_loop():
    """Guidance doubles every conditioning tensor, also inside nested dicts (SDXL's added_cond_kwargs)."""
    unet, sch = _cond_unet(), _ddim(timestep_spacing="trailing")
    B, steps, g = 2, 8, 5.0
    gen = torch.Generator().manual_seed(5)
    emb, neg = torch.randn(B, 4, 8, generator=gen), torch.randn(B, 4, 8, generator=gen)

    def net(x, t, encoder_hidden_states, extra):           # conditioning nested one level down
        return unet(x, t, encoder_hidden_states=encoder_hidden_states + extra["shift"][:, None, None])

    shift, neg_shift = torch.randn(B, generator=gen), torch.randn(B, generator=gen)
    sch.set_timesteps(steps)
    latents = torch.randn(SHAPE, generator=gen)
    x = latents
    with torch.no_grad():
        for t in sch.timesteps:
            both = net(torch.cat([x, x]), t, torch.cat([neg, emb]), {"shift": torch.cat([neg_shift, shift])}).sample
            u, c = both.chunk(2)
            x = sch.step(u + g * (c - u), t, x).prev_sample
    den = from_diffusers(net, sch, dtype=torch.float32, guidance=g)
    for method, tol in (("sequential", None), ("picard", 0.0)):
        s = ParallelSampler(den, solver=solver_for(sch), steps=steps, method=method, progress=False,
                            **({} if tol is None else {"tol": tol}))
        got = sample_latents(s, latents, encoder_hidden_states=emb, extra={"shift": shift},
                             uncond={"encoder_hidden_states": neg, "extra": {"shift": neg_shift}}).samples
        assert float((got - x).abs().max()) <= BOUND * max(1.0, float(x.abs().max()))


@pytest.mark.parametrize("make, match", [
    (lambda: diffusers.KDPM2AncestralDiscreteScheduler(), "KDPM2AncestralDiscreteScheduler.*nearest: EulerAncestral"),
    (lambda: diffusers.DPMSolverSinglestepScheduler(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
    (lambda: diffusers.DEISMultistepScheduler(use_flow_sigmas=True), "use_flow_sigmas"),
    (lambda: diffusers.UniPCMultistepScheduler(solver_type="bh1"), "solver_type"),
    (lambda: diffusers.KDPM2DiscreteScheduler(), "KDPM2DiscreteScheduler.*nearest: HeunDiscrete"),
    (lambda: diffusers.PNDMScheduler(), "skip_prk_steps"),
    (lambda: diffusers.PNDMScheduler(skip_prk_steps=True, prediction_type="v_prediction"), "prediction_type"),
    (lambda: diffusers.DDPMScheduler(variance_type="learned_range"), "variance_type"),
    (lambda: diffusers.DDIMScheduler(thresholding=True), "thresholding"),
    (lambda: diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
     "algorithm_type"),
    (lambda: diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), "stochastic_sampling"),
])
def test_unsupported_schedulers_and_options_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        solver_for(make())
    with pytest.raises(ValueError, match=match):
        from_diffusers(_unet(), make())


def test_ddim_steps_that_land_off_the_grid_are_refused():
    den = from_diffusers(_unet(), _ddim(timestep_spacing="linspace"))
    with pytest.raises(ValueError, match="timestep_spacing.*'linspace'"):
        den.schedule.grid(8)
    with pytest.raises(ValueError, match="spacing"):
        den.schedule.grid(5, "trailing")
    # README: trailing lands on its next timestep where N divides T (1000), linspace only at N = T
    T = den.schedule.base.alphas_cumprod.numel()
    trailing = from_diffusers(_unet(), _ddim(timestep_spacing="trailing"))
    for steps in (25, 40, 50):
        assert trailing.schedule.grid(steps).sigmas.numel() == steps + 1
    for steps in (9, 30):
        with pytest.raises(ValueError, match=f"timestep_spacing.*'trailing' spacing and {steps} steps"):
            trailing.schedule.grid(steps)
    assert T == 1000 and den.schedule.grid(T).sigmas.numel() == T + 1
    empty_last = from_diffusers(_unet(), _ddim(timestep_spacing="leading", set_alpha_to_one=False))
    with pytest.raises(ValueError, match="steps_offset=1 or set_alpha_to_one=True"):
        empty_last.schedule.grid(8)


def test_parareal_takes_one_step_history_and_refuses_deeper():
    """Parareal carries one previous D across slices: DPM-Solver++(2M) SDE reaches the diffusers loop at tol 0 (its
    coarse jump carries the pre-drawn noise); PNDM's three-point history is refused, naming the fix."""
    sde = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="sde-dpmsolver++")
    assert compare(sde, methods=(("parareal", 0.0),))["parareal"] <= BOUND
    pndm = diffusers.PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1)
    with pytest.raises(ValueError, match="Parareal.*picard"):
        compare(pndm, methods=(("parareal", 0.0),))


# -- scheduler defaults, refusals and custom grids (review, stop 47) ---------------------------------------------

@pytest.mark.parametrize("order, steps", [(2, 7), (3, 7), (3, 8), (3, 9)])
def test_singlestep_default_config_runs_every_step_count(order, steps):
    """DPMSolverSinglestepScheduler's defaults (lower_order_final=False, final_sigmas_type='zero'): its set_timesteps
    turns lower_order_final on, so diffusers runs any step count; paratime refused those k does not divide."""
    sch = diffusers.DPMSolverSinglestepScheduler(**SD_BETAS, solver_order=order)
    assert max(compare(sch, steps=steps).values()) <= BOUND


def test_singlestep_uneven_steps_with_sigma_min_follow_the_pipelines_total_steps():
    """final_sigmas_type='sigma_min', lower_order_final=False: diffusers' set_timesteps turns lower_order_final on
    for 7 steps of order 2 too; with the pipeline's total_steps paratime does the same, without it refuses naming it."""
    make = lambda: diffusers.DPMSolverSinglestepScheduler(**SD_BETAS, final_sigmas_type="sigma_min")  # noqa: E731
    assert solver_for(make(), total_steps=7).lower_order_final
    assert not solver_for(make(), total_steps=8).lower_order_final


def test_euler_ancestral_x0_prediction_is_refused_as_diffusers_refuses_it():
    """EulerAncestralDiscreteScheduler.step raises NotImplementedError for prediction_type='sample': paratime must not
    run a loop the scheduler never runs."""
    make = lambda: diffusers.EulerAncestralDiscreteScheduler(prediction_type="sample")     # noqa: E731
    sch, x = make(), torch.zeros(1, 2, 8, 8)
    sch.set_timesteps(2)
    with pytest.raises(NotImplementedError):
        sch.step(x, sch.timesteps[0], x)
    with pytest.raises(ValueError, match="prediction_type='sample'.*EulerDiscreteScheduler"):
        solver_for(make())
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        from_diffusers(_unet(), make())


@pytest.mark.parametrize("call, error, match", [
    (lambda: solver_for(None), ValueError, "scheduler: NoneType is not supported"),
    (lambda: from_diffusers(_unet(), None), ValueError, "scheduler: NoneType is not supported"),
    (lambda: solver_for(diffusers.DPMSolverMultistepScheduler(), total_steps="20"), TypeError, "total_steps"),
    (lambda: solver_for(diffusers.DPMSolverMultistepScheduler(), total_steps=12.5), TypeError, "total_steps"),
    (lambda: solver_for(diffusers.DPMSolverMultistepScheduler(), total_steps=0), ValueError, "total_steps"),
    (lambda: solver_for(diffusers.DEISMultistepScheduler(), total_steps=-5), ValueError, "total_steps"),
], ids=["solver_for-None", "from_diffusers-None", "total_steps-str", "total_steps-float", "total_steps-0",
        "total_steps-negative"])
def test_bad_scheduler_and_total_steps_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("make, kw", [
    (lambda: diffusers.EulerDiscreteScheduler(**SD_BETAS), {"sigmas": [10.0, 5.0, 2.0, 1.0, 0.5, 0.0]}),
    (lambda: diffusers.DDPMScheduler(**SD_BETAS), {"timesteps": [900, 700, 500, 300, 100, 0]}),
    (lambda: diffusers.FlowMatchEulerDiscreteScheduler(), {"sigmas": [1.0, 0.8, 0.5, 0.3, 0.1]}),
], ids=["euler-sigmas", "ddpm-timesteps", "flow-sigmas"])
def test_custom_sigmas_and_timesteps_reproduce_the_loop(make, kw):
    """Custom sigmas / timesteps go to set_timesteps without num_inference_steps (as retrieve_timesteps passes them)."""
    unet, sch, ref = _unet(), make(), make()
    ref.set_timesteps(**kw)
    steps = len(ref.timesteps)
    latents = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3)) * getattr(ref, "init_noise_sigma", 1)
    x, gen = latents, torch.Generator().manual_seed(4)
    step_kwargs = {"generator": gen} if "generator" in inspect.signature(ref.step).parameters else {}
    with torch.no_grad():
        for t in ref.timesteps:
            inp = ref.scale_model_input(x, t) if hasattr(ref, "scale_model_input") else x
            x = ref.step(unet(inp, t).sample, t, x, **step_kwargs).prev_sample
    den = with_timestep_kwargs(from_diffusers(unet, sch), **kw)
    s = ParallelSampler(den, solver=solver_for(sch), steps=steps, method="sequential", progress=False)
    got = sample_latents(s, latents, generator=torch.Generator().manual_seed(4)).samples
    assert float((got - x).abs().max()) <= BOUND * max(1.0, float(x.abs().max()))
    with pytest.raises(ValueError, match=f"steps: {steps + 1}, but the custom"):
        den.schedule.grid(steps + 1)
