"""Flux through ``paratime.parallelize(pipe)`` against ``FluxPipeline``'s own call (same generator): packed latents,
flow matching with the pipeline's sigmas and dynamic shift ``mu`` (from the packed sequence length), and the guidance
embedding (distilled guidance: one transformer call per step); default ``output_type`` and ``"latent"``."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import paratime  # noqa: E402
from paratime.bench.tiny_pipelines import prompt_embeddings, tiny_flux  # noqa: E402
from paratime.methods.picard import DEFAULT_TOL  # noqa: E402

BOUND = 1e-4


def _args(pipe, **kw):
    emb = {k: v for k, v in prompt_embeddings(pipe, batch=2).items() if not k.startswith("negative")}
    return dict(num_inference_steps=5, height=48, width=64, max_sequence_length=16, **emb, **kw)


def _gen():
    return torch.Generator().manual_seed(1)


def test_flux_matches_the_pipeline():
    pipe = tiny_flux()
    args = _args(pipe, guidance_scale=3.5)
    want = pipe(generator=_gen(), output_type="latent", **args).images
    scale = float(want.abs().max())
    # The guidance embedding is wired: another guidance_scale moves the sample by far more than the bound.
    other = pipe(generator=_gen(), output_type="latent", **{**args, "guidance_scale": 1.0}).images
    assert float((other - want).abs().max()) > 100 * BOUND * scale
    for method, tol in (("sequential", None), ("picard", 0.0)):
        got = paratime.parallelize(pipe, method=method, tol=tol)(generator=_gen(), output_type="latent", **args)
        assert float((got.images - want).abs().max()) <= BOUND * scale, method
    fast = paratime.parallelize(pipe)(generator=_gen(), output_type="latent", **args).images
    assert float((fast - want).abs().max()) <= DEFAULT_TOL["final"]
    images = paratime.parallelize(pipe, tol=0.0)(generator=_gen(), **args).images          # default: PIL
    want_images = pipe(generator=_gen(), **args).images
    assert type(images[0]) is type(want_images[0]) and len(images) == len(want_images) == 2
    diff = np.abs(np.stack([np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
                            for a, b in zip(images, want_images)])).max()
    assert diff <= 1.0


def test_flux_true_cfg_is_refused_naming_it():
    pipe = tiny_flux()
    emb = prompt_embeddings(pipe, batch=1)
    with pytest.raises(ValueError, match="true_cfg_scale"):
        paratime.parallelize(pipe)(num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                                   true_cfg_scale=2.0, **emb)


def test_flux_refuses_the_negative_inputs_the_pipeline_refuses():
    """The pipeline's check_inputs sees the negative prompt arguments too (they were left out: inputs diffusers
    refuses ran)."""
    pipe = tiny_flux()
    emb = prompt_embeddings(pipe, batch=1)
    base = dict(prompt_embeds=emb["prompt_embeds"], pooled_prompt_embeds=emb["pooled_prompt_embeds"],
                num_inference_steps=2, height=32, width=32, max_sequence_length=16, output_type="latent")
    neg, neg_pooled = emb["negative_prompt_embeds"], emb["negative_pooled_prompt_embeds"]
    wrapped = paratime.parallelize(pipe, method="sequential")
    for extra, match in ((dict(negative_prompt="x", negative_prompt_embeds=neg), "Cannot forward both"),
                         (dict(negative_prompt_embeds=neg), "negative_pooled_prompt_embeds"),
                         (dict(negative_prompt_2="x", negative_prompt_embeds=neg,
                               negative_pooled_prompt_embeds=neg_pooled), "Cannot forward both")):
        for call in (pipe, wrapped):
            with pytest.raises(ValueError, match=match):
                call(generator=_gen(), **base, **extra)


def test_flux_sigmas_set_the_steps_as_the_pipeline_does():
    """Given sigmas, FluxPipeline runs len(sigmas) steps whatever num_inference_steps says; paratime passed both to
    the scheduler, which refused them unless they agreed."""
    pipe = tiny_flux()
    sigmas = [1.0, 0.7, 0.4, 0.2]
    args = {k: v for k, v in _args(pipe).items() if k != "num_inference_steps"}
    want = pipe(generator=_gen(), output_type="latent", sigmas=sigmas, **args).images
    scale = float(want.abs().max())
    for steps in ({}, {"num_inference_steps": 3}):
        got = paratime.parallelize(pipe, method="sequential")(generator=_gen(), output_type="latent", sigmas=sigmas,
                                                              **args, **steps)
        assert float((got.images - want).abs().max()) <= BOUND * scale, steps
        assert got.paratime_stats.steps == 4


def test_one_prompts_embeddings_serve_several_images_as_in_the_pipeline():
    """FluxPipeline broadcasts prompt_embeds of batch 1 over num_images_per_prompt; paratime refused them, naming
    an internal tensor (encoder_hidden_states)."""
    pipe = tiny_flux()
    emb = {k: v for k, v in prompt_embeddings(pipe, batch=1).items() if not k.startswith("negative")}
    args = dict(num_inference_steps=3, height=32, width=32, max_sequence_length=16, output_type="latent",
                num_images_per_prompt=2, **emb)
    want = pipe(generator=_gen(), **args).images
    got = paratime.parallelize(pipe, method="sequential")(generator=_gen(), **args).images
    assert got.shape == want.shape and want.shape[0] == 2
    assert float((got - want).abs().max()) <= BOUND * float(want.abs().max())
