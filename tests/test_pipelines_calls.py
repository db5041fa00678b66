"""``paratime.parallelize(pipe)`` called as a user calls the pipeline: string prompts (positional or keyword) through
tiny CLIP tokenizers, the default ``output_type``, the pipeline's own generator(s) for stochastic schedulers at a size
whose per-step noise count is not a multiple of 16, and every option checked when ``parallelize`` is called."""

import math
import os
import re
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import paratime  # noqa: E402
from paratime.bench.tiny_pipelines import prompt_embeddings, tiny_sd, tiny_sd3, tiny_sdxl  # noqa: E402
from paratime.integrations.diffusers import REFUSED  # noqa: E402

BOUND = 1e-4
PIPES = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _pixels(images) -> np.ndarray:
    """PIL images (the default output) as one float array."""
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


@pytest.mark.parametrize("name", sorted(PIPES))
def test_default_call_with_a_string_prompt_matches_the_pipeline(name):
    """``pipe("a cat", ...)`` with its default output_type (PIL): positional and keyword prompts, sequential, Picard at
    tol 0 and at its default tolerance; ``"pt"`` output carries no autograd graph."""
    pipe = PIPES[name](text=True)
    args = dict(num_inference_steps=4, height=48, width=64, guidance_scale=4.0)
    want = pipe("a cat", generator=_gen(), **args)
    assert type(want.images[0]).__name__ == "Image"
    runs = {"sequential (positional prompt)": paratime.parallelize(pipe, method="sequential")("a cat", generator=_gen(),
                                                                                              **args),
            "picard tol 0 (keyword prompt)": paratime.parallelize(pipe, tol=0.0)(prompt="a cat", generator=_gen(),
                                                                                  **args),
            "picard default tol": paratime.parallelize(pipe)(prompt="a cat", generator=_gen(), **args)}
    for label, got in runs.items():
        assert type(got) is type(want), label
        # One 8-bit level: the sample differs from the pipeline's by ~1e-6, which may round a pixel the other way.
        assert np.abs(_pixels(got.images) - _pixels(want.images)).max() <= 1.0, label
    pt = paratime.parallelize(pipe, tol=0.0)("a cat", output_type="pt", generator=_gen(), **args).images
    assert not pt.requires_grad
    want_pt = pipe("a cat", output_type="pt", generator=_gen(), **args).images
    assert float((pt - want_pt).abs().max()) <= BOUND


def test_positional_arguments_bind_as_the_pipeline_binds_them():
    """``ppipe(prompt, height, width, num_inference_steps)`` positionally, as ``pipe(...)`` accepts them; one too many
    is refused like the pipeline refuses it."""
    pipe = tiny_sd(text=True)
    want = pipe("a dog", 48, 48, 3, output_type="np", generator=_gen(1)).images
    ppipe = paratime.parallelize(pipe, tol=0.0)
    got = ppipe("a dog", 48, 48, 3, output_type="np", generator=_gen(1)).images
    assert isinstance(got, np.ndarray) and got.shape == want.shape == (1, 48, 48, 3)
    assert np.abs(got - want).max() <= BOUND
    with pytest.raises(TypeError, match="StableDiffusionPipeline.__call__"):
        ppipe(*(["a dog"] + [None] * 40))
    with pytest.raises(TypeError, match="callback_on_step_end: not supported"):
        ppipe("a dog", callback_on_step_end=lambda *a: {})
    # An unsupported argument at its signature's default changes nothing: run, as the pipeline runs it.
    for noop in (dict(callback_on_step_end=None), dict(cross_attention_kwargs=None), dict(timesteps=None),
                 dict(ip_adapter_image=None), dict(callback_on_step_end_tensor_inputs=["latents"])):
        got = ppipe("a dog", 48, 48, 3, output_type="np", generator=_gen(1), **noop).images
        assert np.abs(got - want).max() <= BOUND, noop
    with pytest.raises(TypeError, match="callback_on_step_end_tensor_inputs: not supported"):
        ppipe("a dog", callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])


def _runs_the_replacement(pipe, attribute, replacement, **args):
    """Wrap ``pipe``, call it once, replace ``pipe.<attribute>``, and check the next call runs the replacement (as
    ``pipe`` itself now does)."""
    ppipe = paratime.parallelize(pipe, method="sequential")
    ppipe(generator=_gen(), **args)
    setattr(pipe, attribute, replacement)
    want = pipe(generator=_gen(), **args).images
    got = ppipe(generator=_gen(), **args).images
    assert float((got - want).abs().max()) <= BOUND * float(want.abs().max()), attribute


def test_a_network_replaced_after_wrapping_is_the_one_run():
    """``pipe.unet = ...`` (a fine-tune, torch.compile) after parallelize(): the call runs the pipeline's network at
    that call, as it runs its scheduler and VAE (the first call's sampler kept the old one: 0.37 relative off); a
    ControlNet likewise (its wrapper's sampler was cached by the conditioning scale alone: 0.19 off)."""
    from paratime.bench.tiny_pipelines import tiny_sd_controlnet

    pipe = tiny_sd()
    _runs_the_replacement(pipe, "unet", tiny_sd(seed=7).unet, num_inference_steps=3, height=48, width=48,
                          output_type="latent", guidance_scale=4.0, **prompt_embeddings(pipe))
    cn = tiny_sd_controlnet()
    _runs_the_replacement(cn, "controlnet", tiny_sd_controlnet(seed=7).controlnet,
                          image=torch.rand(1, 3, 48, 48, generator=_gen(1)), num_inference_steps=3,
                          output_type="latent", guidance_scale=4.0, **prompt_embeddings(cn))


STOCHASTIC = {
    "euler_ancestral": (lambda cfg: diffusers.EulerAncestralDiscreteScheduler.from_config(cfg), {}),
    "ddpm": (lambda cfg: diffusers.DDPMScheduler.from_config(cfg), {}),
    "dpmpp_2m_sde": (lambda cfg: diffusers.DPMSolverMultistepScheduler.from_config(
        cfg, algorithm_type="sde-dpmsolver++"), {}),
    "ddim_eta1": (lambda cfg: diffusers.DDIMScheduler.from_config(cfg), {"eta": 1.0}),
}


@pytest.mark.parametrize("generators", ["one", "list"])
@pytest.mark.parametrize("scheduler", sorted(STOCHASTIC))
def test_stochastic_schedulers_draw_the_pipelines_own_noise_at_72x72(scheduler, generators):
    """72 x 72 pixels: 9 x 9 x 4 latents, 648 numbers per step for 2 images (not a multiple of 16, where one big draw
    and per-step draws give different CPU streams). One generator, or a list with one per image."""
    pipe = tiny_sd()
    make, step_kwargs = STOCHASTIC[scheduler]
    pipe.scheduler = make(pipe.scheduler.config)

    def gen():
        return _gen(3) if generators == "one" else [_gen(3 + i) for i in range(2)]

    args = dict(num_inference_steps=5, height=72, width=72, output_type="latent", **prompt_embeddings(pipe, batch=2),
                **step_kwargs)
    want = pipe(generator=gen(), **args).images
    scale = float(want.abs().max())
    for method, tol in (("sequential", None), ("picard", 0.0)):
        got = paratime.parallelize(pipe, method=method, tol=tol)(generator=gen(), **args).images
        assert float((got - want).abs().max()) <= BOUND * scale, method


@pytest.mark.parametrize("scheduler", ["euler_ancestral", "ddpm"])
def test_without_a_generator_step_noise_comes_from_torchs_global_generator(scheduler):
    """No ``generator=``: the pipeline draws its latents and step noise from torch's global generator, so
    ``torch.manual_seed(s)`` repeats its sample and two calls differ. The step noise was the sampler's fixed seed 0:
    every call drew the same (two calls from the same latents were equal), whatever the global seed."""
    pipe = tiny_sd()
    make, step_kwargs = STOCHASTIC[scheduler]
    pipe.scheduler = make(pipe.scheduler.config)
    args = dict(num_inference_steps=5, height=48, width=48, output_type="latent", **prompt_embeddings(pipe, batch=2),
                **step_kwargs)
    torch.manual_seed(11)
    want = pipe(**args).images
    scale = float(want.abs().max())
    for method, tol in (("sequential", None), ("picard", 0.0)):
        ppipe = paratime.parallelize(pipe, method=method, tol=tol)
        torch.manual_seed(11)
        got = ppipe(**args).images
        assert float((got - want).abs().max()) <= BOUND * scale, method
        latents = torch.randn(2, 4, 6, 6, generator=_gen(5))
        first, second = ppipe(latents=latents, **args).images, ppipe(latents=latents, **args).images
        assert float((first - second).abs().max()) > 100 * BOUND * scale, method


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generators_draw_the_pipelines_own_noise():
    pipe = tiny_sd().to("cuda")
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    args = dict(num_inference_steps=5, height=72, width=72, output_type="latent",
                **{k: v.cuda() for k, v in prompt_embeddings(pipe, batch=2).items()})
    for gen in (lambda: torch.Generator("cuda").manual_seed(3),
                lambda: [torch.Generator("cuda").manual_seed(3 + i) for i in range(2)]):
        want = pipe(generator=gen(), **args).images
        got = paratime.parallelize(pipe, tol=0.0)(generator=gen(), **args).images
        assert float((got - want).abs().max()) <= BOUND * float(want.abs().max())


@pytest.mark.parametrize("options, error, match", [
    ({"method": "nonsense"}, ValueError, "method: unknown 'nonsense'"),
    ({"tol": -1}, ValueError, "tol: must be >= 0"),
    ({"tol": math.nan}, ValueError, "tol: must be a finite number"),
    ({"window": 0}, ValueError, "window: must be an integer >= 1"),
    ({"windw": 4}, TypeError, "windw: unknown parallelize.. option; allowed: .*window"),
    ({"state_dtype": torch.int32}, TypeError, "state_dtype: expected one of"),
    ({"method": "parareal"}, ValueError, "method: 'parareal' .* plms uses 3; use method='picard'"),
    ({"solver": "ddim"}, TypeError, "solver: set by the pipeline's scheduler"),
    ({"guidance": 3.0}, TypeError, "guidance: set by guidance_scale= of the call"),
    ({"kernels": "cuda"}, ValueError, "kernels: unknown 'cuda'"),
    ({"progress": "yes"}, TypeError, "progress: expected True or False"),
    ({"backend_options": ["x"]}, TypeError, "backend_options: expected a dict"),
])
def test_every_option_is_checked_when_parallelize_is_called(options, error, match):
    pipe = tiny_sd()                                 # PNDM: a three-point history
    with pytest.raises(error, match=match):
        paratime.parallelize(pipe, **options)


@pytest.mark.parametrize("scheduler", sorted(REFUSED))
def test_unported_schedulers_are_refused_at_wrap_time_with_reason_and_nearest(scheduler):
    pipe = tiny_sd()
    try:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    except ImportError:     # DPMSolverSDEScheduler needs torchsde: a stand-in of that name (paratime reads the name)
        pipe.scheduler = type(scheduler, (diffusers.DPMSolverMultistepScheduler,), {}).from_config(
            pipe.scheduler.config)
    near, why = REFUSED[scheduler]
    message = f"scheduler: {scheduler} is not supported ({why}; nearest: {near})"
    with pytest.raises(ValueError, match=re.escape(message)):
        paratime.parallelize(pipe)


@pytest.mark.parametrize("name, scheduler", [("sd", "LMSDiscreteScheduler"), ("sd3", "FlowMatchHeunDiscreteScheduler"),
                                             ("sd", "UniPCMultistepScheduler"), ("sdxl", "EDMEulerScheduler"),
                                             ("sd", "LCMScheduler")])
def test_new_schedulers_through_the_pipeline(name, scheduler):
    """LMS, FlowMatchHeun, UniPC, EDMEuler and LCM (stochastic: the generator's noise) swapped in with
    from_config: sequential and Picard at tol 0 match."""
    pipe = PIPES[name]()
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    args = dict(num_inference_steps=5, height=48, width=64, output_type="latent", guidance_scale=4.0,
                **prompt_embeddings(pipe, batch=2))
    want = pipe(generator=_gen(), **args).images
    for method, tol in (("sequential", None), ("picard", 0.0)):
        got = paratime.parallelize(pipe, method=method, tol=tol)(generator=_gen(), **args).images
        assert float((got - want).abs().max()) <= BOUND * float(want.abs().max()), method


_RANKS_SEEDED = """
import os
import torch, diffusers
import paratime
from paratime.bench.tiny_pipelines import prompt_embeddings, tiny_sd

rank = int(os.environ["RANK"])
pipe = tiny_sd()
pipe.scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
args = dict(num_inference_steps=6, height=48, width=48, output_type="latent", **prompt_embeddings(pipe, batch=2),
            latents=torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5)))
with paratime.parallelize(pipe, method="picard", tol=0.0, backend="torch") as ppipe:
    torch.manual_seed(100)
    if rank == 0:
        torch.save(ppipe(**args).images, "alike.pt")
    else:
        ppipe(**args)
    torch.manual_seed(100 + rank)
    try:
        ppipe(**args)
        print("APART-RAN")
    except ValueError as e:
        print("APART-ERROR", e)
"""


def test_torchrun_ranks_whose_global_generators_differ_are_refused(tmp_path):
    """backend="torch" without generator=: each rank draws the step noise from its own global generator. Ranks
    seeded alike give the pipeline's sample; ranks seeded apart are refused naming generator (they sampled a
    trajectory from two noises: 20.2 where rank 0's pipeline gave 28.8, the sum of the latents)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from dist_helper import run_ranks

    script = tmp_path / "rank.py"
    script.write_text(_RANKS_SEEDED)
    logs = run_ranks(script, timeout=150, cwd=tmp_path)
    assert (tmp_path / "alike.pt").exists(), logs
    pipe = tiny_sd()
    pipe.scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    torch.manual_seed(100)
    want = pipe(num_inference_steps=6, height=48, width=48, output_type="latent", **prompt_embeddings(pipe, batch=2),
                latents=torch.randn(2, 4, 6, 6, generator=_gen(5))).images
    got = torch.load(tmp_path / "alike.pt")
    assert float((got - want).abs().max()) <= BOUND * float(want.abs().max())
    for log in logs:
        assert "APART-ERROR generator: " in log, log
