"""A video pipeline through ``paratime.parallelize(pipe)``: ``WanPipeline`` (tiny Wan 2.1 transformer and VAE from
configs) against its own call with the same generator, 5-D latents ``(B, C, frames, h, w)``, classifier-free
guidance, flow matching (Euler, and Wan's own UniPC on flow sigmas); its default ``output_type`` ("np") and
``"latent"``."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import paratime  # noqa: E402
from paratime.bench.tiny_pipelines import prompt_embeddings, tiny_wan  # noqa: E402

BOUND = 1e-4


def test_wan_matches_the_pipeline():
    pipe = tiny_wan()
    args = dict(num_inference_steps=4, height=32, width=48, num_frames=5, guidance_scale=4.0,
                **prompt_embeddings(pipe, batch=2))

    def call(target, **kw):
        return target(generator=torch.Generator().manual_seed(1), **args, **kw).frames

    want = call(pipe, output_type="latent")
    assert want.shape == (2, 16, 2, 4, 6)
    scale = float(want.abs().max())
    for method, tol in (("sequential", None), ("picard", 0.0)):
        got = call(paratime.parallelize(pipe, method=method, tol=tol), output_type="latent")
        assert float((got - want).abs().max()) <= BOUND * scale, method
    video, want_video = call(paratime.parallelize(pipe, tol=0.0)), call(pipe)          # default: numpy frames
    assert isinstance(video, np.ndarray) and video.shape == want_video.shape == (2, 5, 32, 48, 3)
    assert np.abs(video - want_video).max() <= BOUND


def test_wan_with_its_default_unipc_scheduler_matches_the_pipeline():
    """Wan's own scheduler: UniPC on flow sigmas (predictor-corrector with a D history)."""
    pipe = tiny_wan(diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0))
    args = dict(num_inference_steps=5, height=32, width=48, num_frames=5, output_type="latent",
                **prompt_embeddings(pipe, batch=2))
    want = pipe(generator=torch.Generator().manual_seed(1), **args).frames
    for method, tol in (("sequential", None), ("picard", 0.0)):
        got = paratime.parallelize(pipe, method=method, tol=tol)(generator=torch.Generator().manual_seed(1), **args)
        assert float((got.frames - want).abs().max()) <= BOUND * float(want.abs().max()), method
