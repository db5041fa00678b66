"""benchmarks/devices.py end to end in its --quick mode: what must hold whatever the figures (sequential at 1.0x,
the planner never below it and within 2e-3 of the data range, CHORDS's core 0 on paratime's sequential sample,
every method measured at every K, the outputs written)."""

import json
import math
import os

import pytest
import torch

from benchmarks import devices


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run(tmp_path, keep_threads, capsys):
    pytest.importorskip("matplotlib")            # devices.main plots (and checks) what it measured
    assert devices.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "devices.json").read_text())
    assert (tmp_path / "devices.png").stat().st_size > 0
    out = capsys.readouterr().out
    for res in data["results"]:
        assert sorted(map(int, res["K"])) == [1, 2, 4]
        for K, rec in res["K"].items():
            assert rec["sequential"]["speedup"] == 1.0
            assert rec["planner"]["speedup"] >= 1.0 and rec["planner"]["err"] <= devices.LEVELS[0]
            assert rec["planner"]["plan"]["devices"] == int(K)
            assert rec["windows"] and rec["parareal_pipelined"] and rec["chords"]
            assert bool(rec["staggered"]) == ("staggered" in devices.METHODS and int(K) >= 2)   # K >= 2 cores
            # The port's hits: the last is core 0 (sequential), at tick N.
            assert rec["chords"][-1]["sce"] == res["steps"] and rec["chords_core0_err"] <= devices.CORE0_TOL
        assert f"{res['model']} DDIM-{res['steps']}" in out


def test_quick_run_with_a_multistep_solver(tmp_path, keep_threads, capsys):
    pytest.importorskip("matplotlib")            # devices.main plots (and checks) what it measured
    # Every method with DPM++(2M); the CHORDS port and pipelined Parareal take one-step solvers: left out of the
    # tables (a row of dashes would read as "missed") and the run says so, not recorded as failures.
    assert devices.main(["--quick", "--models", "digits", "--solver", "dpmpp_2m", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "devices.json").read_text())["results"][0]
    out = capsys.readouterr().out
    assert res["solver"] == "dpmpp_2m" and "digits DPM++(2M)-10, compute-bound" in out
    for K, rec in res["K"].items():
        assert rec["chords"] == [] and rec["parareal_pipelined"] == [] and rec["windows"]
        assert rec["planner"]["speedup"] >= 1.0 and rec["planner"]["err"] <= devices.LEVELS[0]
    assert "| CHORDS port |" not in out and "| pipelined Parareal |" not in out and "| best fixed window |" in out
    assert "not run for dpmpp_2m: the CHORDS port" in out


@pytest.mark.parametrize("argv", [["--solver", "magic"], ["--solver", "dpmpp_2m", "--real"],
                                  ["--solver", "dpmpp_2m", "--paradigms"]])
def test_solver_option_is_checked(argv, capsys):
    with pytest.raises(SystemExit):
        devices.main(argv)
    assert "--solver" in capsys.readouterr().err


def test_calibrate_prints_the_rounds_model_beside_measured_rounds_and_rows(keep_threads, capsys):
    """``--calibrate`` (a short grid of another solver): per window, measured rounds and rows beside the model's."""
    assert devices.main(["--calibrate", "--solver", "dpmpp_2m", "--steps", "6"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| DPM++(2M) | 6 |")]
    assert [ln.split("|")[3].strip() for ln in rows] == ["2", "4", "6"]
    for ln in rows:
        cells = [c.strip() for c in ln.split("|")[4:8]]
        lo, hi = map(int, cells[0].split("-"))
        assert 1 <= lo <= hi and int(cells[1]) >= 1 and float(cells[2]) >= 6 and int(cells[3]) >= 6


def test_bad_output_folder_is_refused_before_the_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        devices.main(["--quick", "--out", str(blocker)])
    assert not list(tmp_path.glob("*.json"))


def test_bad_steps_are_refused():
    with pytest.raises(SystemExit):
        devices.main(["--steps", "2"])


def test_the_window_trace_reads_the_rounds_it_reports():
    # benchmarks/window_trace.py backs the README's "what limits a window of K points": its strides follow the
    # acceptance it prints (leading slots within their threshold, the next one over it), its starts chain, and the
    # instrumentation leaves the sampler as it was.
    from benchmarks.window_trace import main, trace
    from paratime.methods.window import SlidingWindow

    accept = SlidingWindow.accept
    rounds, total, err = trace(window=2, steps=12, sample=0)
    assert SlidingWindow.accept is accept
    assert total == len(rounds) + 1                    # the x0 guess's call, then one acceptance a round
    assert err <= 2e-3 * 1.05                          # the default tol in the data's units (digits' range ~1.05)
    starts = [r["start"] for r in rounds]
    # Each start is the last one plus its stride, or the last window again (N - W) where every point was accepted
    # while the final point still moved (the stop rule's reopen).
    assert starts[0] == 0 and all(b == a + r["stride"] or (a + r["stride"] == 12 and b == 10)
                                  for a, b, r in zip(starts, starts[1:], rounds))
    assert starts[-1] + rounds[-1]["stride"] == 12
    for r in rounds:
        ok = [v <= 1 for v in r["ratios"]]
        lead = next((i for i, v in enumerate(ok) if not v), len(ok))
        assert r["stride"] == min(lead + 1, len(r["ratios"])), r
    assert any(r["stride"] == 2 for r in rounds) and any(r["stride"] == 1 for r in rounds)
    assert main(["--window", "2", "--steps", "12"]) == 0


def test_the_real_two_rank_run_prints_measured_beside_predicted(keep_threads, capsys):
    """``--real`` end to end on 2 gloo ranks (a short grid): the planner's plan, measured wall times beside its
    prediction (network and the work outside it), and a sample within 2e-3 of one rank's sequential one."""
    assert devices.real(steps=6, repeats=1) == []
    out = capsys.readouterr().out
    for what in ("sequential, 1 rank:", "planner, 2 gloo ranks:", "measured speed-up", "planner's prediction:",
                 "work outside it", "plan: "):
        assert what in out, (what, out)


def test_the_baseline_is_sequentials_measured_cost_not_n(keep_threads):
    """Heun takes two calls a step (the last one, to sigma 0, one): sequential costs 2N - 1, and every speed-up is
    taken against that, not against N (the sequential row was hard-coded at N before)."""
    res = devices.measure("digits", 6, [1], 1, quick=True, solver="heun")
    rec = res["K"][1]
    assert rec["sequential"]["sce"] == 11.0 and rec["sequential"]["speedup"] == 1.0
    planner = rec["planner"]
    assert planner["speedup"] == pytest.approx(11.0 / planner["sce"])


def test_a_measured_curve_prices_the_calls(tmp_path, keep_threads, capsys):
    """``--curve FILE:NAME`` prices every call with a table from gpu_curves.py's JSON: the table ``c(r) = r`` gives
    the compute-bound run's figures exactly, a flat table the latency-bound ones, and a GPU-like table (flat to 2
    rows, then linear; the H100's SD-1.5 curve is flat to 8) neither: each configuration's SCE is what the sampler
    reports under that table; the label says which curve; a bad table or name is refused naming --curve."""
    pytest.importorskip("matplotlib")            # devices.main plots (and checks) what it measured
    rows = [1, 2, 4, 8, 16, 32, 64]
    linear_t, flat_t = dict(zip(rows, [r * 1e-3 for r in rows])), dict(zip(rows, [1e-3] * len(rows)))
    gpu_t = dict(zip(rows, [max(1.0, r / 2) * 1e-3 for r in rows]))
    base = devices.measure("digits", 8, [2], 1, quick=True)
    linear = devices.measure("digits", 8, [2], 1, quick=True, curve=("linear (measured)", linear_t))
    assert base["cost"] == "compute" and linear["cost"] == "linear (measured)"
    for key in ("sequential", "planner"):
        assert linear["K"][2][key]["sce"] == pytest.approx(base["K"][2][key]["sce"])
    assert [w["sce"] for w in linear["K"][2]["windows"]] == pytest.approx([w["sce"] for w in base["K"][2]["windows"]])
    flat = devices.measure("policy", 8, [2], 1, quick=True, curve=("flat", flat_t))
    latency = devices.measure("policy", 8, [2], 1, quick=True)
    assert latency["cost"] == "latency"
    assert [w["sce"] for w in flat["K"][2]["windows"]] == pytest.approx([w["sce"] for w in latency["K"][2]["windows"]])
    # A table like neither named curve: the whole-grid window's SCE is what the sampler reports under that table,
    # and differs from both named curves' (a --curve that only relabelled the named curve fails here).
    gpu = devices.measure("digits", 8, [2], 1, quick=True, curve=("gpu", gpu_t))
    wide = next(w for w in gpu["K"][2]["windows"] if w["window"] == 8)
    s = devices.make_sampler("digits", 8, gpu_t, 2, window=8, tol=wide["tol"])
    assert wide["sce"] == pytest.approx(s.sample(1, seed=0, first_sample=0, **devices._cond("digits", 0)).stats.sce)
    named = {c: next(w for w in devices.measure("digits", 8, [2], 1, quick=True, curve=(c, t))["K"][2]["windows"]
                     if w["window"] == 8)["sce"] for c, t in (("linear", linear_t), ("flat", flat_t))}
    assert all(wide["sce"] != pytest.approx(v) for v in named.values()), (wide["sce"], named)
    path = tmp_path / "curves.json"
    path.write_text(json.dumps({"device": "test", "curves": {
        "flat": {"rows": rows, "seconds": [1e-3] * len(rows)},
        "short": {"rows": rows, "seconds": [1e-3] * 3}, "negative": {"rows": [1, 2], "seconds": [1e-3, -1.0]}}}))
    out = tmp_path / "out"
    assert devices.main(["--quick", "--models", "digits", "--curve", f"{path}:flat", "--out", str(out)]) == 0
    assert "cost flat (measured)" in capsys.readouterr().out
    assert json.loads((out / "devices.json").read_text())["results"][0]["cost"] == "flat (measured)"
    for name in ("missing", "short", "negative"):
        with pytest.raises(SystemExit):
            devices.main(["--quick", "--curve", f"{path}:{name}", "--out", str(out)])
        assert "--curve" in capsys.readouterr().err, name


def test_guess_headroom_moves_only_the_entering_guesses():
    # benchmarks/guess_headroom.py backs the README's "how much better the guesses must be": F = 1 is the default
    # sampler itself, exact guesses never cost rounds and end nearer the sequential sample, a halfway guess lies
    # between, and the instrumentation leaves the sampler as it was.
    from benchmarks.guess_headroom import headroom, main
    from paratime import ParallelSampler
    from paratime.methods.window import SlidingWindow

    init, slide = SlidingWindow.__init__, SlidingWindow.slide
    kw = dict(windows=(3,), steps=12, seeds=4)
    today, half, exact = (headroom(f, **kw)[0] for f in (1.0, 2.0, math.inf))
    assert SlidingWindow.__init__ is init and SlidingWindow.slide is slide
    plain = ParallelSampler("digits", method="picard", window=3, steps=12, progress=False).sample(
        4, seed=0, labels=torch.arange(4) % 10)
    assert today["rounds"] == sum(plain.stats.sample_rounds) / 4
    assert exact["rounds"] < today["rounds"] and half["rounds"] <= today["rounds"]
    assert exact["speedup"] == pytest.approx(12 / exact["rounds"])
    assert main(["--factors", "1,inf", "--windows", "2", "--steps", "8", "--seeds", "2"]) == 0
    for bad in (["--factors", "0.5"], ["--windows", "8", "--steps", "8"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            main(bad)
