"""More gaps found by mutation testing integrations/diffusers.py and integrations/pipelines.py (the mutants
tests/test_mutants_integration.py left unrun): what the wrapped schedule reports about the scheduler it reads, next to
the grid it samples on. Every case is anchored on diffusers' own scheduler (its timesteps or alphas_cumprod after
set_timesteps) or on the pipeline's own call with the same latents and generator."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import paratime  # noqa: E402
from paratime.bench.tiny_pipelines import prompt_embeddings, tiny_sd, tiny_sdxl_inpaint  # noqa: E402
from paratime.integrations.diffusers import ZERO_SNR, from_diffusers  # noqa: E402

from test_diffusers import BOUND, SD_BETAS, _unet  # noqa: E402  (tests/ is on sys.path)


# -- the base schedule under the scheduler's grid ----------------------------------------------------------------

def test_flow_model_time_follows_num_train_timesteps():
    """Flow matching conditions the network on ``num_train_timesteps * t`` (1000 by default, where a fixed 1000
    passed): at 100, the wrapped schedule's model_time of each grid sigma is the scheduler's own timestep."""
    sch = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0)
    schedule = from_diffusers(_unet(), sch).schedule
    grid = schedule.grid(6)
    sch.set_timesteps(6)
    torch.testing.assert_close(schedule.model_time(grid.sigmas[:-1]), sch.timesteps.to(torch.float64))


def test_discrete_base_schedule_keeps_the_schedulers_steps_offset():
    """The DiscreteVPSchedule under a DDIM scheduler with steps_offset=1 and leading spacing computes the scheduler's
    own timesteps (every one shifted by the offset), not the offset-0 ones."""
    sch = diffusers.DDIMScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    base = from_diffusers(_unet(), sch).schedule.base
    sch.set_timesteps(10)
    assert base.timesteps(10, "leading").tolist() == sch.timesteps.tolist()


def test_zero_terminal_snr_starts_at_the_zero_snr_stand_in():
    """rescale_betas_zero_snr makes the last alpha_bar exactly 0 (sigma = inf): the grid starts at the documented
    stand-in alpha_bar = ZERO_SNR, sigma = 1e8, where the sample moves by about 1e-8 of its scale (a larger stand-in,
    1e-10, moves it by 1e-5 and stays inside the loop tests' bound)."""
    sch = diffusers.DDIMScheduler(**SD_BETAS, clip_sample=False, timestep_spacing="trailing",
                                  prediction_type="v_prediction", rescale_betas_zero_snr=True)
    assert float(sch.alphas_cumprod[-1]) == 0.0
    sigma0 = from_diffusers(_unet(), sch).schedule.grid(8).sigmas[0]
    assert float(sigma0) == pytest.approx(((1 - ZERO_SNR) / ZERO_SNR) ** 0.5, rel=1e-9)


def test_timesteps_past_the_training_range_are_refused_naming_steps():
    """DDIM's leading spacing adds steps_offset after spacing: with as many steps as training timesteps, the first one
    is num_train_timesteps itself, which no alphas_cumprod entry holds. The grid refuses it, naming steps (not an
    IndexError from the lookup)."""
    sch = diffusers.DDIMScheduler(num_train_timesteps=10, timestep_spacing="leading", steps_offset=1,
                                  set_alpha_to_one=False, clip_sample=False)
    sch.set_timesteps(10)
    assert int(sch.timesteps.max()) == sch.config.num_train_timesteps
    with pytest.raises(ValueError, match="^steps: DDIMScheduler with 10 steps reaches timestep 10"):
        from_diffusers(_unet(), sch).schedule.grid(10)


# -- pipeline calls ----------------------------------------------------------------------------------------------

def test_initial_latents_take_init_noise_sigma_after_set_timesteps():
    """Euler with leading spacing: init_noise_sigma after set_timesteps (the grid's first sigma) is not the one of a
    fresh scheduler (the last training sigma). The wrapped pipeline, called first on a fresh scheduler, scales the
    given latents as the pipeline's own call does."""
    def make():
        pipe = tiny_sd()
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading",
                                                                      steps_offset=1)
        return pipe
    args = dict(num_inference_steps=4, height=48, width=64, output_type="latent", guidance_scale=4.0,
                latents=torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(1)))
    pipe = make()
    fresh = float(pipe.scheduler.init_noise_sigma)
    got = paratime.parallelize(pipe, method="sequential")(**prompt_embeddings(pipe, batch=2), **args).images
    pipe = make()
    want = pipe(**prompt_embeddings(pipe, batch=2), **args).images
    assert float(pipe.scheduler.init_noise_sigma) != pytest.approx(fresh, rel=1e-3)   # the case this test is about
    assert float((got - want).abs().max() / want.abs().max().clamp_min(1)) <= BOUND


def test_a_strength_that_leaves_no_step_is_refused_naming_strength():
    """img2img at strength 0.1 of 4 steps runs int(0.4) = 0 of them (diffusers' get_timesteps returns no timestep):
    the wrapped pipeline refuses the call, naming strength and the steps it leaves, rather than sample on no grid."""
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**tiny_sd(text=True).components)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(4)
    assert len(pipe.get_timesteps(4, 0.1, "cpu")[0]) == 0
    kw = dict(image=torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0)), strength=0.1,
              num_inference_steps=4, output_type="latent")
    with pytest.raises(ValueError, match="^strength: 0.1 leaves 0 of num_inference_steps=4 steps"):
        paratime.parallelize(pipe, method="sequential")("a cat", **kw)



def test_sdxl_inpainting_at_strength_1_starts_from_pure_noise_as_the_pipeline():
    """SDXL inpainting at strength 1.0 (not its 0.9999 default): the pipeline starts from pure noise times
    init_noise_sigma (is_strength_max), not from the image's latents noised to the first timestep; so does the
    wrapped call."""
    pipe = tiny_sdxl_inpaint(text=True)
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    mask = (torch.rand(1, 1, 48, 64, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    kw = dict(image=image, mask_image=mask, height=48, width=64, strength=1.0, num_inference_steps=4,
              output_type="latent")
    want = pipe("a cat", generator=torch.Generator().manual_seed(1), **kw).images
    got = paratime.parallelize(pipe, method="sequential")("a cat", generator=torch.Generator().manual_seed(1), **kw)
    assert float((got.images - want).abs().max() / want.abs().max().clamp_min(1)) <= BOUND
