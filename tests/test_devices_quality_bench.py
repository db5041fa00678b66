"""benchmarks/devices_quality.py: the FD tests on known inputs, and a small run end to end (what must hold whatever
the figures: the planner's default matched and never below sequential, CHORDS's core 0 the sequential quality)."""

import json

import numpy as np
import pytest
import torch

from benchmarks import devices_quality as dq


class _Judge:
    """A stand-in for the digits judge: the features are given, the real ones drawn from N(0, I)."""

    def __init__(self, real):
        self.real = real
        self.clf = self

    def decision_function(self, x):
        return x


def _quality(n=400, d=4, seed=0):
    pytest.importorskip("scipy")                 # the Frechet distance's sqrtm
    # The samples' features N(0, I), the real ones N(1, I): an FD of about d, as a model's FD sits away from 0.
    rng = np.random.default_rng(seed)
    seq = rng.standard_normal((n, d))
    return dq.Quality(_Judge(1 + rng.standard_normal((2000, d))), seq, boot=100), seq, rng


def test_the_sequential_samples_themselves_pass_both_tests():
    q, seq, _ = _quality()
    r = q.score(seq)
    assert r["dfd"] == 0 and r["dfd_se"] == 0 and r["matched"] and r["paired"]
    assert q.se > 0


def test_a_shifted_distribution_fails_both_tests():
    q, seq, _ = _quality()
    r = q.score(seq - 1.0)                       # the means 2 apart per feature: FD grows by 4 * 3 = 12
    assert r["dfd"] > 3 and not r["matched"] and not r["paired"]


def test_a_small_perturbation_passes_the_loose_test_and_fails_the_paired_one():
    # The paired test sees a loss that sequential's own standard error hides: a shift of 0.01 per feature away from
    # the real mean moves the FD by about 0.08, inside the SE of an FD of 4 on 400 samples (~0.2) but many paired
    # SEs away (the perturbed and the sequential samples are the same samples shifted).
    q, seq, _ = _quality()
    r = q.score(seq - 0.01)
    assert 0 < r["dfd"] < q.se and r["matched"]
    assert not r["paired"] and abs(r["dfd"]) > 2 * r["dfd_se"]


def test_best_takes_the_fastest_setting_that_passes():
    rows = [{"method": "paratime W=4", "speedup": s, "matched": m, "paired": p}
            for s, m, p in ((2.0, True, True), (3.0, True, False), (4.0, False, False))]
    rows.append({"method": "CHORDS port", "speedup": 9.0, "matched": True, "paired": True})
    assert dq.best(rows, "paratime")["speedup"] == 3.0
    assert dq.best(rows, "paratime", "paired")["speedup"] == 2.0
    assert dq.best(rows[2:3], "paratime") is None


def test_small_run(tmp_path, capsys):
    pytest.importorskip("sklearn")               # the digits judge (scipy comes with it)
    threads = torch.get_num_threads()
    try:
        rc = dq.main(["--samples", "24", "--steps", "10", "--devices", "2", "--boot", "10", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    res = json.loads((tmp_path / "devices_quality.json").read_text())
    rows = res["K"]["2"]
    planner = rows[0]
    assert planner["method"] == "planner" and planner["speedup"] >= 1.0 and planner["matched"]
    assert {r["setting"] for r in rows if r["method"] == "paratime W=2"} == {f"tol {t:g}" for t in dq.TOLS}
    core0 = [r for r in rows if r["method"] == "CHORDS port"][-1]
    assert core0["setting"] == "core 0 (sequential)" and core0["sce"] == 10 and abs(core0["dfd"]) < 1e-3
    # Sequential DDIM with fewer steps (SCE = its steps at any K), one batch, the same draws as one by one (to the
    # float32 network's batch-size rounding, ~4e-6 after 3 steps).
    assert [r["setting"] for r in res["fewer"]] == [f"DDIM-{m}" for m in (2, 3, 5, 7)]
    assert all(r["sce"] == int(r["setting"][5:]) for r in res["fewer"])
    one = dq._paratime(3, 1, 2, method="sequential")["x"]
    assert torch.allclose(dq._fewer(3, 2).to(one.dtype), one, rtol=0, atol=1e-4)
    fastest = dq.best(rows, "paratime", "paired")
    assert res["at_sce"]["2"]["setting"] == f"DDIM-{round(fastest['sce'])}"
    out = capsys.readouterr().out
    assert "| 2 | FD within sequential's SE |" in out and "| 2 | paired Δ within 2 SE |" in out
    assert "sequential DDIM at that SCE" in out and "against sequential with fewer steps" in out


@pytest.mark.parametrize("argv, name", [(["--samples", "5"], "--samples"), (["--devices", "1"], "--devices"),
                                        (["--devices", "a,b"], "--devices"), (["--boot", "2"], "--boot"),
                                        (["--steps", "2"], "--steps"), (["--windows", "0"], "--windows"),
                                        (["--tols", "0.1,-1"], "--tols"), (["--tols", "x"], "--tols")])
def test_options_are_checked(argv, name, capsys):
    with pytest.raises(SystemExit):
        dq.main(argv)
    assert name in capsys.readouterr().err


def test_the_fixed_settings_can_be_chosen(tmp_path, capsys):
    pytest.importorskip("sklearn")               # the digits judge (scipy comes with it)
    threads = torch.get_num_threads()
    try:
        rc = dq.main(["--samples", "20", "--steps", "10", "--devices", "2", "--boot", "10", "--windows", "1",
                      "--tols", "0.3", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    rows = json.loads((tmp_path / "devices_quality.json").read_text())["K"]["2"]
    assert [(r["method"], r["setting"]) for r in rows if r["method"].startswith("paratime")] == \
        [("paratime W=2", "tol 0.3")]
