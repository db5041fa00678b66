"""Behaviour of the likelihood path and its run records that a second mutation run found unpinned
(``paratime/methods/likelihood.py``, the likelihood part of ``paratime/sampler.py``, ``paratime/likelihood_cli.py``):
the augmented rows' memory bound, the entry checks that the sampler's own checks do not cover, and the ``likelihood``
command's record (its options, wall-clock figures, round summary and standard error), read off a recorded solve whose
figures are set by hand."""

import json
import time
from types import SimpleNamespace

import pytest
import torch

from paratime import ParallelSampler
from paratime.methods import likelihood as lk

F64 = torch.float64


# -- the sampler's likelihood path -------------------------------------------------------------------------------------
def test_the_memory_bound_counts_the_augmented_column(monkeypatch):
    """The bound is the one of ``sample`` over ``(B, n + 1)`` rows: the log-density's coordinate travels with the
    sample's ``n``."""
    from paratime.config import SamplerConfig

    shapes, check = [], SamplerConfig.check_memory

    def record(self, shape, *a, **k):
        shapes.append(tuple(shape))
        return check(self, shape, *a, **k)

    monkeypatch.setattr(SamplerConfig, "check_memory", record)
    sampler = ParallelSampler("gmm", steps=3, method="sequential", progress=False)
    sampler.log_likelihood(torch.zeros(5, 2, dtype=F64))
    assert shapes == [(5, 3)]


def test_an_empty_batch_is_refused():
    """``B = 0`` is no batch: refused naming ``x`` (without the check a ``(0, n)`` tensor reaches the solve and fails
    there with torch's own RuntimeError)."""
    with pytest.raises(ValueError, match=r"x: expected \(B, \*sample_shape\), got shape \(0, 2\)"):
        ParallelSampler("gmm", steps=4, progress=False).log_likelihood(torch.zeros(0, 2, dtype=F64))


def test_a_coarse_callable_is_refused_for_pipelined_parareal_too():
    """A user's coarse propagator maps samples, not the augmented rows: refused for both Parareal variants."""
    coarse = lambda x, s_from, s_to: x                                         # noqa: E731
    for method in ("parareal", "parareal_pipelined"):
        sampler = ParallelSampler("gmm", steps=4, method=method, coarse=coarse, progress=False)
        with pytest.raises(ValueError, match="coarse: a coarse callable maps samples"):
            sampler.log_likelihood(torch.zeros(2, 2, dtype=F64))


def test_the_conditioning_is_checked_like_samples():
    """The model's own conditioning rules and the batch dimension are checked before the solve: the mixture takes
    no conditioning (its hook names the key), and a conditioning tensor needs the data's batch of 2."""
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="labels: the mixture model takes no conditioning"):
        ParallelSampler("gmm", steps=4, progress=False).log_likelihood(x, labels=torch.zeros(2, dtype=torch.long))
    from paratime.denoiser import Denoiser
    from paratime.schedules import VESchedule

    den = Denoiser.from_callable(lambda x, sigma, **cond: 0 * x, schedule=VESchedule(0.01, 50.0), dtype=F64,
                                 sample_shape=(2,))
    with pytest.raises(ValueError, match=r"shift: conditioning tensors need a leading batch dimension of 2, got "
                                         r"shape \(3,\)"):
        ParallelSampler(den, steps=4, progress=False).log_likelihood(x, shift=torch.zeros(3, dtype=F64))


def test_flow_problem_refuses_a_deterministic_multistep_solver():
    """``flow_problem`` takes the one-step ``euler`` (DDIM) and ``heun`` only: a deterministic multistep solver is no
    step of the augmented ODE (the stochastic check alone would let it through)."""
    grid = lk.likelihood_grid(ParallelSampler("gmm", progress=False).denoiser.schedule, 3)
    with pytest.raises(ValueError, match="solver: the likelihood ODE takes euler, heun, got 'dpmpp_2m'"):
        lk.flow_problem(grid, "dpmpp_2m", lambda x, j, b: x, F64, "cpu")


# -- the likelihood command ----------------------------------------------------------------------------------------
def test_digits_shuffles_each_image_by_its_own_permutation_and_refuse_no_images(monkeypatch):
    """Digits whose 64 pixels are all distinct (0..63 in every image) show each shuffle's permutation: every image's is
    a permutation of its pixels, and they differ between images (one permutation per image, not one for all). A
    count of 0 is refused like one past the held-out split."""
    pytest.importorskip("sklearn")
    import sklearn.datasets

    from paratime.likelihood_cli import digits_sets

    data = torch.arange(64, dtype=F64).repeat(1797, 1).numpy()
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: SimpleNamespace(data=data, target=data[:, 0]))
    perms = ((digits_sets(8)["shuffled"].reshape(8, 64) + 1) * 8).round().long()
    assert bool((perms.sort(1).values == torch.arange(64)).all())
    assert len({tuple(p.tolist()) for p in perms}) == 8
    for count in (0, 541):
        with pytest.raises(ValueError, match=rf"--samples: must be an integer in \[1, 540\], got {count}"):
            digits_sets(count)


class _Recorded:
    """A ``log_likelihood`` that solves nothing: each call is recorded and answered with set figures (per call in
    order: the wall seconds and the rounds; the bits/dim ``1, 2, ..., B``)."""

    def __init__(self, walls, rounds):
        self.walls, self.rounds, self.calls = list(walls), list(rounds), []

    def __call__(self, sampler, x, **kw):
        self.calls.append(kw)
        B = x.shape[0]
        bpd = torch.arange(1, B + 1, dtype=F64)
        stats = SimpleNamespace(wall_s=self.walls.pop(0), rounds=self.rounds.pop(0), iterations=1, nfe=1.0)
        zero = torch.zeros(B, dtype=F64)
        return lk.LikelihoodResult(-bpd, bpd, zero, zero, x, 0.01, 50.0, stats)


def _command(monkeypatch, tmp_path, argv, recorded):
    from paratime.cli import main

    monkeypatch.setattr(ParallelSampler, "log_likelihood", lambda self, x, **kw: recorded(self, x, **kw))
    out = tmp_path / "lik.json"
    t0 = time.perf_counter()
    rc = main(["likelihood", "--no-progress", "--json", str(out), *argv])
    return rc, (json.loads(out.read_text()) if rc == 0 else None), time.perf_counter() - t0


def test_likelihood_record_wall_clock_rounds_probes_and_total(monkeypatch, tmp_path, capsys):
    """Two untimed warm-up solves (sequential, picard), then 3 repeats each: the record's wall min / median are the
    repeats' (seconds 1, 2, 9 and 0.5, 4, 0.25: min 1 and 0.25, median 2 and 0.5); the summary line divides the
    rounds (10 sequential, 4 picard: 2.5x fewer; 25 picard: 2.5x more); the default Hutchinson run records and passes
    one probe, seeded with ``--seed``; ``total_s`` is the seconds of the sets' solves (within the command's)."""
    rec_ = _Recorded([100.0, 100.0, 1.0, 2.0, 9.0, 0.5, 4.0, 0.25], [10, 4, 10, 10, 10, 4, 4, 4])
    rc, rec, elapsed = _command(monkeypatch, tmp_path, ["--model", "gmm", "--samples", "4", "--repeats", "3",
                                                        "--seed", "2"], rec_)
    out = capsys.readouterr().out
    assert rc == 0
    seq, pic = rec["sets"]["gmm"]
    assert (seq["method"], seq["wall_min_s"], seq["wall_median_s"]) == ("sequential", 1.0, 2.0)
    assert (pic["method"], pic["wall_min_s"], pic["wall_median_s"]) == ("picard", 0.25, 0.5)
    assert "rounds: picard 4 vs sequential 10 (2.5x fewer)" in out
    assert rec["probes"] == 1 and rec["tol_units"] == "absolute: flow end state, nats / sqrt(n)"
    assert all(kw["probes"] == 1 and kw["seed"] == 2 and kw["divergence"] == "hutchinson" for kw in rec_.calls)
    assert 0 <= rec["total_s"] <= elapsed
    rec_ = _Recorded([1.0] * 4, [10, 25, 10, 25])
    assert _command(monkeypatch, tmp_path, ["--model", "gmm", "--samples", "4"], rec_)[0] == 0
    assert "rounds: picard 25 vs sequential 10 (2.5x more)" in capsys.readouterr().out


def test_likelihood_command_options_reach_the_solve(monkeypatch, tmp_path):
    """``--no-compare`` runs the method alone (its warm-up too); the exact divergence draws nothing (no seed, no
    probes in the call or the record); one sample's standard error is 0."""
    rec_ = _Recorded([1.0] * 2, [3, 3])
    rc, rec, _ = _command(monkeypatch, tmp_path, ["--model", "gmm", "--samples", "4", "--no-compare"], rec_)
    assert rc == 0 and [r["method"] for r in rec["sets"]["gmm"]] == ["picard"]
    assert [kw["method"] for kw in rec_.calls] == ["picard", "picard"]
    rec_ = _Recorded([1.0] * 2, [3, 3])
    rc, rec, _ = _command(monkeypatch, tmp_path, ["--model", "gmm", "--samples", "1", "--method", "sequential",
                                                  "--divergence", "exact", "--seed", "4"], rec_)
    assert rc == 0 and rec["probes"] is None and rec["sets"]["gmm"][0]["bits_per_dim_se"] == 0.0
    assert all(kw["seed"] is None and "probes" not in kw for kw in rec_.calls)


def test_digits_with_the_exact_divergence_dequantise_with_the_seed(monkeypatch, tmp_path):
    """Dequantisation draws: ``--seed 3`` reaches the solve with the exact divergence too (it was dropped, so every
    seed dequantised alike), and not with ``--no-dequantize``; the record gives the levels and the dequantisation
    (the range is the command's fixed [-1, 1])."""
    import paratime.likelihood_cli as cli_mod

    monkeypatch.setattr(cli_mod, "digits_sets", lambda count, seed=0: {s: torch.zeros(count, 1, 8, 8, dtype=F64)
                                                                        for s in cli_mod.DIGITS_SETS})
    for flag, seed in (([], 3), (["--no-dequantize"], None)):
        rec_ = _Recorded([1.0] * 4, [3] * 4)
        argv = ["--samples", "2", "--steps", "3", "--sets", "real", "--method", "sequential", "--divergence",
                "exact", "--seed", "3", *flag]
        rc, rec, _ = _command(monkeypatch, tmp_path, argv, rec_)
        assert rc == 0 and [kw["seed"] for kw in rec_.calls] == [seed, seed]
        assert (rec["levels"], rec["dequantize"]) == (17, seed is not None) and "data_range" not in rec


def test_the_likelihood_command_builds_its_sampler_once(monkeypatch, tmp_path):
    """The command line checks the options (which builds the sampler) and solves with that sampler: one build per
    run, not one for the check and one for the solve."""
    built, init = [], ParallelSampler.__init__

    def counted(self, *a, **k):
        built.append(a[:1])
        init(self, *a, **k)

    monkeypatch.setattr(ParallelSampler, "__init__", counted)
    rc, _, _ = _command(monkeypatch, tmp_path, ["--model", "gmm", "--samples", "2"], _Recorded([1.0] * 4, [3] * 4))
    assert rc == 0 and len(built) == 1
