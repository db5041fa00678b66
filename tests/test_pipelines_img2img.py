"""Image-conditioned pipelines through ``paratime.parallelize(pipe)``, against the pipeline's own call (same
generator), with the default ``output_type`` and ``"latent"``, sequential and Picard: img2img (the pipeline's own
``strength`` truncation of the grid, image encoding and noising), inpainting (a 9-channel UNet: mask and masked-image
latents in every call; SD and SDXL) and ControlNet (its residuals in every call)."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import PIL.Image  # noqa: E402

import paratime  # noqa: E402
from paratime.bench.tiny_pipelines import (tiny_sd, tiny_sd_controlnet, tiny_sd_inpaint, tiny_sdxl,  # noqa: E402
                                            tiny_sdxl_controlnet, tiny_sdxl_inpaint)

BOUND = 1e-4


def _sd_img2img():
    return diffusers.StableDiffusionImg2ImgPipeline(**tiny_sd(text=True).components)


def _sdxl_img2img():
    return diffusers.StableDiffusionXLImg2ImgPipeline(**tiny_sdxl(text=True).components,
                                                      requires_aesthetics_score=False)


PIPES = {"sd_img2img": _sd_img2img, "sdxl_img2img": _sdxl_img2img}
SCHEDULERS = {"ddim": diffusers.DDIMScheduler, "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
              "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}


def _array(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("name", sorted(PIPES))
def test_img2img_matches_the_pipeline(name, scheduler):
    pipe = PIPES[name]()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    image = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))

    def call(target, output_type=None, method="picard", tol=0.0):
        kw = dict(image=image, strength=0.6, num_inference_steps=6, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(1))
        if output_type is not None:
            kw["output_type"] = output_type
        if target is pipe:
            return pipe(["a cat", "a dog"], **kw).images
        return paratime.parallelize(pipe, method=method, tol=tol)(["a cat", "a dog"], **kw)

    want = call(pipe, "latent")
    scale = float(want.abs().max())
    for method, tol in (("sequential", None), ("picard", 0.0)):
        got = call(None, "latent", method, tol)
        assert got.paratime_stats.steps == 3                    # int(6 * 0.6) of the 6 steps: the pipeline's cut
        assert float((got.images - want).abs().max()) <= BOUND * scale, method
    # The default output_type (PIL): within one 8-bit level of the pipeline's images.
    assert np.abs(_array(call(None).images) - _array(call(pipe))).max() <= 1.0


@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "DEISMultistepScheduler"])
def test_img2img_multistep_keeps_the_whole_grids_lower_order_final_rule(scheduler):
    """20 steps at strength 0.6 run 12: diffusers' "fewer than 15 steps" rule counts the whole grid (20), so the last
    steps keep order 3 (taking the rule from the 12 steps run moves the sample by ~1e-3 of its scale)."""
    pipe = _sd_img2img()
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, solver_order=3)
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    kw = dict(image=image, strength=0.6, num_inference_steps=20, output_type="latent", guidance_scale=1.0)
    want = pipe("a cat", generator=torch.Generator().manual_seed(1), **kw).images
    got = paratime.parallelize(pipe, tol=0.0)("a cat", generator=torch.Generator().manual_seed(1), **kw).images
    assert float((got - want).abs().max()) <= BOUND * float(want.abs().max())


@pytest.mark.parametrize("scheduler", ["PNDMScheduler", "LMSDiscreteScheduler", "DPMSolverSinglestepScheduler"])
def test_img2img_with_multistep_schedulers_restarted_part_way_is_refused_with_the_fix(scheduler):
    pipe = _sd_img2img()
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    image = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=f"strength: {scheduler} restarted part-way.*use DDIMScheduler"):
        paratime.parallelize(pipe)("a cat", image=image, strength=0.5, num_inference_steps=4)


@pytest.mark.parametrize("name, scheduler", [("sd", "pndm"), ("sd", "euler_ancestral"), ("sdxl", "euler"),
                                             ("sdxl", "euler_ancestral")])
def test_controlnet_matches_the_pipeline(name, scheduler):
    """SD and SDXL ControlNet (SDXL's ControlNet takes the added text/time conditioning too)."""
    pipe = (tiny_sd_controlnet if name == "sd" else tiny_sdxl_controlnet)(text=True)
    if scheduler == "euler_ancestral":
        pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    control = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))

    def call(target, conditioning_scale=0.7, **kw):
        return target(["a cat", "a dog"], image=control, num_inference_steps=5,
                      controlnet_conditioning_scale=conditioning_scale, generator=torch.Generator().manual_seed(1),
                      **kw)

    want = call(pipe, output_type="latent").images
    scale = float(want.abs().max())
    # The ControlNet's residuals matter here: without them (scale 0) the sample moves by far more than the bound.
    assert float((call(pipe, 0.0, output_type="latent").images - want).abs().max()) > 100 * BOUND * scale
    for method, tol in (("sequential", None), ("picard", 0.0)):
        got = call(paratime.parallelize(pipe, method=method, tol=tol), output_type="latent").images
        assert float((got - want).abs().max()) <= BOUND * scale, method
    assert np.abs(_array(call(paratime.parallelize(pipe, tol=0.0)).images) - _array(call(pipe).images)).max() <= 1.0
    with pytest.raises(ValueError, match="control_guidance_start, control_guidance_end"):
        call(paratime.parallelize(pipe), control_guidance_end=0.5)
    # As diffusers: a list of one beside a number is the ControlNet on every step (it was refused).
    got = call(paratime.parallelize(pipe, method="sequential"), output_type="latent", control_guidance_start=[0.0],
               control_guidance_end=1.0).images
    assert float((got - want).abs().max()) <= BOUND * scale
    # A list of scales is for several ControlNets: diffusers refuses it for one; its first entry was run.
    with pytest.raises(TypeError, match="^controlnet_conditioning_scale: one ControlNet takes a float"):
        call(paratime.parallelize(pipe), [0.7, 0.9])


def test_an_argument_the_pipeline_does_not_have_is_refused_naming_it():
    """Names in paratime's supported set reached the loop through the pipeline's **kwargs though the pipeline has no
    such parameter, and were dropped: img2img's height / width / latents, ControlNet's guidance_rescale."""
    pipe = _sd_img2img()
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    for extra in (dict(height=64), dict(latents=torch.zeros(1, 4, 6, 8))):
        with pytest.raises(TypeError, match=f"^{next(iter(extra))}: not an argument of "
                                            f"StableDiffusionImg2ImgPipeline.__call__"):
            paratime.parallelize(pipe)("a cat", image=image, num_inference_steps=2, **extra)
    control = tiny_sd_controlnet(text=True)
    with pytest.raises(TypeError, match="^guidance_rescale: not an argument of StableDiffusionControlNetPipeline"):
        paratime.parallelize(control)("a cat", image=image, num_inference_steps=2, guidance_rescale=0.7)


@pytest.mark.parametrize("name, scheduler, strength", [("sd", "pndm", 1.0), ("sd", "euler_ancestral", 0.7),
                                                      ("sdxl", "euler", None), ("sdxl", "euler_ancestral", 0.7)])
def test_inpainting_matches_the_pipeline(name, scheduler, strength):
    """SD and SDXL inpainting (9-channel UNets); ``strength=None``: the pipeline's own default (SDXL's 0.9999)."""
    pipe = (tiny_sd_inpaint if name == "sd" else tiny_sdxl_inpaint)(text=True)
    if scheduler == "euler_ancestral":
        pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    image = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    mask = (torch.rand(2, 1, 48, 64, generator=torch.Generator().manual_seed(5)) > 0.5).float()

    def call(target, mask_image=mask, **kw):
        if strength is not None:
            kw["strength"] = strength
        return target(["a cat", "a dog"], image=image, mask_image=mask_image, height=48, width=64,
                      num_inference_steps=5, generator=torch.Generator().manual_seed(1), **kw)

    want = call(pipe, output_type="latent").images
    scale = float(want.abs().max())
    assert float((call(pipe, 1 - mask, output_type="latent").images - want).abs().max()) > 100 * BOUND * scale
    for method, tol in (("sequential", None), ("picard", 0.0)):
        got = call(paratime.parallelize(pipe, method=method, tol=tol), output_type="latent").images
        assert float((got - want).abs().max()) <= BOUND * scale, method
    assert np.abs(_array(call(paratime.parallelize(pipe, tol=0.0)).images) - _array(call(pipe).images)).max() <= 1.0


def test_inpainting_with_a_4_channel_unet_is_refused_at_wrap_time():
    pipe = diffusers.StableDiffusionInpaintPipeline(**tiny_sd().components)
    with pytest.raises(ValueError, match="pipe: StableDiffusionInpaintPipeline with a 4-channel UNet.*9 input"):
        paratime.parallelize(pipe)


def _pixel_array(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


@pytest.mark.parametrize("mask_size", [(64, 64), (40, 32)])
def test_sdxl_inpaint_default_size_matches_the_pipeline(mask_size):
    """``ppipe(prompt, image=, mask_image=)`` without height / width: the UNet's sample size times the VAE factor, as
    ``StableDiffusionXLInpaintPipeline`` (which has no ``default_sample_size``; the call raised AttributeError)."""
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = PIL.Image.fromarray((rng.random(mask_size[::-1]) > 0.5).astype(np.uint8) * 255)
    pipe = tiny_sdxl_inpaint(text=True)
    call = dict(image=image, mask_image=mask, num_inference_steps=4)
    want = pipe("a cat", generator=torch.Generator().manual_seed(0), **call)
    got = paratime.parallelize(pipe, tol=0.0)("a cat", generator=torch.Generator().manual_seed(0), **call)
    assert type(got) is type(want) and got.images[0].size == want.images[0].size == (64, 64)
    # One 8-bit level: the sample differs from the pipeline's by ~1e-6, which may round a pixel the other way.
    assert np.abs(_pixel_array(got.images) - _pixel_array(want.images)).max() <= 1.0
