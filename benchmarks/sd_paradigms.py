"""Side by side on one tiny Stable Diffusion pipeline (built from configs, untrained): diffusers' own
``StableDiffusionParadigmsPipeline`` (the ParaDiGMS reference implementation, the real class) against paratime's
Picard through ``paratime.parallelize``, with the same latents, prompt embeddings, window and guidance.

Reported per run: rounds (sequential network calls), NFE (time-point evaluations per image), wall time (min / median
over repeats) and the max difference from the sequential sample. ``stop="paradigms"`` with
:data:`~paratime.bench.rounds_at_accuracy.PARADIGMS_RULE` (one window for the batch, Picard's update, the guess x_T
copied) takes the real class's rounds and evaluations exactly; paratime's default tolerance is relative to each
latent's own max-abs (the SD latents declare no range). The scheduler is ``DDIMParallelScheduler`` (what
the ParaDiGMS pipeline needs), trailing spacing. Threads: ``torch.set_num_threads(threads)`` (default 1); wall times on
shared CPUs are noisy.

    python -m paratime.bench.sd_paradigms --steps 50 --window 16 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from paratime.methods.picard import DEFAULT_TOL

from paratime.bench.rounds_at_accuracy import PARADIGMS_RULE, rule_options

__all__ = ["compare", "markdown", "main"]


class _CallCounter:
    """Counts a network's calls and rows (forward pre-hook)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = self.rows = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        self.rows += int(args[0].shape[0])

    def reset(self):
        self.calls = self.rows = 0


def compare(steps: int = 50, window: int = 16, repeats: int = 3, batch: int = 1, guidance: float = 5.0,
            threads: int = 1) -> list[dict]:
    """Rows of the comparison (one per sampler), each with ``rounds``, ``nfe``, ``wall_min_s``, ``wall_median_s``
    and ``max_diff`` (from paratime's sequential sample, latent units)."""
    from diffusers import DDIMParallelScheduler, StableDiffusionParadigmsPipeline

    import paratime

    from paratime.bench.tiny_pipelines import prompt_embeddings, tiny_sd

    torch.set_num_threads(threads)
    scheduler = DDIMParallelScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=False,
                                      steps_offset=1)
    pipe = tiny_sd(scheduler)
    paradigms = StableDiffusionParadigmsPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=None,
                                                 unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
    paradigms.set_progress_bar_config(disable=True)
    counter = _CallCounter(pipe.unet)
    args = dict(num_inference_steps=steps, guidance_scale=guidance, height=64, width=64, output_type="latent",
                latents=torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                **prompt_embeddings(pipe, batch=batch))

    runs = {
        "diffusers StableDiffusionPipeline (sequential)": lambda: (pipe(**args).images, None),
        "diffusers StableDiffusionParadigmsPipeline (tol 0.1)": lambda: (
            paradigms(**args, parallel=window, tolerance=0.1).images, None),
        "paratime sequential": _paratime(paratime, pipe, args, method="sequential"),
        # diffusers' rule on paratime's engine: the same rounds and evaluations as the real class (issue 25)
        "paratime picard, stop=paradigms + PARADIGMS_RULE, tol 0.1": _paratime(
            paratime, pipe, args, window=window, stop="paradigms", tol=0.1,
            **rule_options(dict(PARADIGMS_RULE), window, steps)),
        "paratime picard, stop=paradigms, tol 0.1": _paratime(paratime, pipe, args, window=window, stop="paradigms",
                                                              tol=0.1),
        f"paratime picard, default tol ({DEFAULT_TOL['final']:g} of each latent's max-abs, final)": _paratime(
            paratime, pipe, args, window=window),
        "paratime picard, tol 0": _paratime(paratime, pipe, args, window=window, tol=0.0),
    }
    rows, reference = [], None
    for name, run in runs.items():
        walls = []
        for _ in range(repeats):
            counter.reset()
            t0 = time.perf_counter()
            images, stats = run()
            walls.append(time.perf_counter() - t0)
        if reference is None:
            reference = images
        rounds = stats.rounds if stats is not None else counter.calls
        nfe = stats.nfe if stats is not None else counter.rows / (batch * (2 if guidance > 1 else 1))
        rows.append({"sampler": name, "rounds": rounds, "nfe": nfe, "wall_min_s": min(walls),
                     "wall_median_s": statistics.median(walls),
                     "max_diff": float((images.float() - reference.float()).abs().max())})
    counter.handle.remove()
    return rows


def _paratime(paratime, pipe, args, **options):
    ppipe = paratime.parallelize(pipe, **options)

    def run():
        out = ppipe(**args)
        return out.images, out.paratime_stats

    return run


def markdown(rows: list[dict], steps: int = 50, window: int = 16, guidance: float = 5.0, batch: int = 1,
             threads: int = 1, repeats: int = 3) -> str:
    """The comparison as a Markdown table with its settings."""
    lines = [f"Tiny SD pipeline, DDIMParallelScheduler trailing, {steps} steps, window {window}, guidance {guidance}, "
             f"batch {batch}, torch threads {threads}, {repeats} repeats; max diff from the diffusers sequential "
             f"pipeline (latents)", "",
             "| sampler | rounds | NFE / image | wall min (s) | wall median (s) | max diff |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['rounds']} | {r['nfe']:.1f} | {r['wall_min_s']:.3f} | "
              f"{r['wall_median_s']:.3f} | {r['max_diff']:.2e} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    rows = compare(a.steps, a.window, a.repeats, a.batch, a.guidance, a.threads)
    print(markdown(rows, a.steps, a.window, a.guidance, a.batch, a.threads, a.repeats))


if __name__ == "__main__":
    main()
