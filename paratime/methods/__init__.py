"""Sampling methods by name. Each is a pure function of the initial state, the :class:`Problem` and the config."""

from __future__ import annotations

from .common import Outcome, Problem, RoundInfo
from .parareal import sample_parareal, sample_parareal_pipelined
from .picard import sample_picard
from .sequential import sample_sequential
from .staggered import sample_staggered

__all__ = ["METHODS", "Problem", "Outcome", "RoundInfo", "sample_sequential", "sample_picard", "sample_parareal",
           "sample_staggered"]


def _sequential(x, problem, cfg):
    return sample_sequential(x, problem)


def _picard(x, problem, cfg):
    return sample_picard(x, problem, cfg.window_size, cfg.tol, cfg.max_rounds, cfg.shared_window,
                         stop=cfg.stop, update=cfg.update, accept_tol=cfg.accept_tol, init=cfg.init, fill=cfg.fill,
                         tol_scale=cfg.tol_scale if cfg.stop == "final" else 1.0,
                         tol_units=cfg.tol_units if cfg.stop == "final" else None)


#: Parareal's default tolerance (noise-level units), used when ``tol`` is None
PARAREAL_TOL = 0.1


def _parareal_tol(cfg):
    return PARAREAL_TOL if cfg.tol is None else cfg.tol


def _parareal(x, problem, cfg):
    return sample_parareal(x, problem, cfg.slices, cfg.coarse_steps, _parareal_tol(cfg), cfg.coarse)


def _parareal_pipelined(x, problem, cfg):
    return sample_parareal_pipelined(x, problem, cfg.slices, cfg.coarse_steps, _parareal_tol(cfg), cfg.coarse)


def _staggered(x, problem, cfg):
    # K cores: the points evaluated per sample per tick, i.e. the window (ParallelSampler resolves "auto" to one
    # core per device before it gets here).
    if cfg.window == "auto":
        raise ValueError("window: method='staggered' takes its number of cores K as window=K (K rows per tick); "
                         "'auto' is resolved by ParallelSampler, from the backend's devices")
    return sample_staggered(x, problem, cfg.window_size, cfg.tol, tol_scale=cfg.tol_scale)


METHODS = {"sequential": _sequential, "picard": _picard, "parareal": _parareal,
           "parareal_pipelined": _parareal_pipelined, "staggered": _staggered}
