"""Property-based fuzz of ParallelSampler's option matrix beyond tests/test_equivalence.py (which fuzzes method x
solver x steps x window x update / stop / init / fill x slices on the VP ring): here also the schedule kind (discrete
and continuous VP, VE, EDM, rectified flow), the parameterisation (eps, x0, v, score, edm, flow), sample shapes,
the network and state dtypes, clip_x0, guidance with its rescale, classifier guidance, max_rounds, tol_units /
data_scale, eta, the corrector, the noise forms (seed, first_sample, generator, a list of generators, noise=), the
backend's max_batch and buckets, and cost curves.

Properties: (1) at tol=0 every accepted combination is the sequential sample of the same solver and noise (float64
rounding; the repository's ROUNDING); (2) a refused combination raises ValueError / TypeError whose message starts
with the offending argument's name, and nothing else escapes; (3) the stats agree with the network's own counters
(rows, calls), and no call exceeds max_batch; (4) outputs are finite and shaped as asked; (5) a float32 state ends
within the README's 1e-5 of float64 for every solver a flow or zero-SNR grid accepts; (6) a seeded batch is the
concatenation of its samples drawn one by one with first_sample (per-sample methods).

Bounded: derandomised, fixed example counts, under a minute on one core.
"""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paratime import Denoiser, ParallelSampler, SamplerConfig
from paratime.denoiser import from_x0
from paratime.methods.parareal import slice_bounds
from paratime.schedules import (ContinuousVPSchedule, DiscreteVPSchedule, EDMSchedule, FlowSchedule, VESchedule,
                                betas_for)
from paratime.solvers import SOLVERS, make_solver
from paratime.zoo import GaussianMixture

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]



def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ROUNDING = 1e-9
SCHEDULES = {"dvp": lambda: DiscreteVPSchedule.from_betas("linear", 1000, 1e-4, 0.02),
             "cvp": ContinuousVPSchedule, "cvp_cos": lambda: ContinuousVPSchedule("cosine"),
             "ve": lambda: VESchedule(0.01, 20.0), "edm": EDMSchedule, "flow": lambda: FlowSchedule(shift=2.0)}
ANGLES = 2 * math.pi * torch.arange(4, dtype=torch.float64) / 4
MEANS = 2 * torch.stack([ANGLES.cos(), ANGLES.sin()], 1)
ONE_STEP = ("ddim", "ddpm", "euler", "euler_ancestral", "euler_maruyama", "heun", "flow_heun", "consistency")


class Mixture(torch.nn.Module):
    """The exact network of a 4-mode ring for any schedule and prediction; ``labels`` 0-3 pick a mode, 4 the whole
    mixture (the unconditional input). Counts its calls and rows, and the largest call."""

    def __init__(self, schedule, prediction, labelled):
        super().__init__()
        self.schedule, self.prediction, self.labelled = schedule, prediction, labelled
        self.modes = torch.nn.ModuleList([GaussianMixture(MEANS[k:k + 1], 0.3) for k in range(4)]
                                         + [GaussianMixture(MEANS, 0.3)])
        self.calls = self.rows = self.widest = 0

    def forward(self, x_in, t, labels=None):
        assert (labels is not None) == self.labelled
        M = x_in.shape[0]
        self.calls, self.rows, self.widest = self.calls + 1, self.rows + M, max(self.widest, M)
        sigma = self.schedule.sigma_of_model_time(t)
        a = self.schedule.input_scale(sigma)
        x = x_in.reshape(M, 2).to(torch.float64) / a[:, None]
        if labels is None:
            x0 = self.modes[4].denoise(x, sigma)
        else:
            x0 = torch.stack([m.denoise(x, sigma) for m in self.modes])
            x0 = x0.gather(0, labels.long().reshape(1, M, 1).expand(1, M, 2))[0]
        return from_x0(self.prediction, x0, x, sigma[:, None], a[:, None], self.schedule).reshape(x_in.shape) \
            .to(x_in.dtype)


class Classifier(torch.nn.Module):
    def forward(self, x_in, t):
        x = x_in.reshape(x_in.shape[0], 2)
        return 0.5 * torch.stack([x[:, 0], -x[:, 0], x[:, 1]], 1)


@st.composite
def cases(draw):
    """A combination the sampler should accept (a solver it refuses for the grid is a legitimate refusal)."""
    kind = draw(st.sampled_from(sorted(SCHEDULES)))
    pred = draw(st.sampled_from(["eps", "x0", "v", "score"] + {"edm": ["edm"], "flow": ["flow"]}.get(kind, [])))
    method = draw(st.sampled_from(["picard", "parareal", "parareal_pipelined", "staggered", "auto"]))
    steps = draw(st.sampled_from([1, 2, 3, 5, 7, 8, 13]))
    pool = ONE_STEP if method == "parareal_pipelined" else sorted(SOLVERS)
    solver = draw(st.sampled_from(pool))
    if method == "parareal" and make_solver(solver).history_depth > 1:
        solver = "dpmpp_2m"
    o = {"method": method, "steps": steps, "solver": solver}
    if kind == "dvp" or draw(st.booleans()):
        o["spacing"] = draw(st.sampled_from({"dvp": [None, "leading", "trailing", "linspace", "karras"],
                                             "edm": [None], "flow": [None]}.get(kind, [None, "karras"])))
    if solver in ("ddim", "ddpm", "euler", "euler_maruyama") and draw(st.booleans()):
        o["eta"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
    if not make_solver(solver).uses_history and method != "parareal_pipelined" and draw(st.integers(0, 4)) == 0:
        o.update(corrector_snr=0.1, corrector_steps=draw(st.integers(1, 2)))
    if draw(st.integers(0, 4)) == 0:
        o["clip_x0"] = draw(st.sampled_from([1.0, 3.0]))
    if method == "picard":
        W = draw(st.sampled_from(["auto", 1, 2, 3, steps, steps + 2]))
        o.update(window=W, update=draw(st.sampled_from(["secant", "picard", "anderson"])),
                 stop=draw(st.sampled_from(["final", "paradigms"])), shared_window=draw(st.booleans()))
        if draw(st.booleans()):
            o["max_rounds"] = draw(st.integers(1, 5))
        if isinstance(W, int) and W > 1 and draw(st.booleans()):
            o["init"] = draw(st.sampled_from(["noise", "x0", "auto"]))
        if isinstance(W, int) and 1 < W < steps and draw(st.booleans()):
            o["fill"] = draw(st.sampled_from(["copy", "path"]))
        if o["stop"] == "final" and draw(st.booleans()):
            o["tol_units"] = draw(st.sampled_from(["data", "absolute"]))
            if o["tol_units"] == "data" and draw(st.booleans()):
                o["data_scale"] = 2.0
    elif method == "auto":
        o["update"] = draw(st.sampled_from(["secant", "picard", "anderson"]))
    elif method == "staggered":
        o["window"] = draw(st.sampled_from(["auto", 2, 3, max(2, steps)]))
    else:
        bounds = slice_bounds(steps, draw(st.integers(1, steps)))
        o.update(slices=len(bounds) - 1, coarse_steps=draw(st.integers(1, int((bounds[1:] - bounds[:-1]).min()))))
    labelled = draw(st.integers(0, 2)) == 0
    if labelled:
        o["guidance"] = draw(st.sampled_from([0.0, 1.0, 2.5]))
        if o["guidance"] != 1.0 and draw(st.booleans()):
            o["guidance_rescale"] = 0.5
    if draw(st.integers(0, 4)) == 0:
        o.update(classifier=Classifier(), classifier_scale=draw(st.sampled_from([0.5, 2.0])))
    if draw(st.integers(0, 3)) == 0:
        o["backend_options"] = draw(st.sampled_from([{"max_batch": 1}, {"max_batch": 2}, {"max_batch": 3},
                                                     {"buckets": (4, 8)}, {"max_batch": 8, "buckets": (2, 8)}]))
    if draw(st.integers(0, 4)) == 0:
        o["cost"] = draw(st.sampled_from(["latency", "compute", {1: 1.0, 4: 2.0, 16: 6.0}]))
    return dict(kind=kind, pred=pred, labelled=labelled, opts=o, B=draw(st.integers(1, 3)),
                shape=draw(st.sampled_from([(2,), (1, 2), (2, 1, 1)])), seed=draw(st.integers(0, 2**16)),
                noise=draw(st.sampled_from(["seed", "none", "first", "generator", "generators", "noise"])))


#: options the sequential reference shares with the method (the trajectory itself)
SHARED = ("solver", "steps", "spacing", "eta", "corrector_snr", "corrector_steps", "guidance", "guidance_rescale",
          "clip_x0", "classifier", "classifier_scale", "backend_options")


def run(case, method=None, **extra):
    schedule = SCHEDULES[case["kind"]]()
    net = Mixture(schedule, case["pred"], case["labelled"])
    uncond = (lambda c: {**c, "labels": torch.full_like(c["labels"], 4)}) if case["labelled"] else None
    den = Denoiser(net, schedule, case["pred"], dtype=torch.float64, sample_shape=case["shape"], uncond_fn=uncond)
    opts = dict(case["opts"])
    if method is not None:
        opts = {k: v for k, v in opts.items() if k in SHARED}
        opts["method"] = method
    sampler = ParallelSampler(den, progress=False, **opts, **extra)
    B, s, form = case["B"], case["seed"], case["noise"]
    kw = {"seed": s} if form in ("seed", "first") else {}
    if form == "first":
        kw["first_sample"] = 5
    if form == "generator":
        kw["generator"] = torch.Generator().manual_seed(s)
    if form == "generators":
        kw["generator"] = [torch.Generator().manual_seed(s + i) for i in range(B)]
    if form == "noise":
        kw["noise"] = torch.randn((B, *case["shape"]), generator=torch.Generator().manual_seed(s),
                                  dtype=torch.float64)
    if case["labelled"]:
        kw["labels"] = torch.arange(B) % 5
    if "classifier" in opts:
        kw["y"] = torch.arange(B) % 3
    return sampler, sampler.sample(B, **kw), net


@fuzz(250)
@given(cases())
def test_every_accepted_combination_at_tol_zero_is_the_sequential_sample(case):
    try:
        _, ref, _ = run(case, method="sequential")
    except ValueError as e:                    # the solver refuses the grid, the solver its steps, ...
        assert re.match(r"(solver|steps|max_batch)\b", str(e)), e
        with pytest.raises(ValueError):
            run(case, tol=0.0)
        return
    sampler, res, net = run(case, tol=0.0)
    out, st, B = res.samples, res.stats, case["B"]
    assert out.shape == (B, *case["shape"]) and bool(torch.isfinite(out).all())
    # rounding; eps and score outputs on a flow grid's first point (sigma ~1e7) carry 1e7 x eps of float64
    bound = 1e-7 if case["kind"] == "flow" and case["pred"] in ("eps", "score") else ROUNDING
    delta = float((out - ref.samples).abs().max())
    assert delta <= bound, f"tol=0 is {delta:.3g} off the sequential sample"
    # the stats against the network's own counters (a call above max_batch runs as chunks; buckets pad rows)
    doubled = 2 if sampler.denoiser.guided else 1
    limit = case["opts"].get("backend_options", {}).get("max_batch")
    assert limit is None or net.widest <= limit, f"a call of {net.widest} network rows, max_batch {limit}"
    if "backend_options" not in case["opts"]:
        assert st.nfe_total * doubled == net.rows and st.rounds == net.calls, (st.nfe_total, st.rounds, net.rows,
                                                                              net.calls)
    assert st.rounds <= st.nfe_total and abs(st.nfe - st.nfe_total / B) < 1e-9
    assert len(st.sample_rounds) == len(st.converged) == B
    if st.method != "parareal_pipelined":      # pipelined Parareal reports its ticks there
        assert max(st.sample_rounds) <= st.iterations


# -- refusals ------------------------------------------------------------------------------------------------------
FIELDS = [f for f in SamplerConfig.__dataclass_fields__
          if f not in ("schedule", "prediction", "classifier", "coarse", "method", "steps")]
ARGUMENTS = set(FIELDS) | {"shape", "noise", "seed", "generator", "first_sample", "labels", "callback", "progress",
                           "classifier", "coarse", "max_batch", "buckets", "solver_options", "model"}
ODD = [0, -1, 1, 2, 2**70, 1.5, math.nan, math.inf, True, None, "auto", "x", np.int64(2), np.float64(0.5), [1],
       torch.tensor(1), torch.float16, torch.int32, 1e300, "picard", "final", "data", "karras", "meta", 0.0, 1.0]
CALL_ODD = {"seed": [-1, 2**64, 1.5, "1", True], "first_sample": [-1, 2**64, 1.5, True, 3],
            "shape": [0, (0, 2), (2, 3), (2,), 2.0, True, (2, 2.0)],
            "noise": [torch.zeros(2, 3), torch.zeros(2), torch.full((2, 2), math.nan), torch.zeros(2, 2).long()],
            "generator": [[torch.Generator()] * 3, [], [1], "g"], "labels": [torch.zeros(2)],
            "callback": [3], "progress": [1, "yes"]}


@fuzz(300)
@given(st.sampled_from(["sequential", "picard", "parareal", "parareal_pipelined", "staggered", "auto"]),
       st.sampled_from([1, 3, 8]),
       st.dictionaries(st.sampled_from(FIELDS), st.sampled_from(ODD), max_size=3),
       st.dictionaries(st.sampled_from(sorted(CALL_ODD)), st.integers(0, 6), max_size=2))
def test_a_refused_combination_names_the_argument(method, steps, options, call):
    call = {k: CALL_ODD[k][i % len(CALL_ODD[k])] for k, i in call.items()}
    B = call.pop("shape", 2)
    try:
        ParallelSampler("gmm", method=method, steps=steps, progress=False, **options).sample(B, **call)
    except (ValueError, TypeError) as e:
        names = {n.strip().split("[")[0] for n in str(e).split(":", 1)[0].split(",")}
        assert names & ARGUMENTS, f"{type(e).__name__} names no argument: {e}"


# -- float32 state -------------------------------------------------------------------------------------------------
def _gaussian(schedule, prediction):
    """The exact network of N(1.5, 0.5^2) data (float64 inside: the state's precision is what is measured)."""
    def network(x_in, t):
        sigma = schedule.sigma_of_model_time(t.double()).reshape(-1, *[1] * (x_in.ndim - 1))
        a = schedule.input_scale(sigma)
        x = x_in.double() / a
        return from_x0(prediction, 1.5 + 0.25 / (0.25 + sigma**2) * (x - 1.5), x, sigma, a, schedule)
    return Denoiser(network, schedule, prediction)


def _zero_snr():
    s = torch.cumprod(1 - betas_for("scaled_linear", 1000, 0.00085, 0.012), 0).sqrt()
    ac = ((s - s[-1]) * s[0] / (s[0] - s[-1])) ** 2
    ac[-1] = 2.0**-24
    return DiscreteVPSchedule(ac)


GRIDS = {"flow": (lambda: _gaussian(FlowSchedule(shift=3.0, time_scale=1000.0), "flow"), 28),
         "zero_snr": (lambda: _gaussian(_zero_snr(), "v"), 30)}


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("solver", sorted(s for s in SOLVERS if s != "langevin"))
def test_a_float32_state_is_within_the_bound_of_float64_for_every_solver(grid, solver):
    """README (Precision): a float32 state is within 1e-5 of float64 on flow and zero-SNR grids; every step must be
    taken in a cancellation-free next-state form, not ``x + dx`` (UniPC, DEIS, LMS and single-step DPM++ were 1e-2
    off on the flow grid, PLMS 7e-5 on zero-SNR)."""
    make, steps = GRIDS[grid]
    x_T = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = {}
    for dtype in (torch.float32, torch.float64):
        try:
            sampler = ParallelSampler(make(), solver=solver, steps=steps, method="sequential", state_dtype=dtype,
                                      progress=False)
        except ValueError as e:                   # a step linear in sigma refuses the flow grid's first step
            assert str(e).startswith(("solver", "steps")), e
            pytest.skip(str(e)[:60])
        kw = {"seed": 0} if sampler.draws_step_noise else {}
        out[dtype] = sampler.sample(noise=x_T.to(dtype), **kw).samples.double()
    err = float((out[torch.float32] - out[torch.float64]).abs().max())
    assert err <= 1e-5, err


# -- batch splits --------------------------------------------------------------------------------------------------
@fuzz(80)
@given(cases())
def test_a_seeded_batch_is_its_samples_drawn_one_by_one(case):
    """README: noise depends on (seed, sample index, step) only, so splitting a batch with first_sample= gives the
    same samples, bit for bit on the float64 mixtures, for methods that decide per sample (not pipelined Parareal
    nor a shared window, which decide for the batch; guidance_rescale's per-row std rounds by batch size)."""
    o = case["opts"]
    if (o["method"] in ("parareal_pipelined", "auto") or o.get("shared_window") or o.get("window") == "auto"
            or "guidance_rescale" in o):
        return
    case = dict(case, noise="seed")
    try:
        _, whole, _ = run(case)
    except ValueError:
        return
    parts = []
    for i in range(case["B"]):
        schedule = SCHEDULES[case["kind"]]()
        uncond = (lambda c: {**c, "labels": torch.full_like(c["labels"], 4)}) if case["labelled"] else None
        den = Denoiser(Mixture(schedule, case["pred"], case["labelled"]), schedule, case["pred"],
                       dtype=torch.float64, sample_shape=case["shape"], uncond_fn=uncond)
        kw = {"seed": case["seed"], "first_sample": i}
        if case["labelled"]:
            kw["labels"] = torch.tensor([i % 5])
        if "classifier" in o:
            kw["y"] = torch.tensor([i % 3])
        parts.append(ParallelSampler(den, progress=False, **o).sample(1, **kw).samples)
    assert torch.equal(torch.cat(parts), whole.samples)
