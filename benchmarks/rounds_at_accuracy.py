"""Rounds and NFE at fixed accuracy (issue 17): for each Picard update / stopping rule, and for diffusers' ParaDiGMS
loop, sweep the tolerance and report the fewest rounds whose samples lie within max |Δ| <= 1e-2, 2e-3, 5e-4 of
the sequential samples (same model, noise and grid; the diffusers loop against its own sequential run).

    python benchmarks/rounds_at_accuracy.py                                  # gmm DDIM-100 (256 samples), ~1-2 min
    python benchmarks/rounds_at_accuracy.py --cases all --json out.json      # every case below
    python benchmarks/rounds_at_accuracy.py --cases digits-ddim100 --batch 64
    python benchmarks/rounds_at_accuracy.py --cases policy --updates secant --no-diffusers
    python benchmarks/rounds_at_accuracy.py --merge a.json b.json           # one table from earlier --json runs
    python benchmarks/rounds_at_accuracy.py --cases gmm-ddpm1000 --init noise --fill copy   # other initial guesses

Cases (``CASES``): gmm-ddim100 and gmm-ddpm1000 (256 samples), digits-ddim100 and digits-ddpm1000 (16 samples;
~12 min on one core of a loaded 2-core machine), policy (the embedded diffusion policy, 64 samples, DDPM-100,
conditioned on a fixed batch of observations met along the expert's rollouts of the reach task's evaluation
episodes, :func:`paratime.policy_eval.latency_observations`). Windows: the full grid at 100 steps, 100 points at
1000 steps, 32 for the policy (its evaluation's, ``paratime.policy_eval.POLICY_METHODS``).

Combinations: every ``update`` in :data:`paratime.methods.picard.UPDATES` with every ``stop`` in ``STOPS``
(``--updates`` / ``--stops`` pick a subset; a new update rule joins the table without editing this file), each
swept over ``SWEEPS[stop]``. Runs of the same case from several ``--json`` files are merged by ``--merge``.

Rounds are sequential network calls; NFE is time-point evaluations per sample. "today" is the accuracy of the old
default (Picard, ParaDiGMS rule, tol 0.1, ``init="noise"``, ``fill="copy"``; on a sliding window it is a row of its
own, as the sampler's ``init="auto"`` / ``fill="path"`` change Picard there); the last column gives each
combination's rounds at that accuracy (the no-regression check).
Threads: ``--threads`` (default 1); rounds, NFE and max |Δ| do not depend on timing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from paratime import ParallelSampler
from paratime.config import declared_scale
from paratime.denoiser import Denoiser
from paratime.methods.picard import FILLS, INITS, STOPS, UPDATES

TARGETS = (1e-2, 2e-3, 5e-4)
#: tolerances swept per stopping rule, loose to strict (``paradigms``: noise-level units; ``final``: data units)
SWEEPS = {"paradigms": (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5),
          "final": (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)}
DEFAULT = ("secant", "final")                           # the sampler's default (update, stop)
#: the old default (before issue 17: Picard, ParaDiGMS's rule at tol 0.1, Picard's guess x_T copied along the
#: trajectory and into new window slots): its accuracy is the no-regression point
OLD_DEFAULT, TODAY_TOL = ("picard", "paradigms", (("init", "noise"), ("fill", "copy"))), 0.1
DIFFUSERS = "diffusers ParaDiGMS loop"


SD = "tiny-sd"                  # the model name of the tiny Stable Diffusion cases
SD_SCHEDULER = (("beta_start", 0.00085), ("beta_end", 0.012), ("beta_schedule", "scaled_linear"),
                ("clip_sample", False), ("timestep_spacing", "trailing"), ("steps_offset", 1))
SD_GUIDANCE = 5.0


def policy_cond(batch: int) -> dict:
    """``obs`` ``(batch, 12)``: states met along the expert's rollouts of the evaluation episodes (seeded)."""
    from paratime.policy_eval import latency_observations

    return {"obs": latency_observations(batch)}


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        model, solver, steps: the sampler's (model: a registered name, or a :class:`~paratime.denoiser.Denoiser`
            for paratime's runs only: the diffusers loop loads it by name).
        window: Picard's and the diffusers loop's (None: the full grid).
        batch: samples. cond: ``cond(batch) -> dict`` of conditioning tensors with a leading batch dimension.
        scheduler: the diffusers ``DDIM/DDPMParallelScheduler`` options that reproduce the model's schedule.
    """

    model: str | Denoiser
    solver: str
    steps: int
    window: int | None
    batch: int
    cond: Callable[[int], dict] | None = None
    scheduler: tuple[tuple[str, object], ...] = (("num_train_timesteps", 1000), ("beta_schedule", "linear"),
                                                 ("beta_start", 1e-4), ("beta_end", 0.02),
                                                 ("timestep_spacing", "trailing"), ("clip_sample", False))

    def conditioning(self, batch: int) -> dict:
        return self.cond(batch) if self.cond is not None else {}


CASES = {"gmm-ddim100": Case("gmm", "ddim", 100, None, 256),
         "gmm-ddpm1000": Case("gmm", "ddpm", 1000, 100, 256),
         "digits-ddim100": Case("digits", "ddim", 100, None, 16),
         "digits-ddpm1000": Case("digits", "ddpm", 1000, 100, 16),
         # The policy's own schedule and x0 clipping (clip_x0 = 1: diffusers' clip_sample), as in policy_latency.py.
         "policy": Case("policy", "ddpm", 100, 32, 64, policy_cond,
                        (("num_train_timesteps", 100), ("beta_schedule", "squaredcos_cap_v2"), ("clip_sample", True),
                         ("clip_sample_range", 1.0))),
         # The tiny SD pipeline of tiny_pipelines.py (untrained UNet, classifier-free guidance 5, SD's betas): latents
         # with no declared range, so tol and the targets are relative to each sample's own max-abs.
         "sd-ddim50": Case(SD, "ddim", 50, None, 4, scheduler=SD_SCHEDULER),
         "sd-ddpm100": Case(SD, "ddpm", 100, None, 4, scheduler=SD_SCHEDULER)}


@dataclass(frozen=True)
class Combo:
    """A Picard update rule with a stopping rule and more sampler options (``init``, ``fill``, ...; default: the
    sampler's), swept over ``SWEEPS[stop]``."""

    update: str
    stop: str
    options: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        extra = "".join(f", {k} {v}" for k, v in self.options)
        default = " (default)" if (self.update, self.stop) == DEFAULT and not self.options else ""
        return f"{self.update} + {self.stop} rule{extra}{default}"

    @property
    def tols(self) -> tuple[float, ...]:
        return SWEEPS[self.stop]


def combos(updates=UPDATES, stops=STOPS, options: tuple[tuple[str, object], ...] = ()) -> list[Combo]:
    """Every ``update`` with every ``stop``, in the order given, each with the sampler ``options``."""
    return [Combo(u, s, options) for u in updates for s in stops]


# -- runs ----------------------------------------------------------------------------------------------------------
def sample(case: Case, batch: int, seed: int = 0, first_sample: int = 0, noise: torch.Tensor | None = None,
           generator=None, **options):
    """``case``'s samples ``first_sample .. first_sample + batch - 1`` of ``seed``
    (:class:`~paratime.results.SampleResult`) with sampler ``options`` (``method``, ``tol``, ``update``, ...);
    ``window`` defaults to the case's; ``noise``: the initial noise instead of the seed's (the steps' noise still
    comes from the seed); ``generator``: the steps' noise drawn from it instead (the SD cases: the pipeline call's
    ``generator``), as :func:`class_noise` gives it."""
    if options.get("method", "picard") in ("picard", "auto"):
        options.setdefault("window", case.window)
        options = rule_options(options, options["window"], case.steps)
    if case.model == SD:
        if first_sample or noise is not None:
            raise ValueError("first_sample, noise: the tiny SD cases start from their own seeded latents")
        return _sd_sample(case, batch, seed, generator, **options)
    s = ParallelSampler(case.model, solver=case.solver, steps=case.steps, progress=False, **options)
    cond = {k: v[first_sample:] for k, v in case.conditioning(first_sample + batch).items()}
    if noise is not None and not s.draws_step_noise:    # the seed (or generator) draws nothing: an error to pass
        return s.sample(noise=noise, **cond)
    drawn = dict(seed=seed, first_sample=first_sample) if generator is None else dict(generator=generator)
    return s.sample(None if noise is not None else batch, noise=noise, **drawn, **cond)


def class_noise(case: Case, batch: int) -> dict:
    """The noise of the real class's runs (:func:`real_class_runs`) as :func:`sample`'s ``noise`` and ``generator``:
    the class's initial latents (the zoo's ``(seed 0, sample)`` noise, the SD cases' own seeded latents) and its
    step noise, ``torch.Generator().manual_seed(0)`` drawn as the class draws it: one ``(B, *shape)`` draw per step,
    in step order, in its prompt embeddings' dtype (the zoo network's; :class:`~paratime.noise.PipelineNoise`).
    Paratime's seeded step noise is another draw: on a stochastic solver the trajectories and rounds then differ."""
    if case.model == SD:
        return {"generator": torch.Generator().manual_seed(0)}     # the pipeline draws it in its own dtype
    from paratime.models import as_denoiser
    from paratime.noise import INITIAL, PipelineNoise, draw_noise

    model = as_denoiser(case.model)
    dtype = model.dtype or torch.float32
    return {"noise": draw_noise(0, batch, model.sample_shape, None, INITIAL, dtype=dtype),
            "generator": PipelineNoise(torch.Generator().manual_seed(0), dtype)}


# -- the tiny Stable Diffusion cases -------------------------------------------------------------------------------
_PIPES: dict[str, object] = {}


def sd_scheduler(case: Case):
    """The diffusers ParaDiGMS scheduler of ``case`` (``DDIMParallelScheduler`` / ``DDPMParallelScheduler``): what
    the real pipeline class needs, and what paratime reads its grid from. DDIM keeps SD's ``set_alpha_to_one=False``
    on the SD cases, diffusers' default elsewhere."""
    from diffusers import DDIMParallelScheduler, DDPMParallelScheduler

    options = dict(case.scheduler)
    if case.solver == "ddim":
        return DDIMParallelScheduler(**options, set_alpha_to_one=case.model != SD)
    return DDPMParallelScheduler(**options)


def sd_pipe(case: Case):
    """The tiny SD pipeline (:func:`paratime.bench.tiny_pipelines.tiny_sd`, seed 0) with ``case``'s scheduler, one
    per solver."""
    if case.solver not in _PIPES:
        from paratime.bench.tiny_pipelines import tiny_sd

        _PIPES[case.solver] = tiny_sd(sd_scheduler(case))
    return _PIPES[case.solver]


def sd_arguments(case: Case, batch: int, seed: int = 0) -> dict:
    """The pipeline call of the SD cases: seeded latents ``(batch, 4, 8, 8)`` and prompt embeddings, guidance 5,
    latents out (no decoding)."""
    from paratime.bench.tiny_pipelines import prompt_embeddings

    pipe = sd_pipe(case)
    return dict(num_inference_steps=case.steps, guidance_scale=SD_GUIDANCE, height=64, width=64, output_type="latent",
                latents=torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed)),
                **prompt_embeddings(pipe, batch=batch, seed=seed))


def _sd_sample(case: Case, batch: int, seed: int, generator=None, **options):
    import paratime

    drawn = {} if generator is None else {"generator": generator}
    out = paratime.parallelize(sd_pipe(case), **options)(**sd_arguments(case, batch, seed), **drawn)
    return SimpleNamespace(samples=out.images, stats=out.paratime_stats)


# -- accuracy --------------------------------------------------------------------------------------------------------
def data_scale(case: Case) -> float | None:
    """The scale relative errors are in: the model's declared one (:func:`paratime.config.declared_scale`: digits and
    the policy 1), or None (each sample's own max-abs: the mixtures and the SD latents declare none)."""
    if case.model == SD:
        return None
    from paratime.models import as_denoiser

    return declared_scale(as_denoiser(case.model))


def errors(x: torch.Tensor, ref: torch.Tensor, scale: float | None) -> tuple[float, float]:
    """``(max |x - ref|, max over samples of max |x - ref| / scale)`` (scale None: each reference sample's own
    max-abs)."""
    d = (x.double() - ref.double()).flatten(1).abs().amax(1)                    # (B,)
    s = ref.double().flatten(1).abs().amax(1) if scale is None else torch.full_like(d, scale)
    return float(d.max()), float((d / s).max())


def sweep(run: Callable[[float], tuple], tols, floor: float, key: str = "max_abs_diff") -> list[dict]:
    """Run ``run(tol) -> (rounds, nfe, max_diff[, max_rel_diff])`` from loose to strict until ``key`` <= floor."""
    out = []
    for tol in tols:
        rounds, nfe, diff, *rel = run(tol)
        out.append({"tol": tol, "rounds": rounds, "nfe": nfe, "max_abs_diff": diff,
                    **({"max_rel_diff": rel[0]} if rel else {})})
        if out[-1][key] <= floor:
            break
    return out


def at_accuracy(runs: list[dict], target: float, key: str = "max_abs_diff") -> dict | None:
    """The run with the fewest rounds (then NFE) among those with ``key`` within ``target``; None if none did."""
    ok = [r for r in runs if r[key] <= target]
    return min(ok, key=lambda r: (r["rounds"], r["nfe"])) if ok else None


def paratime_runs(case: Case, batch: int, combo: Combo, ref: torch.Tensor, floor: float,
                  tols: tuple[float, ...] | None = None, as_class: bool = False) -> list[dict]:
    """Picard with ``combo`` over its tolerances, each against the sequential samples ``ref`` (of the same noise);
    ``as_class``: the real class's noise (:func:`class_noise`) instead of the seed's."""
    def run(tol):
        drawn = class_noise(case, batch) if as_class else {}                 # a fresh generator each run
        res = sample(case, batch, tol=tol, update=combo.update, stop=combo.stop, **dict(combo.options), **drawn)
        return res.stats.rounds, res.stats.nfe, float((res.samples - ref).abs().max())

    return sweep(run, combo.tols if tols is None else tols, floor)


def diffusers_runs(case: Case, batch: int, tols, floor: float) -> list[dict]:
    """diffusers' ParaDiGMS loop (``DDIM/DDPMParallelScheduler``, one window for the whole batch), each run against
    the loop's own sequential run; empty without diffusers."""
    try:
        from diffusers import DDIMParallelScheduler, DDPMParallelScheduler
    except ImportError:
        return []
    from paratime.bench.suite import paradigms_loop
    from paratime.models import load_model
    from paratime.noise import INITIAL, draw_noise

    model = load_model(case.model)
    dtype = model.dtype or torch.float32                  # the network's own precision (gmm: float64)
    cond = case.conditioning(batch)

    def net(x, t):                                        # x: (P * batch, *shape), P window points, point-major
        rows = {k: v.repeat(x.shape[0] // batch, *([1] * (v.ndim - 1))) for k, v in cond.items()}
        return model.network(x.to(dtype), t, **rows).to(x.dtype)

    options = dict(case.scheduler)
    sch = (DDIMParallelScheduler(**options, set_alpha_to_one=True) if case.solver == "ddim"
           else DDPMParallelScheduler(**options))
    x_T = draw_noise(0, batch, model.sample_shape, None, INITIAL, dtype=dtype)
    W = case.window or case.steps
    with torch.no_grad():
        ref = paradigms_loop(net, sch, x_T, case.steps, 1, 0.0, torch.Generator().manual_seed(0))[0]

        def run(tol):
            x, rounds, nfe = paradigms_loop(net, sch, x_T, case.steps, W, tol, torch.Generator().manual_seed(0))
            return rounds, nfe, float((x - ref).abs().max())

        return sweep(run, tols, floor)


def _zoo_unet(model: Denoiser, cond_shapes: dict):
    """A zoo network in the call form of ``UNet2DConditionModel`` (``unet(sample, timestep, encoder_hidden_states=,
    return_dict=False)[0]``), so that the real ``StableDiffusionParadigmsPipeline`` drives it. The case's
    conditioning travels as the prompt embeddings ``(rows, 1, C)``, its tensors flattened and concatenated
    (``cond_shapes``: key -> per-sample shape, in order)."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class ZooUNet(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, in_channels: int = 1, sample_size: int = 1):
            super().__init__()
            self.dtype_anchor = torch.nn.Parameter(torch.zeros((), dtype=model.dtype or torch.float32),
                                                   requires_grad=False)   # the pipeline's embeddings take its dtype

        def forward(self, sample, timestep, encoder_hidden_states=None, cross_attention_kwargs=None,
                    return_dict=False):
            cond, start, flat = {}, 0, encoder_hidden_states[:, 0]              # (rows, C)
            for k, shape in cond_shapes.items():
                n = math.prod(shape)
                cond[k] = flat[:, start:start + n].reshape(-1, *shape)
                start += n
            net_dtype = model.dtype or torch.float32
            out = model.network(sample.to(net_dtype), timestep.to(torch.float32), **cond)
            return (out.to(sample.dtype),)

    return ZooUNet()


def _paradigms_pipeline(parts: dict, scheduler):
    """diffusers' own ``StableDiffusionParadigmsPipeline`` of ``parts`` (vae, text encoder, unet) and
    ``scheduler``, its progress bar off."""
    from diffusers import StableDiffusionParadigmsPipeline

    pipe = StableDiffusionParadigmsPipeline(**parts, tokenizer=None, scheduler=scheduler, safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _zoo_class(model: Denoiser, scheduler, cond: dict, latents: torch.Tensor, steps: int):
    """``(pipeline, unet, call arguments)``: :func:`_paradigms_pipeline` on a zoo network (through
    :func:`_zoo_unet`, its conditioning as the prompt embeddings) from the initial ``latents``."""
    B, dtype = latents.shape[0], model.dtype or torch.float32
    unet = _zoo_unet(model, {k: tuple(v.shape[1:]) for k, v in cond.items()})
    emb = torch.cat([v.reshape(B, -1).to(dtype) for v in cond.values()], 1) if cond else torch.zeros(B, 1, dtype=dtype)
    args = dict(num_inference_steps=steps, guidance_scale=1.0, height=8, width=8, output_type="latent",
                latents=latents, prompt_embeds=emb[:, None])
    return _paradigms_pipeline(dict(vae=None, text_encoder=None, unet=unet), scheduler), unet, args


def loop_is_the_class(model: Denoiser, scheduler, latents: torch.Tensor, steps: int, window: int, tol: float,
                      cond: dict | None = None, seed: int = 0) -> tuple[bool, str]:
    """The loop the benchmarks time (:func:`paratime.bench.suite.paradigms_loop`, no pipeline around it) against
    diffusers' real ``StableDiffusionParadigmsPipeline`` on one call of ``model`` (:func:`_zoo_class`), the same
    scheduler, initial ``latents``, window, tolerance and generator seed: ``(same, line)``, same when the network
    calls and the samples agree bit for bit."""
    import copy

    from paratime.bench.suite import paradigms_loop

    cond, B = cond or {}, latents.shape[0]
    dtype = model.dtype or torch.float32
    pipe, unet, args = _zoo_class(model, copy.deepcopy(scheduler), cond, latents, steps)
    calls = []
    unet.register_forward_pre_hook(lambda module, inputs: calls.append(1))

    def net(x, t):                                   # x: (P * B, *shape), point-major: each sample's rows repeat
        rows = {k: v.repeat(x.shape[0] // B, *[1] * (v.ndim - 1)) for k, v in cond.items()}
        return model.network(x.to(dtype), t.to(torch.float32), **rows).to(x.dtype)

    with torch.no_grad():
        real = pipe(**args, parallel=window, tolerance=tol, generator=torch.Generator().manual_seed(seed)).images
        x, rounds, _ = paradigms_loop(net, copy.deepcopy(scheduler), latents, steps, window, tol,
                                      torch.Generator().manual_seed(seed))
    real = real.reshape(x.shape).to(x.dtype)
    same = len(calls) == rounds and torch.equal(real, x)
    return same, (f"anchor: the loop {rounds} rounds, diffusers' StableDiffusionParadigmsPipeline {len(calls)} calls; "
                  f"max |sample difference| {float((real - x).abs().max()):.1e}: {'the same' if same else 'DIFFERENT'}")


def real_class(case: Case, batch: int):
    """``(pipeline, unet, call arguments)``: diffusers' own ``StableDiffusionParadigmsPipeline`` on ``case``'s
    network (the tiny SD pipeline's UNet, or a zoo network through :func:`_zoo_class`), the same initial noise as
    paratime's (``(seed 0, sample)`` for the zoo, the SD cases' seeded latents) and the case's scheduler."""
    if case.model == SD:
        sd = sd_pipe(case)
        pipe = _paradigms_pipeline(dict(vae=sd.vae, text_encoder=sd.text_encoder, unet=sd.unet), sd_scheduler(case))
        return pipe, sd.unet, sd_arguments(case, batch)
    from paratime.models import as_denoiser

    latents = class_noise(case, batch)["noise"]
    return _zoo_class(as_denoiser(case.model), sd_scheduler(case), case.conditioning(batch), latents, case.steps)


def real_class_runs(case: Case, batch: int, tols, floor: float) -> list[dict]:
    """The real ``StableDiffusionParadigmsPipeline`` (:func:`real_class`) over ``tols`` (its ``tolerance``), the
    window the case's, each run against the class's own sequential run (``parallel=1``: one exact step per call,
    the same pre-drawn noise); rounds are its network calls, NFE its time points per sample (guided rows counted
    once). Sweeps until the relative error (:func:`errors`) is <= ``floor``; empty without diffusers."""
    try:
        pipe, unet, args = real_class(case, batch)
    except ImportError:
        return []
    per_point = batch * (2 if args["guidance_scale"] > 1 else 1)
    scale = data_scale(case)
    count = [0, 0]                                                        # calls, rows

    def counter(module, inputs):
        count[0], count[1] = count[0] + 1, count[1] + inputs[0].shape[0]

    def call(parallel, tol):
        count[:] = [0, 0]
        x = pipe(**args, parallel=parallel, tolerance=tol, generator=torch.Generator().manual_seed(0)).images
        return x, count[0], count[1] / per_point

    handle = unet.register_forward_pre_hook(counter)

    with torch.no_grad():
        ref = call(1, 0.0)[0]

        def run(tol):
            x, rounds, nfe = call(case.window or case.steps, tol)
            return (rounds, nfe, *errors(x, ref, scale))

        try:
            return sweep(run, tols, floor, key="max_rel_diff")
        finally:
            handle.remove()


def _progress(name: str, label: str, runs: list[dict]) -> None:
    print(f"  {name} {label}: " + ", ".join(f"tol {r['tol']:g}: {r['rounds']} rounds, {r['max_abs_diff']:.2g}"
                                             for r in runs), flush=True)


def run_case(name: str, batch: int | None = None, selected: list[Combo] | None = None,
             with_diffusers: bool = True) -> dict:
    """Every combination (default: :func:`combos`), the old default on a sliding window (where its initial guess
    and window fill differ from today's Picard + ParaDiGMS rule) and the diffusers loop on case ``name``.

    Returns:
        ``{"case", "model", "solver", "steps", "batch", "window", "today", "runs": {label: [run, ...]},
        "combos": {label: {"update", "stop"}}}``, each run ``{"tol", "rounds", "nfe", "max_abs_diff"}``.
    """
    case = CASES[name]
    batch = batch or case.batch
    floor = min(TARGETS)
    rows, meta = {}, {}
    with torch.no_grad():
        ref = sample(case, batch, method="sequential").samples
        old = Combo(*OLD_DEFAULT) if (case.window or case.steps) < case.steps else Combo(*OLD_DEFAULT[:2])
        for combo in [*(selected or combos()), old]:
            if combo.label in rows:
                continue
            rows[combo.label] = paratime_runs(case, batch, combo, ref, floor)
            meta[combo.label] = {"update": combo.update, "stop": combo.stop, **dict(combo.options)}
            _progress(name, combo.label, rows[combo.label])
        today = next((r for r in rows[old.label] if r["tol"] == TODAY_TOL), None)
        today = today or paratime_runs(case, batch, old, ref, 0.0, tols=(TODAY_TOL,))[0]
    if with_diffusers:
        d = diffusers_runs(case, batch, SWEEPS["paradigms"], floor)
        if d:
            rows[DIFFUSERS] = d
            _progress(name, "diffusers", d)
    return {"case": name, "model": case.model, "solver": case.solver, "steps": case.steps, "batch": batch,
            "window": case.window or case.steps, "today": today, "runs": rows, "combos": meta}


def merge(results: list[dict]) -> list[dict]:
    """Results of the same case (and batch) from several runs as one, later runs replacing a label's rows."""
    out: dict[tuple, dict] = {}
    for res in results:
        key = (res["case"], res["batch"], res["window"])
        if key not in out:
            out[key] = {**res, "runs": {}, "combos": {}}
        out[key]["runs"].update(res["runs"])
        out[key]["combos"].update(res.get("combos", {}))
    return list(out.values())


def to_markdown(results: list[dict]) -> str:
    head = "| case | update + stop | " + " | ".join(f"rounds (NFE) at {t:g}" for t in TARGETS) + \
           " | rounds at today's accuracy |"
    lines = [head, "|" + "---|" * (len(TARGETS) + 3)]
    for res in results:
        today = res["today"]["max_abs_diff"]
        for label, runs in res["runs"].items():
            cells = []
            for t in (*TARGETS, today):
                r = at_accuracy(runs, t)
                cells.append(f"{r['rounds']} ({r['nfe']:.0f})" if r else "not reached")
            case = f"{res['case']} b{res['batch']} W{res['window']}"
            lines.append(f"| {case} | {label} | " + " | ".join(cells[:-1]) + f" | {cells[-1]} (max Δ {today:.2g}) |")
    return "\n".join(lines) + "\n"


# -- the headline: paratime's default against the real class --------------------------------------------------------
#: issue 25's comparison: max |Δ| <= TARGET of the data scale (:func:`data_scale`)
TARGET = 2e-3
HEADLINE = ("digits-ddim100", "digits-ddpm1000", "gmm-ddpm1000", "policy", "sd-ddim50", "sd-ddpm100")
#: the sampler options under which ``stop="paradigms"`` is diffusers' pipeline exactly (one window for the batch,
#: Picard's update, the guess x_T copied along the trajectory and into new slots): same rounds and evaluations as
#: the real class on the same network, noise and window (``tests/test_accuracy_bench.py``)
PARADIGMS_RULE = (("update", "picard"), ("shared_window", True), ("init", "noise"), ("fill", "copy"))
RATIO = 1.5                     # the target: the real class's rounds / paratime's default rounds


def rule_options(options: dict, window: int | None, steps: int) -> dict:
    """``options`` without a ``fill`` where the window (None: the whole grid) covers the ``steps``-step grid and no
    ``max_rounds`` is given: nothing enters such a window, and the sampler refuses a fill that does not apply."""
    if "fill" in options and (window is None or window >= steps) and options.get("max_rounds") is None:
        return {k: v for k, v in options.items() if k != "fill"}
    return options


def headline(name: str, batch: int | None = None, with_rule: bool = True) -> dict:
    """Case ``name``: paratime at its DEFAULT options (no tolerance sweep) against the real
    ``StableDiffusionParadigmsPipeline`` at its best tolerance for max |Δ| <= :data:`TARGET` of the data scale
    (each against its own sequential run), and paratime's ``stop="paradigms"`` under :data:`PARADIGMS_RULE` at that
    tolerance (the same rule on paratime's engine, from the class's noise: :func:`class_noise`).

    Returns:
        ``{"case", "batch", "window", "default": run, "peer": run or None, "peer_runs", "rule": run or None,
        "checks": {name: bool}}``; a run is ``{"tol", "rounds", "nfe", "max_abs_diff", "max_rel_diff"}`` and the
        default's also ``tol_units``, ``tol_abs`` (the tolerance in force in the sample's units) and ``scale``.
    """
    case = CASES[name]
    batch = batch or case.batch
    scale = data_scale(case)
    with torch.no_grad():
        ref = sample(case, batch, method="sequential").samples
        res = sample(case, batch)
    st = res.stats
    units = getattr(st, "tol_units", "absolute")
    default = {"tol": st.tol, "rounds": st.rounds, "nfe": st.nfe, **dict(zip(("max_abs_diff", "max_rel_diff"),
                                                                               errors(res.samples, ref, scale))),
               "tol_units": units, "tol_abs": getattr(st, "tol_abs", st.tol), "scale": scale,
               "window": st.window}     # what ran: a case without a window leaves it to the planner
    peer_runs = real_class_runs(case, batch, SWEEPS["paradigms"], TARGET)
    peer = at_accuracy(peer_runs, TARGET, "max_rel_diff")
    rule = None
    if with_rule and peer is not None:      # the class's noise: the same step noise on a stochastic solver
        combo = Combo("picard", "paradigms", tuple(o for o in PARADIGMS_RULE if o[0] != "update"))
        with torch.no_grad():
            seq = sample(case, batch, method="sequential", **class_noise(case, batch)).samples
        (rule,) = paratime_runs(case, batch, combo, seq, 0.0, tols=(peer["tol"],), as_class=True)
    # The error relative to the tolerance in force: tol itself in data units; with tol in other units the margin
    # check is left out (every README row runs in data units).
    rel_tol = st.tol if units == "data" else None
    checks = {"max rel Δ <= target": default["max_rel_diff"] <= TARGET}
    if rel_tol is not None and rel_tol > 0:
        checks["max rel Δ in [tol/4, tol]"] = rel_tol / 4 <= default["max_rel_diff"] <= rel_tol
    if peer is not None:
        checks[f"rounds >= {RATIO}x fewer"] = peer["rounds"] >= RATIO * default["rounds"]
        checks["rounds, NFE <= peer's"] = default["rounds"] <= peer["rounds"] and default["nfe"] <= peer["nfe"]
    else:       # no comparison is not a passed one: the class missing (no diffusers) or short of the target
        checks["real class ran (diffusers)" if not peer_runs else "real class reached the target"] = False
    return {"case": name, "batch": batch, "window": case.window or case.steps, "default": default, "peer": peer,
            "peer_runs": peer_runs, "rule": rule, "checks": checks}


def headline_markdown(results: list[dict]) -> str:
    """The headline results as one table (relative errors: max over samples of max |Δ| / data scale)."""
    lines = [f"| case | paratime default: rounds / NFE / max rel Δ (tol) | real class at its best tol for "
             f"{TARGET:g}: tol / rounds / NFE / max rel Δ | rounds ratio | paratime ParaDiGMS rule at that tol: "
             f"rounds / NFE | checks |", "|---|---|---|---|---|---|"]
    for r in results:
        d, p, q = r["default"], r["peer"], r["rule"]
        tol = f"{d['tol']:g} {d['tol_units']}"
        peer = f"{p['tol']:g} / {p['rounds']} / {p['nfe']:.0f} / {p['max_rel_diff']:.2g}" if p else "not reached"
        ratio = f"{p['rounds'] / d['rounds']:.2f}x" if p else "–"
        rule = f"{q['rounds']} / {q['nfe']:.0f}" if q else "–"
        checks = ", ".join(f"{k}: {'ok' if v else '**MISSED**'}" for k, v in r["checks"].items())
        own = d.get("window")            # the planner's window when the case left it open (the peer runs r's)
        ran = "" if own in (None, r["window"]) else f" (paratime W{own})"
        lines.append(f"| {r['case']} b{r['batch']} W{r['window']}{ran} | {d['rounds']} / {d['nfe']:.0f} / "
                     f"{d['max_rel_diff']:.2g} ({tol}) | {peer} | {ratio} | {rule} | {checks} |")
    return "\n".join(lines) + "\n"


def _names(text: str, allowed, what: str, ap: argparse.ArgumentParser) -> list[str]:
    names = list(allowed) if text == "all" else text.split(",")
    for n in names:
        if n not in allowed:
            ap.error(f"{what}: unknown {n!r}; allowed: {', '.join(allowed)}, all")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rounds_at_accuracy", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--cases", default="gmm-ddim100", help=f"comma-separated of {', '.join(CASES)}, or 'all'")
    ap.add_argument("--batch", type=int, default=None, help="samples for every case (default: each case's)")
    ap.add_argument("--updates", default="all", help=f"comma-separated of {', '.join(UPDATES)}, or 'all'")
    ap.add_argument("--stops", default="all", help=f"comma-separated of {', '.join(STOPS)}, or 'all'")
    ap.add_argument("--init", choices=INITS, default=None, help="Picard's initial guess (default: the sampler's)")
    ap.add_argument("--fill", choices=FILLS, default=None, help="how points entering a sliding window start "
                    "(default: the sampler's)")
    ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers' ParaDiGMS loop")
    ap.add_argument("--headline", action="store_true", help="paratime's default against the real "
                    "StableDiffusionParadigmsPipeline (default cases: HEADLINE); exits 1 when a check fails")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", default=None, help="also write every run to this file")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="print one table from earlier --json files instead of running")
    args = ap.parse_args(argv)
    if (args.batch is not None and args.batch < 1) or args.threads < 1:
        ap.error("--batch, --threads: must be >= 1")
    if args.merge:
        results = merge([r for f in args.merge for r in json.loads(Path(f).read_text())])
    else:
        torch.set_num_threads(args.threads)
        if args.headline:
            names = list(HEADLINE) if args.cases == ap.get_default("cases") else _names(args.cases, CASES, "--cases",
                                                                                        ap)
            print(f"torch threads={args.threads}; target max|Δ| <= {TARGET:g} of the data scale", flush=True)
            results = []
            for n in names:
                results.append(headline(n, args.batch))
                print(headline_markdown(results[-1:]), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=1))
            print(headline_markdown(results))
            return 0 if all(all(r["checks"].values()) for r in results) else 1
        names = _names(args.cases, CASES, "--cases", ap)
        options = tuple((k, v) for k, v in (("init", args.init), ("fill", args.fill)) if v is not None)
        selected = combos(_names(args.updates, UPDATES, "--updates", ap), _names(args.stops, STOPS, "--stops", ap),
                          options)
        print(f"torch threads={args.threads}; targets max|Δ| {', '.join(f'{t:g}' for t in TARGETS)}", flush=True)
        results = []
        for n in names:
            results.append(run_case(n, args.batch, selected, not args.no_diffusers))
            if args.json:                               # after every case: a long run keeps what it finished
                Path(args.json).write_text(json.dumps(results, indent=1))
    print(to_markdown(results))
    if args.json and args.merge:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
