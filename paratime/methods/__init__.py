"""Sampling methods by name. Each is a pure function of the initial state, the :class:`Problem` and the config."""

from __future__ import annotations

from .common import Outcome, Problem, RoundInfo
from .parareal import sample_parareal, sample_parareal_pipelined
from .picard import sample_picard
from .sequential import sample_sequential

__all__ = ["METHODS", "Problem", "Outcome", "RoundInfo", "sample_sequential", "sample_picard", "sample_parareal"]


def _sequential(x, problem, cfg):
    return sample_sequential(x, problem)


def _picard(x, problem, cfg):
    return sample_picard(x, problem, cfg.window_size, cfg.tol, cfg.max_rounds, cfg.shared_window,
                         stop=cfg.stop, update=cfg.update, accept_tol=cfg.accept_tol, init=cfg.init, fill=cfg.fill)


#: Parareal's default tolerance (noise-level units), used when ``tol`` is None
PARAREAL_TOL = 0.1


def _parareal_tol(cfg):
    return PARAREAL_TOL if cfg.tol is None else cfg.tol


def _parareal(x, problem, cfg):
    return sample_parareal(x, problem, cfg.slices, cfg.coarse_steps, _parareal_tol(cfg), cfg.coarse)


def _parareal_pipelined(x, problem, cfg):
    return sample_parareal_pipelined(x, problem, cfg.slices, cfg.coarse_steps, _parareal_tol(cfg), cfg.coarse)


METHODS = {"sequential": _sequential, "picard": _picard, "parareal": _parareal,
           "parareal_pipelined": _parareal_pipelined}
