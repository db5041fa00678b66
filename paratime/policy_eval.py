"""Closed-loop evaluation of the embedded diffusion policy on the ``reach`` task (:mod:`paratime.tasks.reach`).

Every method rolls out the same fixed, seeded set of episodes: at each re-planning point the policy samples an action
chunk ``(H, 2)`` for every running episode from its observation (one batched :class:`~paratime.ParallelSampler` call,
noise keyed by ``(seed + chunk, episode)``, so an episode's chunk does not depend on the batch it runs in) and the
first ``n_exec`` actions are executed. Reported per method: success rate, collision rate, mean steps; and, measured
apart at batch 1 (one robot, the control-loop case), the wall-clock latency per action chunk with its rounds and NFE.

The unimodal baseline (mean regression, shipped beside the policy) rolls out the same episodes.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checks import check_int
from .progress import progress_bar
from .results import json_text
from .methods import PARAREAL_TOL
from .sampler import ParallelSampler
from .tasks.reach import Episodes, ReachConfig, make_episodes, observe, step

__all__ = ["POLICY_METHODS", "EVAL_SEED", "EvalResult", "rollout", "policy_sampler", "sampler_act", "evaluate_policy",
           "evaluate_baseline", "chunk_latency", "latency_observations", "compare_methods", "format_records",
           "rollouts_png", "policy_demo", "run_eval", "add_policy_parsers", "run_policy_command",
           "check_eval_args", "check_train_args", "episode_observations", "chunks_png"]

log = logging.getLogger("paratime")

EVAL_SEED = 1000          # the fixed evaluation set (training data uses seed 0: disjoint layouts)
# Sampler options per method, DDPM-100 everywhere. Picard: a 32-point window, ParaDiGMS's stopping rule at tol 0.3
# (noise-level units: each point within 0.3 of the std of the noise DDPM adds there) with the secant update. The
# success rates and per-chunk latencies on the 100 evaluation episodes are the README's (*The diffusion policy*):
# ``paratime eval-policy`` and benchmarks/policy_latency.py measure them.
POLICY_METHODS: dict[str, dict] = {
    "sequential": dict(method="sequential"),
    "picard": dict(method="picard", window=32, tol=0.3, stop="paradigms", update="secant"),
    "parareal": dict(method="parareal"),
}


@dataclass
class EvalResult:
    """Closed-loop outcome of one policy on a set of episodes.

    Attributes:
        name: the policy (``sequential``, ``picard``, ``parareal``, ``baseline``). success, collided: ``(B,)`` bool.
        steps: ``(B,)`` steps taken. paths: ``(B, T + 1, 2)`` positions (held after an episode ends).
        chunks: policy calls (batched over the episodes). wall_s: seconds for the whole rollout.
    """

    name: str
    success: torch.Tensor
    collided: torch.Tensor
    steps: torch.Tensor
    paths: torch.Tensor
    chunks: int
    wall_s: float

    @property
    def success_rate(self) -> float:
        return float(self.success.double().mean())

    @property
    def collision_rate(self) -> float:
        return float(self.collided.double().mean())

    def summary(self) -> dict:
        ok = self.success
        return {"policy": self.name, "episodes": int(ok.numel()), "success_rate": self.success_rate,
                "collision_rate": self.collision_rate, "timeouts": int((~ok & ~self.collided).sum()),
                "mean_steps_success": float(self.steps[ok].double().mean()) if bool(ok.any()) else None,
                "chunks": self.chunks, "rollout_wall_s": self.wall_s}


def rollout(act: Callable[[torch.Tensor, int], torch.Tensor], episodes: int = 100, seed: int = EVAL_SEED,
            config: ReachConfig | None = None, name: str = "policy", progress: bool = False) -> EvalResult:
    """Roll a chunked policy out closed loop on episodes ``0 .. episodes - 1`` of the seeded set ``seed``.

    Args:
        act: ``act(obs (B, obs_dim), chunk_index) -> (B, >= n_exec, 2)`` normalised actions for *every* episode
            (finished ones included, so that each episode keeps its row and its noise).
        episodes, seed: the episode set. config: the task constants. name: a label for the result.
        progress: show the chunks done out of the most an episode can take (:func:`paratime.progress.progress_bar`).
    Returns:
        :class:`EvalResult`.
    Raises:
        ValueError: ``episodes`` or ``seed`` not a valid count / index; ``act`` returned a wrongly shaped chunk.
    """
    check_int("episodes", episodes, 1)
    check_int("seed", seed, 0)
    config = config or ReachConfig()
    ep = make_episodes(episodes, seed=seed, config=config)
    paths = [ep.pos.clone()]
    t0, chunks = time.perf_counter(), 0
    bar = progress_bar(-(-config.max_steps // config.n_exec), f"rollout {name}", unit="chunk") if progress else None
    while bool((~ep.done & (ep.steps < config.max_steps)).any()):
        chunk = act(observe(ep), chunks)
        if chunk.ndim != 3 or chunk.shape[0] != len(ep) or chunk.shape[1] < config.n_exec or chunk.shape[2] != 2:
            raise ValueError(f"act: expected a ({len(ep)}, >= {config.n_exec}, 2) chunk, got {tuple(chunk.shape)}")
        chunks += 1
        for k in range(config.n_exec):
            step(ep, chunk[:, k], config)
            paths.append(ep.pos.clone())
        if bar is not None:
            bar.set_postfix(running=int((~ep.done).sum()))
            bar.update(1)
    if bar is not None:
        bar.close()
    return EvalResult(name, ep.success, ep.collided, ep.steps, torch.stack(paths, 1), chunks,
                      time.perf_counter() - t0)


def policy_sampler(method: str = "picard", model=None, **options) -> ParallelSampler:
    """A DDPM-100 sampler of the shipped policy with :data:`POLICY_METHODS`'s options for ``method``, overridden by
    ``options`` (``window``, ``tol``, ..., and ``solver`` / ``steps`` for another grid than the evaluation's).

    Raises:
        ValueError: unknown ``method``.
    """
    if method not in POLICY_METHODS:
        raise ValueError(f"method: unknown {method!r}; allowed: {', '.join(POLICY_METHODS)}")
    opts = {"progress": False, **POLICY_METHODS[method], **{k: v for k, v in options.items() if v is not None}}
    return ParallelSampler(model if model is not None else "policy", **{"solver": "ddpm", "steps": 100, **opts})


def sampler_act(sampler: ParallelSampler, seed: int = EVAL_SEED) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """A rollout policy from a sampler: chunk ``c`` of episode ``e`` uses the noise of ``(seed + c, e)``."""
    def act(obs: torch.Tensor, chunk: int) -> torch.Tensor:
        return sampler.sample(obs.shape[0], seed=seed + chunk, obs=obs).samples
    return act


def evaluate_policy(method: str, episodes: int = 100, seed: int = EVAL_SEED, **options) -> EvalResult:
    """Closed-loop rollouts of the shipped policy sampled by ``method`` (see :func:`policy_sampler`)."""
    return rollout(sampler_act(policy_sampler(method, **options), seed), episodes, seed, name=method)


def evaluate_baseline(episodes: int = 100, seed: int = EVAL_SEED) -> EvalResult:
    """Closed-loop rollouts of the shipped unimodal baseline (mean regression)."""
    from .zoo.policy import load_baseline

    base = load_baseline()

    def act(obs: torch.Tensor, chunk: int) -> torch.Tensor:
        with torch.no_grad():
            return base(obs)
    return rollout(act, episodes, seed, name="baseline")


def chunk_latency(samplers: dict[str, ParallelSampler], observations: torch.Tensor, seed: int = EVAL_SEED,
                  warmup: int = 2) -> dict[str, dict]:
    """Wall-clock seconds per action chunk at batch 1 (one robot), whole ``sample`` calls, one per observation and
    sampler; the samplers take turns on each observation, so load from other processes hits them alike.

    Args:
        samplers: name -> sampler to time. observations: ``(n, obs_dim)``, one chunk each. seed: noise seed.
        warmup: untimed calls per sampler first.
    Returns:
        per name ``{"wall_s": [...], "min_s", "median_s", "rounds": median, "nfe": median}``.
    Raises:
        ValueError: ``observations`` is not ``(n >= 1, obs_dim)``.
    """
    if observations.ndim != 2 or observations.shape[0] < 1:
        raise ValueError(f"observations: expected (n >= 1, obs_dim), got {tuple(observations.shape)}")
    check_int("warmup", warmup, 0)
    for sampler in samplers.values():
        for i in range(warmup):
            sampler.sample(1, seed=seed, obs=observations[i % len(observations)][None])
    runs = {name: ([], [], []) for name in samplers}
    for i, o in enumerate(observations):
        for name, sampler in samplers.items():
            t0 = time.perf_counter()
            res = sampler.sample(1, seed=seed + i, obs=o[None])
            walls, rounds, nfe = runs[name]
            walls.append(time.perf_counter() - t0)
            rounds.append(res.stats.rounds)
            nfe.append(res.stats.nfe)
    return {name: {"wall_s": w, "min_s": min(w), "median_s": statistics.median(w), "rounds": statistics.median(r),
                   "nfe": statistics.median(n)} for name, (w, r, n) in runs.items()}


def latency_observations(n: int, seed: int = EVAL_SEED, config: ReachConfig | None = None) -> torch.Tensor:
    """``(n, obs_dim)`` observations met in a control loop: states along the expert's rollouts of the evaluation
    episodes, one every ``n_exec`` steps (where a policy re-plans)."""
    from .tasks.reach import rollout_expert

    check_int("n", n, 1)
    config = config or ReachConfig()
    episodes = max(1, n // 4)
    for _ in range(8):              # an episode re-plans a few times: more episodes until n are met (bounded)
        obs, _ = rollout_expert(make_episodes(episodes, seed=seed, config=config), config)
        picks = torch.cat([o for k, o in enumerate(obs) if k % config.n_exec == 0])
        if picks.shape[0] >= n:
            return picks[:n]
        episodes *= 2
    raise ValueError(f"n: {n} observations not met in {episodes // 2} episodes of the reach task")


# -- pictures ------------------------------------------------------------------------------------------------------
_COLOURS = {"sequential": (31, 119, 180), "picard": (44, 160, 44), "parareal": (148, 103, 189),
            "baseline": (214, 39, 40)}


def _panel(ep: Episodes, e: int, paths: list[tuple[str, torch.Tensor]], size: int = 200) -> "np.ndarray":
    """One episode's layout and paths drawn on a white ``(size, size, 3)`` canvas (the box [-1, 1]^2)."""
    import numpy as np

    img = np.full((size, size, 3), 255, dtype=np.uint8)
    ij = lambda p: ((p[..., 0] + 1) / 2 * (size - 1), (1 - p[..., 1]) / 2 * (size - 1))  # noqa: E731
    yy, xx = np.mgrid[0:size, 0:size]
    for c, r in zip(ep.centers[e].numpy(), ep.radii[e].numpy()):
        cx, cy = ij(c)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= (r / 2 * (size - 1)) ** 2] = (170, 170, 170)
    for point, colour, rad in ((ep.start[e], (0, 0, 0), 3), (ep.goal[e], (255, 160, 0), 4)):
        cx, cy = ij(point.numpy())
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= rad ** 2] = colour
    for name, path in paths:
        p = path.numpy()
        dense = np.concatenate([np.linspace(a, b, 6, endpoint=False) for a, b in zip(p[:-1], p[1:])] + [p[-1:]])
        x, y = ij(dense)
        x, y = np.clip(np.round(x).astype(int), 0, size - 1), np.clip(np.round(y).astype(int), 0, size - 1)
        img[y, x] = _COLOURS.get(name, (0, 0, 0))
    img[[0, -1]] = img[:, [0, -1]] = 0
    return img


def rollouts_png(path: str | Path, results: list[EvalResult], episodes: int = 4, seed: int = EVAL_SEED) -> Path:
    """A PNG of the first ``episodes`` rollouts: one row of panels per result (in the order given), one column per
    episode; paths in the result's colour (sequential blue, Picard green, Parareal purple, baseline red), discs grey,
    start black, goal orange.

    Raises:
        ValueError: no results, or ``episodes`` < 1.
    """
    import numpy as np

    from .images import write_png

    if not results:
        raise ValueError("results: need at least one result")
    check_int("episodes", episodes, 1)
    n = min(episodes, min(len(r.success) for r in results))
    ep = make_episodes(n, seed=seed)
    rows = [np.concatenate([_panel(ep, e, [(r.name, r.paths[e])]) for e in range(n)], 1) for r in results]
    write_png(path, np.concatenate(rows, 0))
    return Path(path)


def episode_observations(n: int, seed: int = EVAL_SEED) -> torch.Tensor:
    """``(n, obs_dim)``: the first observation of episodes ``0 .. n - 1`` of the seeded set ``seed`` (what
    ``paratime sample --model policy`` conditions its chunks on)."""
    return observe(make_episodes(n, seed=seed))


def chunks_png(path: str | Path, chunks: torch.Tensor, seed: int = EVAL_SEED, episodes: int = 8) -> Path:
    """A PNG of sampled action chunks ``(B, H, 2)``, one panel per episode (at most ``episodes``): each chunk of
    :func:`episode_observations` executed open loop from its episode's start (the path the chunk plans).

    Raises:
        ValueError: ``chunks`` is not ``(B >= 1, H, 2)``.
    """
    import numpy as np

    from .images import write_png

    if chunks.ndim != 3 or chunks.shape[0] < 1 or chunks.shape[2] != 2:
        raise ValueError(f"chunks: expected (B >= 1, H, 2) action chunks, got {tuple(chunks.shape)}")
    check_int("episodes", episodes, 1)
    n = min(episodes, chunks.shape[0])
    ep = make_episodes(n, seed=seed)
    layout = make_episodes(n, seed=seed)           # the untouched layouts to draw on
    paths = [ep.pos.clone()]
    for k in range(chunks.shape[1]):
        step(ep, chunks[:n, k].double().cpu())
        paths.append(ep.pos.clone())
    paths = torch.stack(paths, 1)                                        # (n, H + 1, 2)
    write_png(path, np.concatenate([_panel(layout, e, [("picard", paths[e])]) for e in range(n)], 1))
    return Path(path)


# -- reports -------------------------------------------------------------------------------------------------------
def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]


def compare_methods(methods: tuple[str, ...] = ("sequential", "picard", "parareal"), episodes: int = 100,
                    seed: int = EVAL_SEED, latency_chunks: int = 20, baseline: bool = True,
                    options: dict | None = None, progress: bool = False) -> dict:
    """Success, collisions and batch-1 latency per chunk of the shipped policy under each sampling method.

    Args:
        methods: names in :data:`POLICY_METHODS`. episodes, seed: the evaluation set. latency_chunks: batch-1
            chunks timed per method. baseline: also roll out the mean-regression baseline.
        options: per-method sampler overrides, e.g. ``{"picard": {"tol": 0.2}}``. progress: show each rollout's
            progress.
    Returns:
        ``{"results": {name: EvalResult}, "records": {name: summary + latency}}``; ``speedup`` (median
        sequential latency / median latency) when ``sequential`` is among the methods.
    Raises:
        ValueError: an unknown method; ``options`` overriding a method not in ``methods`` (they were dropped);
            ``episodes`` or ``latency_chunks`` not an integer >= 1 (before any work).
    """
    check_int("episodes", episodes, 1)
    check_int("latency_chunks", latency_chunks, 1)
    options = options or {}
    unused = [m for m, over in options.items() if over and m not in methods]
    if unused:
        raise ValueError(f"options: overrides for {', '.join(map(repr, unused))}, not among methods "
                         f"{', '.join(methods)}")
    samplers = {m: policy_sampler(m, **options.get(m, {})) for m in methods}
    results = {m: rollout(sampler_act(s, seed), episodes, seed, name=m, progress=progress)
               for m, s in samplers.items()}
    latency = chunk_latency(samplers, latency_observations(latency_chunks, seed), seed)
    records = {m: {**results[m].summary(), "window": s.config.window_size if m == "picard" else None,
                   "tol": s.config.tol_in_force, **{f"latency_{k}": v for k, v in latency[m].items()}}
               for m, s in samplers.items()}
    if "sequential" in records:
        ref = records["sequential"]["latency_median_s"]
        for r in records.values():
            r["speedup"] = ref / r["latency_median_s"]
    if baseline:
        results["baseline"] = evaluate_baseline(episodes, seed)
        records["baseline"] = results["baseline"].summary()
    return {"results": results, "records": records}


def format_records(records: dict) -> list[str]:
    """The comparison as a labelled text table."""
    rows = [("policy", "success", "collisions", "timeouts", "chunk ms min", "chunk ms median", "rounds", "NFE",
             "speed-up (median)")]
    for name, r in records.items():
        lat = "latency_median_s" in r
        rows.append((name, f"{100 * r['success_rate']:.0f}%", f"{100 * r['collision_rate']:.0f}%", r["timeouts"],
                     f"{1000 * r['latency_min_s']:.1f}" if lat else "-",
                     f"{1000 * r['latency_median_s']:.1f}" if lat else "-",
                     f"{r['latency_rounds']:.0f}" if lat else "-", f"{r['latency_nfe']:.0f}" if lat else "-",
                     f"{r['speedup']:.2f}x" if "speedup" in r else "-"))
    return _table(rows)


def check_eval_args(args) -> tuple[tuple[str, ...], dict]:
    """``eval-policy``'s options checked before anything is sampled; returns the methods and per-method overrides.

    Raises:
        ValueError, TypeError: naming the flag (``--methods ''``, ``--threads 0``, ``--window`` without picard, ...).
    """
    from .config import SamplerConfig, check_int

    for flag, value, low in (("--episodes", args.episodes, 1), ("--latency-chunks", args.latency_chunks, 1),
                             ("--threads", args.threads, 1), ("--seed", args.seed, 0)):
        check_int(flag, value, low)
    names = args.methods.split(",")
    if not args.methods.strip() or any(not m.strip() for m in names):
        raise ValueError(f"--methods: expected comma-separated names of {', '.join(POLICY_METHODS)}, "
                         f"got {args.methods!r}")
    methods = tuple(m.strip() for m in names)
    unknown = [m for m in methods if m not in POLICY_METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; allowed: {', '.join(POLICY_METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods: each method once, got {args.methods!r}")
    # --window is Picard's; --tol is Picard's and Parareal's: refused when no method given reads it.
    if args.window is not None and "picard" not in methods:
        raise ValueError("--window: applies only to picard, which --methods does not include")
    if args.tol is not None and not {"picard", "parareal"} & set(methods):
        raise ValueError("--tol: applies only to picard and parareal, which --methods does not include")
    over = {k: v for k, v in (("window", args.window), ("tol", args.tol)) if v is not None}
    options = {"picard": over, "parareal": {k: v for k, v in over.items() if k == "tol"}}
    for m in methods:                     # the samplers' own checks (window, tol ranges), before any work
        opts = {**POLICY_METHODS[m], **options.get(m, {})}
        SamplerConfig.from_options(solver="ddpm", steps=100, **opts)
    return methods, options


def check_train_args(args) -> None:
    """``train-policy``'s options checked before any data is made (``--lr inf``, ``--width 0``, ``--blocks -1``).

    Raises:
        ValueError, TypeError: naming the option.
    """
    from .zoo.policy import check_train_options

    check_train_options(steps=args.steps, batch=args.batch, lr=args.lr, width=args.width, blocks=args.blocks,
                        episodes=args.episodes, seed=args.seed, threads=args.threads)


def run_eval(args, emit: Callable[[str], None] = print) -> dict:
    """``paratime eval-policy``: every method and the baseline on ``--episodes`` seeded episodes; prints a table and
    writes the rollout PNG. Returns the JSON record."""
    methods, options = check_eval_args(args)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = compare_methods(methods, args.episodes, args.seed, args.latency_chunks, options=options,
                          progress=args.progress)
    emit(f"policy: DDPM-100, {args.episodes} episodes (seed {args.seed}), latency per chunk at batch 1 over "
         f"{args.latency_chunks} chunks, torch threads {torch.get_num_threads()}")
    for line in format_records(out["records"]):
        emit(line)
    if args.out:
        rollouts_png(args.out, list(out["results"].values()), seed=args.seed)
        emit(f"wrote {args.out}")
    emit(f"({time.perf_counter() - t0:.0f} s)")
    return {"episodes": args.episodes, "seed": args.seed, "threads": torch.get_num_threads(),
            "records": out["records"]}


def policy_demo(out: str | Path | None = "policy_rollouts.png", episodes: int = 30, latency_chunks: int = 8,
                threads: int | None = 1, emit: Callable[[str], None] = print, progress: bool = False) -> dict:
    """The policy half of the main job: per-chunk latency sequential vs Picard measured now, success rates on the
    seeded episodes, the baseline's, and a PNG of a few rollouts. About 10 s on an idle core, 30 s on a busy one.

    Args:
        out: PNG path (None or '': none). episodes: closed-loop episodes per method. latency_chunks: batch-1 chunks
            timed per method. threads: torch threads while it runs (restored after; None: leave as is).
        emit: where the labelled lines go. progress: show each rollout's progress.
    Returns:
        The records per policy (see :func:`compare_methods`).
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        res = compare_methods(("sequential", "picard"), episodes, EVAL_SEED, latency_chunks, progress=progress)
    finally:
        torch.set_num_threads(before)
    rec = res["records"]
    pic = POLICY_METHODS["picard"]
    emit(f"policy (diffusion policy, reach task): DDPM-100, batch 1, {threads or before} thread(s); "
         f"Picard window {pic['window']} tol {pic['tol']}; success on {episodes} seeded episodes")
    for line in format_records(rec):
        emit("  " + line)
    emit(f"  policy per-chunk latency (median, measured now): sequential "
         f"{1000 * rec['sequential']['latency_median_s']:.1f} ms, Picard {1000 * rec['picard']['latency_median_s']:.1f}"
         f" ms: {rec['picard']['speedup']:.2f}x faster")
    if out:
        rollouts_png(out, list(res["results"].values()))
        emit(f"wrote {out} (rollouts of 4 episodes, one row each: sequential blue, Picard green, "
             f"mean-regression baseline red)")
    return rec


# -- command line (``paratime train-policy`` / ``paratime eval-policy``) -------------------------------------------
def add_policy_parsers(sub) -> None:
    """Add the ``train-policy`` and ``eval-policy`` subcommands to the CLI's subparsers."""
    t = sub.add_parser("train-policy", help="train the embedded diffusion policy and its mean-regression baseline")
    t.add_argument("--out", default="policy.safetensors", help="where to write the weights (safetensors)")
    t.add_argument("--steps", type=int, default=20000, help="optimiser steps (the shipped weights: 20000)")
    t.add_argument("--batch", type=int, default=256, help="training batch size")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    t.add_argument("--width", type=int, default=128, help="hidden units of the denoiser")
    t.add_argument("--blocks", type=int, default=4, help="FiLM residual blocks")
    t.add_argument("--episodes", type=int, default=2000, help="expert demonstrations")
    t.add_argument("--seed", type=int, default=0, help="seed of the data and the initial weights")
    t.add_argument("--threads", type=int, default=1, help="torch threads (1: no spinning under contention)")

    e = sub.add_parser("eval-policy", help="closed-loop success, collisions and per-chunk latency of the policy")
    e.add_argument("--episodes", type=int, default=100, help="seeded closed-loop episodes")
    e.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the episode set")
    e.add_argument("--methods", default=",".join(POLICY_METHODS),
                   help=f"comma-separated methods to roll out, of {', '.join(POLICY_METHODS)}")
    pic, par = POLICY_METHODS["picard"], POLICY_METHODS["parareal"]
    e.add_argument("--window", type=int, default=None, help=f"Picard window (default: {pic['window']})")
    e.add_argument("--tol", type=float, default=None,
                   help=f"Picard tolerance, noise-level units of ParaDiGMS's rule (default: {pic['tol']:g}); "
                        f"Parareal's (default: {par.get('tol', PARAREAL_TOL):g})")
    e.add_argument("--latency-chunks", type=int, default=20, help="batch-1 chunks timed per method")
    e.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly: timings swing)")
    e.add_argument("--out", default="policy_rollouts.png", help="PNG of a few rollouts ('' for none)")
    e.add_argument("--json", default=None, help="write the records as JSON here (default: none)")


def run_policy_command(args, emit: Callable[[str], None] = print) -> int:
    """Run ``train-policy`` or ``eval-policy`` from parsed arguments; returns the exit status."""
    if args.command == "train-policy":
        from .zoo.policy import train_policy

        check_train_args(args)
        r = train_policy(args.out, steps=args.steps, batch=args.batch, lr=args.lr, width=args.width,
                         blocks=args.blocks, episodes=args.episodes, seed=args.seed, threads=args.threads,
                         progress=args.progress)
        emit(f"trained {args.steps} steps in {r['seconds']:.0f} s, final loss {r['meta']['final_loss']:.4f} "
             f"(baseline {r['meta']['baseline_final_loss']:.4f}); wrote {args.out}")
        return 0
    rec = run_eval(args, emit)
    if args.json:
        Path(args.json).write_text(json_text(rec))
        emit(f"wrote {args.json}")
    return 0
