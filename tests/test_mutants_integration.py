"""Gaps found by mutation testing integrations/diffusers.py and integrations/pipelines.py: scheduler options the
suite left at their defaults, refusals it never exercised, and pipeline-call arguments that changed nothing in the
parallel loop. Every case is anchored on diffusers' own classes: the scheduler's loop or the pipeline's own call with
the same latents and generator."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import paratime  # noqa: E402
from paratime.bench.tiny_pipelines import (prompt_embeddings, tiny_flux, tiny_sd, tiny_sd3,  # noqa: E402
                                            tiny_sd_controlnet, tiny_sdxl, tiny_wan)
from paratime import ParallelSampler  # noqa: E402
from paratime.integrations.diffusers import from_diffusers, sample_latents, solver_for  # noqa: E402

from test_diffusers import BOUND, SD_BETAS, _unet, diffusers_loop  # noqa: E402  (tests/ is on sys.path)


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def _off(got, want) -> float:
    """max |got - want| relative to the sample's scale (at least 1)."""
    return float((got - want).abs().max() / want.abs().max().clamp_min(1))


# -- scheduler options the suite only ran at their defaults ----------------------------------------------------

OPTIONS = {
    # DDPM clips x0 to its own clip_sample_range (1.0 by default, where a fixed 1.0 passed)
    "ddpm-clip-range": (lambda: diffusers.DDPMScheduler(**SD_BETAS, clip_sample=True, clip_sample_range=0.5), 8),
    # LCM's boundary condition takes c_skip, c_out at timestep_scaling * t (10 by default: c_skip ~ 1e-6)
    "lcm-timestep-scaling": (lambda: diffusers.LCMScheduler(**SD_BETAS, timestep_scaling=0.005), 4),
    # EDM preconditioning with the scheduler's sigma_data (0.5 by default)
    "edm-sigma-data": (lambda: diffusers.EDMEulerScheduler(sigma_data=1.0), 8),
    # "fewer than 15 steps": 15 is the first count where DPM-Solver++(3M) and DEIS keep order 3 to the end
    "dpm-o3-15-steps": (lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, solver_order=3), 15),
    "deis-o3-15-steps": (lambda: diffusers.DEISMultistepScheduler(**SD_BETAS, solver_order=3), 15),
    # euler_at_final: a first-order last step onto a nonzero sigma_min (trailing spacing: a real step)
    "dpm-euler-at-final": (lambda: diffusers.DPMSolverMultistepScheduler(
        **SD_BETAS, euler_at_final=True, lower_order_final=False, final_sigmas_type="sigma_min",
        timestep_spacing="trailing"), 8),
    # UniPC keeps order 3 to the end without lower_order_final (sigma_min: diffusers' own loop fails onto zero)
    "unipc-o3-no-lower-order-final": (lambda: diffusers.UniPCMultistepScheduler(
        **SD_BETAS, solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"), 8),
}


@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_scheduler_options_off_their_defaults_reproduce_the_loop(case):
    """Each option moves diffusers' own loop by far more than the bound; paratime's sequential loop must follow, with
    ``total_steps`` given as the pipelines give it (the 15-step rule is read from it)."""
    make, steps = OPTIONS[case]
    unet, sch = _unet(), make()
    latents, want = diffusers_loop(unet, sch, steps, seed=3)
    s = ParallelSampler(from_diffusers(unet, sch), solver=solver_for(sch, total_steps=steps), steps=steps,
                        method="sequential", progress=False)
    assert _off(sample_latents(s, latents, generator=_gen(4)).samples, want) <= BOUND


def test_img2img_at_15_steps_keeps_order_3_to_the_end_as_diffusers():
    """15 steps at strength 0.6 run 9: diffusers' "fewer than 15 steps" rule counts the whole grid, and 15 is not
    fewer, so DPM-Solver++(3M) keeps order 3 on its last steps (the boundary of the rule the 20-step case misses)."""
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**tiny_sd(text=True).components)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, solver_order=3)
    image = torch.rand(1, 3, 48, 64, generator=_gen(0))
    kw = dict(image=image, strength=0.6, num_inference_steps=15, output_type="latent", guidance_scale=1.0)
    want = pipe("a cat", generator=_gen(), **kw).images
    assert _off(paratime.parallelize(pipe, method="sequential")("a cat", generator=_gen(), **kw).images, want) <= BOUND


@pytest.mark.parametrize("make, option", [
    (lambda: diffusers.LCMScheduler(**SD_BETAS, clip_sample=True), "clip_sample"),
    (lambda: diffusers.TCDScheduler(**SD_BETAS, clip_sample=True), "clip_sample"),
    (lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver",
                                                   final_sigmas_type="sigma_min"), "algorithm_type"),
    (lambda: diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "invert_sigmas"),
], ids=["lcm-clip", "tcd-clip", "dpmsolver", "flow-invert-sigmas"])
def test_options_paratime_does_not_reproduce_are_refused(make, option):
    """Each changes diffusers' step in a way paratime's solver does not (LCM / TCD clip the boundary-condition x0,
    DPM-Solver (not ++) is the noise-prediction update, inverted sigmas run the flow backwards): refused, naming the
    option, by both entry points."""
    with pytest.raises(ValueError, match=f"^scheduler: {type(make()).__name__} with .*{option}"):
        solver_for(make())
    with pytest.raises(ValueError, match=option):
        from_diffusers(_unet(), make())


# -- per-call pipeline arguments ---------------------------------------------------------------------------------

def _sd_args(pipe, **kw):
    return dict(num_inference_steps=4, height=48, width=64, output_type="latent",
                latents=torch.randn(2, 4, 6, 8, generator=_gen()), **prompt_embeddings(pipe, batch=2), **kw)


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_guidance_and_guidance_rescale_of_each_call_match_the_pipeline(name):
    """One wrapped pipeline called with several guidance_scale / guidance_rescale values, each against the pipeline's
    own call: the rescale reaches the loop (it moves the sample by ~0.7), is off without guidance (as diffusers does),
    and a later call's values are not the cached sampler's."""
    pipe = {"sd": tiny_sd, "sdxl": tiny_sdxl}[name]()
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    ppipe = paratime.parallelize(pipe, method="sequential")
    for g, rescale in ((5.0, 0.7), (5.0, 0.0), (2.0, 0.0), (2.0, 0.7), (1.0, 0.7)):   # one option changed a call
        args = _sd_args(pipe, guidance_scale=g, guidance_rescale=rescale)
        want = pipe(**args).images
        assert _off(ppipe(**args).images, want) <= BOUND, (g, rescale)


def test_eta_of_each_call_matches_the_pipeline():
    """DDIM's eta from each call: a wrapped pipeline called with eta 0 then 1 (the same generator) draws the step
    noise the second time, as the pipeline does."""
    pipe = tiny_sd()
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    ppipe = paratime.parallelize(pipe, method="sequential")
    for eta in (0.0, 1.0):
        args = _sd_args(pipe, guidance_scale=4.0, eta=eta)
        want = pipe(generator=_gen(3), **args).images
        assert _off(ppipe(generator=_gen(3), **args).images, want) <= BOUND, eta


def test_sd3_mu_of_each_call_matches_the_pipeline():
    """SD3 with dynamic shifting: the call's ``mu`` shifts the grid; a second call with another mu on the same wrapped
    pipeline runs that grid (the sampler is not the first call's)."""
    pipe = tiny_sd3(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                              max_shift=1.15))
    ppipe = paratime.parallelize(pipe, method="sequential")
    for mu in (0.3, 1.5):
        args = _sd_args(pipe, guidance_scale=4.0, mu=mu)
        want = pipe(**args).images
        assert _off(ppipe(**args).images, want) <= BOUND, mu


def test_flux_guidance_embedding_takes_the_calls_guidance_scale():
    """Flux's distilled guidance at a guidance_scale other than its 3.5 default."""
    pipe = tiny_flux()
    emb = {k: v for k, v in prompt_embeddings(pipe, batch=1).items() if not k.startswith("negative")}
    args = dict(num_inference_steps=3, height=32, width=32, max_sequence_length=16, output_type="latent",
                guidance_scale=1.5, **emb)
    want = pipe(generator=_gen(), **args).images
    assert _off(paratime.parallelize(pipe, method="sequential")(generator=_gen(), **args).images, want) <= BOUND


def test_wan_rounds_num_frames_as_the_pipeline():
    """WanPipeline rounds num_frames to 4 k + 1 (8 -> 9: 3 latent frames, not 2): the pipeline's frames and values."""
    pipe = tiny_wan()
    args = dict(num_inference_steps=3, height=32, width=48, num_frames=8, guidance_scale=4.0, output_type="latent",
                **prompt_embeddings(pipe, batch=1))
    want = pipe(generator=_gen(), **args).frames
    got = paratime.parallelize(pipe, method="sequential")(generator=_gen(), **args).frames
    assert got.shape == want.shape and _off(got, want) <= BOUND


def test_sdxl_negative_size_needs_both_original_and_target_as_in_the_pipeline():
    """SDXL builds negative time ids only when negative_original_size and negative_target_size are both given; one
    alone leaves them equal to the positive ids."""
    pipe = tiny_sdxl()
    args = _sd_args(pipe, guidance_scale=4.0, negative_original_size=(24, 24))
    want = pipe(**args).images
    assert _off(paratime.parallelize(pipe, method="sequential")(**args).images, want) <= BOUND


# -- arguments the parallel loop does not run, refused ---------------------------------------------------------

def test_options_the_pipeline_sets_are_refused_at_wrap_time():
    """eta comes from the call and the latent scale from the VAE: as parallelize() options they are refused, naming
    what sets them."""
    pipe = tiny_sd()
    with pytest.raises(TypeError, match="^eta: set by eta= of the call"):
        paratime.parallelize(pipe, eta=0.5)
    with pytest.raises(TypeError, match="^latent_scale: set by the pipeline's VAE"):
        paratime.parallelize(pipe, latent_scale=0.5)


def test_controlnet_start_after_zero_is_refused():
    """control_guidance_start > 0 runs the ControlNet on part of the steps only: refused like an early end."""
    pipe = tiny_sd_controlnet(text=True)
    control = torch.rand(1, 3, 48, 48, generator=_gen(0))
    with pytest.raises(ValueError, match="^control_guidance_start, control_guidance_end"):
        paratime.parallelize(pipe)("a cat", image=control, num_inference_steps=2, control_guidance_start=0.2)


def test_wan_per_token_timesteps_are_refused():
    """Wan 2.2's expand_timesteps (a timestep per latent token) is not the loop paratime runs: refused."""
    pipe = tiny_wan()
    pipe.register_to_config(expand_timesteps=True)
    with pytest.raises(ValueError, match="^pipe: Wan 2.2.*expand_timesteps"):
        paratime.parallelize(pipe)(prompt_embeds=torch.zeros(1, 4, 32), height=16, width=16, num_frames=1,
                                   num_inference_steps=2, output_type="latent")
