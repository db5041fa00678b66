"""``paratime.parallelize(pipe)`` against the pipelines' own ``__call__`` on tiny SD / SDXL / SD3 pipelines built from
configs (same latents, guidance on, a non-square size): sequential equals the pipeline, Picard at tol 0 equals it,
Picard at its default tolerance stays within that tolerance."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import paratime  # noqa: E402
from paratime.bench.tiny_pipelines import prompt_embeddings, tiny_sd, tiny_sd3, tiny_sdxl  # noqa: E402
from paratime.methods.picard import DEFAULT_TOL  # noqa: E402

BOUND = 1e-4
PIPES = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3}
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _call(pipe, seed=1, **kw):
    """Keyword arguments of one call: embeddings, guidance on, 48 x 64 pixels (6 x 8 latents), fixed latents."""
    args = dict(num_inference_steps=6, guidance_scale=5.0, height=48, width=64, output_type="latent",
                latents=torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(seed)),
                **prompt_embeddings(pipe, batch=2))
    args.update(kw)
    return args


def _rel(got, want):
    return float((got - want).abs().max() / want.abs().max().clamp_min(1))


@pytest.mark.parametrize("name", sorted(PIPES))
def test_parallel_pipeline_reproduces_the_pipeline_call(name):
    pipe = PIPES[name]()
    args = _call(pipe)
    ref = pipe(**args)
    want = ref.images
    seq = paratime.parallelize(pipe, method="sequential")(**args)
    assert type(seq) is type(ref)                                 # what the pipeline returns, plus the stats
    assert seq.paratime_stats.method == "sequential"
    assert _rel(seq.images, want) <= BOUND
    exact = paratime.parallelize(pipe, tol=0.0)(**args)
    assert exact.paratime_stats.method == "picard"
    assert _rel(exact.images, want) <= BOUND
    fast = paratime.parallelize(pipe)(**args)                     # the default tolerance (max-abs, latent units)
    assert float((fast.images - want).abs().max()) <= DEFAULT_TOL["final"]


def test_decoded_images_and_tuples_match_the_pipeline():
    pipe = tiny_sd()
    args = _call(pipe, output_type="pt")
    want = pipe(**args).images
    got = paratime.parallelize(pipe, tol=0.0)(**args, return_dict=False)
    assert isinstance(got, tuple) and got[0].shape == want.shape == (2, 3, 48, 64)
    assert float((got[0] - want).abs().max()) <= BOUND


@pytest.mark.parametrize("scheduler", [
    lambda cfg: diffusers.DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="sde-dpmsolver++"),
    lambda cfg: diffusers.EulerAncestralDiscreteScheduler.from_config(cfg),
    lambda cfg: diffusers.DDIMScheduler.from_config(cfg, clip_sample=True, clip_sample_range=0.2),
])
def test_swapped_schedulers_and_generators_match(scheduler):
    """Schedulers swapped in with from_config, stochastic ones drawing step noise from the call's generator."""
    pipe = tiny_sd()
    pipe.scheduler = scheduler(pipe.scheduler.config)
    args = _call(pipe)
    want = pipe(**args, generator=torch.Generator().manual_seed(7)).images
    got = paratime.parallelize(pipe, tol=0.0)(**args, generator=torch.Generator().manual_seed(7)).images
    assert _rel(got, want) <= BOUND


def test_sd3_dynamic_shifting_uses_the_pipelines_mu():
    pipe = tiny_sd3(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                              max_shift=1.15))
    args = _call(pipe)
    want = pipe(**args).images
    assert _rel(paratime.parallelize(pipe, method="sequential")(**args).images, want) <= BOUND


def test_unsupported_schedulers_and_arguments_fail_at_wrap_or_call_time():
    pipe = tiny_sd()
    pipe.scheduler = diffusers.KDPM2DiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="KDPM2DiscreteScheduler"):
        paratime.parallelize(pipe)
    pipe.scheduler = diffusers.PNDMScheduler(**SD_BETAS)          # skip_prk_steps=False
    with pytest.raises(ValueError, match="skip_prk_steps"):
        paratime.parallelize(pipe)
    pipe.scheduler = diffusers.DDIMScheduler(**SD_BETAS, timestep_spacing="trailing")
    with pytest.raises(TypeError, match="callback_on_step_end"):
        paratime.parallelize(pipe)(**_call(pipe), callback_on_step_end=lambda *a: {})
    with pytest.raises(TypeError, match="^callback_steps: deprecated; not run"):     # the pipeline's **kwargs
        paratime.parallelize(pipe)(**_call(pipe), callback_steps=1)
    with pytest.raises(ValueError, match="pipe"):
        paratime.parallelize(object())


def test_fill_is_refused_at_the_call_whose_steps_the_window_covers():
    """``fill`` is checked against the call's num_inference_steps (unknown at wrap time): a window of 4 slides over 5
    steps and samples; over 4 steps it covers the grid, and the call names ``fill``."""
    pipe = tiny_sd()
    pipe.scheduler = diffusers.DDIMScheduler(**SD_BETAS, timestep_spacing="trailing")
    ppipe = paratime.parallelize(pipe, window=4, fill="copy")
    assert ppipe(**_call(pipe, num_inference_steps=5)).images.shape == (2, 4, 6, 8)
    with pytest.raises(ValueError, match="^fill: applies only to a sliding window"):
        ppipe(**_call(pipe, num_inference_steps=4))


def test_return_dict_false_is_the_pipelines_own_tuple():
    """SD returns ``(images, nsfw)`` with ``return_dict=False``, nsfw None without a safety checker; the parallel
    pipeline dropped the None (``images, nsfw = ...`` raised)."""
    pipe = tiny_sd()
    pipe.scheduler = diffusers.DDIMScheduler(**SD_BETAS, timestep_spacing="trailing")
    args = _call(pipe, num_inference_steps=5, output_type="np", return_dict=False)
    want = pipe(**args)
    got = paratime.parallelize(pipe, tol=0.0)(**args)
    assert len(got) == len(want) == 2 and got[1] is None and want[1] is None
    # Float32 rounding of batched against one-row UNet calls: 2.4e-5 of the [0, 1] image range on this machine's
    # threads, 1.1e-4 on one thread (OMP_NUM_THREADS=1; the latents 7.6e-5 of their max-abs 1)
    assert np.abs(got[0] - want[0]).max() <= 5e-4


def test_bad_steps_and_triton_on_cpu_are_named():
    pipe = tiny_sd()
    pipe.scheduler = diffusers.DDIMScheduler(**SD_BETAS, timestep_spacing="trailing")
    ppipe = paratime.parallelize(pipe)
    for steps in (0, -1, 2.5):                  # 0 divided by zero inside the scheduler
        with pytest.raises(ValueError, match="^num_inference_steps: must be an integer >= 1"):
            ppipe(**_call(pipe, num_inference_steps=steps))
    # A numpy integer (np.arange of a sweep) runs, as the pipeline runs it (it was refused as not an integer).
    want = pipe(**_call(pipe, num_inference_steps=np.int64(4))).images
    got = paratime.parallelize(pipe, tol=0.0)(**_call(pipe, num_inference_steps=np.int64(4))).images
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    with pytest.raises(ValueError, match="^kernels: 'triton' cannot run"):     # at wrap time, not the first call
        paratime.parallelize(pipe, kernels="triton")


def test_import_paratime_does_not_import_diffusers():
    code = "import sys, paratime; assert 'diffusers' not in sys.modules; assert callable(paratime.parallelize)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_sd3_mu_without_dynamic_shifting_is_refused_naming_it():
    """The scheduler would not read mu (dynamic shifting off): accepted, it changed nothing."""
    pipe = tiny_sd3()
    assert not pipe.scheduler.config.get("use_dynamic_shifting")
    with pytest.raises(ValueError, match="^mu: applies only to a scheduler with use_dynamic_shifting"):
        paratime.parallelize(pipe)(**_call(pipe), mu=5.0)
