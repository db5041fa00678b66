"""Torch ops per Picard round, split by phase, the network call excluded: the engine's own calls around the batched
network call (on a GPU each is a kernel launch or at least a dispatch, ~5-10 us; for a latency-bound model such as the
shipped policy they, not the network, decide a round's time).

A ``TorchDispatchMode`` counts every aten op (views included, reported apart: they launch no kernel but cost a
dispatch) while the phase in force is the innermost of the engine's pieces that is running (``pack``, ``update``,
``accept``, ...; wrapped for the count only). A round runs from its ``pack`` to the return of its ``report``; ops
outside the rounds (set-up, the x0 guess's round, the result) are counted apart. Counts are deterministic (a function
of the code and the decisions, which are bitwise reproducible); the CPU wall per round (median of the intervals
between round callbacks over interleaved repeats, the first round left out as it holds the set-up) is noisy on a
shared machine: read the ops.

    OMP_NUM_THREADS=1 python benchmarks/engine_ops.py [--reps 5] [--json out.json]

Configurations: the policy (DDPM-100, window 32, batch 1, the eval's Picard options,
:data:`paratime.policy_eval.POLICY_METHODS`), and digits DDIM-50 at batch 1 with window 4 (the planner's choice at K=4)
and window 50 (default stop rule and update).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: (module, owner, attribute, phase): the pieces a round is split into (the innermost running one counts)
PHASES = (
    ("paratime.methods.window", "SlidingWindow", "pack", "pack"),
    ("paratime.methods.picard", None, "window_increments", "increments"),
    ("paratime.evaluator", "Evaluator", "__call__", "evaluator"),
    ("paratime.evaluator", "Evaluator", "outputs", "evaluator"),
    ("paratime.methods.updates", "UpdateRule", "__call__", "update"),
    ("paratime.methods.updates", None, "picard_update", "picard_update"),
    ("paratime.methods.updates", None, "_secant_increment", "secant"),
    ("paratime.methods.updates", None, "_window_gain", "gain"),
    ("paratime.methods.updates", None, "_anderson_values", "anderson"),
    ("paratime.methods.window", "SlidingWindow", "accept", "accept"),
    ("paratime.methods.stops", "FinalPointStop", "accept_scale", "accept"),
    ("paratime.methods.window", "SlidingWindow", "write", "write"),
    ("paratime.methods.window", "SlidingWindow", "slide", "slide"),
    ("paratime.methods.window", None, "model_frame_path", "path"),
    ("paratime.methods.updates", "UpdateRule", "shift", "shift"),
    ("paratime.methods.stops", "FinalPointStop", "__call__", "stop"),
    ("paratime.methods.stops", "FinalPointStop", "amplified", "stop"),
    ("paratime.methods.window", "SlidingWindow", "sync", "sync"),
    ("paratime.methods.common", "Problem", "report", "report"),
)
NETWORK = "network"
ORDER = ("pack", "increments", "evaluator", "picard_update", "secant", "gain", "anderson", "update", "accept", "write",
         "path", "slide", "shift", "stop", "sync", "report", "loop")


class OpCounter(TorchDispatchMode):
    """Counts aten ops by phase while a round runs (:attr:`in_round`); ``outside`` the rest."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.in_round = False
        self.rounds = 0                        # rounds seen (pack calls)
        self.ops: Counter = Counter()          # (phase, is_view) -> ops, rounds only
        self.outside: Counter = Counter()
        self.names: Counter = Counter()        # (phase, op name) -> ops, rounds only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        phase = self.stack[-1] if self.stack else "loop"
        if phase != NETWORK:
            view = bool(getattr(func, "is_view", False))
            if self.in_round:
                self.ops[phase, view] += 1
                self.names[phase, str(func.overloadpacket.__name__)] += 1
            else:
                self.outside[view] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def phases(counter: OpCounter, backend):
    """Wrap the engine's pieces (and ``backend.evaluate``, the network) to set the counter's phase."""
    import importlib

    undo = []

    def wrap(fn, phase):
        @functools.wraps(fn)
        def inner(*a, **k):
            if phase == "pack":
                counter.in_round = True
                counter.rounds += 1
            counter.stack.append(phase)
            try:
                return fn(*a, **k)
            finally:
                counter.stack.pop()
                if phase == "report":
                    counter.in_round = False
        return inner

    for mod_name, owner, attr, phase in PHASES:
        target = importlib.import_module(mod_name)
        target = getattr(target, owner) if owner else target
        orig = target.__dict__[attr]
        setattr(target, attr, wrap(orig, phase))
        undo.append((target, attr, orig))
    backend.evaluate = wrap(backend.evaluate, NETWORK)
    try:
        yield
    finally:
        del backend.evaluate
        for target, attr, orig in undo:
            setattr(target, attr, orig)


def configs():
    """``name -> (sampler, [sample kwargs])``: the configurations measured."""
    from paratime import ParallelSampler
    from paratime.policy_eval import latency_observations, policy_sampler

    obs = latency_observations(4)
    digits = lambda w: ParallelSampler("digits", solver="ddim", steps=50, method="picard", window=w,  # noqa: E731
                                       progress=False)
    return {
        "policy DDPM-100 W32 B1": (policy_sampler("picard"), [dict(shape=1, seed=s, obs=o[None])
                                                              for s, o in enumerate(obs)]),
        "digits DDIM-50 W4 B1": (digits(4), [dict(shape=1, seed=s) for s in range(2)]),
        "digits DDIM-50 W50 B1": (digits(50), [dict(shape=1, seed=s) for s in range(2)]),
    }


def count_ops(sampler, calls: list[dict]) -> dict:
    """Ops per round by phase (network excluded) over ``calls`` to ``sampler.sample``."""
    counter = OpCounter()
    with phases(counter, sampler.backend):
        for kw in calls:
            with counter:
                sampler.sample(**kw)
    rounds = counter.rounds
    per = {}
    for phase in ORDER:
        n, v = counter.ops[phase, False], counter.ops[phase, True]
        if n or v:
            per[phase] = {"ops": (n + v) / rounds, "views": v / rounds}
    total = sum(counter.ops.values())
    views = sum(v for (_, is_view), v in counter.ops.items() if is_view)
    return {"rounds": rounds, "calls": len(calls), "ops_per_round": total / rounds, "views_per_round": views / rounds,
            "outside_per_call": sum(counter.outside.values()) / len(calls), "phases": per,
            "top": [(f"{p}:{n}", c / rounds) for (p, n), c in counter.names.most_common(25)]}


def round_walls(samplers: dict, reps: int) -> dict[str, float]:
    """Median seconds per round (callback to callback, the first round of each call left out), interleaved."""
    walls: dict[str, list[float]] = {name: [] for name in samplers}
    for name, (sampler, calls) in samplers.items():        # warm-up
        sampler.sample(**calls[0])
    for _ in range(reps):
        for name, (sampler, calls) in samplers.items():
            for kw in calls:
                stamps = []
                sampler.sample(**kw, callback=lambda info: stamps.append(time.perf_counter()))
                walls[name] += [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return {name: statistics.median(w) for name, w in walls.items() if w}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="engine_ops", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="interleaved repeats of the wall-clock timing (0: none)")
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    samplers = configs()
    out = {}
    for name, (sampler, calls) in samplers.items():
        out[name] = count_ops(sampler, calls)
    walls = round_walls(samplers, args.reps) if args.reps > 0 else {}
    for name, r in out.items():
        r["wall_ms_per_round"] = walls[name] * 1e3 if name in walls else None
        wall = f"{r['wall_ms_per_round']:.3f} ms/round (CPU, median)" if name in walls else ""
        print(f"{name}: {r['ops_per_round']:.1f} ops/round ({r['views_per_round']:.1f} views) over {r['rounds']} "
              f"rounds, {r['outside_per_call']:.0f} ops outside rounds per call; {wall}")
        print("    " + ", ".join(f"{p} {v['ops']:.1f}" for p, v in r["phases"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
