"""Input-validation branches no other test reached (from a coverage run of the suite): each bad input, given through
the public entry point a user would call, ends in the right exception type whose message names the argument; the
few non-error branches (fallbacks, delegations) are checked against an independent expectation."""

import io
import json
import math

import numpy as np
import pytest
import torch

from paratime import (ContinuousVPSchedule, Denoiser, DiscreteVPSchedule, EDMSchedule, NoiseSchedule,
                      ParallelSampler, TimeGrid, VESchedule, make_solver)
import paratime.models
from paratime.schedules import FlowSchedule, karras_sigmas
from paratime.solvers import TCD, LangevinCorrected

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one intra-op thread (conftest)


def _gmm(**kw):
    return ParallelSampler("gmm", steps=4, progress=False, **kw)


def _raw(x, t, **cond):                                # a raw eps-network: predicts no noise
    return torch.zeros_like(x)


def _raw_sampler(**kw):
    return ParallelSampler(_raw, schedule=VESchedule(), prediction="eps", steps=2, progress=False, **kw)


def _raises(call, error, name):
    """``call()`` raises ``error`` whose message starts with ``name:`` (the project's "argument: problem" form)."""
    with pytest.raises(error) as info:
        call()
    assert str(info.value).startswith(f"{name}:"), str(info.value)


def _karras(steps, lo, hi, rho=7.0):
    """EDM's grid written out from the paper's formula (eq. 5), independent of paratime's helper."""
    ramp = [i / (steps - 1) for i in range(steps)] if steps > 1 else [0.0]
    return [(hi ** (1 / rho) + r * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for r in ramp] + [0.0]


# -- config.py, denoiser.py, models.py, sampler.py: options of ParallelSampler / SamplerConfig / Denoiser ----------
class _Classifier(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros(x.shape[0], 3)


SAMPLER_CASES = [
    ("device=3", lambda: _gmm(device=3), TypeError, "device"),
    ("device=mps", lambda: _gmm(device="mps"), ValueError, "device"),
    ("device=xpu", lambda: _gmm(device="xpu"), ValueError, "device"),
    ("schedule='ve'", lambda: _gmm(schedule="ve"), TypeError, "schedule"),
    ("prediction=magic", lambda: _gmm(prediction="magic"), ValueError, "prediction"),
    ("classifier=3", lambda: _gmm(classifier=3), TypeError, "classifier"),
    ("classifier_scale, no classifier", lambda: _gmm(classifier_scale=1.0), ValueError, "classifier_scale"),
    ("Denoiser + schedule", lambda: ParallelSampler(Denoiser(_raw, VESchedule(), "eps"), schedule=VESchedule()),
     ValueError, "schedule, prediction"),
    ("classifier without y", lambda: ParallelSampler(_raw, schedule=VESchedule(), prediction="eps", steps=2,
                                                     classifier=_Classifier(), classifier_scale=1.0,
                                                     progress=False).sample((2, 2)), ValueError, "y"),
    ("Denoiser dtype='half'", lambda: Denoiser(_raw, VESchedule(), "eps", dtype="half"), TypeError, "dtype"),
    ("Denoiser guidance_rescale=2", lambda: Denoiser(_raw, VESchedule(), "eps", guidance_rescale=2.0), ValueError,
     "guidance_rescale"),
    ("Denoiser classifier=3", lambda: Denoiser(_raw, VESchedule(), "eps", classifier=3), TypeError, "classifier"),
    # A raw network takes any conditioning (the mixtures take none: named by their own rule, below).
    ("cond on another device", lambda: _raw_sampler().sample((2, 2), labels=torch.zeros(2, device="meta")),
     ValueError, "labels"),
    ("tol with sequential", lambda: _gmm(method="sequential", tol=0.5), ValueError, "tol"),
    ("staggered with one core", lambda: _gmm(method="staggered", window=1), ValueError, "window"),
    ("triton kernels on a float64 state", lambda: _gmm(kernels="triton"), ValueError, "kernels"),
    ("progress=3", lambda: ParallelSampler("gmm", steps=4, progress=3), TypeError, "progress"),
    ("sample(progress='yes')", lambda: _gmm().sample(2, progress="yes"), TypeError, "progress"),
    ("log_likelihood(progress=1)", lambda: _gmm().log_likelihood(torch.zeros(2, 2), progress=1), TypeError, "progress"),
    ("gmm with labels", lambda: _gmm().sample(4, labels=torch.zeros(4, dtype=torch.long)), ValueError, "labels"),
    ("guidance on gmm", lambda: _gmm(guidance=2.0).sample(4), ValueError, "guidance"),
    ("guidance on the policy", lambda: ParallelSampler("policy", steps=2, guidance=2.0, progress=False).sample(
        1, obs=torch.zeros(1, 12)), ValueError, "guidance"),
    ("decode without a decoder", lambda: _gmm().decode(torch.zeros(2, 2)), ValueError, "decoder"),
    ("likelihood with staggered", lambda: _gmm().log_likelihood(torch.zeros(2, 2), method="staggered"), ValueError,
     "method"),
    ("likelihood on a staggered sampler", lambda: _gmm(method="staggered", window=2).log_likelihood(torch.zeros(2, 2)),
     ValueError, "method"),
    ("nested cond on another device",
     lambda: _raw_sampler(guidance=2.0).sample((2, 2), uncond={"e": torch.zeros(2, device="meta")}), ValueError,
     "uncond.e"),
    ("uncond without guidance", lambda: _raw_sampler().sample((2, 2), uncond={"e": torch.zeros(2)}), ValueError,
     "uncond"),
    ("uncond not a dict", lambda: _raw_sampler(guidance=2.0).sample((2, 2), uncond=[1]), TypeError, "uncond"),
    ("y without a classifier", lambda: _raw_sampler().sample((2, 2), y=torch.zeros(2, dtype=torch.long)), ValueError,
     "y"),
    ("classifier guidance without y", lambda: _raw_sampler(classifier=lambda x, t: x, classifier_scale=1.0).sample(
        (2, 2)), ValueError, "y"),
    ("guidance_rescale with guidance 1", lambda: _raw_sampler(guidance=1.0, guidance_rescale=0.5), ValueError,
     "guidance_rescale"),
    ("eta on the consistency solver", lambda: _raw_sampler(solver="consistency", eta=0.5), ValueError, "eta"),
    ("solver not a name", lambda: _raw_sampler(solver=["ddim"]), TypeError, "solver"),
    ("backend not a name", lambda: _gmm(backend=["local"]), TypeError, "backend"),
    ("backend_options not a dict", lambda: _gmm(backend_options=[1]), TypeError, "backend_options"),
    ("cost table of strings", lambda: _gmm(cost={1: "a"}), TypeError, "cost"),
    ("cost callable of two arguments", lambda: _gmm(cost=lambda a, b: 1.0), TypeError, "cost"),
    ("decode batch 0", lambda: _gmm(decoder=lambda x: x).decode(torch.zeros(2, 2), batch=0), ValueError, "batch"),
    ("callback not callable", lambda: _gmm().sample(2, callback=3), TypeError, "callback"),
    ("likelihood seed -1", lambda: _gmm().log_likelihood(torch.zeros(2, 2), seed=-1), ValueError, "seed"),
]


@pytest.mark.parametrize("call, error, name", [c[1:] for c in SAMPLER_CASES], ids=[c[0] for c in SAMPLER_CASES])
def test_sampler_option_is_a_clear_error(call, error, name):
    _raises(call, error, name)


@pytest.mark.parametrize("solver", ["plms", "dpmpp_2m", "dpmpp_3m"])
def test_pipelined_parareal_refuses_a_multistep_solver_when_built(solver):
    # When the sampler is built, not at its first sample, naming the solver given (it once said dpmpp_2m for all).
    with pytest.raises(ValueError, match=f"^solver: .*'{solver}' reads the previous points' D"):
        _gmm(method="parareal_pipelined", solver=solver)


@pytest.mark.parametrize("rng", [(1.0, -1.0), (0.0, math.inf), (0.0,), "01"])
def test_declared_scale_refuses_a_bad_data_range(rng):
    from paratime.config import declared_scale

    net = torch.nn.Identity()
    net.data_range = rng
    _raises(lambda: declared_scale(Denoiser(net, VESchedule(), "x0")), ValueError, "data_range")


def test_declared_scale_reads_a_good_data_range():
    from paratime.config import declared_scale

    net = torch.nn.Identity()
    net.data_range = (-3, 2)
    assert declared_scale(Denoiser(net, VESchedule(), "x0")) == 3.0


def test_unknown_prediction_in_the_scalings_is_named():
    from paratime.denoiser import from_x0, to_x0

    s = torch.ones(1)
    for fn in (to_x0, from_x0):
        _raises(lambda: fn("magic", s, s, s, s, VESchedule()), ValueError, "prediction")


def test_model_factory_builds_the_named_model():
    from paratime.models import load_model, model_factory

    made, direct = model_factory("gmm")(), load_model("gmm")
    assert isinstance(made, Denoiser)
    x, s = torch.randn(3, 2), torch.full((3,), 0.7, dtype=torch.float64)
    t = made.schedule.model_time(s)
    torch.testing.assert_close(made(x.double(), s, t), direct(x.double(), s, t))


def test_read_weights_names_the_argument(tmp_path):
    from safetensors.torch import save_file

    from paratime.models import read_weights

    _raises(lambda: read_weights(tmp_path / "none.safetensors", argument="weights"), FileNotFoundError, "weights")
    bad_json, not_dict = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad_json), metadata={"paratime": "{not json"})
    save_file({"w": torch.zeros(2)}, str(not_dict), metadata={"paratime": json.dumps([1, 2])})
    for p in (bad_json, not_dict):
        _raises(lambda: read_weights(p, argument="weights"), ValueError, "weights")


def test_state_device_names_the_device():
    from paratime.models import state_device

    den = Denoiser(torch.nn.Linear(2, 2, device="meta"), VESchedule(), "eps")
    _raises(lambda: state_device(den, object()), ValueError, "device")
    _raises(lambda: state_device(den, "cpu"), ValueError, "device")
    assert state_device(den) == torch.device("meta")


def test_state_device_compares_the_device_index(monkeypatch):
    """A network on ``cuda:0`` (a stand-in parameter: no GPU needed) with ``device="cuda:1"`` is refused (only the
    type was compared), ``device="cuda"`` is the network's own ``cuda:0`` (not the current device), and ``cpu:0``
    is a CPU network's device."""
    from types import SimpleNamespace

    from paratime.models import state_device

    net = torch.nn.Linear(2, 2)
    den = Denoiser(net, VESchedule(), "eps")
    assert state_device(den, "cpu:0") == torch.device("cpu:0")
    monkeypatch.setattr(net, "parameters", lambda: iter([SimpleNamespace(device=torch.device("cuda", 0))]))
    with pytest.raises(ValueError, match="device: the network is on cuda:0 but device=cuda:1; move one of them"):
        state_device(den, "cuda:1")
    assert state_device(den, "cuda") == torch.device("cuda", 0)
    assert state_device(den, "cuda:0") == torch.device("cuda", 0)


# -- cost.py ------------------------------------------------------------------------------------------------------
def test_cost_curve_and_make_cost_errors():
    from paratime.cost import CostCurve, make_cost, measure_rows

    _raises(lambda: CostCurve((), ()), ValueError, "cost")
    _raises(lambda: CostCurve((1, 2), (1.0,)), ValueError, "cost")
    _raises(lambda: make_cost("auto"), ValueError, "cost")
    _raises(lambda: make_cost(lambda r: "slow"), TypeError, "cost")
    _raises(lambda: make_cost(3), TypeError, "cost")
    _raises(lambda: _gmm(cost=3), TypeError, "cost")
    for repeats in (0, True, 1.5):
        _raises(lambda: measure_rows(lambda r: None, "cpu", repeats=repeats), ValueError, "repeats")


def test_cost_curve_values_off_the_table():
    from paratime.cost import CostCurve, make_cost

    one = CostCurve((1,), (2.5,))
    assert one(0) == 0.0 and one(-3) == 0.0             # no rows cost nothing
    assert one(1) == one(7) == 2.5                       # one point: flat, no slope to follow
    assert make_cost(one) is one                          # a curve passes through
    # A callable spec and a CostCurve instance are accepted by the sampler's option check.
    assert _gmm(cost=one).config.cost is one
    linear = lambda r: r                                                        # noqa: E731
    assert _gmm(cost=linear).config.cost is linear


def test_measure_cost_caches_a_network_that_is_not_weak_referenceable():
    from paratime.cost import cached_cost, measure_cost

    net = (1, 2)                                          # a tuple: weakref.ref raises TypeError
    calls = []
    curve = measure_cost(net, calls.append, "cpu", torch.float32, (2,), rows=(1, 2), repeats=1)
    assert curve.rows == (1, 2) and len(calls) == 6       # a warm-up, then an untimed and a timed call per row count
    assert cached_cost(net, "cpu", torch.float32, (2,), (1, 2)) is curve
    again = measure_cost(net, calls.append, "cpu", torch.float32, (2,), rows=(1, 2), repeats=1)
    assert again is curve and len(calls) == 6             # cached: no new calls


# -- schedules.py -------------------------------------------------------------------------------------------------
def _grid(sig, times=None, scales=None):
    sig = torch.tensor(sig, dtype=torch.float64)
    n = sig.numel()
    return TimeGrid(sig, torch.zeros(n) if times is None else times, torch.ones(n) if scales is None else scales)


class _RangeOnly(NoiseSchedule):
    """A user schedule that gives only its sigma range: the base class's Karras grid serves it."""

    @property
    def sigma_range(self):
        return 0.1, 10.0


SCHEDULE_CASES = [
    ("grid of 0 steps", lambda: _grid([1.0]), ValueError, "steps"),
    ("model_times shape", lambda: _grid([2.0, 1.0], times=torch.zeros(3)), ValueError, "model_times"),
    ("frame_scales shape", lambda: _grid([2.0, 1.0], scales=torch.ones(1)), ValueError, "frame_scales"),
    ("increasing sigmas", lambda: _grid([1.0, 2.0]), ValueError, "sigmas"),
    ("negative sigmas", lambda: _grid([-1.0, -2.0]), ValueError, "sigmas"),
    ("infinite sigmas", lambda: _grid([math.inf, 1.0]), ValueError, "sigmas"),
    ("karras steps=0", lambda: karras_sigmas(0, 0.1, 1.0), ValueError, "steps"),
    ("grid spacing=odd", lambda: VESchedule().grid(3, "odd"), ValueError, "spacing"),
    ("base grid spacing", lambda: _RangeOnly().grid(3, "linspace"), ValueError, "spacing"),
    ("final_alpha_cumprod=0", lambda: DiscreteVPSchedule(torch.tensor([0.9, 0.5]), final_alpha_cumprod=0.0),
     ValueError, "final_alpha_cumprod"),
    ("discrete timesteps karras", lambda: DiscreteVPSchedule.from_betas().timesteps(3, "karras"), ValueError,
     "spacing"),
    ("discrete grid steps=0", lambda: DiscreteVPSchedule.from_betas().grid(0), ValueError, "steps"),
    ("continuous VP schedule=magic", lambda: ContinuousVPSchedule(schedule="magic"), ValueError, "schedule"),
    ("continuous VP eps=0", lambda: ContinuousVPSchedule(eps=0.0), ValueError, "eps"),
    ("continuous VP spacing", lambda: ContinuousVPSchedule().grid(3, "trailing"), ValueError, "spacing"),
    ("VE sigma_min > sigma_max", lambda: VESchedule(sigma_min=2.0, sigma_max=1.0), ValueError, "sigma_min, sigma_max"),
    ("VE spacing", lambda: VESchedule().grid(3, "leading"), ValueError, "spacing"),
    ("EDM sigma_data=0", lambda: EDMSchedule(sigma_data=0.0), ValueError, "sigma_data"),
    ("flow spacing", lambda: FlowSchedule().grid(3, "trailing"), ValueError, "spacing"),
]


@pytest.mark.parametrize("call, error, name", [c[1:] for c in SCHEDULE_CASES], ids=[c[0] for c in SCHEDULE_CASES])
def test_schedule_input_is_a_clear_error(call, error, name):
    _raises(call, error, name)


def test_base_schedule_has_no_sigma_range():
    with pytest.raises(NotImplementedError):
        NoiseSchedule().sigma_range


@pytest.mark.parametrize("schedule", [_RangeOnly(), VESchedule(), ContinuousVPSchedule(), FlowSchedule()],
                         ids=["user", "ve", "continuous_vp", "flow"])
def test_karras_spacing_follows_the_paper(schedule):
    lo, hi = schedule.sigma_range
    grid = schedule.grid(5, "karras")
    torch.testing.assert_close(grid.sigmas, torch.tensor(_karras(5, lo, hi), dtype=torch.float64))


def test_continuous_vp_prior_std_is_the_vp_marginal():
    sigma = torch.tensor([0.0, 0.75, 3.0], dtype=torch.float64)
    # VP: x = sqrt(alpha_bar) (x0 + sigma eps); at sigma_max the VE-frame prior is N(0, 1 + sigma^2).
    torch.testing.assert_close(ContinuousVPSchedule().prior_std(sigma), torch.tensor([1.0, 1.25, math.sqrt(10)],
                                                                                    dtype=torch.float64))


# -- noise.py -----------------------------------------------------------------------------------------------------
def test_noise_and_generator_errors():
    from paratime.noise import LazyNoise

    raw = ParallelSampler(_raw, schedule=VESchedule(), prediction="eps", steps=2, progress=False)
    _raises(lambda: raw.sample(4), ValueError, "shape")                       # no known sample shape
    _raises(lambda: _gmm().sample((3, 2), noise=torch.randn(4, 2)), ValueError, "shape")
    gens = [torch.Generator().manual_seed(s) for s in range(2)]
    _raises(lambda: _gmm().sample(4, generator=gens), ValueError, "generator")
    # A generator draws all the noise: a seed or a first_sample beside it would change nothing, so they are refused.
    gen = torch.Generator().manual_seed(5)
    _raises(lambda: _gmm().sample(4, seed=0, generator=gen), ValueError, "seed")
    _raises(lambda: _gmm().sample(4, first_sample=8, generator=gen), ValueError, "first_sample")
    # Without one, seed=None is seed 0.
    torch.testing.assert_close(_gmm().sample(4).samples, _gmm().sample(4, seed=0).samples, rtol=0, atol=0)
    # Noise given and a deterministic solver: nothing is drawn, so seed, first_sample and generator are refused ...
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    assert not _gmm().draws_step_noise
    _raises(lambda: _gmm().sample(noise=z, seed=3), ValueError, "seed")
    _raises(lambda: _gmm().sample(noise=z, first_sample=4), ValueError, "first_sample")
    _raises(lambda: _gmm().sample(noise=z, generator=gen), ValueError, "generator")
    # ... while with step noise (a stochastic solver, or the Langevin corrector) they draw it: other seeds, other bits.
    for kw in (dict(solver="ddpm"), dict(corrector_snr=0.1)):
        s = _gmm(**kw)
        assert s.draws_step_noise
        a, b = s.sample(noise=z, seed=3).samples, s.sample(noise=z, seed=4).samples
        assert not torch.equal(a, b), kw
        torch.testing.assert_close(s.sample(noise=z, seed=3).samples, a, rtol=0, atol=0)
    lazy = LazyNoise(0, 0, 0, 3, 2, (2,), torch.float32, torch.device("cpu"))
    with pytest.raises(TypeError, match="noise\\[i, b\\]"):
        lazy[0]


def test_a_list_of_one_generator_is_that_generator():
    # diffusers' randn_tensor treats [g] as g: the same draws, so the same samples.
    one = _gmm(solver="ddpm").sample(3, generator=[torch.Generator().manual_seed(5)]).samples
    plain = _gmm(solver="ddpm").sample(3, generator=torch.Generator().manual_seed(5)).samples
    other = _gmm(solver="ddpm").sample(3, generator=torch.Generator().manual_seed(6)).samples
    torch.testing.assert_close(one, plain, rtol=0, atol=0)
    assert not torch.equal(one, other)


# -- images.py ----------------------------------------------------------------------------------------------------
def test_image_helpers_name_their_argument(tmp_path):
    from paratime.images import image_grid, scatter_image, write_png

    _raises(lambda: write_png(tmp_path / "a.png", np.zeros((2, 2, 4))), ValueError, "pixels")
    _raises(lambda: image_grid(torch.zeros(1, 2, 4, 4)), ValueError, "images")
    _raises(lambda: scatter_image(torch.zeros(3, 3)), ValueError, "points")


def test_scatter_image_draws_the_reference_in_grey():
    from paratime.images import scatter_image

    grey, blue = (190, 190, 190), (31, 119, 180)
    img = scatter_image(torch.tensor([[1.0, 1.0]]), size=64, extent=2.0, reference=torch.tensor([[-1.0, -1.0]]))
    colours = {tuple(c) for c in img.reshape(-1, 3).tolist()}
    assert grey in colours and blue in colours
    # The reference point (-1, -1) of extent 2 lies in the lower-left quarter, the sample in the upper-right.
    ys, xs = np.nonzero((img == grey).all(-1))
    assert xs.max() < 32 and ys.min() >= 32
    without = scatter_image(torch.tensor([[1.0, 1.0]]), size=64, extent=2.0)
    assert grey not in {tuple(c) for c in without.reshape(-1, 3).tolist()}


# -- results.py ---------------------------------------------------------------------------------------------------
def test_record_rounds_closes_the_last_round_and_skips_empty_ones():
    from paratime.cost import CostCurve
    from paratime.results import SampleStats, record_rounds

    stats = SampleStats(method="picard", solver="ddim", steps=4, backend="local", workers=1, window=4, tol=0.1)
    # Calls of 3, 2 and 4 rows; a report after call 1, a report with no call, and call 3 after the last mark.
    record_rounds(stats, [3, 2, 4], [(1, 0.5), (1, 0.6), (2, 1.0)], 2.0, CostCurve((1, 8), (1.0, 8.0)), 1)
    assert stats.round_device_rows == [3, 2, 4]                # the empty round left out, the unmarked call a round
    assert stats.round_wall_s == pytest.approx([0.5, 0.5, 1.0])
    assert stats.sce == pytest.approx(9.0)                     # c(r) = r on this table: the rows' sum


# -- progress.py --------------------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_is_tqdm(monkeypatch):
    from tqdm.auto import tqdm

    from paratime.progress import RoundProgress, progress_bar

    stream = _Terminal()
    bar = progress_bar(10, "demo", stream=stream)
    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.close()
    assert "demo" in stream.getvalue()
    monkeypatch.setattr("sys.stderr", _Terminal())
    with RoundProgress(4, "rounds", show=True) as progress:
        assert isinstance(progress.bar, tqdm)
    assert progress.bar.disable or progress.bar.n == 0      # closed without error


# -- solvers.py ---------------------------------------------------------------------------------------------------
SOLVER_CASES = [
    ("ddim clip=0", lambda: make_solver("ddim", clip=0), ValueError, "clip"),
    ("ddim clip='1'", lambda: make_solver("ddim", clip="1"), ValueError, "clip"),
    ("dpmpp order=4", lambda: make_solver("dpmpp", order=4), ValueError, "order"),
    ("dpmpp solver_type", lambda: make_solver("dpmpp", solver_type="rk4"), ValueError, "solver_type"),
    ("lms order=5", lambda: make_solver("lms", order=5), ValueError, "order"),
    ("unipc order=4", lambda: make_solver("unipc", order=4), ValueError, "order"),
    ("deis order=4", lambda: make_solver("deis", order=4), ValueError, "order"),
    ("singlestep order=4", lambda: make_solver("dpmpp_singlestep", order=4), ValueError, "order"),
    ("singlestep solver_type", lambda: make_solver("dpmpp_singlestep", solver_type="rk4"), ValueError,
     "solver_type"),
    # TCD and the Langevin corrector are built by the diffusers integration and the config, not looked up by name.
    ("tcd without train_sigmas", lambda: TCD(), ValueError, "train_sigmas"),
    ("langevin without base", lambda: LangevinCorrected(), ValueError, "solver"),
    ("langevin snr=0", lambda: LangevinCorrected(base=make_solver("ddim"), snr=0.0), ValueError, "corrector_snr"),
    ("langevin steps=0", lambda: LangevinCorrected(base=make_solver("ddim"), corrector_steps=0), ValueError,
     "corrector_steps"),
    ("instance + options", lambda: make_solver(make_solver("ddim"), eta=0.5), ValueError, "solver_options"),
]


@pytest.mark.parametrize("call, error, name", [c[1:] for c in SOLVER_CASES], ids=[c[0] for c in SOLVER_CASES])
def test_solver_option_is_a_clear_error(call, error, name):
    _raises(call, error, name)


def test_ddim_clip_keeps_the_samples_in_range():
    # A model whose x0 prediction is far outside [-1, 1]: DDIM's clip_sample puts its final x0 term in range, and
    # at the last step to sigma = 0 the sample is that x0 (a fixed 4.0 clipped to 1.0).
    net = lambda x, t: torch.full_like(x, 4.0)                                  # noqa: E731
    for method in ("sequential", "picard"):
        s = ParallelSampler(net, solver=make_solver("ddim", clip=1.0), schedule=VESchedule(), prediction="x0",
                            steps=3, method=method, progress=False)
        torch.testing.assert_close(s.sample((2, 2)).samples, torch.ones(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_clip_increment_is_next_state_minus_x(eta):
    # increment() and next_state() are two forms of one step: x + dx = x_{i+1}, clipping included.
    solver = make_solver("ddim", eta=eta, clip=1.0)
    sigmas = VESchedule().grid(4).sigmas
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, generator=g, dtype=torch.float64) * 5
    d = torch.randn(3, 2, generator=g, dtype=torch.float64) * 3                   # far outside [-1, 1]: clipped
    noise = torch.randn(3, 2, generator=g, dtype=torch.float64)            # z of each row's step
    i, b = torch.tensor([0, 1, 2]), torch.arange(3)
    args = (x, i, b, d, None, noise, sigmas, None)
    torch.testing.assert_close(x + solver.increment(*args), solver.next_state(*args))


@pytest.mark.parametrize("name, options", [("deis", {"order": 1}), ("dpmpp_singlestep", {"order": 1}),
                                           ("dpmpp_singlestep", {"order": 3, "solver_type": "midpoint"}),
                                           ("dpmpp_singlestep", {"order": 3, "solver_type": "heun"})],
                         ids=["deis-1", "singlestep-1", "singlestep-3-midpoint", "singlestep-3-heun"])
def test_multistep_orders_solve_a_constant_denoiser_exactly(name, options):
    # D(x, sigma) = c: the probability-flow ODE dx/dsigma = (x - c) / sigma has x(sigma) = c + (sigma / sigma_T)
    # (x_T - c), so every consistent solver lands on c at sigma = 0 (the multistep weights on D must sum to 1).
    c = torch.tensor([0.3, -1.2], dtype=torch.float64)
    net = lambda x, t: c.expand_as(x).to(x)                                      # noqa: E731
    s = ParallelSampler(net, solver=make_solver(name, **options), schedule=VESchedule(), prediction="x0", steps=6,
                        method="sequential", progress=False)
    torch.testing.assert_close(s.sample((3, 2)).samples, c.expand(3, 2), rtol=1e-9, atol=1e-9)


def test_singlestep_first_order_is_first_order_everywhere():
    assert make_solver("dpmpp_singlestep", order=1).orders(5) == [1] * 5


# -- methods/likelihood.py ----------------------------------------------------------------------------------------
def test_likelihood_errors_name_the_argument():
    from paratime.methods import likelihood as lk

    gmm = _gmm()
    fine = lambda x, s_from, s_to: x                                            # noqa: E731
    _raises(lambda: _gmm(method="parareal", coarse=fine).log_likelihood(torch.zeros(2, 2)), ValueError, "coarse")
    _raises(lambda: lk.flow_denoiser(gmm.denoiser, (2,), "trace"), ValueError, "divergence")
    _raises(lambda: lk.likelihood_grid(VESchedule(), 0), ValueError, "steps")
    _raises(lambda: lk.flow_problem(VESchedule().grid(3), "ddpm", None, torch.float64, "cpu"), ValueError, "solver")
    _raises(lambda: lk.make_probes(torch.randn(2, 1, 2), "sobol"), ValueError, "probe")
    flow = lk.flow_denoiser(gmm.denoiser, (2,), "hutchinson")
    s = torch.ones(2, dtype=torch.float64)
    _raises(lambda: flow(torch.zeros(2, 3, dtype=torch.float64), s, s), ValueError, lk.PROBE_KEY)
    assert not flow.fusable                        # D~ is no linear map of a network output: never fused


def test_auto_method_likelihood_runs_picard_and_matches_sequential():
    x = torch.tensor([[0.5, -0.25], [1.0, 2.0]])
    auto = _gmm(method="auto").log_likelihood(x)
    seq = _gmm(method="sequential").log_likelihood(x)
    assert auto.stats.method == "picard"
    torch.testing.assert_close(auto.nats, seq.nats, rtol=1e-6, atol=1e-6)


def test_likelihood_grid_keeps_a_grid_that_ends_above_zero():
    from paratime.methods.likelihood import likelihood_grid

    # diffusers' set_alpha_to_one=False: the final alpha is alphas_cumprod[0] = 1 - beta_0, so the discrete grid's
    # last point is sigma = sqrt(beta_0 / (1 - beta_0)) > 0, not 0, and the likelihood keeps the grid as it is.
    beta0 = 1e-4
    schedule = DiscreteVPSchedule.from_betas(num_train_timesteps=50, beta_start=beta0, final_alpha_cumprod=1 - beta0)
    grid = likelihood_grid(schedule, 5)
    assert grid.steps == 5 and bool((grid.sigmas > 0).all())
    torch.testing.assert_close(grid.sigmas[-1], torch.tensor(math.sqrt(beta0 / (1 - beta0)), dtype=torch.float64))


# -- methods/parareal.py ------------------------------------------------------------------------------------------
def test_pipelined_parareal_with_a_user_coarse_propagator_matches_sequential():
    calls = []

    def coarse(x, sigma_from, sigma_to):                  # one probability-flow Euler step of a null model
        calls.append(x.shape[0])
        return x * (sigma_to / sigma_from)[:, None]

    seq = _gmm(method="sequential").sample(3, seed=1).samples
    par = _gmm(method="parareal_pipelined", slices=2, coarse=coarse, tol=0.0).sample(3, seed=1)
    assert calls, "the user's coarse propagator was never called"
    torch.testing.assert_close(par.samples, seq, rtol=1e-9, atol=1e-9)


# -- tasks/reach.py -----------------------------------------------------------------------------------------------
REACH_CASES = [
    ("horizon=0", lambda: _reach_config(horizon=0), ValueError, "horizon"),
    ("max_steps=True", lambda: _reach_config(max_steps=True), TypeError, "max_steps"),
    ("goal_tol=0", lambda: _reach_config(goal_tol=0.0), ValueError, "goal_tol"),
    ("margin='1'", lambda: _reach_config(margin="1"), TypeError, "margin"),
    ("first=-1", lambda: _reach("make_episodes")(2, first=-1), ValueError, "first"),
    ("seed=1.5", lambda: _reach("make_episodes")(2, seed=1.5), TypeError, "seed"),
    ("seed=True", lambda: _reach("make_episodes")(2, seed=True), TypeError, "seed"),
    ("noise=-1", lambda: _reach("make_dataset")(1, noise=-1.0), ValueError, "noise"),
    ("noise=nan", lambda: _reach("make_dataset")(1, noise=math.nan), ValueError, "noise"),
]


def _reach(name):
    from paratime.tasks import reach

    return getattr(reach, name)


def _reach_config(**kw):
    return _reach("ReachConfig")(**kw)


@pytest.mark.parametrize("call, error, name", [c[1:] for c in REACH_CASES], ids=[c[0] for c in REACH_CASES])
def test_reach_input_is_a_clear_error(call, error, name):
    _raises(call, error, name)


# -- zoo ----------------------------------------------------------------------------------------------------------
def _policy_sample(**cond):
    return ParallelSampler("policy", steps=2, method="sequential", progress=False).sample(2, **cond)


ZOO_CASES = [
    ("gmm 1-D means", lambda: _zoo_gmm([0.0, 1.0], 1.0), ValueError, "means, stds, weights"),
    ("gmm std=0", lambda: _zoo_gmm([[0.0, 0.0]], 0.0), ValueError, "means, stds, weights"),
    ("gmm weight<0", lambda: _zoo_gmm([[0.0, 0.0], [1.0, 1.0]], 1.0, [1.0, -1.0]), ValueError,
     "means, stds, weights"),
    ("digits labels (2, 1)", lambda: ParallelSampler("digits", steps=2, method="sequential", progress=False)
     .sample(2, labels=torch.zeros(2, 1, dtype=torch.long)), ValueError, "labels"),
    ("policy no obs", lambda: _policy_sample(), ValueError, "obs"),
    ("policy other key", lambda: _policy_sample(obs=torch.zeros(2, 1), goal=torch.zeros(2)), ValueError, "goal"),
    ("policy integer obs", lambda: _policy_sample(obs=torch.zeros(2, 3, dtype=torch.long)), TypeError, "obs"),
    ("policy obs shape", lambda: _policy_sample(obs=torch.zeros(2, 1)), ValueError, "obs"),
    ("policy weights missing", lambda: _policy_load("/nonexistent/policy.safetensors"), FileNotFoundError, "path"),
]


def _zoo_gmm(means, stds, weights=None):
    from paratime.zoo.gmm import GaussianMixture

    return GaussianMixture(means, stds, weights)


def _policy_load(path):
    from paratime.zoo.policy import load_policy_model

    return load_policy_model(path)


@pytest.mark.parametrize("call, error, name", [c[1:] for c in ZOO_CASES], ids=[c[0] for c in ZOO_CASES])
def test_zoo_input_is_a_clear_error(call, error, name):
    _raises(call, error, name)


# -- integrations/diffusers.py ------------------------------------------------------------------------------------
def _scheduler(name, **config):
    diffusers = pytest.importorskip("diffusers")

    return getattr(diffusers, name)(**config)


# (id, scheduler class, its config, the option the message must name)
REFUSED_SCHEDULERS = [
    ("heun clip_sample", "HeunDiscreteScheduler", {"clip_sample": True}, "clip_sample"),
    ("lcm v", "LCMScheduler", {"prediction_type": "v_prediction"}, "prediction_type"),
    ("deis order 4", "DEISMultistepScheduler", {"solver_order": 4}, "solver_order"),
    ("edm v", "EDMEulerScheduler", {"prediction_type": "v_prediction"}, "prediction_type"),
    ("dpm learned variance", "DPMSolverMultistepScheduler", {"variance_type": "learned_range"}, "variance_type"),
    ("dpm flow sigmas", "DPMSolverMultistepScheduler", {"use_flow_sigmas": True}, "use_flow_sigmas"),
    # SANA's set-up: named by its flow sigmas (the message asked for use_flow_sigmas=True, which it has)
    ("dpm flow sigmas, flow", "DPMSolverMultistepScheduler",
     {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}, "use_flow_sigmas"),
    ("dpm order 4", "DPMSolverMultistepScheduler", {"solver_order": 4}, "solver_order"),
    ("unipc predict_x0=False", "UniPCMultistepScheduler", {"predict_x0": False}, "predict_x0"),
    ("unipc order 4", "UniPCMultistepScheduler", {"solver_order": 4}, "solver_order"),
    ("unipc flow sigmas, eps", "UniPCMultistepScheduler", {"use_flow_sigmas": True}, "use_flow_sigmas"),
]


@pytest.mark.parametrize("name, config, option", [c[1:] for c in REFUSED_SCHEDULERS],
                         ids=[c[0] for c in REFUSED_SCHEDULERS])
def test_unsupported_scheduler_option_is_named(name, config, option):
    from paratime.integrations.diffusers import solver_for

    with pytest.raises(ValueError, match=f"^scheduler: {name} with {option}") as info:
        solver_for(_scheduler(name, **config))
    assert "use " in str(info.value)                      # and the nearest supported choice


def test_singlestep_order_edited_after_construction_is_named():
    from paratime.integrations.diffusers import solver_for

    # diffusers refuses solver_order 4 in the constructor; a config edited afterwards reaches paratime's own check.
    scheduler = _scheduler("DPMSolverSinglestepScheduler", solver_order=3)
    scheduler.register_to_config(solver_order=4)
    with pytest.raises(ValueError, match="^scheduler: DPMSolverSinglestepScheduler with solver_order=4"):
        solver_for(scheduler)


def test_unsupported_prediction_and_eta_are_named():
    from paratime.integrations.diffusers import solver_for

    _raises(lambda: solver_for(_scheduler("DDIMScheduler", prediction_type="noise")), ValueError, "prediction_type")
    _raises(lambda: solver_for(_scheduler("EulerDiscreteScheduler"), eta=0.5), ValueError, "eta")
    unipc = _scheduler("UniPCMultistepScheduler")
    unipc.solver_p = _scheduler("DDIMScheduler")          # UniPC's optional predictor: not ported
    with pytest.raises(ValueError, match="^scheduler: UniPCMultistepScheduler with solver_p"):
        solver_for(unipc)


def test_diffusers_schedule_checks_and_delegates():
    from paratime.integrations.diffusers import DiffusersSchedule

    _raises(lambda: DiffusersSchedule(base=None), TypeError, "base")
    _raises(lambda: DiffusersSchedule(base=VESchedule(), begin=-1), ValueError, "begin")
    _raises(lambda: DiffusersSchedule(base=VESchedule()).grid(0), ValueError, "steps")
    base = EDMSchedule()
    wrapped = DiffusersSchedule(base=base)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    t = base.model_time(sigma)
    torch.testing.assert_close(wrapped.model_time(sigma), sigma.log() / 4)      # EDM's c_noise
    torch.testing.assert_close(wrapped.sigma_of_model_time(t), sigma)
    torch.testing.assert_close(wrapped.prior_std(sigma), base.prior_std(sigma))
    assert wrapped.sigma_range == (base.sigma_min, base.sigma_max)


def test_diffusers_helpers_refuse_other_models():
    from paratime.integrations.diffusers import Keyword, sample_latents, with_timestep_kwargs

    _raises(lambda: with_timestep_kwargs(_gmm().denoiser, mu=0.5), TypeError, "denoiser")
    _raises(lambda: sample_latents(_gmm(), torch.zeros(2, 2)), TypeError, "sampler")
    module = torch.nn.Linear(2, 2)
    module.config = {"in_channels": 2}
    assert Keyword(module).config is module.config


def test_corrected_history_solver_keeps_the_base_history():
    # PLMS keeps eps, not D, as its history: the Langevin corrector must keep the base solver's value.
    from paratime.solvers import PLMS

    base = PLMS()
    corrected = LangevinCorrected(base=base)
    sigmas = VESchedule().grid(4).sigmas
    x, d, i = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64), torch.tensor([1, 1, 2])
    eps = (x - d) / sigmas[i][:, None]                         # PLMS' history value: the eps prediction
    torch.testing.assert_close(corrected.history_value(x, d, i, sigmas), eps)
    # Sampled through the sampler, Picard's fixed point is the sequential loop's result.
    seq = _gmm(solver="plms", corrector_snr=0.05, method="sequential").sample(2, seed=3).samples
    par = _gmm(solver="plms", corrector_snr=0.05, method="picard", tol=0.0).sample(2, seed=3).samples
    torch.testing.assert_close(par, seq, rtol=1e-8, atol=1e-8)


def test_constant_d_jump_without_noise_is_the_ddim_jump():
    from paratime.solvers import constant_d_jump

    # With no step noise, D held fixed from point e: x_j = D + (sigma_j / sigma_e) (x_e - D) (DDIM, eta = 0).
    sigmas = VESchedule().grid(6).sigmas
    x, d = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    e, j = torch.tensor([0, 2]), torch.tensor([3, 5])
    got = constant_d_jump(make_solver("ddim"), sigmas, None, x, d, e, j, torch.tensor([0, 1]), 6)
    torch.testing.assert_close(got, d + (sigmas[j] / sigmas[e])[:, None] * (x - d))


# -- integrations/pipelines.py ------------------------------------------------------------------------------------
def _tiny(name, **kw):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    try:                                                  # the helpers' home moved between releases of the tree
        from paratime.bench import tiny_pipelines
    except ImportError:
        from benchmarks import tiny_pipelines
    return getattr(tiny_pipelines, name)(**kw)


def test_parallel_pipeline_refuses_what_it_does_not_run():
    diffusers = pytest.importorskip("diffusers")

    import paratime

    pipe = _tiny("tiny_sd", text=True)
    pipe.set_progress_bar_config(disable=True)
    # LCM's guidance embedding: refused at wrap time.
    pipe.unet.register_to_config(time_cond_proj_dim=8)
    _raises(lambda: paratime.parallelize(pipe), ValueError, "pipe")
    pipe.unet.register_to_config(time_cond_proj_dim=None)
    # A grid option the scheduler sets: refused at wrap time, not at every call.
    _raises(lambda: paratime.parallelize(pipe, spacing="karras"), TypeError, "spacing")
    # img2img: a strength that leaves no step of num_inference_steps (int(4 * 0.1) = 0).
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    image = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    _raises(lambda: paratime.parallelize(img2img)("a cat", image=image, strength=0.1, num_inference_steps=4,
                                                   output_type="latent"), ValueError, "strength")


def test_parallel_pipeline_refuses_several_controlnets_and_guess_mode():
    """Refused when wrapping (a MultiControlNetModel was a TypeError at the first call), and at a call after the
    pipeline's ControlNet was replaced; a ControlNet with global_pool_conditions=True makes diffusers run guess mode,
    which the parallel loop does not (samples 0.49 relative off, silently)."""
    pytest.importorskip("diffusers")
    from diffusers import MultiControlNetModel

    import paratime

    pipe = _tiny("tiny_sd_controlnet", text=True)
    pipe.set_progress_bar_config(disable=True)
    single = pipe.controlnet
    wrapped = paratime.parallelize(pipe, method="sequential")
    pipe.controlnet = MultiControlNetModel([single, single])
    _raises(lambda: paratime.parallelize(pipe), ValueError, "pipe")
    control = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    _raises(lambda: wrapped("a cat", image=[control, control], num_inference_steps=2, output_type="latent"),
            ValueError, "pipe")
    pipe.controlnet = single
    single.register_to_config(global_pool_conditions=True)
    with pytest.raises(ValueError, match="^pipe: a ControlNet with global_pool_conditions=True"):
        paratime.parallelize(pipe)


def test_parallel_inpainting_refuses_an_asymmetric_vae():
    """diffusers decodes an AsymmetricAutoencoderKL with the init image and mask; the parallel pipeline's decoder
    does not (images up to 0.79 apart): refused when wrapping."""
    pytest.importorskip("diffusers")
    from diffusers import AsymmetricAutoencoderKL

    import paratime

    pipe = _tiny("tiny_sd_inpaint")
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  down_block_out_channels=(4,) * 4, up_block_out_channels=(4,) * 4)
    pipe.register_modules(vae=AsymmetricAutoencoderKL(latent_channels=4, norm_num_groups=2, sample_size=32,
                                                      layers_per_down_block=1, layers_per_up_block=1, **blocks))
    with pytest.raises(ValueError, match="^pipe: StableDiffusionInpaintPipeline with an AsymmetricAutoencoderKL"):
        paratime.parallelize(pipe)


def test_parallel_pipeline_refuses_wan_2_2_experts():
    import paratime

    pipe = _tiny("tiny_wan")
    pipe.register_to_config(boundary_ratio=0.875)         # Wan 2.2's switch between two experts
    with pytest.raises(ValueError, match="^pipe: Wan 2.2.*boundary_ratio"):
        paratime.parallelize(pipe)(prompt_embeds=torch.zeros(1, 4, 32), height=16, width=16, num_frames=1,
                                   num_inference_steps=2, output_type="latent")


def test_sdxl_controlnet_negative_size_conditioning_matches_the_pipeline():
    import paratime

    pipe = _tiny("tiny_sdxl_controlnet", text=True)
    pipe.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    kw = dict(image=control, num_inference_steps=2, guidance_scale=3.0, output_type="latent",
              negative_original_size=(24, 24), negative_target_size=(96, 96))

    def run(target, **more):
        return target("a cat", generator=torch.Generator().manual_seed(1), **{**kw, **more}).images

    want = run(pipe)
    got = run(paratime.parallelize(pipe, method="sequential"))
    other = run(paratime.parallelize(pipe, method="sequential"), negative_target_size=(48, 48))
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    assert not torch.allclose(other, want)                 # the negative sizes reach the unconditional branch



class _Watermark:
    """Stands in for SDXL's invisible watermark: marks the decoded images (halves them) and counts its calls."""

    def __init__(self):
        self.calls = 0

    def apply_watermark(self, images):
        self.calls += 1
        return images.clamp(-1, 1) * 0.5


def test_sdxl_decode_with_latent_statistics_fp16_vae_and_watermark_matches_the_pipeline():
    import paratime

    pipe = _tiny("tiny_sdxl", text=True)
    pipe.set_progress_bar_config(disable=True)
    channels = pipe.vae.config.latent_channels
    pipe.vae.register_to_config(latents_mean=[0.1 * k for k in range(channels)], latents_std=[0.5] * channels,
                                force_upcast=True)
    pipe.vae.to(torch.float16)                              # decoded in float32 (upcast), then cast back
    pipe.watermark = _Watermark()
    latents = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2))

    def run(target):
        return target("a cat", num_inference_steps=2, guidance_scale=1.0, height=48, width=48, latents=latents,
                      output_type="pt").images

    want = run(pipe)
    got = run(paratime.parallelize(pipe, method="sequential"))
    assert pipe.watermark.calls == 2 and pipe.vae.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)

# -- bugs found on the way, fixed: bools and infinities passed the task's checks, a final_alpha_cumprod below the
#    grid's last timestep was reported as "sigmas", train_digits(threads=) leaked its thread count -----------------
@pytest.mark.parametrize("call, name", [
    (lambda: _reach_config(max_speed=True), "max_speed"),
    (lambda: _reach_config(goal_tol=math.inf), "goal_tol"),
    (lambda: _reach("make_episodes")(True), "n"),
    (lambda: _reach("make_episodes")(2, first=True), "first"),
    (lambda: _reach("make_dataset")(1, noise=math.inf), "noise"),
], ids=["max_speed=True", "goal_tol=inf", "n=True", "first=True", "noise=inf"])
def test_reach_refuses_bools_and_infinities(call, name):
    with pytest.raises((TypeError, ValueError), match=f"^{name}:"):
        call()


def test_discrete_final_alpha_below_the_trained_ones_names_final_alpha_cumprod():
    schedule = DiscreteVPSchedule.from_betas(num_train_timesteps=50, final_alpha_cumprod=0.5)
    with pytest.raises(ValueError, match="^final_alpha_cumprod:"):
        schedule.grid(5)


def test_train_digits_restores_the_thread_count():
    pytest.importorskip("sklearn")
    from paratime.zoo.digits import train_digits

    before = torch.get_num_threads()
    train_digits(None, steps=1, batch=4, progress=False, threads=before + 1)
    after = torch.get_num_threads()
    torch.set_num_threads(before)                          # the later tests keep their count either way
    assert after == before


def test_call_arguments_are_checked_before_the_cost_curve_is_measured(monkeypatch):
    """A bad ``seed`` / ``first_sample`` / ``callback`` was refused only after the plan (and a measured cost curve's
    timed calls on the network): now before any of it."""
    import paratime.sampler as sampler_module

    def measured(*a, **k):
        raise AssertionError("the cost curve was measured before the call's arguments were checked")

    monkeypatch.setattr(sampler_module, "measure_cost", measured)
    s = ParallelSampler("digits", steps=4, cost="measure", progress=False)
    for kw, error, name in ((dict(seed=-1), ValueError, "seed"), (dict(first_sample=-2), ValueError, "first_sample"),
                            (dict(callback=3), TypeError, "callback")):
        _raises(lambda: s.sample(2, **kw), error, name)


def test_likelihood_stats_report_the_flow_method_that_ran():
    """``log_likelihood(method=...)`` on a sampler of another method: the stats' tolerance is the flow's (Picard's
    default 2e-3, Parareal's 0.1), not the sampler's method's (0 for sequential)."""
    s = ParallelSampler("gmm", steps=10, method="sequential", progress=False)
    x = torch.randn(3, 2, dtype=torch.float64)
    for method, tol in (("picard", 2e-3), ("parareal", 0.1), ("sequential", 0.0)):
        st = s.log_likelihood(x, method=method).stats
        assert (st.method, st.tol) == (method, tol)


# -- the model side: Denoiser, schedules, solvers, adapters (a review's reproduced cases) ---------------------------
def _flow_on_ddim():
    diffusers = pytest.importorskip("diffusers")
    from paratime.integrations.diffusers import from_diffusers

    return from_diffusers(_raw, diffusers.DDIMScheduler(prediction_type="flow_prediction"))


def _clip_via_from_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from paratime.integrations.diffusers import from_diffusers

    return from_diffusers(_raw, diffusers.DDPMScheduler(), clip_x0=1.0)


def _euler_zero_snr():
    diffusers = pytest.importorskip("diffusers")
    from paratime.integrations.diffusers import from_diffusers

    return from_diffusers(_raw, diffusers.EulerDiscreteScheduler(rescale_betas_zero_snr=True))


MODEL_SIDE_CASES = [
    # garbage out, no error before
    ("karras sigma_max < sigma_min", lambda: karras_sigmas(4, 80.0, 0.002), ValueError, "sigma_max"),
    ("karras sigma_min < 0 (complex grid)", lambda: karras_sigmas(4, -1.0, 80.0), ValueError, "sigma_min"),
    ("karras rho 0", lambda: karras_sigmas(4, 0.1, 80.0, rho=0), ValueError, "rho"),
    ("flow time_scale 0", lambda: FlowSchedule(time_scale=0), ValueError, "time_scale"),
    ("VP time_scale -1", lambda: ContinuousVPSchedule(time_scale=-1), ValueError, "time_scale"),
    ("EDM sigma_data nan", lambda: EDMSchedule(sigma_data=float("nan")), ValueError, "sigma_data"),
    ("EDM rho 0", lambda: EDMSchedule(rho=0), ValueError, "rho"),
    ("classifier_scale -5", lambda: Denoiser(_raw, classifier=_Classifier(), classifier_scale=-5.0), ValueError,
     "classifier_scale"),
    ("classifier_scale nan", lambda: Denoiser(_raw, classifier=_Classifier(), classifier_scale=float("nan")),
     ValueError, "classifier_scale"),
    # ignored before
    ("Denoiser classifier without scale", lambda: Denoiser(_raw, classifier=_Classifier()), ValueError, "classifier"),
    ("Denoiser scale without classifier", lambda: Denoiser(_raw, classifier_scale=2.0), ValueError,
     "classifier_scale"),
    ("Denoiser guidance_rescale without guidance", lambda: Denoiser(_raw, guidance_rescale=0.5), ValueError,
     "guidance_rescale"),
    ("flow_prediction on DDIM", _flow_on_ddim, ValueError, "prediction_type"),
    ("dpmpp_2m order 3", lambda: make_solver("dpmpp_2m", order=3), ValueError, "order"),
    ("dpmpp_2m_sde sde False", lambda: make_solver("dpmpp_2m_sde", sde=False), ValueError, "sde"),
    ("dpmpp_3m order 1", lambda: make_solver("dpmpp_3m", order=1), ValueError, "order"),
    # misleading or cryptic before
    ("unipc disable_corrector 5", lambda: make_solver("unipc", disable_corrector=5), ValueError,
     "disable_corrector"),
    ("dpmpp order 2.0", lambda: make_solver("dpmpp", order=2.0), ValueError, "order"),
    ("dpmpp sde 'no'", lambda: make_solver("dpmpp", sde="no"), TypeError, "sde"),
    ("from_diffusers clip_x0", _clip_via_from_diffusers, ValueError, "clip_x0"),
    ("load_model bogus=1", lambda: paratime.models.load_model("gmm", bogus=1), TypeError, "bogus"),
    ("model_factory bogus=1", lambda: paratime.models.model_factory("gmm", bogus=1), TypeError, "bogus"),
    ("as_denoiser bogus=1", lambda: paratime.models.as_denoiser("gmm", bogus=1), TypeError, "bogus"),
    ("Denoiser clip_x0 '1'", lambda: Denoiser(_raw, clip_x0="1"), TypeError, "clip_x0"),
    ("Denoiser uncond_fn 3", lambda: Denoiser(_raw, guidance=2.0, uncond_fn=3), TypeError, "uncond_fn"),
    ("Denoiser sample_shape 'abc'", lambda: Denoiser(_raw, sample_shape="abc"), ValueError, "sample_shape"),
    ("Denoiser sample_shape (0,)", lambda: Denoiser(_raw, sample_shape=(0,)), ValueError, "sample_shape"),
    ("Euler zero SNR", _euler_zero_snr, ValueError, "scheduler"),       # named alphas_cumprod, never passed
    ("flow shift with karras spacing", lambda: FlowSchedule(shift=3).grid(4, "karras"), ValueError, "shift"),
    ("cosine VP with betas", lambda: ContinuousVPSchedule("cosine", beta_max=5.0), ValueError, "beta_min, beta_max"),
    ("default_spacing bogus", lambda: VESchedule(default_spacing="bogus"), ValueError, "default_spacing"),
    ("VE sigma_min 'a'", lambda: VESchedule(sigma_min="a"), TypeError, "sigma_min"),
    ("final_alpha_cumprod '1'", lambda: DiscreteVPSchedule(torch.linspace(0.99, 0.01, 10),
                                                           final_alpha_cumprod="1"), TypeError, "final_alpha_cumprod"),
    ("steps_offset 1.5", lambda: DiscreteVPSchedule(torch.linspace(0.99, 0.01, 10), steps_offset=1.5), TypeError,
     "steps_offset"),
]


@pytest.mark.parametrize("call, error, name", [c[1:] for c in MODEL_SIDE_CASES], ids=[c[0] for c in MODEL_SIDE_CASES])
def test_model_side_input_is_a_clear_error(call, error, name):
    _raises(call, error, name)


def test_constant_beta_vp_schedule_has_finite_times():
    """beta_min = beta_max (a constant beta) divided by zero in t(sigma): every model time was NaN."""
    g = ContinuousVPSchedule(beta_min=1.0, beta_max=1.0).grid(4)
    assert torch.isfinite(g.model_times).all()
    s = ContinuousVPSchedule(beta_min=1.0, beta_max=1.0)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(s.t_of_sigma(s.sigma_of_t(t)), t)


def test_guidance_options_on_a_denoiser_that_carries_the_other_half():
    """A Denoiser with a classifier takes classifier_scale from the sampler, and one with guidance takes
    guidance_rescale: refused before ("given without classifier=")."""
    s = ParallelSampler(Denoiser(_raw, VESchedule(), "eps", classifier=_Classifier(), classifier_scale=1.0),
                        classifier_scale=2.0, steps=2, progress=False)
    assert s.denoiser.classifier_scale == 2.0
    s = ParallelSampler(Denoiser(_raw, VESchedule(), "eps", guidance=3.0, uncond_fn=lambda c: c),
                        guidance_rescale=0.5, steps=2, progress=False)
    assert s.denoiser.guidance_rescale == 0.5


def test_zoo_and_evaluation_inputs_are_named():
    """Inputs that gave wrong scores, a blank plot, a NaN model or an episode stuck at NaN (helper review of the zoo
    and evaluation code) are refused naming the argument."""
    import numpy as np

    from paratime.digits_eval import knn_precision_recall
    from paratime.images import image_grid, scatter_image
    from paratime.models import load_model
    from paratime.policy_eval import chunks_png
    from paratime.tasks.reach import make_dataset, make_episodes, step
    from paratime.zoo.gmm import AnisotropicMixture, GaussianMixture

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(20, 3)), rng.normal(size=(20, 3)) + 1.5
    assert knn_precision_recall(real, fake, 3) != (1.0, 1.0)
    for k in (-1, 0, 20):                       # k = -1 read the largest distance: (1.0, 1.0)
        _raises(lambda: knn_precision_recall(real, fake, k), ValueError, "k")
    _raises(lambda: image_grid(torch.zeros(0, 1, 8, 8)), ValueError, "images")
    _raises(lambda: image_grid(torch.ones(2, 1, 8, 8), upscale=0), ValueError, "upscale")
    _raises(lambda: image_grid(torch.ones(2, 1, 8, 8), pad=-1), ValueError, "pad")
    _raises(lambda: scatter_image(torch.zeros(0, 2)), ValueError, "points")
    points = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    blotted = points.clone()
    blotted[0] = float("nan")                  # one NaN point blanked the whole plot
    drawn = lambda image: int((image != 255).any(-1).sum())
    assert drawn(scatter_image(blotted)) >= drawn(scatter_image(points[1:])) > 0
    two = [[0.0, 0.0], [1.0, 1.0]]
    _raises(lambda: GaussianMixture(two, 1.0, [0.0, 0.0]), ValueError, "means, stds, weights")
    _raises(lambda: GaussianMixture(two, float("nan")), ValueError, "means, stds, weights")
    _raises(lambda: GaussianMixture(two, [1.0, 1.0, 1.0]), ValueError, "means, stds, weights")
    _raises(lambda: AnisotropicMixture([[0.0, 0.0]], [[[1.0, 0.0], [0.0, -1.0]]], [1.0]), ValueError, "covs")
    _raises(lambda: step(make_episodes(2), torch.full((2, 2), float("nan"))), ValueError, "actions")
    _raises(lambda: step(make_episodes(2), np.zeros((2, 2))), TypeError, "actions")
    _raises(lambda: make_dataset(0), ValueError, "episodes")
    _raises(lambda: chunks_png("unused.png", torch.zeros(3, 16, 2), episodes=0), ValueError, "episodes")
    _raises(lambda: load_model("digits", dtype="float16"), TypeError, "dtype")
    _raises(lambda: load_model("policy", device="gpu0"), ValueError, "device")


def test_a_judge_needs_more_samples_than_k_and_one_label_each():
    pytest.importorskip("sklearn")
    from paratime.digits_eval import DigitsJudge

    judge = DigitsJudge()
    _raises(lambda: judge.score(torch.zeros(3, 1, 8, 8)), ValueError, "samples")      # an IndexError before
    _raises(lambda: judge.score(torch.zeros(8, 1, 8, 8), labels=torch.zeros(5, dtype=torch.long)), ValueError,
            "labels")


def test_a_progress_line_that_closes_short_of_its_total_shows_no_eta():
    import io

    from paratime.progress import LineProgress

    out, clock = io.StringIO(), iter(range(100)).__next__
    bar = LineProgress(10, "rollout", "chunk", out, clock=clock)
    for _ in range(6):
        bar.update(1)
    bar.close()
    assert "ETA" not in out.getvalue().strip().splitlines()[-1]
