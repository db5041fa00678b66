"""A port of CHORDS's reference scheduler, the peer that ``benchmarks/devices.py`` measures against.

CHORDS (Han et al., ICCV 2025; reference code ``algorithms/chords.py`` of github.com/hanjq17/CHORDS) runs K
"cores" over an N-step grid ``t = 0 .. T`` (T = N). Core 0 starts at ``t = 0`` with ``x_0``; core ``i`` is started at
the staggered point ``init_t[i]`` by a coarse jump from core ``i - 1``'s first point, as soon as that point's score is
known. Every tick, every running core evaluates the score at its current point (one batched call of at most K rows)
and then takes one step. A core's step is the fine step ``F`` of its last point, unless the core before it has just
reached the core's *begin* point (the point where it was started or last corrected); then it takes the
Parareal-type correction

    x_{t+1} = F(x_t) - G(begin -> t + 1) + G(previous core's point at begin's t -> t + 1)

(``G``: one solver jump with the score held at its start point) and its begin moves to ``t + 1``. A core that
reaches ``T`` is a *hit*: it records (its step count k, the tick, x_T) and stops. When the last core's first
score is known and no core is left to start, one jump from it to ``T`` gives the "zeroth" hit. The run stops
when hit number ``index`` arrives (``core_index``, the reference's default ``index = 1``), when two consecutive
hits differ by less than ``threshold`` (``residual``: ``|h_j - h_{j-1}|_2 / numel``), or when every core finished.
Core 0 never corrects, so its hit, at tick T, is the sequential solution.

The port keeps the reference's semantics and its hit record exactly (``tests/test_chords_ref.py`` checks the
outputs and the tick of every hit against the original on its own linear test problem, when the original is at
hand, and against the closed-form ticks ``i + T - init_t[i]`` and the sequential solution always), and is written
as one loop over cores per tick. Notation: ``t`` grid index (0 = start), ``k`` steps the core has taken, ``x`` the
state, ``score`` what the model returned at ``(t, x)`` (any network output the solver consumes: CHORDS's velocity,
paratime's denoiser output D).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["Chords", "Hit", "ChordsRun", "run_chords", "euler", "stagger"]

Solver = Callable[[Any, Any, int, int], Any]   # solver(x_t, score_t, t, s) -> x_s


def euler(x, score, t, s):
    """The reference's default solver: ``x_s = x_t + score_t (s - t)``."""
    return x + score * (s - t)


def stagger(steps: int, cores: int) -> list[int]:
    """Initial points for ``cores`` cores on ``steps`` steps: the reference's recommended 8-core schedule on 50 steps,
    ``0-2-4-8-16-24-32-40``, rescaled to ``steps``; fewer cores take its points 0, then every (8 / K)-th from the
    end (K = 4: 0-8-24-40, K = 2: 0-40 on 50 steps; our choice, the reference states only the 8-core one).

    Raises:
        ValueError: ``cores`` not in 1, 2, 4, 8, or a schedule whose points collide on a short grid.
    """
    ref = [0, 2, 4, 8, 16, 24, 32, 40]
    if cores not in (1, 2, 4, 8):
        raise ValueError(f"cores: the staggered schedule is defined for 1, 2, 4 or 8 cores, got {cores!r}")
    picked = [0] + sorted(ref[::-1][::8 // cores][:cores - 1])
    pts = [round(p * steps / 50) for p in picked]
    if len(set(pts)) != cores or pts[-1] >= steps:
        raise ValueError(f"cores: {cores} staggered points {pts} do not fit {steps} steps")
    return pts


@dataclass
class Hit:
    """A core that reached T: its steps taken ``k``, the tick it finished at, and its ``x_T``."""

    k: int
    tick: int
    x: Any


@dataclass
class _Core:
    """One staggered solver. ``t, k, x``: the point it evaluates next. ``begin``: ``[t, k, x, score]`` where it was
    started or last corrected (score None until evaluated). ``last``: ``(t, k, x, score)`` its last evaluated point."""

    t: int
    k: int
    x: Any
    begin: list = field(default_factory=list)
    last: tuple | None = None


class Chords:
    """The scheduler: :meth:`pending` lists the points to evaluate this tick, :meth:`advance` takes their scores.

    Args:
        T: grid steps. x0: the initial state. init_t: each core's start point (``init_t[0] = 0``, increasing).
        solver: ``solver(x_t, score_t, t, s) -> x_s`` (default :func:`euler`). criterion: ``core_index`` or
            ``residual``. index: hit number that stops ``core_index``. threshold: ``residual``'s bound.

    Raises:
        ValueError: a bad schedule or stop rule, naming it.
    """

    def __init__(self, T: int, x0, init_t: Sequence[int], solver: Solver = euler, criterion: str = "core_index",
                 index: int | None = 1, threshold: float | None = None):
        init_t = [int(t) for t in init_t]
        if not init_t or init_t[0] != 0 or any(b <= a for a, b in zip(init_t, init_t[1:])) or init_t[-1] >= T:
            raise ValueError(f"init_t: must increase from 0 and stay below T={T}, got {init_t}")
        if criterion not in ("core_index", "residual"):
            raise ValueError(f"criterion: unknown {criterion!r}; allowed: core_index, residual")
        if criterion == "core_index" and index is None:
            raise ValueError("index: required by criterion='core_index'")
        if criterion == "residual" and threshold is None:
            raise ValueError("threshold: required by criterion='residual'")
        self.T, self.init_t, self.solver = T, init_t, solver
        self.criterion, self.index, self.threshold = criterion, index, threshold
        self.cores = [_Core(0, 0, x0, [0, 0, x0, None])]
        self.hits: list[Hit] = []
        self.tick = 0
        self.evaluations = 0

    def pending(self) -> list[tuple[int, Any]]:
        """``(t, x)`` of every running core, in core order: this tick's one batched call."""
        return [(c.t, c.x) for c in self.cores]

    def advance(self, scores: Sequence[Any]) -> bool:
        """Take this tick's scores (one per :meth:`pending` point), step every core, record hits.

        Returns:
            True when the stop rule fired or no core is left.
        """
        # 1. Scores: each core's current point becomes its last evaluated one (and its begin's score).
        for c, s in zip(self.cores, scores):
            c.last = (c.t, c.k, c.x, s)
            if (c.begin[0], c.begin[1]) == (c.t, c.k):
                c.begin[3] = s
        self.evaluations += len(scores)
        self.tick += 1
        # 2. Steps, in core order (a core started now takes its first step next tick).
        for i in range(len(self.cores)):
            c = self.cores[i]
            t, k, x, s = c.last
            if i == len(self.cores) - 1 and k == 0:          # the last core's first score: start the next core
                nxt = self.init_t.index(t) + 1
                if nxt < len(self.init_t):
                    x_new = self.solver(x, s, t, self.init_t[nxt])
                    self.cores.append(_Core(self.init_t[nxt], 0, x_new, [self.init_t[nxt], 0, x_new, None]))
                else:                                           # none left: jump to T, the zeroth hit
                    self.hits.append(Hit(0, self.tick, self.solver(x, s, t, self.T)))
            prev = self.cores[i - 1].last if i > 0 else None
            fine = self.solver(x, s, t, t + 1)
            if prev is not None and c.begin[0] == prev[0]:
                # Parareal correction from the previous core's point at the begin's t.
                b_t, _, b_x, b_s = c.begin
                x_next = fine - self.solver(b_x, b_s, b_t, t + 1) + self.solver(prev[2], prev[3], prev[0], t + 1)
                c.begin = [c.t + 1, c.k + 1, x_next, None]
            else:
                x_next = fine
            c.t, c.k, c.x = c.t + 1, c.k + 1, x_next
        # 3. Hits: cores at T stop; the stop rule looks at the record.
        done = [c for c in self.cores if c.t == self.T]
        if done:
            self.hits += [Hit(c.k, self.tick, c.x) for c in done]
            self.cores = [c for c in self.cores if c.t != self.T]
            if self.criterion == "core_index" and len(self.hits) - 1 >= self.index:
                return True
            if self.criterion == "residual" and len(self.hits) >= 2:
                a, b = self.hits[-1].x, self.hits[-2].x
                if torch.linalg.norm(a - b).double().item() / a.numel() < self.threshold:
                    return True
        return not self.cores


@dataclass
class ChordsRun:
    """A finished run: ``hits`` in the order they arrived, ``ticks`` (batched calls) and ``evaluations`` (rows)."""

    hits: list[Hit]
    ticks: int
    evaluations: int


def run_chords(T: int, x0, score: Callable[[list[tuple[int, Any]]], list[Any]], init_t: Sequence[int],
               solver: Solver = euler, criterion: str = "core_index", index: int | None = 1,
               threshold: float | None = None) -> ChordsRun:
    """Run CHORDS to its stop rule. ``score(points) -> scores`` evaluates one tick's ``[(t, x), ...]`` at once.

    Returns:
        :class:`ChordsRun`.
    """
    algo = Chords(T, x0, init_t, solver, criterion, index, threshold)
    while not algo.advance(score(algo.pending())):
        pass
    return ChordsRun(algo.hits, algo.tick, algo.evaluations)


# -- the original's outputs, recorded: what tests/test_chords_ref.py checks the port against on every run --------
#: the reference's linear test problem (its test()): score 0.1 x + 0.01 t on 50 steps from 128 normal draws (seed 10)
LINEAR_T = 50
#: the schedules, stop rules and dtypes the port is compared on. The original indexes a list of cores that its own
#: clean-up emptied when every core hits T at the same tick without stopping (consecutive starts such as
#: [0, 1, 2, 3]), so no such schedule is among them.
ORIGINAL_SCHEDULES = (stagger(LINEAR_T, 8), stagger(LINEAR_T, 4), stagger(LINEAR_T, 2), [0, 5, 6, 30])
ORIGINAL_STOPS = (dict(criterion="core_index", index=1, threshold=None),
                  dict(criterion="core_index", index=100, threshold=None),
                  dict(criterion="residual", index=1, threshold=5.0),
                  dict(criterion="residual", index=1, threshold=4e-4))
ORIGINAL_DTYPES = ("float64", "float32")
#: where :func:`record_original` writes and the test reads the original's hits
TRANSCRIPT = Path(__file__).resolve().parent.parent / "tests" / "chords_original_hits.json"


def linear_score(x, t):
    return 0.1 * x + 0.01 * t


def linear_x0(dtype: str = "float64") -> torch.Tensor:
    return torch.randn(128, generator=torch.Generator().manual_seed(10), dtype=getattr(torch, dtype))


def digest(x: torch.Tensor) -> str:
    """The exact bits of a hit's output (dtype and values), as a short hex string."""
    t = x.detach().cpu().contiguous()
    return hashlib.sha256(str(t.dtype).encode() + t.numpy().tobytes()).hexdigest()[:32]


def case_key(init_t, stop: dict, dtype: str) -> str:
    return f"{'-'.join(map(str, init_t))}|{stop['criterion']}|{stop['index']}|{stop['threshold']}|{dtype}"


def run_original(CHORDS, init_t, stop: dict, dtype: str) -> dict:
    """The original class driven by its own loop (its test()): ``{"hits": [[k, tick, digest], ...], "ticks",
    "evaluations"}``."""
    algo = CHORDS(LINEAR_T, linear_x0(dtype), len(init_t), init_t="-".join(map(str, init_t)), stopping_kwargs=stop)
    while True:
        allocation = algo.get_allocation()
        if allocation == []:
            break
        algo.update_scores([(t, k, linear_score(x, t)) for t, k, x in allocation])
        algo.update_states(len(allocation))
        delete_ids, earlystop = algo.schedule_cores()
        if earlystop:
            break
        algo.cur_core_to_compute = algo.cur_core_to_compute[len(allocation):]
        if len(delete_ids):
            algo.cur_core_to_compute = [c for c in algo.cur_core_to_compute if c not in delete_ids]
    return {"hits": [[k, tick, digest(x)] for k, tick, x in algo.hits], "ticks": algo.counter,
            "evaluations": algo.flops_count}


def run_port(init_t, stop: dict, dtype: str) -> dict:
    """:func:`run_chords` on the same problem, in the transcript's form."""
    run = run_chords(LINEAR_T, linear_x0(dtype), lambda pts: [linear_score(x, t) for t, x in pts], init_t,
                     criterion=stop["criterion"], index=stop["index"], threshold=stop["threshold"])
    return {"hits": [[h.k, h.tick, digest(h.x)] for h in run.hits], "ticks": run.ticks,
            "evaluations": run.evaluations}


def record_original(path: str | Path, out: str | Path = TRANSCRIPT) -> dict:
    """Run the original ``algorithms/chords.py`` at ``path`` (not part of this repository) on every case and write
    its hits to ``out`` (JSON), with the torch version that made them."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("chords_original", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cases = {}
    with contextlib.redirect_stdout(io.StringIO()):          # the original prints as it runs
        for init_t in ORIGINAL_SCHEDULES:
            for stop in ORIGINAL_STOPS:
                for dtype in ORIGINAL_DTYPES:
                    cases[case_key(init_t, stop, dtype)] = run_original(mod.CHORDS, init_t, stop, dtype)
    data = {"source": "github.com/hanjq17/CHORDS algorithms/chords.py", "torch": torch.__version__, "cases": cases}
    Path(out).write_text(json.dumps(data, indent=1) + "\n")
    return data


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Record the original CHORDS scheduler's hits on the reference's linear "
                                            "problem (what tests/test_chords_ref.py compares the port with).")
    p.add_argument("--record-original", required=True, metavar="PATH", help="the original algorithms/chords.py")
    p.add_argument("--out", default=str(TRANSCRIPT), help=f"JSON to write (default: {TRANSCRIPT})")
    a = p.parse_args()
    print(f"{len(record_original(a.record_original, a.out)['cases'])} cases written to {a.out}")
