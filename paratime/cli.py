"""The paratime command line. paratime sample is the main job: the embedded digits model sampled with Picard and
sequentially (a PNG grid and a table of the figures), then (--policy-demo, on by default with the digits model) the
trained diffusion policy's per-chunk latency, sequential against Picard, with its closed-loop success rate and a PNG
of rollouts. --model package.module:factory samples your own network; --pipeline DIR a saved diffusers pipeline."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from .cost import COST_NAMES
from .results import json_text

__all__ = ["main", "build_parser"]


_DEFAULT_WORKERS = 2       # torch ranks / Ray actors when --workers is not given
_DEFAULT_TIMEOUT_S = 300.0  # --timeout: seconds before a stuck torch rank or Ray actor is an error
_ADDRESS_TIMEOUT_S = 5.0   # --address HOST:PORT must accept a connection within this
_MIN_EVAL_SAMPLES = 4      # eval-digits: k-NN precision/recall with k = 3 needs k + 1 samples


class UsageError(Exception):
    """A user error on the command line: printed as one line ``paratime: error: ...``, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, so :func:`main` prints them the same way as every other user error)."""

    def error(self, message: str):
        raise UsageError(message)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, read from the parser (the value the code runs with); an option
    whose default is None says in its own help what None means."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, argparse.SUPPRESS):
            return text
        d = action.default
        shown = ("on" if d else "off") if isinstance(d, bool) else ("'' (none)" if d == "" else d)
        return f"{text} (default: {shown})"


def _window_arg(text: str):
    """``--window``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}") from None


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    """``--progress / --no-progress`` (every subcommand that reports progress)."""
    from .progress import LINE_INTERVAL_S

    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help=f"show progress (rounds, residual, ETA) on stderr: a bar on a terminal, one line every "
                        f"{LINE_INTERVAL_S:g} s otherwise")


def _tol_help() -> str:
    from .methods import PARAREAL_TOL
    from .methods.picard import DEFAULT_TOL

    return (f"tolerance; 0 is exactly sequential. Picard (stop rule final) and staggered: the returned sample's "
            f"max-abs distance to the sequential one, relative to the data's scale (the model's declared range, "
            f"else each sample's own max-abs) (default {DEFAULT_TOL['final']:g}); ParaDiGMS's rule and Parareal: "
            f"each point's change in units of the noise level (default {DEFAULT_TOL['paradigms']:g} and "
            f"{PARAREAL_TOL:g})")


def _window_help() -> str:
    from dataclasses import fields

    from .config import SamplerConfig

    default = next(f.default for f in fields(SamplerConfig) if f.name == "window")
    return (f"Picard window W: an integer >= 1 or auto (default: {default}; auto: the planner's choice, at most "
            f"min(N, max(100, N // 2)) for N steps); staggered: its cores K (auto: one per device, at least 2)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from .denoiser import PREDICTIONS
    from .methods import METHODS
    from .models import MODELS, SCHEDULES
    from .schedules import SPACINGS
    from .solvers import SOLVERS

    p.add_argument("--model", default=None,
                   help=f"a named model ({', '.join(sorted(MODELS))}) or package.module:factory, a callable "
                        f"returning a Denoiser or a network net(x_in, t) (give --prediction and --schedule) "
                        f"(default: digits)")
    p.add_argument("--sample-shape", default=None, metavar="D[,D...]",
                   help="per-sample shape for a --model module:factory that does not declare one, e.g. 2 or "
                        "3,32,32 (default: the model's)")
    p.add_argument("--prediction", default=None, choices=PREDICTIONS,
                   help="what a --model module:factory network predicts (default: none; required for a network)")
    p.add_argument("--schedule", default=None, choices=tuple(SCHEDULES),
                   help="the noise schedule of a --model module:factory network, with its default parameters "
                        "(default: none; required for a network)")
    p.add_argument("--pipeline", default=None, metavar="DIR",
                   help="a diffusers pipeline saved with save_pretrained (Stable Diffusion, SDXL, SD3, Flux) "
                        "instead of --model; writes one PNG per image (default: none)")
    p.add_argument("--prompt", default=None, help="--pipeline: the text prompt (default: none; required there)")
    p.add_argument("--height", type=int, default=None, help="--pipeline: image height in pixels (default: the "
                                                            "pipeline's)")
    p.add_argument("--width", type=int, default=None, help="--pipeline: image width in pixels (default: the "
                                                           "pipeline's)")
    p.add_argument("--dtype", default=None, choices=tuple(_DTYPES),
                   help="the network's dtype (the trajectory stays float64 on CPU, float32 on CUDA) (default: the "
                        "model's own)")
    p.add_argument("--solver", default=None, help=f"one of {', '.join(sorted(SOLVERS))} (default: ddim; with "
                                                  f"--pipeline the pipeline's scheduler decides)")
    p.add_argument("--steps", type=int, default=100, help="solver steps N")
    p.add_argument("--method", default="picard", help=f"one of {', '.join(METHODS)}, or auto (the planner "
                   f"chooses by predicted wall time on the backend's devices)")
    p.add_argument("--window", type=_window_arg, default=None, help=_window_help())
    p.add_argument("--cost", default=None, choices=COST_NAMES,
                   help="the cost curve the planner (--method auto, --window auto) and the SCE figures use: auto "
                        "(measure on CUDA, latency elsewhere), measure (time the network and each candidate's work "
                        "outside it here), compute (c(r) = r) or latency (c(r) = 1) (default: auto)")
    p.add_argument("--tol", type=float, default=None, help=_tol_help())
    p.add_argument("--shared-window", action="store_true",
                   help="one Picard window for the whole batch (diffusers' ParaDiGMS) instead of one per sample")
    p.add_argument("--max-rounds", type=int, default=None,
                   help="Picard rounds before the rest is finished sequentially (default: unlimited)")
    p.add_argument("--spacing", default=None, help=f"time grid: {', '.join(SPACINGS)} (default: the schedule's)")
    p.add_argument("--eta", type=float, default=None,
                   help="noise scale of ddim, ddpm, euler, euler_ancestral and euler_maruyama, in [0, 1] "
                        "(default: the solver's)")
    p.add_argument("--slices", type=int, default=None, help="Parareal slices (default: round(sqrt(steps)))")
    p.add_argument("--coarse-steps", type=int, default=None, help="Parareal coarse DDIM steps per slice (default: 1)")
    p.add_argument("--batch", type=int, default=16, help="number of samples (images with --pipeline)")
    p.add_argument("--seed", type=int, default=0, help="noise seed, >= 0")
    p.add_argument("--label", type=int, default=None, help="digits: class label 0..9 to condition on (default: none)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale >= 0: digits with --label (1 is plain conditional "
                        "sampling), or --pipeline's guidance_scale (default: none; the pipeline's own)")
    p.add_argument("--backend", default="local", choices=("local", "torch", "ray"),
                   help="local, torch (torchrun ranks) or ray (actors)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"torch ranks or Ray actors, at most one per CPU (or GPU) here (default: {_DEFAULT_WORKERS})")
    p.add_argument("--address", default=None,
                   help="Ray cluster address, e.g. auto or ray://HOST:10001 (default: none, a local Ray)")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the sequential sampler and report speed-up and difference (default: on, except "
                        "with --method sequential, where it does not apply)")
    p.add_argument("--timeout", type=float, default=None, help=f"seconds before a stuck worker is an error (--backend "
                   f"torch or ray; default {_DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--out", default="paratime_samples.png",
                   help="PNG of the samples ('' for none; --pipeline: OUT-0.png, OUT-1.png, ... one per image)")
    p.add_argument("--save", default=None, help="write the samples tensor here with torch.save (default: none)")
    p.add_argument("--json", default=None, help="write the stats as JSON here (default: none)")
    p.add_argument("--policy-demo", action=argparse.BooleanOptionalAction, default=None,
                   help="after the samples, the main job's second half: the diffusion policy's per-chunk latency "
                        "(sequential vs Picard), success rates and a PNG of rollouts (default: on with --model "
                        "digits and --backend local, off otherwise)")
    p.add_argument("--policy-out", default=None,
                   help="--policy-demo: PNG of the rollouts (default: policy_rollouts.png)")
    add_progress_arg(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paratime", description=__doc__, formatter_class=_DefaultsFormatter,
                     epilog="paratime with no subcommand (or with only options) runs paratime sample. "
                            "paratime COMMAND --help shows a subcommand's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("bench", help="scaling benchmarks (see paratime bench --help)", add_help=False)
    _add_sampling_args(sub.add_parser("sample", help="sample a model (the default command)"))

    from .zoo.digits import train_digits

    d = _signature_defaults(train_digits)
    t = sub.add_parser("train-digits", help="train the embedded digits model (needs scikit-learn)")
    t.add_argument("--out", default="digits.safetensors", help="safetensors file to write")
    t.add_argument("--steps", type=int, default=d["steps"], help="optimiser steps")
    t.add_argument("--batch", type=int, default=d["batch"], help="training batch")
    t.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate")
    t.add_argument("--channels", type=int, default=d["channels"], help="U-Net width, a multiple of 8")
    t.add_argument("--seed", type=int, default=d["seed"], help="training seed")
    add_progress_arg(t)

    e = sub.add_parser("eval-digits", help="score digits samples with a scikit-learn classifier and k-NN P/R")
    e.add_argument("--samples", type=int, default=200, help=f"samples per sampler, >= {_MIN_EVAL_SAMPLES}")
    e.add_argument("--solver", default="ddim", help="solver")
    e.add_argument("--steps", type=int, default=100, help="solver steps")
    e.add_argument("--tol", type=float, default=None, help=_tol_help())
    e.add_argument("--window", type=_window_arg, default=None, help=_window_help())
    e.add_argument("--seed", type=int, default=0, help="noise seed")
    e.add_argument("--label", type=int, default=None, help="class label 0..9 to condition on (default: none)")
    e.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (needs --label) (default: none)")
    e.add_argument("--json", default=None, help="write the scores as JSON here (default: none)")
    add_progress_arg(e)
    from .policy_eval import add_policy_parsers

    add_policy_parsers(sub)     # train-policy, eval-policy
    from .likelihood_cli import add_likelihood_parser

    add_likelihood_parser(sub)  # likelihood
    for name, sp in sub.choices.items():
        if name != "bench":
            sp.formatter_class = _DefaultsFormatter
            if not any(a.dest == "progress" for a in sp._actions):
                add_progress_arg(sp)
    return parser


def _signature_defaults(fn) -> dict:
    import inspect

    return {k: v.default for k, v in inspect.signature(fn).parameters.items()
            if v.default is not inspect.Parameter.empty}


# -- checks before anything starts ---------------------------------------------------------------------------------

def _check_distinct(outputs: list[tuple[str, str | None]]) -> None:
    """Refuse two output flags naming one file (the later write replaced the earlier: ``--save x --json x`` left
    the JSON and no samples)."""
    seen: dict[Path, str] = {}
    for flag, path in outputs:
        if not path:
            continue
        key = Path(path).resolve()
        if key in seen:
            raise UsageError(f"{flag}: {path} is the file {seen[key]} writes too; give each output its own file")
        seen[key] = flag


def _check_writable(flag: str, path: str | None) -> None:
    """Refuse an output path that cannot be written, before any work (the file is not left behind)."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag}: {path} is a directory; give a file name")
    if not p.parent.is_dir():
        raise UsageError(f"{flag}: directory {str(p.parent)!r} does not exist")
    existed = p.exists()
    try:
        with open(p, "ab"):
            pass
    except OSError as e:
        raise UsageError(f"{flag}: cannot write {path}: {e.strerror or e}") from e
    if not existed:
        p.unlink(missing_ok=True)


def _check_ray_address(address: str | None) -> None:
    """``--address`` answers (:func:`~paratime.backends.ray_actors.check_ray_address`, which the backend runs too)."""
    from .backends.ray_actors import check_ray_address

    try:
        check_ray_address(address, _ADDRESS_TIMEOUT_S)
    except ValueError as e:
        raise UsageError(f"--{e}") from e


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _check_workers(args, device: torch.device) -> None:
    """--workers against what this machine has, before a process or actor starts: one rank/actor per GPU on CUDA,
    per usable CPU core otherwise. Without --workers, ``min(2, what there is)``; sets ``args.workers``."""
    if args.backend == "local":
        if args.workers is not None:
            raise UsageError("--workers: only used with --backend torch or ray (local runs one process)")
        return
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers: must be an integer >= 1, got {args.workers}")
    if "RANK" in os.environ:            # under torchrun the world size is already fixed
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.workers is not None and args.workers != world:
            raise UsageError(f"--workers: {args.workers}, but torchrun started {world} ranks (WORLD_SIZE); omit "
                             f"--workers under torchrun, or give {world}")
        args.workers = world
        return
    if args.backend == "ray" and args.address is not None:
        # A cluster's resources are Ray's to schedule.
        args.workers = args.workers or _DEFAULT_WORKERS
        return
    if device.type == "cuda" and args.backend == "torch":
        have, what = torch.cuda.device_count(), "CUDA devices"
    else:
        have, what = _usable_cpus(), "usable CPU cores"
    if args.workers is None:
        args.workers = min(_DEFAULT_WORKERS, have)
    elif args.workers > have:
        raise UsageError(f"--workers: {args.workers} exceeds the {have} {what} here; allowed: 1..{have}")


def _model_factory(args):
    """A picklable zero-argument factory of the sample's model: a registered name, or ``package.module:factory``."""
    import functools

    from .models import MODELS, load_model, user_model

    if args.model in MODELS:
        return functools.partial(load_model, args.model)
    shape = _sample_shape(args)
    return functools.partial(user_model, args.model, args.prediction, args.schedule, shape)


def _sample_shape(args) -> tuple[int, ...] | None:
    if args.sample_shape is None:
        return None
    try:
        shape = tuple(int(v) for v in args.sample_shape.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise UsageError(f"--sample-shape: expected positive integers separated by commas, e.g. 2 or 3,32,32; "
                         f"got {args.sample_shape!r}")
    return shape


def _refuse(flags: dict, why: str) -> None:
    """UsageError for the first of ``flags`` (flag -> value) that was given: it does not apply (``why``). Not given
    is None (False: a ``--no-...`` switch, its default in effect); 0 is a value given (``0 in (None, False)`` is true:
    ``--label 0`` and ``--eta 0`` passed unnoticed)."""
    for flag, value in flags.items():
        if value is not None and value is not False:
            raise UsageError(f"{flag}: {why}")


def _check_rank_env() -> None:
    """Under torchrun (``RANK`` set) the environment describes the world (:func:`~paratime.backends.torch_dist.
    check_rank_env`, which the backend runs too).

    Raises:
        UsageError: naming the environment variable and the allowed values.
    """
    from .backends.torch_dist import check_rank_env

    try:
        check_rank_env()
    except ValueError as e:
        raise UsageError(str(e)) from e


def _check_sample_args(args) -> dict:
    """Every ``sample`` option checked before a model, process or actor starts; returns the sampler options."""
    from .config import SamplerConfig, check_cond, check_int, check_number
    from .models import MODELS

    if args.backend == "torch" and "RANK" in os.environ:
        _check_rank_env()
    check_int("batch", args.batch, 1)
    check_int("seed", args.seed, 0)
    if args.timeout is not None and args.backend == "local":
        raise UsageError("--timeout: only used with --backend torch or ray (local has no workers to wait for)")
    args.timeout = _DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
    from .backends.torch_dist import MAX_TIMEOUT_S          # gloo holds it in milliseconds in a C int

    check_number("timeout", args.timeout, 0, MAX_TIMEOUT_S if args.backend == "torch" else None, low_open=True)
    if args.address is not None and args.backend != "ray":
        raise UsageError("--address: only used with --backend ray")
    _check_ray_address(args.address)
    demo = args.policy_demo
    if args.pipeline is not None:
        _refuse({"--model": args.model, "--prediction": args.prediction, "--schedule": args.schedule,
                 "--sample-shape": args.sample_shape, "--label": args.label, "--solver": args.solver,
                 "--spacing": args.spacing, "--eta": args.eta, "--policy-demo": demo, "--policy-out": args.policy_out,
                 "--workers": args.workers},
                "does not apply with --pipeline (the pipeline's scheduler and components decide; it runs on one "
                "device)")
        if args.backend != "local":
            raise UsageError("--backend: --pipeline runs with --backend local")
    else:
        _refuse({"--prompt": args.prompt, "--height": args.height, "--width": args.width},
                "applies only with --pipeline DIR")
    args.model = args.model or "digits"
    args.solver = args.solver or "ddim"
    if args.pipeline is None and args.model in MODELS:
        _refuse({"--prediction": args.prediction, "--schedule": args.schedule, "--sample-shape": args.sample_shape},
                f"applies only to --model package.module:factory, not the named model {args.model!r}")
    if args.guidance is not None and args.label is None and args.pipeline is None:
        raise UsageError("--guidance: classifier-free guidance needs --label (the class to guide towards)")
    if args.label is not None and args.model != "digits":
        raise UsageError(f"--label: only the digits model takes labels, not {args.model!r}")
    # The main job's second half: explicit --policy-demo / --no-policy-demo, by default on with the digits model.
    args.policy_demo = (args.model == "digits" and args.pipeline is None) if demo is None else demo
    if args.policy_demo and args.backend != "local":
        if demo:
            raise UsageError("--policy-demo: runs with --backend local only (it times one robot's chunks)")
        args.policy_demo = False
    if args.policy_out is not None and not args.policy_demo:
        raise UsageError("--policy-out: applies only with --policy-demo")
    args.policy_out = "policy_rollouts.png" if args.policy_out is None else args.policy_out
    # Flags given where they do not apply (their value equal to the default passed unnoticed).
    if args.compare and args.method == "sequential":
        raise UsageError("--compare: applies only to a parallel --method (sequential sampling is the comparison)")
    args.compare = args.method != "sequential" if args.compare is None else args.compare
    if args.coarse_steps is not None and args.method not in ("parareal", "parareal_pipelined"):
        raise UsageError(f"--coarse-steps: applies only to --method parareal or parareal_pipelined, not "
                         f"{args.method!r}")
    opts = {k: v for k, v in dict(
        solver=args.solver, steps=args.steps, method=args.method, window=args.window, tol=args.tol, cost=args.cost,
        shared_window=args.shared_window or None, max_rounds=args.max_rounds, spacing=args.spacing, eta=args.eta,
        slices=args.slices, coarse_steps=args.coarse_steps, device=args.device,
        dtype=_DTYPES.get(args.dtype)).items() if v is not None}
    if args.pipeline is not None:
        return _check_pipeline_args(args, opts)
    if args.guidance is not None:
        opts["guidance"] = args.guidance
    cfg = SamplerConfig.from_options(**opts)
    device = _device(args, cfg.device)
    opts["device"] = device
    _check_workers(args, device)
    # Built once: the checks, the run and the sequential comparison share it (a --model factory was called three
    # times: an untrained network's comparison was against another network, max |diff| 240).
    model = args.built_model = _model_factory(args)()
    check_cond(model, _cond(args, args.batch), args.batch)
    if model.sample_shape is None:
        raise UsageError(f"--sample-shape: {args.model} does not declare its sample shape; give it, e.g. 2 or 3,32,32")
    shape = (args.batch, *model.sample_shape)
    # The sampler's own bound, before any start (staggered's cores as the sampler will size them: one per worker;
    # under torchrun the world size, not --workers, is the backend's).
    workers = int(os.environ.get("WORLD_SIZE", args.workers or 1)) if "RANK" in os.environ else args.workers or 1
    cfg.for_devices(workers).check_memory(shape, device, cfg.state_dtype_on(device), guided=model.guided)
    if args.out and args.model != "policy" and not (len(shape) == 2 and shape[1] == 2 or len(shape) == 4):
        raise UsageError(f"--out: a PNG shows (B, 2) points or (B, C, H, W) images, not samples of shape "
                         f"{shape}; give --out '' (and --save FILE for the tensor)")
    if os.environ.get("RANK", "0") == "0":       # rank 0 writes the outputs (and the launcher checked them)
        _check_distinct([("--out", args.out), ("--save", args.save), ("--json", args.json),
                         ("--policy-out", args.policy_out if args.policy_demo else None)])
        for flag, path in (("--out", args.out), ("--save", args.save), ("--json", args.json)):
            _check_writable(flag, path)
        if args.policy_demo:
            _check_writable("--policy-out", args.policy_out)
    for flag, path in (("--out", args.out), ("--policy-out", args.policy_out if args.policy_demo else None)):
        _check_png(flag, path)
    return opts


def _check_png(flag: str, path: str | None, what: str = "a PNG") -> None:
    """An output written as ``what`` (PNG) must be named so: a PNG in x.jpg would mislead every viewer."""
    if path and Path(path).suffix.lower() != ".png":
        raise UsageError(f"{flag}: writes {what}; give a file name ending in .png, got {path!r}")


def _ran(stats, asked: str) -> str:
    """The table's method cell: the method that ran, with Picard's window; ``auto: ...`` where ``--method auto``
    chose it (its choice of sequential sampling is otherwise a second row named like the comparison's)."""
    ran = stats.method + (f" W={stats.window}" if stats.method == "picard" and stats.window else "")
    return f"auto: {ran}" if asked == "auto" else ran


def _predicted(stats, cost: str | None) -> tuple[str, str | None]:
    """The table's ``predicted`` cell: the plan's predicted speed-up over sequential sampling on the same devices
    (the measured column's baseline), or empty where nothing was planned; and a footnote where the prediction rests
    on a curve assumed, not timed (``--cost auto`` off CUDA: the latency-bound ``c(r) = 1``), or None."""
    plan = stats.plan
    if not plan or not plan.get("predicted_sce"):
        return "", None
    cell = f"{plan['sequential_sce'] / plan['predicted_sce']:.2f}"
    if cost not in (None, "auto") or str(stats.cost).startswith("measured"):
        return cell, None
    return cell + "*", ("* assumed latency-bound (c(r) = 1) and not timed: --cost auto off CUDA; --cost measure "
                        "times the network here")


def _pipeline_pngs(args) -> list[str]:
    """``--out OUT.png`` with ``--pipeline``: ``OUT-0.png``, ``OUT-1.png``, ... one per image."""
    if not args.out:
        return []
    stem = Path(args.out).with_suffix("")           # (a .png name: checked before the work)
    return [f"{stem}-{i}.png" for i in range(args.batch)]


#: the pipelines ``sample --pipeline`` drives: text to image (a prompt in, images out); the others (img2img,
#: inpainting, ControlNet, video) take inputs the command has no flags for: :func:`paratime.parallelize` runs them
_CLI_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")


def _check_pipeline_args(args, opts: dict) -> dict:
    """``sample --pipeline DIR``: the folder and its pipeline class, the sampler options (as the sampler will check
    them, with the pipeline's own solver still unknown), the prompt, the size and the outputs, before the pipeline
    loads."""
    from .config import SamplerConfig, check_int, check_number

    folder = Path(args.pipeline)
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"--pipeline: {args.pipeline} holds no model_index.json; give a folder written by a "
                         f"diffusers pipeline's save_pretrained")
    try:
        cls = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"--pipeline: cannot read {folder / 'model_index.json'}: {e}") from e
    if cls not in _CLI_PIPELINES:
        raise UsageError(f"--pipeline: {args.pipeline} holds a {cls}; this command runs text-to-image pipelines "
                         f"({', '.join(_CLI_PIPELINES)}); drive others with paratime.parallelize(pipe) from Python")
    SamplerConfig.from_options(**opts)          # --method, --window, --tol, --steps, --device ... before the load
    try:
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        sched = {}                              # no readable scheduler config: the pipeline's load will say
    T = sched.get("num_train_timesteps") if isinstance(sched, dict) else None
    if isinstance(T, int) and args.steps is not None and args.steps > T:
        raise UsageError(f"--steps: at most the scheduler's num_train_timesteps={T}, got {args.steps}")
    if not args.prompt:
        raise UsageError("--prompt: required with --pipeline (a non-empty text prompt)")
    for flag, v in (("height", args.height), ("width", args.width)):
        check_int(flag, v, 8, none=True)
        if v is not None and v % 8:
            raise UsageError(f"--{flag}: must be a multiple of 8 (the VAE's scale factor), got {v}")
    check_number("guidance", args.guidance, 0, none=True)
    _check_png("--out", args.out, "PNGs (OUT-0.png, OUT-1.png, ... from OUT.png)")
    _check_distinct([*(("--out", path) for path in _pipeline_pngs(args)), ("--save", args.save),
                     ("--json", args.json)])
    for path in _pipeline_pngs(args):
        _check_writable("--out", path)
    for flag, path in (("--save", args.save), ("--json", args.json)):
        _check_writable(flag, path)
    for k in ("solver", "steps", "dtype", "device"):     # set by the pipeline, the call, or run_pipeline
        opts.pop(k, None)
    scheduler = _saved_scheduler(sched)
    if scheduler is not None:
        # What parallelize() checks against the scheduler at wrap time (Parareal with a multistep scheduler such as
        # PNDM's), from the scheduler's config alone: before the weights load, not after.
        from .integrations.diffusers import solver_for
        from .integrations.pipelines import _check_options

        _check_options(solver_for(scheduler), {**opts, "progress": args.progress})
    return opts


def _saved_scheduler(config: dict | None):
    """The scheduler a saved pipeline's ``scheduler_config.json`` (``config``, read) describes, built from the config
    alone (no weights), or None where it names no diffusers scheduler class that builds (the load will say)."""
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name")), None) if isinstance(config, dict) else None
    if cls is None or not callable(getattr(cls, "from_config", None)):
        return None
    try:
        return cls.from_config(config)
    except Exception:  # noqa: BLE001 - a foreign or damaged config: left to the pipeline's load to report
        return None


def run_pipeline(args, opts: dict) -> dict:
    """``paratime sample --pipeline DIR --prompt ...``: the saved pipeline through :func:`paratime.parallelize`,
    one PNG per image (the pipeline's own conversion to 8 bits); returns the JSON record."""
    import numpy as np
    from diffusers import DiffusionPipeline

    from .integrations.pipelines import parallelize

    device = _device(args, torch.device(args.device) if args.device else None)
    if not args.progress:
        import diffusers.utils.logging
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(args.pipeline, dtype=_DTYPES.get(args.dtype, torch.float32),
                                                 local_files_only=True).to(device)
    except (OSError, ValueError, TypeError, AttributeError) as e:     # an incomplete or foreign folder
        raise UsageError(f"--pipeline: cannot load a diffusers pipeline from {args.pipeline}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": args.prompt, "num_inference_steps": args.steps, "num_images_per_prompt": args.batch,
            "output_type": "np", **{k: v for k, v in (("height", args.height), ("width", args.width),
                                                       ("guidance_scale", args.guidance)) if v is not None}}
    runs = [args.method] + (["sequential"] if args.compare and args.method != "sequential" else [])
    out = {}
    for method in runs:
        with parallelize(pipe, **_method_options(opts, method), progress=args.progress) as ppipe:
            res = ppipe(**call, generator=torch.Generator(device).manual_seed(args.seed))
        out[method] = (res.images, res.paratime_stats)
    images, stats = out[args.method]
    rec = {"pipeline": args.pipeline, "prompt": args.prompt, **stats.to_dict()}
    rows = [("method", "rounds", "NFE/sample", "wall s", "speed-up", "predicted", "max |diff|")]
    predicted, footnote = _predicted(stats, args.cost)
    if len(runs) == 2:
        ref, ref_stats = out["sequential"]
        diff = float(np.abs(images - ref).max())
        rec.update(sequential_wall_s=ref_stats.wall_s, speedup=ref_stats.wall_s / stats.wall_s, max_abs_diff=diff)
        rows.append(("sequential", ref_stats.rounds, f"{ref_stats.nfe:.0f}", f"{ref_stats.wall_s:.3f}", "1.00", "",
                     "0"))
        rows.append((_ran(stats, args.method), stats.rounds, f"{stats.nfe:.0f}", f"{stats.wall_s:.3f}",
                     f"{rec['speedup']:.2f}", predicted, f"{diff:.3g}"))
    else:
        rows.append((_ran(stats, args.method), stats.rounds, f"{stats.nfe:.0f}", f"{stats.wall_s:.3f}", "",
                     predicted, ""))
    print(f"pipeline={args.pipeline} ({type(pipe).__name__}, {type(pipe.scheduler).__name__}) steps={args.steps} "
          f"images={args.batch} prompt={args.prompt!r}")
    _print_table(rows)
    if footnote:
        print(footnote)
    for path, img in zip(_pipeline_pngs(args), pipe.numpy_to_pil(images)):
        img.save(path)
        print(f"wrote {path}")
    if args.save:
        torch.save(torch.from_numpy(images), args.save)
        print(f"wrote {args.save}")
    if args.json:
        Path(args.json).write_text(json_text(rec))
        print(f"wrote {args.json}")
    return rec


def _device(args, device: torch.device | None) -> torch.device:
    """The sampling device: ``--device`` (already checked to exist), else CUDA (this rank's GPU) if any, else CPU;
    the Ray driver keeps its states on the CPU (the actors pick their own devices)."""
    if device is not None:
        return device
    if args.backend == "ray":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if args.backend == "torch" else 0)
    return torch.device("cpu")


_PARALLEL_OPTIONS = ("window", "tol", "shared_window", "max_rounds", "slices", "coarse_steps")


def _method_options(opts: dict, method: str) -> dict:
    """``opts`` for ``method``: the sequential reference drops the parallel methods' options (they do not apply)."""
    opts = {**opts, "method": method}
    return {k: v for k, v in opts.items() if k not in _PARALLEL_OPTIONS} if method == "sequential" else opts


def _sampler(args, opts: dict, method: str, backend=None):
    from .sampler import ParallelSampler

    kw = {}
    if backend is None:
        backend, bopts = args.backend, {}
        if backend == "ray":
            # The actors build a registered model themselves (its shipped weights); a user's factory may not be
            # seeded, so its network, built once here, travels through the object store (each actor calling the
            # factory built a different network: max |diff| 197 on 2 actors).
            from .models import MODELS

            bopts = {"workers": args.workers, "address": args.address, "timeout_s": args.timeout,
                     "model": _model_factory(args) if args.model in MODELS else None}
        elif backend == "torch":
            bopts = {"timeout_s": args.timeout}
        kw["backend_options"] = bopts
    model = getattr(args, "built_model", None) or _model_factory(args)()
    if isinstance(model.network, torch.nn.Module):
        model.network.to(opts["device"])
    return ParallelSampler(model, **_method_options(opts, method), backend=backend, progress=args.progress, **kw)


def _cond(args, batch: int) -> dict:
    if getattr(args, "model", None) == "policy":  # the policy acts on observations: the seeded episodes' first ones
        from .policy_eval import episode_observations

        return {"obs": episode_observations(batch)}
    return {} if args.label is None else {"labels": torch.full((batch,), args.label, dtype=torch.long)}


def _print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def run_sample(args, opts: dict | None = None) -> dict:
    """Run ``paratime sample``; returns the JSON record (also printed as a table).

    Raises:
        UsageError, ValueError, TypeError: a bad option (checked before anything starts).
    """
    opts = _check_sample_args(args) if opts is None else opts
    sampler = _sampler(args, opts, args.method)
    with sampler:
        result = sampler.sample(args.batch, seed=args.seed, **_cond(args, args.batch))
        rows = [("method", "rounds", "NFE/sample", "wall s", "speed-up", "predicted", "max |diff|")]
        rec = {"model": args.model, **{k: v for k, v in result.stats.to_dict().items()}}
        st = result.stats
        predicted, footnote = _predicted(st, args.cost)
        if args.compare and args.method != "sequential":
            seq = _sampler(args, opts, "sequential", backend=sampler.backend)
            ref = seq.sample(args.batch, seed=args.seed, **_cond(args, args.batch))
            diff = float((result.samples - ref.samples).abs().max())
            speedup = ref.stats.wall_s / result.stats.wall_s
            rec.update(sequential_wall_s=ref.stats.wall_s, sequential_rounds=ref.stats.rounds,
                       speedup=speedup, max_abs_diff=diff)
            rows.append(("sequential", ref.stats.rounds, f"{ref.stats.nfe:.0f}", f"{ref.stats.wall_s:.3f}", "1.00",
                         "", "0"))
            rows.append((_ran(st, args.method), st.rounds, f"{st.nfe:.0f}", f"{st.wall_s:.3f}", f"{speedup:.2f}",
                         predicted, f"{diff:.3g}"))
        else:
            rows.append((_ran(st, args.method), st.rounds, f"{st.nfe:.0f}", f"{st.wall_s:.3f}", "", predicted, ""))
        if not sampler.backend.is_primary:
            return rec
        # The tolerance asked for (a plan that chose sequential sampling ran exact: its stats say tol 0).
        tol = f"{sampler.config.tol_in_force:g}" + (" (default)" if args.tol is None else "")
        cond = "" if args.label is None else f" label={args.label} guidance={args.guidance}"
        print(f"model={args.model} solver={args.solver} steps={args.steps} batch={args.batch} tol={tol}{cond} "
              f"backend={sampler.backend.name} workers={sampler.backend.workers}")
        _print_table(rows)
        if footnote:
            print(footnote)
        plan_s = result.stats.extra.get("plan_s", 0.0)
        if plan_s >= 0.05:
            print(f"planning took {plan_s:.2f} s more (measuring the cost here: once per batch shape, not in the "
                  f"wall times above)")
        if args.save:
            torch.save(result.samples.cpu(), args.save)
            print(f"wrote {args.save}")
        if args.out:
            if args.model == "policy":
                from .policy_eval import chunks_png

                chunks_png(args.out, result.samples.float().cpu())
            else:
                from .images import save_samples_png

                save_samples_png(args.out, result.samples.float())
            print(f"wrote {args.out}")
        if args.json:
            Path(args.json).write_text(json_text(rec))
            print(f"wrote {args.json}")
    return rec


_STOP_GRACE_S = 5.0                      # a rank gets this long to end after SIGTERM, then SIGKILL


class _Terminated(Exception):
    """SIGTERM reached the launcher (handled like Ctrl-C: every rank is ended)."""


def _end_ranks(procs: list) -> None:
    """SIGTERM every rank still running, wait at most ``_STOP_GRACE_S`` in all, then SIGKILL the rest."""
    import signal
    import time

    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=_STOP_GRACE_S)


def _deliver(signum: int, handler) -> None:
    """Act on a signal that arrived while a rank was starting, as ``handler`` (the one in force) would have: call
    it, ignore it, or (the default action) send it again."""
    import signal

    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


def _launch_ranks(workers: int, argv: list[str]) -> int:
    """``paratime sample --backend torch --workers N`` outside torchrun: start the N local ranks (torchrun's
    environment: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) in this process group and wait for them. A rank that
    fails ends the others. The ranks ignore SIGINT (a terminal's Ctrl-C reaches the whole group): on Ctrl-C or SIGTERM
    the launcher ends every rank itself (SIGTERM, then SIGKILL after a grace period) and reports once."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(workers),
            "LOCAL_WORLD_SIZE": str(workers)}
    base.setdefault("GLOO_SOCKET_IFNAME", "lo")

    def on_term(signum, frame):
        raise _Terminated

    # Ctrl-C or SIGTERM while Popen starts a rank would raise inside Popen, after the fork: that rank would never
    # reach ``procs`` and would outlive the launcher. While a rank starts, both are blocked in this thread (and so in
    # the child until it unblocks them, ignoring SIGINT) and, since a signal sent to the process can still arrive
    # through another thread (torch's, a library's) whose Python handler then runs here, both handlers only note
    # the signal; it is acted on once the rank is recorded.
    spawning = {signal.SIGINT, signal.SIGTERM}
    noted: list[int] = []

    def rank_setup():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, spawning)

    def note(signum, frame):
        noted.append(signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    procs = []
    try:
        for r in range(workers):
            env = {**base, "RANK": str(r), "LOCAL_RANK": str(r)}
            handlers = {s: signal.signal(s, note) for s in spawning}
            signal.pthread_sigmask(signal.SIG_BLOCK, spawning)
            try:
                procs.append(subprocess.Popen([sys.executable, "-m", "paratime", *argv], env=env,
                                              preexec_fn=rank_setup))
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, spawning)    # a pending signal is noted here
                for s, handler in handlers.items():
                    signal.signal(s, handler)
            arrived, noted[:] = list(noted), []
            for s in arrived:               # the rank is recorded: act on what arrived meanwhile, as it would have
                _deliver(s, handlers[s])
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:                      # one rank's error ends the others (they would wait for it forever)
                _end_ranks(procs)
                rank, code = failed[0]
                if code < 0:                # killed by a signal: the rank printed nothing, so say it here
                    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else -code
                    print(f"paratime: error: rank {rank} was ended by {name}; the other ranks were stopped",
                          file=sys.stderr)
                    return 128 - code
                return code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    except (KeyboardInterrupt, _Terminated):
        _end_ranks(procs)
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _bench(argv: list[str]) -> int:
    """``paratime bench``: a thin entry to :func:`paratime.bench.suite.main` (the benchmarks live in
    ``benchmarks/``)."""
    from .bench.suite import main as bench_main

    try:
        return bench_main(argv, parser_class=_Parser)
    except UsageError as e:         # one line, as every other subcommand's user errors
        return _user_error(str(e))


def _user_error(message: str) -> int:
    """Print a user error as its one line, ``paratime: error: ...``; the exit code, 2."""
    print(f"paratime: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _check_eval_args(args) -> None:
    """``eval-digits`` options checked before the classifier is fitted or anything is sampled."""
    from .config import SamplerConfig, check_cond, check_int
    from .models import load_model

    check_int("samples", args.samples, _MIN_EVAL_SAMPLES)
    check_int("seed", args.seed, 0)
    if args.guidance is not None and args.label is None:
        raise UsageError("--guidance: classifier-free guidance needs --label (the class to guide towards)")
    cfg = SamplerConfig.from_options(solver=args.solver, steps=args.steps, tol=args.tol, window=args.window,
                                     guidance=args.guidance)
    model = load_model("digits")
    # --steps on the model's grid and the solver's (a discrete schedule's timesteps, dpmpp_singlestep's order
    # list), as the samplers check it when built: after the classifier's fit and the table's header, otherwise
    cfg.build_solver().check_grid(model.schedule.grid(cfg.steps, cfg.spacing).sigmas)
    check_cond(model, _cond(args, args.samples), args.samples)
    _check_writable("--json", args.json)


def _check_train_args(args) -> None:
    from .zoo.digits import check_train_options

    check_train_options(steps=args.steps, batch=args.batch, lr=args.lr, channels=args.channels, seed=args.seed)
    _check_writable("--out", args.out)


# Messages name the API argument ("window: ..."); on the command line they name the flag ("--window: ...").
_FLAG_OF = {"labels": "--label", "shape": "--batch", "shape, steps": "--batch, --steps", "timeout_s": "--timeout",
            "solver_options": "--eta", "pipe": "--pipeline"}


def _as_flag(message: str, args) -> str:
    name, _, rest = message.partition(":")
    if name in _FLAG_OF:
        return f"{_FLAG_OF[name]}:{rest}"
    names = name.split(", ")                   # "prediction, schedule: ..." names two
    if args is not None and all(" " not in n and n in vars(args) for n in names):
        return ", ".join(f"--{n.replace('_', '-')}" for n in names) + f":{rest}"
    return message


# Each subcommand's output files: checked writable after its options and before any work.
_OUTPUTS = {"train-digits": ("out",), "eval-digits": ("json",), "train-policy": ("out",),
            "eval-policy": ("out", "json"), "likelihood": ("json",)}


#: outputs written as a PNG, whose name must say so (:func:`_check_png`)
_PNGS = {("eval-policy", "out")}
#: outputs a command exists to write: '' (elsewhere "none") is refused before the work, not after training
_REQUIRED = {("train-digits", "out"), ("train-policy", "out")}


def _check_outputs(args) -> None:
    _check_distinct([(f"--{dest}", getattr(args, dest)) for dest in _OUTPUTS.get(args.command, ())])
    for dest in _OUTPUTS.get(args.command, ()):
        path = getattr(args, dest)
        if not path and (args.command, dest) in _REQUIRED:
            raise UsageError(f"--{dest}: required: the file the trained weights are written to")
        _check_writable(f"--{dest}", path)
        if (args.command, dest) in _PNGS:
            _check_png(f"--{dest}", path)


def _write_json(path: str | None, rec: dict) -> None:
    if path:
        Path(path).write_text(json_text(rec))
        print(f"wrote {path}")


def _run(args, argv: list[str]) -> int:
    if args.command == "sample":
        opts = _check_sample_args(args)
        if args.backend == "torch" and "RANK" not in os.environ:
            return _launch_ranks(args.workers, argv)
        if args.pipeline is not None:
            run_pipeline(args, opts)
        else:
            run_sample(args, opts)
        if args.policy_demo:        # the main job's second half, chosen by --policy-demo (on with digits)
            from .policy_eval import policy_demo

            policy_demo(args.policy_out, progress=args.progress)
        return 0
    if args.command == "train-digits":
        _check_train_args(args)
    elif args.command == "eval-digits":
        _check_eval_args(args)
    elif args.command == "train-policy":
        from .policy_eval import check_train_args

        check_train_args(args)
    elif args.command == "eval-policy":
        from .policy_eval import check_eval_args

        check_eval_args(args)
    elif args.command == "likelihood":
        from .likelihood_cli import check_likelihood_args

        lik_sampler = check_likelihood_args(args)     # built once: run_likelihood solves with it
    else:
        build_parser().print_help()
        return 2
    _check_outputs(args)
    if args.command == "train-digits":
        from .zoo.digits import train_digits

        r = train_digits(args.out, steps=args.steps, batch=args.batch, lr=args.lr, channels=args.channels,
                         seed=args.seed, progress=args.progress)
        print(f"trained {args.steps} steps in {r['seconds']:.0f} s, final loss {r['meta']['final_loss']:.4f}; "
              f"wrote {args.out}")
    elif args.command in ("train-policy", "eval-policy"):
        from .policy_eval import run_policy_command

        return run_policy_command(args)
    elif args.command == "likelihood":
        from .likelihood_cli import run_likelihood

        _write_json(args.json, run_likelihood(args, emit=print, sampler=lik_sampler))
    elif args.command == "eval-digits":
        from .digits_eval import run_eval

        _write_json(args.json, run_eval(args, emit=print))
    return 0


#: The extra of pyproject.toml that installs each optional module a command may import.
_EXTRA_OF = {"sklearn": "digits", "PIL": "digits", "ray": "ray", "triton": "triton", "diffusers": "diffusers",
             "transformers": "diffusers", "matplotlib": "bench"}


def _missing_extra(e: ImportError) -> str:
    """``e``'s message, naming the extra to install where ``e`` is a missing optional module and does not say so."""
    extra = _EXTRA_OF.get((e.name or "").partition(".")[0])
    if extra is None or "paratime[" in str(e):
        return str(e)
    return f"{e} (an optional extra): pip install 'paratime[{extra}]'"


def main(argv: list[str] | None = None) -> int:
    """The ``paratime`` command. Returns the exit code: 0; 2 for a user error (one line on stderr, no traceback);
    130 after Ctrl-C (one line; the ranks and actors it started are ended).

    Args:
        argv: the arguments (default ``sys.argv[1:]``); no subcommand means ``sample``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["sample", *argv]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = None
    try:
        args = build_parser().parse_args(argv)
        return _run(args, argv)
    except KeyboardInterrupt:
        # The sampler's and backend's context managers (and the rank launcher) have ended actors and ranks.
        print("paratime: interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        message = str(e)
    except (ValueError, TypeError, FileNotFoundError) as e:
        message = _as_flag(str(e), args)
    except ConnectionError as e:      # ray.init(address=...) without a cluster there
        message = f"--address: cannot reach a Ray cluster at {args.address!r}: {e}"
    except ImportError as e:          # an optional dependency (ray, scikit-learn) is missing
        message = _missing_extra(e)
    return _user_error(message)


if __name__ == "__main__":
    sys.exit(main())
