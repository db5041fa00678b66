"""The embedded digits model: weights, Picard == sequential, training, quality by scikit-learn."""

import json

import pytest
import torch

from paratime import ParallelSampler
from paratime.zoo import load_model
from paratime.zoo.digits import WEIGHTS, _read_meta, train_digits


def test_weights_load_and_give_finite_outputs():
    den = load_model("digits")
    assert WEIGHTS.stat().st_size < 10 * 2**20
    assert _read_meta(WEIGHTS)["steps"] > 0                        # training record beside the weights
    x = torch.randn(5, 1, 8, 8)
    out = den.network(x, torch.tensor([0.0, 10, 500, 900, 999]), torch.tensor([0, 3, 10, 9, 1]))
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_picard_equals_sequential_on_digits():
    seq = ParallelSampler("digits", steps=20, method="sequential", progress=False).sample(4, seed=0)
    exact = ParallelSampler("digits", steps=20, tol=0.0, progress=False).sample(4, seed=0)
    torch.testing.assert_close(exact.samples, seq.samples, rtol=0, atol=1e-5)
    par = ParallelSampler("digits", steps=20, tol=1e-3, progress=False).sample(4, seed=0)
    assert float((par.samples - seq.samples).abs().max()) <= 0.01   # the README's bound at tol 1e-3
    assert par.stats.rounds < 20


def test_training_loop_reduces_the_loss():
    pytest.importorskip("sklearn")
    r = train_digits(None, steps=60, batch=32, channels=8, lr=3e-3, progress=False)
    first, last = sum(r["losses"][:10]) / 10, sum(r["losses"][-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_training_rejects_bad_options():
    with pytest.raises(ValueError, match="steps"):
        train_digits(None, steps=0)
    with pytest.raises(ValueError, match="ema"):
        train_digits(None, steps=1, ema=1.5)


def test_sample_quality_by_an_independent_classifier():
    """The issue's quality bar on 200 samples of the shipped weights with DDPM-1000: >= 85% classified with
    confidence >= 0.9 by a logistic regression trained on the real digits, every class 5-15%, k-NN precision and
    recall >= 0.7. Picard (DDIM-100, tol 0.1) scores like the sequential DDIM-100 sampler within sampling noise."""
    pytest.importorskip("sklearn")
    from paratime.digits_eval import DigitsJudge

    judge = DigitsJudge(seed=0)
    ref = ParallelSampler("digits", solver="ddpm", steps=1000, method="sequential", progress=False).sample(200, seed=0)
    s = judge.score(ref.samples)
    assert s["confident_share"] >= 0.85, s
    assert 0.05 <= min(s["class_hist"]) and max(s["class_hist"]) <= 0.15, s
    assert s["knn_precision"] >= 0.7 and s["knn_recall"] >= 0.7, s
    scores = {}
    for method in ("sequential", "picard"):
        res = ParallelSampler("digits", steps=100, method=method, progress=False).sample(200, seed=0)
        scores[method] = sc = judge.score(res.samples)
        assert sc["knn_precision"] >= 0.7 and sc["knn_recall"] >= 0.7, sc
        # A class share near 0.1 on 200 samples has a standard error of ~0.021: 3-18% is 3.5 of them either side.
        assert 0.03 <= min(sc["class_hist"]) and max(sc["class_hist"]) <= 0.18, sc
    # Same seed on both sides: Picard's samples are the sequential ones within tol, so are their classes.
    assert max(abs(p - q) for p, q in zip(scores["picard"]["class_hist"], scores["sequential"]["class_hist"])) <= 0.02
    # 200 samples: the standard error of a share near 0.85 is ~0.025.
    assert abs(scores["picard"]["confident_share"] - scores["sequential"]["confident_share"]) <= 0.05
    assert scores["sequential"]["confident_share"] >= 0.8


@pytest.mark.parametrize("uncond, error, match", [
    ({"labels": torch.tensor([99, 99])}, ValueError, r"^uncond\.labels: classes must lie in 0\.\.10, got 99"),
    ({"labels": torch.tensor([1.5, 1.5])}, TypeError, r"^uncond\.labels: expected a \(2,\) integer tensor"),
    ({"labels": torch.tensor([1])}, ValueError, r"^uncond\.labels: expected shape \(2,\)"),
    ({"foo": torch.tensor([1, 1])}, ValueError, r"^uncond\.foo: the digits model's unconditional inputs"),
])
def test_negative_conditioning_is_checked_like_the_labels(uncond, error, match):
    """``uncond`` (negative conditioning under guidance) is checked before any work: a bad class raised an
    IndexError deep in the embedding and float labels were truncated. The null class 10 and any class pass."""
    s = ParallelSampler("digits", steps=4, method="sequential", guidance=3.0, progress=False)
    labels = torch.tensor([3, 7])
    with pytest.raises(error, match=match):
        s.sample(2, seed=0, labels=labels, uncond=uncond)
    for ok in (torch.tensor([10, 10]), torch.tensor([1, 2])):
        assert torch.isfinite(s.sample(2, seed=0, labels=labels, uncond={"labels": ok}).samples).all()


def test_the_judge_scores_one_batch_the_same_every_time():
    """k-NN precision / recall against one real reference per sample count: the same batch scored twice gave
    0.98 / 0.94 precision before (a fresh reference draw per call)."""
    pytest.importorskip("sklearn")
    from paratime.digits_eval import DigitsJudge

    judge = DigitsJudge(seed=0)
    x = ParallelSampler("digits", steps=10, method="sequential", progress=False).sample(32, seed=0).samples
    a, b = judge.score(x), judge.score(x)
    assert (a["knn_precision"], a["knn_recall"]) == (b["knn_precision"], b["knn_recall"])


def test_eval_digits_records_what_ran(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from paratime.cli import main

    out = tmp_path / "ed.json"
    assert main(["eval-digits", "--samples", "8", "--steps", "4", "--json", str(out), "--no-progress"]) == 0
    assert "tol=0.002 (default)" in capsys.readouterr().out
    rec = json.loads(out.read_text())
    assert (rec["solver"], rec["steps"], rec["samples"]) == ("ddim", 4, 8)
    assert rec["picard"]["tol"] == 0.002 and rec["sequential"]["tol"] == 0.0 and rec["picard"]["window"] >= 1
