"""The ``paratime`` command line. ``paratime sample`` with no arguments is the main job: the embedded digits model
sampled with Picard and sequentially (a PNG grid and a table of the figures), then the trained diffusion policy's
per-chunk latency, sequential against Picard, with its closed-loop success rate and a PNG of rollouts."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["main", "build_parser"]


_DEFAULT_WORKERS = 2       # torch ranks / Ray actors when --workers is not given
_ADDRESS_TIMEOUT_S = 5.0   # --address HOST:PORT must accept a connection within this
_MIN_EVAL_SAMPLES = 4      # eval-digits: k-NN precision/recall with k = 3 needs k + 1 samples


class UsageError(Exception):
    """A user error on the command line: printed as one line ``paratime: error: ...``, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, so :func:`main` prints them the same way as every other user error)."""

    def error(self, message: str):
        raise UsageError(message)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from .methods import METHODS
    from .models import MODELS
    from .schedules import SPACINGS
    from .solvers import SOLVERS

    p.add_argument("--model", default="digits", choices=sorted(MODELS),
                   help=f"named model: {', '.join(sorted(MODELS))} (default: digits)")
    p.add_argument("--solver", default="ddim", help=f"{', '.join(sorted(SOLVERS))} (default: ddim)")
    p.add_argument("--steps", type=int, default=100, help="solver steps N (default: 100)")
    p.add_argument("--method", default="picard", help=f"{', '.join(METHODS)} (default: picard)")
    p.add_argument("--window", type=int, default=None, help="Picard window (default: steps)")
    p.add_argument("--tol", type=float, default=None,
                   help="Picard/Parareal tolerance in units of the noise level; 0 is exactly sequential "
                        "(default: the method's)")
    p.add_argument("--shared-window", action="store_true",
                   help="one Picard window for the whole batch (diffusers' ParaDiGMS) instead of one per sample")
    p.add_argument("--max-rounds", type=int, default=None,
                   help="Picard rounds before the rest is finished sequentially (default: unlimited)")
    p.add_argument("--spacing", default=None, help=f"time grid: {', '.join(SPACINGS)} (default: the schedule's)")
    p.add_argument("--eta", type=float, default=None, help="noise scale of ddim/ddpm/euler_maruyama, in [0, 1]")
    p.add_argument("--slices", type=int, default=None, help="Parareal slices (default ~sqrt(steps))")
    p.add_argument("--coarse-steps", type=int, default=1, help="Parareal coarse DDIM steps per slice (default: 1)")
    p.add_argument("--batch", type=int, default=16, help="number of samples (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="noise seed, >= 0 (default: 0)")
    p.add_argument("--label", type=int, default=None, help="digits: class label 0..9 to condition on")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale >= 0 (needs --label; 1 is plain conditional sampling)")
    p.add_argument("--backend", default="local", choices=("local", "torch", "ray"),
                   help="local (default), torch (torchrun ranks) or ray (actors)")
    p.add_argument("--workers", type=int, default=None,
                   help="torch ranks or Ray actors, at most one per CPU (or GPU) here (default: 2)")
    p.add_argument("--address", default=None, help="Ray cluster address, e.g. auto or ray://HOST:10001 (backend ray)")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the sequential sampler and report speed-up and difference (default on)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck worker is an error")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--out", default="paratime_samples.png", help="PNG of the samples ('' for none)")
    p.add_argument("--save", default=None, help="write the samples tensor here (torch.save)")
    p.add_argument("--json", default=None, help="write the stats as JSON here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar over the rounds (default on)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paratime", description=__doc__,
                     epilog="`paratime` with no subcommand (or with only options) runs `paratime sample`. "
                            "`paratime COMMAND --help` shows a subcommand's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("bench", help="scaling benchmarks (see paratime bench --help)", add_help=False)
    _add_sampling_args(sub.add_parser("sample", help="sample a model (the default command)"))

    t = sub.add_parser("train-digits", help="train the embedded digits model (needs scikit-learn)")
    t.add_argument("--out", default="digits.safetensors", help="safetensors file to write")
    t.add_argument("--steps", type=int, default=8000, help="optimiser steps (default: 8000)")
    t.add_argument("--batch", type=int, default=256, help="training batch (default: 256)")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    t.add_argument("--channels", type=int, default=32, help="U-Net width (default: 32)")
    t.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")

    e = sub.add_parser("eval-digits", help="score digits samples with a scikit-learn classifier and k-NN P/R")
    e.add_argument("--samples", type=int, default=200, help=f"samples per sampler, >= {_MIN_EVAL_SAMPLES} "
                                                           "(default: 200)")
    e.add_argument("--solver", default="ddim", help="solver (default: ddim)")
    e.add_argument("--steps", type=int, default=100, help="solver steps (default: 100)")
    e.add_argument("--tol", type=float, default=None, help="Picard tolerance (default: the method's)")
    e.add_argument("--window", type=int, default=None, help="Picard window (default: steps)")
    e.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    e.add_argument("--label", type=int, default=None, help="class label 0..9 to condition on")
    e.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (needs --label)")
    e.add_argument("--json", default=None, help="write the scores as JSON here")
    from .policy_eval import add_policy_parsers

    add_policy_parsers(sub)     # train-policy, eval-policy
    from .likelihood_cli import add_likelihood_parser

    add_likelihood_parser(sub)  # likelihood
    return parser


# -- checks before anything starts ---------------------------------------------------------------------------------

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
    """An explicit ``HOST:PORT`` (or ``ray://HOST:PORT``) must answer within a few seconds: Ray itself waits for
    minutes on an address where nothing listens. ``auto`` is Ray's to resolve (it fails fast without a cluster)."""
    if address is None or address == "auto":
        return
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address: expected auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_ADDRESS_TIMEOUT_S):
            pass
    except OSError as e:
        raise UsageError(f"--address: nothing answers at {host}:{port} ({e.strerror or e}); start the cluster with "
                         f"`ray start --head` or give its address") from e


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
    if (args.backend == "ray" and args.address is not None) or "RANK" in os.environ:
        # A cluster's resources are Ray's to schedule; under torchrun the world size is already fixed.
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


def _check_sample_args(args) -> dict:
    """Every ``sample`` option checked before a model, process or actor starts; returns the sampler options."""
    from .config import SamplerConfig, check_cond, check_int, check_number
    from .models import load_model

    check_int("batch", args.batch, 1)
    check_int("seed", args.seed, 0)
    check_number("timeout", args.timeout, 0, low_open=True)
    if args.address is not None and args.backend != "ray":
        raise UsageError("--address: only used with --backend ray")
    _check_ray_address(args.address)
    if args.guidance is not None and args.label is None:
        raise UsageError("--guidance: classifier-free guidance needs --label (the class to guide towards)")
    if args.label is not None and args.model != "digits":
        raise UsageError(f"--label: only the digits model takes labels, not {args.model!r}")
    opts = dict(solver=args.solver, steps=args.steps, method=args.method, window=args.window, tol=args.tol,
                shared_window=args.shared_window, max_rounds=args.max_rounds, spacing=args.spacing, eta=args.eta,
                slices=args.slices, coarse_steps=args.coarse_steps, device=args.device)
    if args.guidance is not None:
        opts["guidance"] = args.guidance
    cfg = SamplerConfig.from_options(**opts)
    device = _device(args, cfg.device)
    opts["device"] = device
    _check_workers(args, device)
    model = load_model(args.model)
    check_cond(model, _cond(args, args.batch), args.batch)
    if model.sample_shape is not None:            # the sampler's own bound, before a process or actor starts
        cfg.check_memory((args.batch, *model.sample_shape), device, cfg.state_dtype_on(device))
    if os.environ.get("RANK", "0") == "0":       # rank 0 writes the outputs (and the launcher checked them)
        for flag, path in (("--out", args.out), ("--save", args.save), ("--json", args.json)):
            _check_writable(flag, path)
    return opts


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


def _sampler(args, opts: dict, method: str, backend=None):
    from .models import load_model
    from .sampler import ParallelSampler

    kw = {}
    if backend is None:
        backend, bopts = args.backend, {}
        if backend == "ray":
            bopts = {"workers": args.workers, "address": args.address, "model": args.model,
                     "timeout_s": args.timeout}
        elif backend == "torch":
            bopts = {"timeout_s": args.timeout}
        kw["backend_options"] = bopts
    model = load_model(args.model)
    if isinstance(model.network, torch.nn.Module):
        model.network.to(opts["device"])
    return ParallelSampler(model, **{**opts, "method": method}, backend=backend, progress=args.progress, **kw)


def _cond(args, batch: int) -> dict:
    return {} if args.label is None else {"labels": torch.full((batch,), args.label, dtype=torch.long)}


def run_sample(args, opts: dict | None = None) -> dict:
    """Run ``paratime sample``; returns the JSON record (also printed as a table).

    Raises:
        UsageError, ValueError, TypeError: a bad option (checked before anything starts).
    """
    opts = _check_sample_args(args) if opts is None else opts
    sampler = _sampler(args, opts, args.method)
    with sampler:
        result = sampler.sample(args.batch, seed=args.seed, **_cond(args, args.batch))
        rows = [("method", "rounds", "NFE/sample", "wall s", "speed-up", "max |diff|")]
        rec = {"model": args.model, **{k: v for k, v in result.stats.to_dict().items()}}
        if args.compare and args.method != "sequential":
            seq = _sampler(args, opts, "sequential", backend=sampler.backend)
            ref = seq.sample(args.batch, seed=args.seed, **_cond(args, args.batch))
            diff = float((result.samples - ref.samples).abs().max())
            speedup = ref.stats.wall_s / result.stats.wall_s
            rec.update(sequential_wall_s=ref.stats.wall_s, sequential_rounds=ref.stats.rounds,
                       speedup=speedup, max_abs_diff=diff)
            rows.append(("sequential", ref.stats.rounds, f"{ref.stats.nfe:.0f}", f"{ref.stats.wall_s:.3f}", "1.00",
                         "0"))
            rows.append((args.method, result.stats.rounds, f"{result.stats.nfe:.0f}", f"{result.stats.wall_s:.3f}",
                         f"{speedup:.2f}", f"{diff:.3g}"))
        else:
            rows.append((args.method, result.stats.rounds, f"{result.stats.nfe:.0f}", f"{result.stats.wall_s:.3f}",
                         "", ""))
        if not sampler.backend.is_primary:
            return rec
        tol = f"{result.stats.tol:g}" + (" (default)" if args.tol is None else "")
        cond = "" if args.label is None else f" label={args.label} guidance={args.guidance}"
        print(f"model={args.model} solver={args.solver} steps={args.steps} batch={args.batch} tol={tol}{cond} "
              f"backend={sampler.backend.name} workers={sampler.backend.workers}")
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
        if args.save:
            torch.save(result.samples.cpu(), args.save)
        if args.out:
            from .images import save_samples_png

            save_samples_png(args.out, result.samples.float())
            print(f"wrote {args.out}")
        if args.json:
            Path(args.json).write_text(json.dumps(rec, indent=2))
            print(f"wrote {args.json}")
    return rec


def _launch_torchrun(workers: int, argv: list[str]) -> int:
    """``paratime sample --backend torch --workers N`` outside torchrun: start N local ranks under torchrun."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={workers}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "paratime", *argv]
    return subprocess.call(cmd, env=env)


def _bench(argv: list[str]) -> int:
    """``paratime bench``: a thin entry to :func:`paratime.bench.suite.main` (the benchmarks live in ``benchmarks/``)."""
    from .bench.suite import main as bench_main

    return bench_main(argv)


def _check_eval_args(args) -> None:
    """``eval-digits`` options checked before the classifier is fitted or anything is sampled."""
    from .config import SamplerConfig, check_cond, check_int
    from .models import load_model

    check_int("samples", args.samples, _MIN_EVAL_SAMPLES)
    check_int("seed", args.seed, 0)
    if args.guidance is not None and args.label is None:
        raise UsageError("--guidance: classifier-free guidance needs --label (the class to guide towards)")
    SamplerConfig.from_options(solver=args.solver, steps=args.steps, tol=args.tol, window=args.window,
                               guidance=args.guidance)
    check_cond(load_model("digits"), _cond(args, args.samples), args.samples)
    _check_writable("--json", args.json)


def _check_train_args(args) -> None:
    from .zoo.digits import check_train_options

    check_train_options(steps=args.steps, batch=args.batch, lr=args.lr, channels=args.channels, seed=args.seed)
    _check_writable("--out", args.out)


# Messages name the API argument ("window: ..."); on the command line they name the flag ("--window: ...").
_FLAG_OF = {"labels": "--label", "shape": "--batch", "shape, steps": "--batch, --steps", "timeout_s": "--timeout", "solver_options": "--eta"}


def _as_flag(message: str, args) -> str:
    name, _, rest = message.partition(":")
    if name in _FLAG_OF:
        return f"{_FLAG_OF[name]}:{rest}"
    if args is not None and " " not in name and name in vars(args):
        return f"--{name.replace('_', '-')}:{rest}"
    return message


def _run(args, argv: list[str]) -> int:
    if args.command == "sample":
        opts = _check_sample_args(args)
        if args.backend == "torch" and "RANK" not in os.environ:
            return _launch_torchrun(args.workers, argv)
        run_sample(args, opts)
        if argv == ["sample"]:      # the main job: the diffusion policy's latency after the digits
            from .policy_eval import policy_demo

            policy_demo()
    elif args.command == "train-digits":
        from .zoo.digits import train_digits

        _check_train_args(args)
        r = train_digits(args.out, steps=args.steps, batch=args.batch, lr=args.lr, channels=args.channels,
                         seed=args.seed)
        print(f"trained {args.steps} steps in {r['seconds']:.0f} s, final loss {r['meta']['final_loss']:.4f}; "
              f"wrote {args.out}")
    elif args.command in ("train-policy", "eval-policy"):
        from .policy_eval import run_policy_command

        return run_policy_command(args)
    elif args.command == "likelihood":
        from .likelihood_cli import run_likelihood

        rec = run_likelihood(args, emit=print)
        if args.json:
            Path(args.json).write_text(json.dumps(rec, indent=2))
    elif args.command == "eval-digits":
        from .digits_eval import run_eval

        _check_eval_args(args)
        rec = run_eval(args, emit=print)
        if args.json:
            Path(args.json).write_text(json.dumps(rec, indent=2))
    else:
        build_parser().print_help()
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``paratime`` command. Returns the exit code: 0, or 2 for a user error (one line on stderr, no traceback).

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
    except UsageError as e:
        message = str(e)
    except (ValueError, TypeError, FileNotFoundError) as e:
        message = _as_flag(str(e), args)
    except ConnectionError as e:      # ray.init(address=...) without a cluster there
        message = f"--address: cannot reach a Ray cluster at {args.address!r}: {e}"
    except ImportError as e:          # an optional dependency (ray, scikit-learn) is missing
        message = str(e)
    print(f"paratime: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
