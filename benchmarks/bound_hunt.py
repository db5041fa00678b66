"""The bound hunt: does ``tol`` hold on every sample, for every solver, window, update and tolerance? Each case draws
a batch with Picard and with the sequential method from the same noise and scores it by its worst sample's
``max |Δ| / tol_abs`` (``SampleStats.tol_abs``: the tolerance in force for that sample, in its own units).

    OMP_NUM_THREADS=1 python -m paratime.bench.bound_hunt --models gmm,mix3 --seeds 0,1      # the README's hunt
    OMP_NUM_THREADS=1 python -m paratime.bench.bound_hunt --models guided --batch 128 [--guidance 2]
    OMP_NUM_THREADS=1 python -m paratime.bench.bound_hunt --models policy --batch 64
    OMP_NUM_THREADS=1 python -m paratime.bench.bound_hunt --models digits --batch 16 --steps 20 --windows 4,8,all

Models: ``gmm`` (the ring mixture), ``mix3`` (the 3-D mixture with unequal weights and anisotropic covariances of
``tests/test_accuracy.py``), ``guided`` (the labelled ring of :mod:`paratime.bench.equivalence_sweep`, labels 0-8
drawn from the seed), ``policy`` (observations uniform in [-1, 1], drawn from the seed) and ``digits``. Window
``all`` is the whole grid. Prints the worst ratio per solver and model, then every case over tol with a command that
reproduces it, every case that failed (its network output turned non-finite: Picard diverged) and the cases a solver
refuses (a ``ValueError`` naming the argument, e.g. a step count ``dpmpp_singlestep`` cannot split). Deterministic;
exits 1 when a case ends over tol or fails.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import re
import sys

import torch

from paratime import ParallelSampler
from paratime.bench.equivalence_sweep import guided_ring
from paratime.bench.scoring import sample_errors
from paratime.evaluator import NonFiniteOutputError
from paratime.methods.picard import UPDATES
from paratime.models import load_model
from paratime.solvers import SOLVERS
from paratime.zoo import ring_gmm
from paratime.zoo.gmm import mixture_3d

MODELS = {"gmm": ring_gmm, "mix3": mixture_3d, "guided": guided_ring, "policy": lambda: load_model("policy"),
          "digits": lambda: load_model("digits")}
#: a refusal: paratime's ValueErrors name the argument first ("steps: ...", "solver: ...")
_REFUSAL = re.compile(r"^\w+: ")


@functools.lru_cache(maxsize=None)
def model(name: str):
    """The :class:`~paratime.denoiser.Denoiser` of ``name`` (built once)."""
    return MODELS[name]()


def conditioning(name: str, batch: int, seed: int) -> dict:
    """The model's inputs besides the noise, drawn from ``seed``: the guided ring's labels, the policy's
    observations."""
    gen = torch.Generator().manual_seed(seed)
    if name == "guided":
        return {"labels": torch.randint(0, 9, (batch,), generator=gen)}
    if name == "policy":
        obs_dim = model(name).network.config["obs_dim"]
        return {"obs": torch.rand(batch, obs_dim, generator=gen, dtype=torch.float64) * 2 - 1}
    return {}


def sequential(name: str, solver: str, steps: int, batch: int, seed: int, **options) -> torch.Tensor:
    """The reference: the sequential samples of the same noise (``options``: the trajectory's, e.g. ``guidance``)."""
    return ParallelSampler(model(name), solver=solver, steps=steps, method="sequential", progress=False,
                           **options).sample(batch, seed=seed, **conditioning(name, batch, seed)).samples


def score(name: str, solver: str, steps: int, window: int | str, update: str, tol: float, batch: int, seed: int,
          reference: torch.Tensor, **options) -> dict:
    """One case against ``reference``: ``worst`` (the largest max |Δ| / tol_abs), its ``sample``, whether that sample
    was ``rolled_back``, the samples ``over`` tol and the ``rounds``."""
    res = ParallelSampler(model(name), solver=solver, steps=steps, window=steps if window == "all" else window,
                          update=update, tol=tol, progress=False, **options).sample(
        batch, seed=seed, **conditioning(name, batch, seed))
    err, ratio = sample_errors(res.samples, reference, res.stats.tol_abs)                    # (B,), (B,)
    i = int(ratio.argmax())
    return {"worst": float(ratio[i]), "sample": i, "rolled_back": bool(res.stats.extra["rolled_back"][i]),
            "over": int((ratio > 1).sum()), "max_abs": float(err[i]), "rounds": res.stats.rounds}


def _refusal(e: ValueError) -> str:
    """The message of a case the sampler refuses (it names the argument); any other ValueError is raised."""
    if not _REFUSAL.match(str(e)):
        raise e
    return str(e)


def hunt(models, solvers, steps, windows, updates, tols, seeds, batch, guidance: float | None = None) -> list[dict]:
    """Every case of the grid, one record each: its settings and :func:`score`'s fields, or ``refused`` (the
    message) where the sampler refuses it, ``failed`` where its network output turns non-finite. The reference is
    drawn once per model, solver, step count and seed. ``guidance``: the sampler's (None: its default)."""
    options = {} if guidance is None else {"guidance": guidance}
    rows = []
    for name, solver, n, seed in itertools.product(models, solvers, steps, seeds):
        try:
            ref, refusal = sequential(name, solver, n, batch, seed, **options), None
        except ValueError as e:
            ref, refusal = None, _refusal(e)                          # every case of this reference is refused
        for w, u, t in itertools.product(windows, updates, tols):
            row = {"model": name, "solver": solver, "steps": n, "window": w, "update": u, "tol": t, "seed": seed,
                   "batch": batch, **options}
            try:
                row.update(score(name, solver, n, w, u, t, batch, seed, ref, **options) if refusal is None
                           else {"refused": refusal})
            except ValueError as e:
                row["refused"] = _refusal(e)
            except NonFiniteOutputError as e:                         # Picard diverged: a failure, like over tol
                row["failed"] = str(e)
            rows.append(row)
    return rows


def command(row: dict) -> str:
    """The command that reproduces one case."""
    line = (f"OMP_NUM_THREADS=1 python -m paratime.bench.bound_hunt --models {row['model']} --solvers {row['solver']} "
            f"--steps {row['steps']} --windows {row['window']} --updates {row['update']} --tols {row['tol']:g} "
            f"--seeds {row['seed']} --batch {row['batch']}")
    return line + (f" --guidance {row['guidance']:g}" if "guidance" in row else "")


def report(rows: list[dict]) -> str:
    """Markdown: the worst ratio per solver (a column per model), the cases over tol or failed, the refused ones."""
    ran = [r for r in rows if "worst" in r]
    refused = [r for r in rows if "refused" in r]
    failed = [r for r in rows if "failed" in r]
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| solver | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for solver in dict.fromkeys(r["solver"] for r in rows):
        cells = []
        for m in models:
            worst = [r["worst"] for r in ran if (r["model"], r["solver"]) == (m, solver)]
            cells.append(f"{max(worst):.3g}" if worst else "-")
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    over = [r for r in ran if r["worst"] > 1]
    lines += ["", f"{len(ran)} cases run, {len(over)} over tol, {len(failed)} failed, {len(refused)} refused; worst "
              f"{max((r['worst'] for r in ran), default=0):.3g} of tol"]
    if over:
        lines += ["", "Over tol (worst sample: ratio, index, rolled back; the command):"]
        lines += [f"- {r['worst']:.3g}x sample {r['sample']} rolled_back={r['rolled_back']}: {command(r)}"
                  for r in over]
    if failed:
        lines += ["", "Failed (the sampler raised; the command):"]
        lines += [f"- {r['failed']}: {command(r)}" for r in failed]
    if refused:
        lines += ["", "Refused:"]
        groups = itertools.groupby(refused, key=lambda r: (r["model"], r["solver"], r["steps"], r["refused"]))
        lines += [f"- {m} {s}-{n}, {len(list(g))} cases: {msg}" for (m, s, n, msg), g in groups]
    return "\n".join(lines)


def _list(text: str, kind, name: str, allowed=None) -> list:
    """A comma-separated option parsed by ``kind``, each item checked against ``allowed``."""
    try:
        items = [kind(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated values, got {text!r}") from None
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad:
        raise ValueError(f"--{name}: unknown {bad}; allowed: {', '.join(map(str, allowed))}")
    return items


def _window(text: str) -> int | str:
    if text != "all" and int(text) < 1:
        raise ValueError(text)
    return text if text == "all" else int(text)


def _positive(text: str) -> float:
    if not float(text) > 0:
        raise ValueError(text)
    return float(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gmm", help=f"comma-separated, of {', '.join(MODELS)} (default gmm)")
    ap.add_argument("--solvers", default="all", help="comma-separated paratime solvers (default all)")
    ap.add_argument("--steps", default="20,100")
    ap.add_argument("--windows", default="4,8,32,all", help="windows; 'all': the whole grid")
    ap.add_argument("--updates", default="secant,picard,anderson")
    ap.add_argument("--tols", default="2e-3,0.1")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the sampler's)")
    ap.add_argument("--json", default=None, help="write every case's record to this file")
    args = ap.parse_args(argv)
    try:
        grid = dict(models=_list(args.models, str, "models", MODELS),
                    solvers=list(SOLVERS) if args.solvers == "all" else _list(args.solvers, str, "solvers", SOLVERS),
                    steps=_list(args.steps, int, "steps"), windows=_list(args.windows, _window, "windows"),
                    updates=_list(args.updates, str, "updates", UPDATES), tols=_list(args.tols, _positive, "tols"),
                    seeds=_list(args.seeds, int, "seeds"))
    except ValueError as e:
        ap.error(str(e))
    if args.batch < 1 or min(grid["steps"]) < 1:
        ap.error("--batch, --steps: at least 1")
    rows = hunt(**grid, batch=args.batch, guidance=args.guidance)
    print(report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r.get("worst", 0) > 1 or "failed" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
