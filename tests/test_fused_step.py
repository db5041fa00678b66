"""Linear steps (DDIM, DDPM, Euler ancestral, Euler-Maruyama) take guidance, the conversion to x0 and the increment
in one pass from the raw network outputs inside the samplers (``Problem.step_to``), on every backend:

- the one-pass path gives the same bits as the two-pass path it replaces (x0 first, then the step), sequential and
  Picard, guided and not;
- it really runs: the denoiser's conversion to x0 is never called, and on the kernel path the one launch per call
  reads the outputs in the network's dtype (bf16 digits: a ``fused_step[float32<-bfloat16,guided,...,dx]``);
- denoisers whose x0 is no linear map of the outputs (``clip_x0``) keep the two-pass path.
"""

import pytest
import torch

from paratime import ParallelSampler
from paratime.evaluator import Evaluator

LINEAR = ["ddim", "ddpm", "euler_ancestral", "euler_maruyama"]


def _two_pass(monkeypatch):
    monkeypatch.setattr(Evaluator, "fusable", property(lambda self: False))


def _count_outputs(monkeypatch):
    calls = []
    original = Evaluator.outputs

    def outputs(self, x, i, b):
        calls.append(x.shape[0])
        return original(self, x, i, b)

    monkeypatch.setattr(Evaluator, "outputs", outputs)
    return calls


@pytest.mark.parametrize("solver", LINEAR)
@pytest.mark.parametrize("method", ["sequential", "picard", "parareal"])
def test_one_pass_equals_two_passes_gmm(solver, method, monkeypatch):
    kw = dict(solver=solver, steps=20, method=method, progress=False, **({} if method == "sequential" else
                                                                          dict(tol=1e-3)))
    with monkeypatch.context() as m:
        calls = _count_outputs(m)
        fused = ParallelSampler("gmm", **kw).sample(32, seed=3)
    assert calls, "the fused path was not taken"
    with monkeypatch.context() as m:
        _two_pass(m)
        ref = ParallelSampler("gmm", **kw).sample(32, seed=3)
    assert torch.equal(fused.samples, ref.samples)
    assert fused.stats.rounds == ref.stats.rounds and fused.stats.nfe == ref.stats.nfe


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
@pytest.mark.parametrize("method", ["sequential", "picard"])
def test_one_pass_equals_two_passes_guided_digits(solver, method, monkeypatch):
    kw = dict(solver=solver, steps=5, method=method, guidance=2.5, progress=False)
    labels = torch.tensor([0, 3, 8])
    with monkeypatch.context() as m:
        calls = _count_outputs(m)
        fused = ParallelSampler("digits", **kw).sample(3, seed=1, labels=labels)
    assert calls
    with monkeypatch.context() as m:
        _two_pass(m)
        ref = ParallelSampler("digits", **kw).sample(3, seed=1, labels=labels)
    assert torch.equal(fused.samples, ref.samples)


def test_the_conversion_to_x0_is_skipped(monkeypatch):
    """Under the fused path the denoiser's to_x0 (the first of the two passes) never runs for a linear step."""
    from paratime.denoiser import Denoiser

    seen = []
    original = Denoiser.to_x0
    monkeypatch.setattr(Denoiser, "to_x0", lambda self, *a, **k: seen.append(1) or original(self, *a, **k))
    ParallelSampler("digits", solver="ddpm", steps=4, guidance=2.0, progress=False).sample(
        2, seed=0, labels=torch.tensor([1, 2]))
    assert seen == []
    ParallelSampler("digits", solver="dpmpp_2m", steps=4, guidance=2.0, progress=False).sample(
        2, seed=0, labels=torch.tensor([1, 2]))
    assert seen, "a solver with history needs x0 and must still convert"


def test_kernel_path_reads_bf16_outputs_in_one_launch():
    """On the kernel path (the interpreter here), a guided DDPM step of the bf16 digits network is one
    ``fused_step`` launch over the raw bf16 halves, writing x0 and the step whose sum is the next state (the
    next-state form); no x0-only launch happens."""
    pytest.importorskip("triton")
    from paratime.kernels import Launch, SAMPLER_LAUNCHES, kernels, record_launches

    with kernels("triton"), record_launches() as seen:
        ParallelSampler("digits", solver="ddpm", steps=3, dtype=torch.bfloat16, state_dtype=torch.float32,
                        guidance=2.0, method="sequential", progress=False).sample(2, seed=0,
                                                                                 labels=torch.tensor([4, 9]))
    steps = {x for x in seen if x.kernel == "fused_step"}
    assert steps == {Launch("fused_step", torch.float32, torch.bfloat16, uncond=True, noise=True, x0=True, dx=True)}
    assert steps <= set(SAMPLER_LAUNCHES)


def test_clip_x0_keeps_the_two_pass_path(monkeypatch):
    def refuse(self, x, i, b):
        raise AssertionError("outputs() must not be used when x0 is clipped")

    monkeypatch.setattr(Evaluator, "outputs", refuse)
    res = ParallelSampler("digits", solver="ddpm", steps=4, clip_x0=1.0, progress=False).sample(2, seed=0)
    assert torch.isfinite(res.samples).all()


def test_non_finite_raw_output_is_reported():
    """The NaN check reads the raw outputs' peaks on the fused path and still names step and sample."""
    from paratime.denoiser import Denoiser
    from paratime.evaluator import NonFiniteOutputError
    from paratime.schedules import DiscreteVPSchedule

    def net(x, t):
        out = torch.zeros_like(x)
        out[1] = torch.where(t[1] < 500, float("nan"), 0.0)
        return out

    den = Denoiser(net, DiscreteVPSchedule.from_betas("linear", 1000, 1e-4, 0.02), "eps", sample_shape=(2,))
    with pytest.raises(NonFiniteOutputError, match="sample 1"):
        ParallelSampler(den, solver="ddim", steps=10, method="sequential", progress=False).sample(3, seed=0)


def test_classifier_labels_without_a_classifier_are_refused():
    """``y=`` is the classifier's argument, never the network's: a mixture (which takes no conditioning) refuses it
    by name rather than sampling as if it were not given."""
    s = ParallelSampler("gmm", solver="ddpm", steps=8, progress=False)
    with pytest.raises(ValueError, match="^y: the mixture model takes no conditioning"):
        s.sample(4, seed=0, y=torch.zeros(4, dtype=torch.long))


def test_non_finite_unconditional_output_is_reported(monkeypatch):
    """Under classifier-free guidance the fused path's NaN check reads the unconditional half's peaks too: a network
    whose unconditional output alone is NaN (at one sample, late steps) is reported with that step and sample, not
    folded into the guided step unseen."""
    from paratime.denoiser import Denoiser
    from paratime.evaluator import NonFiniteOutputError
    from paratime.schedules import DiscreteVPSchedule

    def net(x, t, c):
        out = torch.zeros_like(x)
        bad = (c == 0) & (t < 500) & (torch.arange(x.shape[0]) % 3 == 1)     # unconditional rows of sample 1
        return out.masked_fill(bad[:, None], float("nan"))

    calls = _count_outputs(monkeypatch)
    den = Denoiser(net, DiscreteVPSchedule.from_betas("linear", 1000, 1e-4, 0.02), "eps", sample_shape=(2,),
                   guidance=2.0, uncond_fn=lambda cond: {"c": torch.zeros_like(cond["c"])})
    with pytest.raises(NonFiniteOutputError, match="sample 1"):
        ParallelSampler(den, solver="ddim", steps=10, method="sequential", progress=False).sample(
            3, seed=0, c=torch.ones(3))
    assert calls, "the fused path was not taken"
