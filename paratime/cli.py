"""The ``paratime`` command line. ``paratime sample`` with no arguments is the main job: the embedded digits model
sampled with Picard and sequentially, a PNG grid and a table of the figures."""

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


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", help="named model: digits (default) or gmm")
    p.add_argument("--solver", default="ddim", help="ddim, ddpm, euler, euler_maruyama, heun, dpmpp_2m")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--method", default="picard", help="picard, sequential, parareal or parareal_pipelined")
    p.add_argument("--window", type=int, default=None, help="Picard window (default: steps)")
    p.add_argument("--tol", type=float, default=0.1)
    p.add_argument("--shared-window", action="store_true",
                   help="one Picard window for the whole batch (diffusers' ParaDiGMS) instead of one per sample")
    p.add_argument("--max-rounds", type=int, default=None)
    p.add_argument("--spacing", default=None, help="leading, trailing, linspace or karras")
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--slices", type=int, default=None, help="Parareal slices (default ~sqrt(steps))")
    p.add_argument("--coarse-steps", type=int, default=1, help="Parareal coarse DDIM steps per slice")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, default=None, help="digits: class label to condition on")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--backend", default="local", help="local, torch or ray")
    p.add_argument("--workers", type=int, default=2, help="Ray actors (backend ray)")
    p.add_argument("--address", default=None, help="Ray cluster address (backend ray)")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the sequential sampler and report speed-up and difference (default on)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck worker is an error")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--out", default="paratime_samples.png", help="PNG of the samples ('' for none)")
    p.add_argument("--save", default=None, help="write the samples tensor here (torch.save)")
    p.add_argument("--json", default=None, help="write the stats as JSON here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paratime", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("bench", help="scaling benchmarks (see paratime bench --help)")
    _add_sampling_args(sub.add_parser("sample", help="sample a model (the default command)"))

    t = sub.add_parser("train-digits", help="train the embedded digits model (needs scikit-learn)")
    t.add_argument("--out", default="digits.safetensors")
    t.add_argument("--steps", type=int, default=8000)
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--channels", type=int, default=32)
    t.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("eval-digits", help="score digits samples with a scikit-learn classifier and k-NN P/R")
    e.add_argument("--samples", type=int, default=200)
    e.add_argument("--solver", default="ddim")
    e.add_argument("--steps", type=int, default=100)
    e.add_argument("--tol", type=float, default=0.1)
    e.add_argument("--window", type=int, default=None, help="Picard window (default: steps)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--label", type=int, default=None)
    e.add_argument("--guidance", type=float, default=None)
    e.add_argument("--json", default=None)
    return parser


def _device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if args.backend == "torch" else 0)
    return torch.device("cpu")


def _sampler(args, method: str, backend=None):
    from .sampler import ParallelSampler
    from .zoo import load_model

    opts = {}
    if backend is None:
        backend, bopts = args.backend, {}
        if backend == "ray":
            bopts = {"workers": args.workers, "address": args.address, "model": args.model,
                     "timeout_s": args.timeout}
        elif backend == "torch":
            bopts = {"timeout_s": args.timeout}
        opts["backend_options"] = bopts
    model = load_model(args.model)
    device = _device(args) if args.backend != "ray" else torch.device("cpu")
    if isinstance(model.network, torch.nn.Module):
        model.network.to(device)
    return ParallelSampler(model, solver=args.solver, steps=args.steps, method=method, window=args.window,
                           tol=args.tol, shared_window=args.shared_window, max_rounds=args.max_rounds,
                           spacing=args.spacing, eta=args.eta,
                           slices=args.slices, coarse_steps=args.coarse_steps,
                           device=device, backend=backend, progress=args.progress, **opts)


def _cond(args, batch: int) -> dict:
    cond = {}
    if args.label is not None:
        if args.model != "digits":
            raise ValueError("--label: only the digits model takes labels")
        cond["labels"] = torch.full((batch,), args.label, dtype=torch.long)
    return cond


def run_sample(args) -> dict:
    """Run ``paratime sample``; returns the JSON record (also printed as a table)."""
    sampler = _sampler(args, args.method)
    with sampler:
        result = sampler.sample(args.batch, seed=args.seed, **_cond(args, args.batch))
        rows = [("method", "rounds", "NFE/sample", "wall s", "speed-up", "max |diff|")]
        rec = {"model": args.model, **{k: v for k, v in result.stats.to_dict().items()}}
        if args.compare and args.method != "sequential":
            seq = _sampler(args, "sequential", backend=sampler.backend)
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
        print(f"model={args.model} solver={args.solver} steps={args.steps} batch={args.batch} tol={args.tol} "
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
    if workers < 1:
        raise ValueError(f"--workers: must be >= 1, got {workers}")
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
    """``paratime bench``: run the scaling suite, write JSON, Markdown and plots, print the table."""
    from .bench import default_suite, machine, plot, run_suite, to_markdown, worker

    if argv and argv[0] == "--worker":          # one torchrun rank of a torch.distributed case
        worker(*argv[1:4])
        return 0
    ap = argparse.ArgumentParser(prog="paratime bench", description="Scaling benchmark (see paratime/bench.py).")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and smaller batches")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import time

    t0 = time.perf_counter()
    records = run_suite(default_suite(args.quick), log=print)
    (out / "bench.json").write_text(json.dumps({"machine": machine(), "runs": records}, indent=1))
    md = to_markdown(records)
    (out / "bench.md").write_text(md)
    plots = plot(records, out)
    print(md)
    from .bench import compare_paradigms, paradigms_markdown

    rows = compare_paradigms(batch=8 if args.quick else 16,
                             cases=(("ddim", 100),) if args.quick else (("ddim", 100), ("ddpm", 1000)))
    if rows:
        pmd = paradigms_markdown(rows)
        (out / "paradigms.md").write_text(pmd)
        (out / "paradigms.json").write_text(json.dumps(rows, indent=1))
        print(pmd)
    else:
        print("diffusers is not installed (pip install 'paratime[diffusers]'): ParaDiGMS comparison skipped")
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}" + "".join(f", {p}" for p in plots)
          + f" in {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    if not argv or argv[0].startswith("-"):
        argv = ["sample", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "sample" and args.backend == "torch" and "RANK" not in os.environ:
            return _launch_torchrun(args.workers, argv)
        if args.command == "sample":
            run_sample(args)
        elif args.command == "train-digits":
            from .zoo.digits import train_digits

            r = train_digits(args.out, steps=args.steps, batch=args.batch, lr=args.lr, channels=args.channels,
                             seed=args.seed)
            print(f"trained {args.steps} steps in {r['seconds']:.0f} s, final loss {r['meta']['final_loss']:.4f}; "
                  f"wrote {args.out}")
        elif args.command == "eval-digits":
            from .zoo.digits_eval import run_eval

            rec = run_eval(args, emit=print)
            if args.json:
                Path(args.json).write_text(json.dumps(rec, indent=2))
        else:
            parser.print_help()
            return 2
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"paratime: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
