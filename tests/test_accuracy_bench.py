"""The issue-17 accuracy benchmarks on tiny settings: ``accuracy_sweep.py``'s rows and flags, and
``rounds_at_accuracy.py``'s combinations, selection at a target accuracy and merging of runs."""

from dataclasses import replace

import pytest
import torch

from paratime.bench.accuracy_sweep import SWEEP_CASES, accuracy_sweep, to_markdown
from paratime.bench.rounds_at_accuracy import (CASES, Combo, at_accuracy, combos, diffusers_runs, merge, paratime_runs,
                                              sample)
from paratime.methods.picard import STOPS, UPDATES

KEYS = {"tol", "max_abs_diff", "p99_abs_diff", "over", "switched", "switched_over", "rounds", "nfe", "flagged", "worst",
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
        err = (sample(small, 32, tol=r["tol"]).samples - ref).abs().amax(1)      # (B,) per-sample max |Δ|
        assert r["max_abs_diff"] == pytest.approx(float(err.max()), abs=0)
        assert r["p99_abs_diff"] <= r["max_abs_diff"] and r["over"] == int((err > r["tol"]).sum())
        assert 0 < r["rounds"] < small.steps and 0 <= r["switched_over"] <= min(r["switched"], r["over"])
        assert r["flagged"] == (r["max_abs_diff"] > r["tol"])
    # The guarantee holds here (tests/test_accuracy.py checks it at every tolerance): no flag.
    assert not any(r["flagged"] for r in rows)


def test_sweep_flags_a_run_that_misses_its_tolerance(small):
    """Acceptance far too loose: every point but the last (noise level 0) is accepted in round 1, one Picard sweep
    from the noise, far from the sequential sample; the row must say so."""
    (row,) = accuracy_sweep(small, (1e-3,), accept_tol=1e3)
    assert row["rounds"] <= 2 and row["max_abs_diff"] > 10 * row["tol"]
    assert row["flagged"] and row["over"] == small.batch and row["switched"] is not None
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
