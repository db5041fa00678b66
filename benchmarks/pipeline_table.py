"""The README's pipeline x scheduler table: every diffusers scheduler swapped into every supported pipeline (tiny,
built from configs, untrained), run by the pipeline itself and by ``paratime.parallelize`` (sequential and Picard at
tol 0) with the same generator; a cell is the worst max |paratime - pipeline| relative to the pipeline's latent scale,
``refused`` (with the reason paratime gives at wrap time), or ``-`` where the scheduler does not fit the model
(flow-matching schedulers on noise-prediction UNets and the reverse). Stochastic schedulers run at 72 x 72 pixels
(per-step noise count not a multiple of 16), the others at 48 x 64; guidance on, ``output_type="latent"``.

    python -m paratime.bench.pipeline_table            # markdown table on stdout (~2 min on one core)
    python -m paratime.bench.pipeline_table --steps 6 --threads 1
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import torch

from paratime.bench import tiny_pipelines as tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["PIPELINES", "SCHEDULERS", "cell", "table", "markdown", "main"]

# Scheduler name -> extra step arguments of the call (DDIM's eta).
SCHEDULERS = {
    "DDIMScheduler": {}, "DDIMScheduler (eta=1)": {"eta": 1.0}, "DDPMScheduler": {}, "PNDMScheduler": {},
    "EulerDiscreteScheduler": {}, "EulerAncestralDiscreteScheduler": {}, "HeunDiscreteScheduler": {},
    "LMSDiscreteScheduler": {}, "DPMSolverMultistepScheduler": {}, "DPMSolverMultistepScheduler (sde, karras)": {},
    "FlowMatchEulerDiscreteScheduler": {}, "FlowMatchHeunDiscreteScheduler": {},
    "UniPCMultistepScheduler": {}, "UniPCMultistepScheduler (flow sigmas)": {},
    "KDPM2DiscreteScheduler": {}, "KDPM2AncestralDiscreteScheduler": {},
    "DPMSolverSinglestepScheduler": {}, "DEISMultistepScheduler": {}, "EDMEulerScheduler": {},
    "EDMDPMSolverMultistepScheduler": {}, "LCMScheduler": {}, "TCDScheduler (eta=0.3)": {"eta": 0.3},
}
_OPTIONS = {"DPMSolverMultistepScheduler (sde, karras)": {"algorithm_type": "sde-dpmsolver++",
                                                          "use_karras_sigmas": True},
            "UniPCMultistepScheduler (flow sigmas)": {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                                      "flow_shift": 3.0}}
_STOCHASTIC = ("DDIMScheduler (eta=1)", "DDPMScheduler", "EulerAncestralDiscreteScheduler",
               "DPMSolverMultistepScheduler (sde, karras)", "LCMScheduler", "TCDScheduler (eta=0.3)")


def _img2img(cls_name: str, base, **options):
    """An img2img pipeline of ``cls_name`` from a tiny text-to-image pipeline's components."""
    import diffusers
    return getattr(diffusers, cls_name)(**base(text=True).components, **options)


# Pipeline name -> (builder, flow matching?, call arguments beyond the shared ones).
PIPELINES = {
    "StableDiffusionPipeline": (partial(tiny.tiny_sd, text=True), False, {}),
    "StableDiffusionXLPipeline": (partial(tiny.tiny_sdxl, text=True), False, {}),
    "StableDiffusion3Pipeline": (partial(tiny.tiny_sd3, text=True), True, {}),
    "StableDiffusionImg2ImgPipeline": (partial(_img2img, "StableDiffusionImg2ImgPipeline", tiny.tiny_sd), False,
                                       {"strength": 0.6}),
    "StableDiffusionXLImg2ImgPipeline": (partial(_img2img, "StableDiffusionXLImg2ImgPipeline", tiny.tiny_sdxl,
                                                 requires_aesthetics_score=False), False, {"strength": 0.6}),
    "StableDiffusionInpaintPipeline": (partial(tiny.tiny_sd_inpaint, text=True), False,
                                       {"strength": 0.6, "mask_image": None}),
    "StableDiffusionXLInpaintPipeline": (partial(tiny.tiny_sdxl_inpaint, text=True), False,
                                         {"strength": 0.6, "mask_image": None}),
    "StableDiffusionControlNetPipeline": (partial(tiny.tiny_sd_controlnet, text=True), False, {"image": None}),
    "StableDiffusionXLControlNetPipeline": (partial(tiny.tiny_sdxl_controlnet, text=True), False, {"image": None}),
    "FluxPipeline": (tiny.tiny_flux, True, {}),
    "WanPipeline": (tiny.tiny_wan, True, {"num_frames": 5}),
}


def cell(pipeline: str, scheduler: str, steps: int = 6) -> str:
    """One table cell: ``"3.1e-07"`` (worst relative difference of sequential and Picard tol 0), ``"refused: ..."``,
    or ``"-"`` (the scheduler does not fit the model)."""
    import diffusers

    import paratime

    build, flow, extra = PIPELINES[pipeline]
    cls_name = scheduler.split(" ")[0]
    if (cls_name.startswith("FlowMatch") or "flow" in scheduler) != flow:
        return "-"
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config,
                                                                   **_OPTIONS.get(scheduler, {}))
    except ImportError as e:                     # e.g. torchsde for DPMSolverSDEScheduler
        return f"not installed ({str(e).strip().splitlines()[0][:40]})"
    side = (72, 72) if scheduler in _STOCHASTIC else (48, 64)
    if pipeline in ("FluxPipeline", "WanPipeline"):  # packed / patched 2 x 2 latents: sides multiple of 16
        side = (80, 80) if scheduler in _STOCHASTIC else (48, 64)
    args = dict(num_inference_steps=steps, guidance_scale=4.0, output_type="latent", **extra,
                **SCHEDULERS[scheduler])
    if "strength" in extra or "image" in extra:  # img2img, inpainting: the init image; ControlNet: the control
        args["image"] = torch.rand(2, 3, *side, generator=torch.Generator().manual_seed(0))
    if "mask_image" in extra:
        args["mask_image"] = (torch.rand(2, 1, *side, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    if "strength" not in extra or "mask_image" in extra:
        args.update(height=side[0], width=side[1])
    prompts = {"prompt": ["a cat", "a dog"]}
    if pipeline in ("FluxPipeline", "WanPipeline"):  # no text encoders in the tiny Flux / Wan: embeddings
        prompts = tiny.prompt_embeddings(pipe, batch=2)
        if pipeline == "FluxPipeline":
            prompts = {k: v for k, v in prompts.items() if not k.startswith("negative")}
            args.update(max_sequence_length=16)

    def run(target):
        out = target(generator=torch.Generator().manual_seed(1), **prompts, **args)
        return out.frames if pipeline == "WanPipeline" else out.images

    try:
        paratime.parallelize(pipe)
    except ValueError as e:                      # refused at wrap time: the reason and the nearest scheduler
        return "refused: " + str(e).split("; supported")[0]
    try:
        want = run(pipe)
    except (ValueError, TypeError) as e:         # the pipeline itself cannot run this scheduler
        return f"(pipeline raises: {type(e).__name__})"
    scale = float(want.abs().max())
    try:
        worst = max(float((run(paratime.parallelize(pipe, method=m, tol=t)) - want).abs().max()) / scale
                    for m, t in (("sequential", None), ("picard", 0.0)))
    except ValueError as e:                      # refused at call time (an argument of this call: strength)
        return "refused: " + str(e)
    return f"{worst:.1e}"


def table(steps: int = 6) -> dict[str, dict[str, str]]:
    """``{scheduler: {pipeline: cell}}`` for every pair."""
    return {s: {p: cell(p, s, steps) for p in PIPELINES} for s in SCHEDULERS}


def markdown(rows: dict[str, dict[str, str]]) -> str:
    """The table as markdown: a refusal's reason once, under the table, not in every cell."""
    pipes = list(PIPELINES)
    reasons: dict[str, list[str]] = {}          # reason -> "scheduler on pipeline" where it applies
    lines = ["| scheduler | " + " | ".join(p.replace("Pipeline", "") for p in pipes) + " |",
             "|---" * (len(pipes) + 1) + "|"]
    for s, cells in rows.items():
        shown = []
        for p in pipes:
            c = cells[p]
            if c.startswith("refused: "):
                where = reasons.setdefault(c[len("refused: "):], [])
                where += [] if s in where else [s]
                c = "refused"
            shown.append(c)
        lines.append(f"| {s} | " + " | ".join(shown) + " |")
    if reasons:
        lines += ["", "Refused, with the reason `parallelize` gives (at wrap time; PNDM img2img at call time):", ""]
        lines += [f"- {', '.join(where)}: {why}" for why, where in reasons.items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="num_inference_steps (default 6)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(markdown(table(a.steps)))


if __name__ == "__main__":
    main()
