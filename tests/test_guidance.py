"""Classifier-free and classifier guidance, latent decoding: exact answers on the Gaussian mixture, label accuracy
on digits, Picard == sequential with guidance on."""

import types

import pytest
import torch

from paratime import Denoiser, ParallelSampler
from paratime.zoo import GaussianMixture, ring_gmm


class _LabelledMixture(torch.nn.Module):
    """eps-network of the ring mixture conditioned on a mode label (label 8: the whole mixture)."""

    def __init__(self):
        super().__init__()
        self.full = ring_gmm().network
        g = self.full.gmm
        self.modes = [GaussianMixture(g.means[k:k + 1], g.stds[k:k + 1]).network(self.full.schedule, "eps")
                      for k in range(8)]

    def forward(self, x, t, labels):
        out = self.full(x, t)
        for k in range(8):
            m = labels == k
            if bool(m.any()):
                out[m] = self.modes[k](x[m], t[m])
        return out


def _rows(n=12, seed=0):
    model = ring_gmm()
    g = torch.Generator().manual_seed(seed)
    sig = model.schedule.train_sigmas[torch.randint(0, 1000, (n,), generator=g)]
    t = model.schedule.model_time(sig)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * (1 + sig[:, None])
    return model, x, sig, t


def test_cfg_is_the_linear_combination_of_the_two_predictions():
    model, x, sig, t = _rows()
    net = _LabelledMixture()
    labels = torch.arange(12) % 8
    null = torch.full_like(labels, 8)
    plain = Denoiser(net, model.schedule, "eps")
    cond, unc = plain(x, sig, t, labels=labels), plain(x, sig, t, labels=null)
    for g in (0.0, 1.0, 3.5):
        guided = Denoiser(net, model.schedule, "eps", guidance=g)(x, sig, t, labels=labels, uncond={"labels": null})
        torch.testing.assert_close(guided, unc + g * (cond - unc))


def test_cfg_rescale_keeps_the_conditional_std():
    model, x, sig, t = _rows()
    net = _LabelledMixture()
    labels = torch.arange(12) % 8
    den = Denoiser(net, model.schedule, "eps", guidance=5.0, guidance_rescale=1.0)
    x0 = den(x, sig, t, labels=labels, uncond={"labels": torch.full_like(labels, 8)})
    eps_guided = (x - x0) / sig[:, None]                       # back to the network's eps space
    eps_cond = net(x / (1 + sig[:, None] ** 2).sqrt(), t.float(), labels)
    torch.testing.assert_close(eps_guided.std(1), eps_cond.std(1))


def test_classifier_guidance_with_the_exact_classifier_gives_the_conditional_denoiser():
    """grad log p(x) + grad log p(k | x) = grad log p(x | k): with the mixture's own responsibilities as the
    classifier and scale 1, D becomes the single-mode posterior mean."""
    model, x, sig, t = _rows()
    gmm, sched = model.network.gmm, model.schedule

    def classifier(x_in, time):
        s = sched.sigma_of_model_time(time)
        return gmm.responsibilities(x_in.double() / sched.input_scale(s)[:, None], s).log()

    y = torch.arange(12) % 8
    den = Denoiser(model.network, sched, "eps", classifier=classifier, classifier_scale=1.0)
    single = [GaussianMixture(gmm.means[k:k + 1], gmm.stds[k:k + 1]) for k in range(8)]
    want = torch.stack([single[int(k)].denoise(x[r:r + 1], sig[r:r + 1])[0] for r, k in enumerate(y)])
    # To float64 rounding: a float64 classifier's log-softmax is kept at its precision (it was cast to float32:
    # 2.6e-6 relative off the single-mode mean).
    torch.testing.assert_close(den(x, sig, t, y=y), want, rtol=1e-10, atol=1e-10)


class _Timed(torch.nn.Module):
    """A linear layer called as ``module(x, time)``."""

    def __init__(self, out: int, dtype: torch.dtype):
        super().__init__()
        self.lin = torch.nn.Linear(2, out).to(dtype)

    def forward(self, x, time):
        return self.lin(x)


@pytest.mark.parametrize("net_dtype, clf_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.float32)])
def test_a_classifier_runs_in_its_own_dtype(net_dtype, clf_dtype):
    """The classifier's input takes its own parameters' dtype, not the network's (an fp16 network with an fp32
    classifier, or the reverse, failed: mat1 and mat2 must have the same dtype)."""
    model, x, sig, t = _rows(4)
    den = Denoiser(_Timed(2, net_dtype), model.schedule, "eps", classifier=_Timed(3, clf_dtype), classifier_scale=1.0)
    out = den(x, sig, t, y=torch.zeros(4, dtype=torch.long))
    assert out.dtype == x.dtype and torch.isfinite(out).all()


def test_guidance_needs_unconditional_inputs():
    model, x, sig, t = _rows()
    den = Denoiser(_LabelledMixture(), model.schedule, "eps", guidance=2.0)
    with pytest.raises(ValueError, match="uncond"):
        den(x, sig, t, labels=torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match="guidance"):
        Denoiser(_LabelledMixture(), model.schedule, "eps", guidance=-1.0)


@pytest.mark.parametrize("method", ["sequential", "picard"])
def test_guided_digits_are_classified_as_their_label(method):
    pytest.importorskip("sklearn")
    from paratime.digits_eval import DigitsJudge

    y = torch.arange(100) % 10
    s = ParallelSampler("digits", steps=50, method=method, guidance=3.0, progress=False)
    res = s.sample(100, seed=1, labels=y)
    assert DigitsJudge(seed=0).score(res.samples, labels=y)["label_accuracy"] >= 0.9


def test_picard_with_guidance_equals_sequential():
    y = torch.tensor([3, 7, 1])
    seq = ParallelSampler("digits", steps=12, method="sequential", guidance=2.0, progress=False).sample(3, labels=y)
    par = ParallelSampler("digits", steps=12, tol=0.0, guidance=2.0, progress=False).sample(3, labels=y)
    torch.testing.assert_close(par.samples, seq.samples, rtol=0, atol=1e-5)


def test_latent_decoding_divides_by_the_scale_and_batches():
    calls = []

    def decoder(z):
        calls.append(z.shape[0])
        return torch.nn.functional.interpolate(z, scale_factor=2)

    s = ParallelSampler("digits", steps=5, method="sequential", decoder=decoder, latent_scale=0.5, progress=False)
    res = s.sample(10, seed=0)
    assert res.samples.shape == (10, 1, 16, 16) and res.latents.shape == (10, 1, 8, 8)
    torch.testing.assert_close(res.samples, torch.nn.functional.interpolate(res.latents / 0.5, scale_factor=2))
    assert calls == [8, 2]
    with pytest.raises(ValueError, match="latent_scale"):
        ParallelSampler("digits", latent_scale=0.0)


def test_decoders_without_weights_and_vaes_with_decode():
    """A decoder module with no parameters decodes in the latents' dtype (it raised a bare StopIteration after all
    the sampling), and an object with ``.decode`` (a VAE) that is not itself callable is taken, as documented."""
    class Vae:
        def decode(self, z):
            return types.SimpleNamespace(sample=z * 3)

    for decoder, scale in ((torch.nn.Identity(), 1), (torch.nn.Sequential(torch.nn.Identity()), 1), (Vae(), 3)):
        s = ParallelSampler("digits", steps=3, method="sequential", decoder=decoder, progress=False)
        res = s.sample(2, seed=0)
        torch.testing.assert_close(res.samples, res.latents * scale)


def test_a_zoo_network_that_takes_no_conditioning_samples_with_a_classifiers_labels():
    """``y=`` belongs to the classifier: the mixture's conditioning hook refused it ("y: the mixture model takes no
    conditioning"), so classifier guidance could not run on it. Guided samples of each label land nearer that
    label's direction."""
    base = ring_gmm()
    W = torch.tensor([[4.0, 0.0], [-4.0, 0.0]], dtype=torch.float64)        # class 0: x > 0, class 1: x < 0
    den = Denoiser(base.network, base.schedule, "eps", dtype=torch.float64, sample_shape=(2,),
                   classifier=lambda x_in, t: x_in.double() @ W.T, classifier_scale=3.0)
    y = torch.tensor([0] * 64 + [1] * 64)
    out = ParallelSampler(den, steps=20, method="sequential", progress=False).sample(128, seed=0, y=y).samples
    assert float(out[:64, 0].mean()) > 0.5 > -0.5 > float(out[64:, 0].mean())
    with pytest.raises(ValueError, match="^z: the mixture model takes no conditioning"):
        ParallelSampler(den, steps=4, progress=False).sample(2, y=y[:2], z=torch.zeros(2))
