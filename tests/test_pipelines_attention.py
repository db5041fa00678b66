"""The call's attention kwargs through ``paratime.parallelize(pipe)``: ``cross_attention_kwargs`` (SD, SDXL, img2img,
inpainting, ControlNet), ``joint_attention_kwargs`` (SD3, Flux) and ``attention_kwargs`` (Wan). As in the pipeline,
their ``scale`` is the text encoders' LoRA scale in ``encode_prompt`` and the network's LoRA strength, and the rest
reaches the attention processors on every network call: every window row, every method, both guidance halves."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import paratime  # noqa: E402
from paratime.bench import tiny_pipelines as tiny  # noqa: E402

BOUND = 1e-4
METHODS = (("sequential", None), ("picard", 0.0))


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def _rel(got, want):
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _out(result):
    return result.frames if hasattr(result, "frames") else result.images


class _Gain:
    """An attention processor that scales what the network's own processor returns by the call's ``gain``
    (keyword-only: Flux passes its rotary embedding positionally)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, *args, gain=1.0, **kwargs):
        out = self.inner(attn, hidden_states, *args, **kwargs)
        return tuple(gain * o for o in out) if isinstance(out, tuple) else gain * out


def _ddim():
    return diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   set_alpha_to_one=False)


def _image(channels=3):
    return torch.rand(1, channels, 48, 48, generator=_gen(2))


# name: (pipeline, its attention argument, call arguments beyond the common ones)
GAINED = {
    "sd": (tiny.tiny_sd, "cross_attention_kwargs", dict(height=48, width=64)),
    "sd_controlnet": (tiny.tiny_sd_controlnet, "cross_attention_kwargs", dict(image=_image())),
    "sd_inpaint": (lambda: tiny.tiny_sd_inpaint(_ddim()), "cross_attention_kwargs",
                   dict(image=_image(), mask_image=(_image(1) > 0.5).float(), strength=0.7, height=48, width=48)),
    "sd3": (tiny.tiny_sd3, "joint_attention_kwargs", dict(height=48, width=64)),
    "flux": (tiny.tiny_flux, "joint_attention_kwargs", dict(height=32, width=32)),
}


@pytest.mark.parametrize("name", sorted(GAINED))
def test_attention_processor_kwargs_reach_every_network_call(name):
    """A processor argument (``gain``) changes the sample as in the pipeline, through the UNet, the ControlNet's and
    the inpainting UNet's wrappers and the transformers; one parallel pipeline called with gains 0.5, none and 0.25 in
    turn runs each (a sampler is not reused across different kwargs)."""
    make, argument, extra = GAINED[name]
    pipe = make()
    net = pipe.transformer if name in ("sd3", "flux") else pipe.unet
    net.set_attn_processor({k: _Gain(p) for k, p in net.attn_processors.items()})
    args = dict(num_inference_steps=4, guidance_scale=4.0, output_type="latent", **tiny.prompt_embeddings(pipe),
                **extra)
    if name == "flux":                      # guidance distilled into the model: no negative prompt
        del args["negative_prompt_embeds"], args["negative_pooled_prompt_embeds"]
    gains = (0.5, None, 0.25)
    kwargs = {g: {argument: None if g is None else {"gain": g}} for g in gains}
    want = {g: _out(pipe(generator=_gen(), **args, **kwargs[g])) for g in gains}
    assert _rel(want[0.5], want[None]) > 1e-3       # the argument reaches the network (measured 0.009 to 0.28)
    for method, tol in METHODS:
        ppipe = paratime.parallelize(pipe, method=method, tol=tol)
        for g in gains:
            assert _rel(_out(ppipe(generator=_gen(), **args, **kwargs[g])), want[g]) <= BOUND, (method, g)


# Without text encoders: without peft, diffusers' encode_prompt adjusts a text encoder's scale through
# ``text_encoder.text_model``, which this transformers' CLIPTextModel lacks (the pipeline itself raises
# AttributeError); with peft, the LoRA test below runs SD's text encoder at two scales.
SCALED = {"sdxl": (tiny.tiny_sdxl, "cross_attention_kwargs", dict(height=48, width=64)),
          "sd3": (tiny.tiny_sd3, "joint_attention_kwargs", dict(height=48, width=64)),
          "wan": (tiny.tiny_wan, "attention_kwargs", dict(height=32, width=48, num_frames=5))}


@pytest.mark.parametrize("name", sorted(SCALED))
def test_a_lora_scale_without_lora_runs_as_the_pipeline(name):
    """``{"scale": 0.7}`` on networks without LoRA layers runs as the pipeline runs it; a value that is not a dict
    is refused naming the argument."""
    make, argument, extra = SCALED[name]
    pipe = make()
    args = dict(num_inference_steps=4, guidance_scale=4.0, output_type="latent", **tiny.prompt_embeddings(pipe),
                **extra)
    want = _out(pipe(generator=_gen(), **args, **{argument: {"scale": 0.7}}))
    for method, tol in METHODS:
        got = _out(paratime.parallelize(pipe, method=method, tol=tol)(generator=_gen(), **args,
                                                                        **{argument: {"scale": 0.7}}))
        assert _rel(got, want) <= BOUND, method
    with pytest.raises(TypeError, match=f"{argument}: expected a dict or None, got float"):
        paratime.parallelize(pipe)(**args, **{argument: 0.7})


def test_a_lora_at_two_scales_matches_the_pipeline():
    """PEFT LoRA layers (random, nonzero) on the UNet and the text encoder: ``{"scale": s}`` scales both, the text
    encoder's through encode_prompt's ``lora_scale`` and the UNet's at every call; 0.3 and 1.0 each match the
    pipeline (they differ by 0.018 relative)."""
    peft = pytest.importorskip("peft")
    pipe = tiny.tiny_sd(text=True)
    torch.manual_seed(3)
    lora = dict(r=2, lora_alpha=2, init_lora_weights=False)     # False: random B, so the layers change the output
    pipe.unet.add_adapter(peft.LoraConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"], **lora))
    pipe.text_encoder.add_adapter(peft.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], **lora))
    args = dict(prompt="a cat", num_inference_steps=4, guidance_scale=4.0, height=48, width=64, output_type="latent")
    scales = (0.3, 1.0)
    want = {s: pipe(generator=_gen(), cross_attention_kwargs={"scale": s}, **args).images for s in scales}
    assert _rel(want[0.3], want[1.0]) > 1e-3
    for method, tol in METHODS:
        ppipe = paratime.parallelize(pipe, method=method, tol=tol)
        for s in scales:
            got = ppipe(generator=_gen(), cross_attention_kwargs={"scale": s}, **args).images
            assert _rel(got, want[s]) <= BOUND, (method, s)


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_the_scale_reaches_encode_prompt_as_lora_scale(name):
    """``scale`` is the text encoders' LoRA scale: encode_prompt gets it as ``lora_scale`` as in the pipeline (the
    LoRA test above, the only other check of it, needs peft)."""
    make, argument, extra = SCALED[name]
    pipe = make()
    seen = []
    encode = pipe.encode_prompt

    def recorded(*a, **k):
        seen.append(k.get("lora_scale"))
        return encode(*a, **k)

    pipe.encode_prompt = recorded
    args = dict(num_inference_steps=2, guidance_scale=4.0, output_type="latent", **tiny.prompt_embeddings(pipe),
                **extra, **{argument: {"scale": 0.7}})
    pipe(generator=_gen(), **args)
    assert seen == [0.7]
    paratime.parallelize(pipe, method="sequential")(generator=_gen(), **args)
    assert seen == [0.7, 0.7]


def test_numpy_scales_share_a_sampler_and_actor_built_networks_are_refused():
    """A numpy scale is a value (np.float32(0.5) twice: one sampler, it was one a call, each re-planned); workers that
    build their own network (Ray's model=) never see the kwargs, so the call is refused before any work (it failed on
    the actors' network-type check, after Ray had started, advising a new backend)."""
    import numpy as np

    from paratime.backends.local import LocalBackend

    pipe = tiny.tiny_sd3()
    args = dict(num_inference_steps=2, guidance_scale=4.0, output_type="latent", **tiny.prompt_embeddings(pipe),
                height=48, width=64)
    ppipe = paratime.parallelize(pipe, method="sequential")
    for _ in range(2):
        ppipe(generator=_gen(), joint_attention_kwargs={"scale": np.float32(0.5)}, **args)
    first = list(ppipe._samplers.values())[0]
    ppipe(generator=_gen(), joint_attention_kwargs={"scale": np.float32(0.5)}, **args)
    assert list(ppipe._samplers.values())[0] is first

    class OwnNetworks(LocalBackend):            # stands for RayBackend(model=...): the workers' own network
        model = "their own"

    owned = paratime.parallelize(pipe, method="sequential", backend=OwnNetworks())
    with pytest.raises(TypeError, match="^joint_attention_kwargs: not supported with a backend whose workers build"):
        owned(generator=_gen(), joint_attention_kwargs={"scale": 0.5}, **args)
    assert _out(owned(generator=_gen(), **args)).shape == _out(pipe(generator=_gen(), **args)).shape
