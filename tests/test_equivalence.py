"""The equivalence matrix (issue 23): every method of ``paratime.methods.METHODS`` equals the sequential sample at
``tol=0`` (to float rounding) and stays within its default tolerance, over method x solver x steps (1 to 200, primes
included) x spacing x batch x window x update rule x stopping rule x init / fill x slices x guidance.

The case space and the check are :mod:`paratime.bench.equivalence_sweep`'s (``benchmarks/equivalence_sweep.py``
runs a larger draw of it). Here the draw is derandomised and bounded: the same cases on every run, about a minute on
one core. Named regressions the matrix found are pinned below as explicit examples.
"""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings

from paratime import ParallelSampler
from paratime.bench.equivalence_sweep import ROUNDING, WINDOWED, Case, cases, check, guided_ring
from paratime.methods import METHODS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@settings(max_examples=150, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases(max_parallel=16))
# Found by the matrix: Parareal accepted a dpmpp_2m slice start that had not moved while the history D it carries
# still had (149 slices of 192 steps: tol 0 ended 4e-6 off the sequential sample; 6 slices of 8 steps: 2e-4).
@example(Case("gmm", "parareal", 1, 0, {"solver": "dpmpp_2m", "steps": 8, "spacing": None, "slices": 6,
                                        "coarse_steps": 1}))
# Found by the matrix: Parareal carried D across slice starts where DEIS's history is eps (tol 0: 1.35 off).
@example(Case("gmm", "parareal", 3, 1, {"solver": "deis", "steps": 20, "spacing": None, "slices": 5,
                                        "coarse_steps": 1}))
# Issue 23: a longer slice accepted before shorter ones left a zero-row fine step (image-shaped samples crashed).
@example(Case("guided", "parareal", 2, 0, {"solver": "ddim", "steps": 10, "spacing": None, "slices": 3,
                                           "coarse_steps": 1, "guidance": 2.0}))
# Found by the matrix: the trailing spacing gave 62 timesteps for steps=61 (diffusers' float arange; also 103, 121,
# 201, ... of 1000), so DDPM indexed past its 61 pre-drawn noise steps (IndexError) and DDIM ran 62 steps.
@example(Case("gmm", "picard", 2, 0, {"solver": "ddpm", "steps": 61, "spacing": "trailing", "window": 20}))
def test_every_method_equals_sequential(case):
    check(case)


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"sequential"}))
@pytest.mark.parametrize("model", ["gmm", "guided"])
def test_every_registered_method_at_a_prime_step_count(method, model):
    """Every method of the registry (one added later included), whatever the draw above picked: 17 steps (uneven
    slices, a window that does not divide N), a batch of 3, a one-step ODE solver every method takes."""
    opts = {"solver": "heun", "steps": 17, "spacing": None}
    if model == "guided":
        opts["guidance"] = 3.0
    if method in WINDOWED:
        opts["window"] = 5
    elif method.startswith("parareal"):
        opts["slices"] = 5
    check(Case(model, method, 3, 7, opts))


def test_the_guided_model_is_guided():
    """The tiny guided model's guidance changes the sample (so the guided cases test guidance, not a no-op), and its
    unconditional label reproduces the ring mixture."""
    y = torch.tensor([0, 3, 8])
    out = {g: ParallelSampler(guided_ring(), steps=8, method="sequential", guidance=g, progress=False)
           .sample(3, seed=0, labels=y).samples for g in (1.0, 3.0)}
    assert float((out[3.0] - out[1.0])[:2].abs().max()) > 1e-3       # labelled rows move with the scale
    assert float((out[3.0] - out[1.0])[2].abs().max()) <= ROUNDING   # label 8 is its own unconditional input
    ring = ParallelSampler("gmm", steps=8, method="sequential", progress=False).sample(3, seed=0).samples
    torch.testing.assert_close(out[1.0][2].reshape(2), ring[2], rtol=0, atol=ROUNDING)


def test_staggered_stays_within_its_default_tolerance_at_few_steps():
    """Found by the matrix: the staggered method stopped when two cores agreed after 2 ticks, 0.5 off the sequential
    sample (tol_abs 0.007) at 3 steps and 2 cores."""
    seq = ParallelSampler("gmm", solver="ddim", steps=3, method="sequential", progress=False).sample(8, seed=0)
    res = ParallelSampler("gmm", solver="ddim", steps=3, method="staggered", window=2, progress=False).sample(
        8, seed=0)
    assert float((res.samples - seq.samples).abs().max()) <= max(res.stats.tol_abs)


def test_parareal_with_the_consistency_step_at_tol_zero():
    """Was a known divergence: the constant-D jump's table exp(-C) overflowed with consistency steps (factor 0 at
    every step); the jump is now summed in step order with weights <= 1."""
    case = Case("gmm", "parareal", 1, 4838, {"solver": "consistency", "steps": 200, "spacing": "leading",
                                             "slices": 60, "coarse_steps": 1})
    ref = case.sample("sequential").samples
    torch.testing.assert_close(case.sample("parareal", tol=0.0).samples, ref, rtol=0, atol=ROUNDING)


def test_picard_with_the_consistency_step_at_its_default_tolerance():
    """Was a known divergence (2.4 off the sequential sample at tol_abs 0.006): the same overflowing table in the
    constant-D path of Picard's guesses."""
    case = Case("gmm", "picard", 1, 0, {"solver": "consistency", "steps": 31, "spacing": None, "window": 18,
                                        "init": "noise"})
    ref, res = case.sample("sequential").samples, case.sample("picard")
    assert float((res.samples - ref).abs().max()) <= max(res.stats.tol_abs)


def test_picard_with_the_consistency_step_on_the_guided_ring():
    """Found by the matrix: the consistency step (stochastic: x' = D(x) + sigma' z) in a sliding window, plain Picard
    update, ended 3.6e10 off the sequential sample while that window accepted at tol / 30 (its entry in
    KNOWN_DIVERGENT); at tol / 3000, 4.5e-7 (the tolerance in force 8.7e-3), but in 1,454 rounds for 127 steps: its
    diverging window-end values set each sample's own scale (up to ~1e11x its accepted points'), so it accepted
    wrong points and re-opened its window again and again. With the own scale capped by the accepted points'
    (:data:`paratime.methods.stops.TRUST_SCALE`), 125 rounds: at most one a step (and the x0 guess's)."""
    case = Case("guided", "picard", 5, 127, {"solver": "consistency", "steps": 127, "spacing": "linspace",
                                             "guidance": 2.0, "window": 118, "update": "picard"})
    ref, res = case.sample("sequential").samples, case.sample("picard")
    assert float((res.samples - ref).abs().max()) <= max(res.stats.tol_abs)
    assert res.stats.rounds <= 127 + 1


@pytest.mark.parametrize("window", [16, 32])
def test_picard_update_on_the_guided_rings_consistency_step_in_a_sliding_window(window):
    """Was a known divergence (a strict xfail; found while tuning the stochastic sliding acceptance, stop 52): the
    same case as above with a window of 32 (16) returned samples ~1e5 (~1e9) off, the sequential samples' max-abs
    being 4.3. The plain update takes each step's Jacobian as I where the consistency step's is ~0 (its window gain
    ~1e-10), so each point's error is minus the sum of those before it and the window's unaccepted points grow ~5x a
    round; each sample's own scale, read from D at the window end, grew with them, and acceptance relative to it
    froze points ~1e-3 off from round 11 (825 of them at a window of 32), which the stop then measured against the
    diverged final point's own scale. Capped at :data:`paratime.methods.stops.TRUST_SCALE` x the largest accepted
    point's max-abs, the scale stays the sample's, acceptance refuses the diverging points (the window slides one
    exact step a round) and the samples are ~5e-7 off."""
    case = Case("guided", "picard", 5, 127, {"solver": "consistency", "steps": 127, "spacing": "linspace",
                                             "guidance": 2.0, "window": window, "update": "picard"})
    ref, res = case.sample("sequential").samples, case.sample("picard")
    assert float((res.samples - ref).abs().max()) <= 2e-3 * float(ref.abs().max())
    assert res.stats.rounds <= 127 + 1


def test_staggered_stays_within_its_default_tolerance_with_many_cores():
    """Found by the matrix: 69 cores on 97 PLMS steps; two successive cores' samples agreed within tol while both were
    2.7x tol off the sequential sample (each quiet sample must now move by <= tol / 4)."""
    case = Case("guided", "staggered", 5, 4096, {"solver": "plms", "steps": 97, "spacing": None, "guidance": 1.0,
                                                 "window": 69})
    ref, res = case.sample("sequential").samples, case.sample("staggered")
    assert float((res.samples - ref).abs().max()) <= max(res.stats.tol_abs)


def test_parareal_with_deis_stays_within_its_default_tolerance():
    """Found by the matrix: iteration 1 read zeros for the history of every slice but the first, and DEIS's history
    (eps, ~0.1 on the ring at high noise) passed the settling test from them, so starts made with a zero history were
    accepted: 3 steps in 3 slices ended 0.6 off the sequential sample (tol 0.1 x scale 1), 5 in 5 (batch 256) 4.3."""
    check(Case("gmm", "parareal", 1, 832, {"solver": "deis", "steps": 3, "spacing": None, "slices": 3,
                                            "coarse_steps": 1}))
    kw = dict(solver="deis", steps=5, progress=False)
    ref = ParallelSampler("gmm", method="sequential", **kw).sample(256, seed=832).samples
    res = ParallelSampler("gmm", method="parareal", slices=5, **kw).sample(256, seed=832)
    assert float((res.samples - ref).abs().max()) <= res.stats.tol * max(1.0, float(ref.abs().max()))
