"""The issue-17 accuracy benchmarks on tiny settings: ``accuracy_sweep.py``'s rows and flags, and
``rounds_at_accuracy.py``'s combinations, selection at a target accuracy and merging of runs."""

from dataclasses import replace

import pytest
import torch

from paratime.bench.accuracy_sweep import SWEEP_CASES, accuracy_sweep, to_markdown
from paratime.bench.rounds_at_accuracy import (CASES, PARADIGMS_RULE, Combo, at_accuracy, class_noise, combos,
                                              diffusers_runs, errors, headline, headline_markdown, merge,
                                              paratime_runs, real_class, real_class_runs, sample)
from paratime.methods.picard import STOPS, UPDATES

KEYS = {"tol", "max_abs_diff", "p99_abs_diff", "max_rel", "median_rel", "over", "switched", "switched_over", "rounds",
        "nfe", "mean_rounds", "rolled_back", "flagged", "worst", "window",
        "strict_accept_max_abs_diff", "sensitivity_median", "sensitivity_p99"}


@pytest.fixture(scope="module")
def small():
    return replace(SWEEP_CASES["gmm-ddim100"], steps=20, batch=32)


def test_sweep_rows_hold_the_errors_and_flag_exactly_the_rows_over_tol(small):
    tols = (1e-1, 1e-3)
    rows = accuracy_sweep(small, tols)
    assert [r["tol"] for r in rows] == list(tols) and all(set(r) == KEYS for r in rows)
    ref = sample(small, 32, method="sequential").samples
    for r in rows:
        res = sample(small, 32, tol=r["tol"], window=small.steps)                # a case without a window: the grid
        err = (res.samples - ref).abs().amax(1)                                  # (B,) per-sample max |Δ|
        tol_abs = torch.tensor(res.stats.tol_abs, dtype=err.dtype)              # tol times each sample's scale
        assert r["max_abs_diff"] == pytest.approx(float(err.max()), abs=0)
        assert r["max_rel"] == pytest.approx(float((err / tol_abs).max()), rel=1e-12)
        assert r["p99_abs_diff"] <= r["max_abs_diff"] and r["over"] == int((err > tol_abs).sum())
        assert 0 < r["rounds"] < small.steps and 0 <= r["switched_over"] <= min(r["switched"], r["over"])
        assert r["flagged"] == (r["max_rel"] > 1)
        assert r["mean_rounds"] == sum(res.stats.sample_rounds) / 32 <= r["rounds"]
        assert r["rolled_back"] == sum(res.stats.extra["rolled_back"])
    # The guarantee holds here (tests/test_accuracy.py checks it at every tolerance): no flag.
    assert not any(r["flagged"] for r in rows)
    assert all(r["window"] == small.steps for r in rows)        # a case without a window runs the whole grid


def test_sweep_runs_a_sliding_window_case():
    """The sliding-window cases (the planner's window on K compute-bound devices) run the sampler with their window
    (more rounds than the full window's, fewer rows per round) and hold their tolerance on a small batch; the
    diagnostic rerun uses the sliding window's acceptance."""
    case = replace(SWEEP_CASES["mix3-ddim100-w8"], steps=30, batch=64)
    full = replace(case, window=None)
    (slide,), (whole,) = accuracy_sweep(case, (1e-2,)), accuracy_sweep(full, (1e-2,))
    assert case.window == 8 and slide["rounds"] > whole["rounds"] and slide["nfe"] < whole["nfe"]
    assert not slide["flagged"] and slide["max_rel"] <= 1


def test_sweep_flags_a_run_that_misses_its_tolerance(small):
    """Acceptance far too loose on DDPM (accept_tol 1e3: every point with a noise level accepted each round, frozen
    far from its fixed point): samples end in other modes, over tol; the row must say so."""
    (row,) = accuracy_sweep(replace(small, solver="ddpm"), (1e-3,), accept_tol=1e3)
    assert row["max_rel"] > 10 and row["flagged"] and row["over"] > 0
    assert row["switched"] > 0 and row["strict_accept_max_abs_diff"] is None    # accept_tol given: no rerun
    assert "**max Δ > tol" in to_markdown("gmm", small, [row])


def test_combos_cover_every_update_and_stop():
    assert {(c.update, c.stop) for c in combos()} == {(u, s) for u in UPDATES for s in STOPS}
    assert [c.label for c in combos(["secant"], ["final"])] == ["secant + final rule (default)"]


def test_at_accuracy_and_merge():
    runs = [{"tol": 0.1, "rounds": 5, "nfe": 50.0, "max_abs_diff": 3e-2},
            {"tol": 0.01, "rounds": 7, "nfe": 70.0, "max_abs_diff": 1e-3}]
    assert at_accuracy(runs, 1e-2)["rounds"] == 7 and at_accuracy(runs, 1e-4) is None
    a = {"case": "c", "batch": 4, "window": 10, "today": runs[0], "runs": {"x": runs}, "combos": {}}
    b = {**a, "runs": {"y": runs[:1]}}
    (m,) = merge([a, b])
    assert list(m["runs"]) == ["x", "y"]


def test_policy_case_runs_conditioned_and_a_sample_alone_is_its_row_of_the_batch():
    case = CASES["policy"]
    ref = sample(case, 2, method="sequential").samples
    assert ref.shape == (2, 16, 2) and torch.isfinite(ref).all()
    # Sample 1 alone (its observation and noise follow it): what accuracy_sweep's reruns rely on.
    torch.testing.assert_close(sample(case, 1, first_sample=1, method="sequential").samples[0], ref[1], rtol=0,
                               atol=1e-6)
    (run,) = paratime_runs(case, 2, Combo("secant", "final"), ref, floor=1.0, tols=(0.1,))
    assert run["rounds"] < case.steps and run["max_abs_diff"] <= 0.1


def test_diffusers_loop_runs_the_policy():
    pytest.importorskip("diffusers")
    (run,) = diffusers_runs(CASES["policy"], 2, (0.1,), floor=1.0)
    assert run["rounds"] < CASES["policy"].steps and run["max_abs_diff"] < 0.1


# -- stop="paradigms" against diffusers' real StableDiffusionParadigmsPipeline (issue 25) ------------------------------
@pytest.mark.parametrize("case, window", [("sd-ddim50", 8), ("sd-ddim50", 20), ("gmm-ddim100", 10),
                                          ("digits-ddim100", 20)])
def test_paradigms_rule_has_the_real_class_rounds_and_evaluations(case, window):
    """On the same network, initial noise and window (DDIM: no step noise), ``stop="paradigms"`` with
    :data:`PARADIGMS_RULE` takes exactly the real class's rounds and evaluations, at two tolerances; the tiny SD
    pipeline (classifier-free guidance 5, latents ~+-70) and zoo networks driven through the class."""
    pytest.importorskip("diffusers")
    c = replace(CASES[case], steps=20, window=window)
    batch = 2
    ref = sample(c, batch, method="sequential").samples
    options = tuple(o for o in PARADIGMS_RULE if o[0] != "update")
    for tol in (0.1, 0.01):
        (peer,) = real_class_runs(c, batch, (tol,), floor=float("inf"))
        (ours,) = paratime_runs(c, batch, Combo("picard", "paradigms", options), ref, 0.0, tols=(tol,))
        assert (ours["rounds"], ours["nfe"]) == (peer["rounds"], peer["nfe"]), (tol, ours, peer)
        assert 1 < peer["rounds"] < c.steps
        # The same iterate: the differences from each side's own sequential run agree to the network's float32.
        assert ours["max_abs_diff"] == pytest.approx(peer["max_abs_diff"], rel=0.05, abs=1e-4)


@pytest.mark.parametrize("case, steps, window, batch", [("gmm-ddpm1000", 100, 20, 8), ("digits-ddpm1000", 50, 20, 2),
                                                         ("sd-ddpm100", 20, 8, 2)])
def test_paradigms_rule_on_ddpm_is_the_real_class_from_its_noise(case, steps, window, batch):
    """DDPM, fed the real class's noise (:func:`class_noise`: its initial latents, its generator's step noise drawn
    per step in its order and dtype): paratime's sequential sample is the class's ``parallel=1`` one, and
    ``stop="paradigms"`` with :data:`PARADIGMS_RULE` takes the class's rounds and evaluations and ends at its
    samples, within 1e-5 of each sample's max-abs (~2e-6 here: the class's float32 ``alphas_cumprod``, and its last
    step's ``1e-10 z``, the variance clamped at 1e-20). Paratime's own seeded step noise is another draw (O(1)
    apart; gmm: 24 rounds / 408 NFE against the class's 22 / 383 at tol 0.1). Steps divide 1000: else the class's
    ``batch_step_no_noise`` steps to ``t - 1000 // steps``, off its own trailing grid."""
    pytest.importorskip("diffusers")
    c = replace(CASES[case], steps=steps, window=window)
    pipe, _, args = real_class(c, batch)

    def real(parallel, tol):
        with torch.no_grad():
            x = pipe(**args, parallel=parallel, tolerance=tol, generator=torch.Generator().manual_seed(0)).images
        return x.reshape(ref.shape)

    ref = sample(c, batch, method="sequential", **class_noise(c, batch)).samples
    assert errors(real(1, 0.0), ref, None)[1] <= 1e-5
    options = tuple(o for o in PARADIGMS_RULE if o[0] != "update")
    for tol in (0.1, 0.01, 1e-3):
        (peer,) = real_class_runs(c, batch, (tol,), floor=float("inf"))
        (ours,) = paratime_runs(c, batch, Combo("picard", "paradigms", options), ref, 0.0, tols=(tol,),
                                as_class=True)
        assert (ours["rounds"], ours["nfe"]) == (peer["rounds"], peer["nfe"]), (tol, ours, peer)
        assert 1 < peer["rounds"] < c.steps
    x = sample(c, batch, tol=0.01, update="picard", stop="paradigms", **dict(options), **class_noise(c, batch))
    assert errors(x.samples, real(window, 0.01), None)[1] <= 1e-5


def test_headline_rule_column_on_ddpm_is_the_real_class(monkeypatch):
    """The headline's rule column runs from the class's noise: on gmm DDPM-100 (window 20, 8 samples) its rounds
    and evaluations at the class's chosen tolerance are the class's."""
    pytest.importorskip("diffusers")
    from paratime.bench import rounds_at_accuracy as ra

    monkeypatch.setitem(ra.CASES, "gmm-ddpm1000", replace(CASES["gmm-ddpm1000"], steps=100, window=20))
    res = headline("gmm-ddpm1000", batch=8)
    p, q = res["peer"], res["rule"]
    assert p is not None and (q["tol"], q["rounds"], q["nfe"]) == (p["tol"], p["rounds"], p["nfe"]), (p, q)


def test_headline_reports_paratime_default_against_the_real_class():
    pytest.importorskip("diffusers")
    from paratime.bench import rounds_at_accuracy as ra

    res = headline("policy", batch=2, with_rule=False)
    d, p = res["default"], res["peer"]
    assert d["tol_units"] == "data" and d["scale"] == 1.0 and d["rounds"] > 0
    assert p is not None and p["max_rel_diff"] <= ra.TARGET and res["checks"]["max rel Δ <= target"]
    assert "policy b2 W32" in headline_markdown([res])


def test_headline_without_the_real_class_fails_its_peer_check(monkeypatch):
    """No diffusers (the class's runs empty) is a failed comparison, not an absent one: the peer checks dropped out
    and the run could exit 0 with no peer compared."""
    from paratime.bench import rounds_at_accuracy as ra

    monkeypatch.setattr(ra, "real_class_runs", lambda *a, **k: [])
    res = headline("policy", batch=2, with_rule=False)
    assert res["peer"] is None and res["checks"]["real class ran (diffusers)"] is False


def test_errors_are_relative_to_the_declared_or_own_scale():
    ref = torch.tensor([[1.0, -4.0], [0.5, 0.25]])
    x = ref + torch.tensor([[0.1, 0.0], [0.0, 0.05]])
    assert errors(x, ref, 2.0) == pytest.approx((0.1, 0.05))
    assert errors(x, ref, None) == pytest.approx((0.1, 0.1))        # 0.05 / max|ref_1| = 0.05 / 0.5


def test_sliding_worst_reads_each_sample_as_drawn_alone(capsys):
    # benchmarks/sliding_worst.py backs the README's worst-of-4,096 rows: its chunks decide as each sample alone
    # (per-sample windows), its errors are over the tolerance in force, and --before is the flat tol / 30 (a
    # different run: its second half accepts larger errors).
    from benchmarks.sliding_worst import main, worst
    from paratime import ParallelSampler

    a = worst(10, "ddim", 6, 6, 3)
    b = worst(10, "ddim", 6, 4, 3)
    # The same decisions (rounds); errors equal to the batched network's rounding (~1e-6: up to 2.5e-3 of tol on
    # MKL / AVX-512, whose rows round differently with the call's batch size).
    assert a["rounds"] == b["rounds"] and a["worst"] == pytest.approx(b["worst"], abs=6e-3)
    assert 0 <= a["worst"] <= 1 and a["over"] == 0 and len(a["top"]) == 3
    alone = ParallelSampler("digits", steps=10, window=3, method="picard", progress=False)
    seq = ParallelSampler("digits", steps=10, method="sequential", progress=False)
    i, err = a["top"][0]
    cond = {"labels": torch.tensor([i % 10])}
    res = alone.sample(1, seed=0, first_sample=i, **cond)
    ref = seq.sample(1, seed=0, first_sample=i, **cond).samples
    assert float((res.samples - ref).abs().max()) / res.stats.tol_abs[0] == pytest.approx(err, abs=6e-3)
    before = worst(10, "ddim", 6, 6, 3, before=True)
    assert before["worst"] > 2 * a["worst"]          # the looser second half freezes larger errors
    assert main(["--steps", "10", "--samples", "4", "--windows", "2,3"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n| 2 |") == 1 and out.count("\n| 3 |") == 1
    # --tol: the errors are over that tolerance (digits' data scale is 1), and a looser one stops no later.
    loose = worst(10, "ddim", 6, 6, 3, tol=0.05)
    assert loose["worst_abs"] == pytest.approx(loose["worst"] * 0.05, rel=1e-6)
    assert a["worst_abs"] == pytest.approx(a["worst"] * 2e-3, rel=1e-6) and loose["rounds"] <= a["rounds"]
    for bad in (["--steps", "10", "--windows", "10"], ["--solver", "ddpm", "--before"], ["--windows", "2,x"],
                ["--tol", "0"]):
        with pytest.raises(SystemExit) as exit_:
            main(bad)
        assert exit_.value.code == 2, bad
    with pytest.raises(ValueError, match="before"):
        worst(10, "ddpm", 4, 4, 3, before=True)


def test_sliding_worst_exits_1_when_a_sample_ends_over_tol(monkeypatch, capsys):
    import benchmarks.sliding_worst as sw

    rows = {2: 0, 3: 1}
    monkeypatch.setattr(sw, "worst", lambda steps, solver, samples, chunk, w, before=False, tol=None: {
        "window": w, "worst": 0.5 + rows[w], "over": rows[w], "top": [(0, 0.5 + rows[w])], "rounds": 5.0,
        "worst_abs": 1e-3})
    assert sw.main(["--steps", "10", "--windows", "2,3"]) == 1
    assert sw.main(["--steps", "10", "--windows", "2"]) == 0
    assert "| 3 | 1.500 | 1.00e-03 | 0 (1.500) | 1 | 5.00 | 2.00x |" in capsys.readouterr().out
