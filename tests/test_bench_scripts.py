"""The comparison scripts ``paratime bench`` ends with run end to end on tiny settings (their figures are printed by
``paratime bench``; here only what must hold whatever the timing)."""

import os

import pytest
import torch

pytest.importorskip("diffusers")


@pytest.fixture
def keep_threads():
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


def test_stable_diffusion_paradigms_pipeline_side_by_side(keep_threads):
    from paratime.bench.sd_paradigms import compare, markdown

    rows = {r["sampler"]: r for r in compare(steps=10, window=4, repeats=1)}
    seq = rows["diffusers StableDiffusionPipeline (sequential)"]
    assert seq["rounds"] == 10 and seq["max_diff"] == 0
    # paratime's sequential loop and Picard at tol 0 reproduce diffusers' own pipeline.
    assert rows["paratime sequential"]["max_diff"] <= 1e-4
    assert rows["paratime picard, tol 0"]["max_diff"] <= 1e-4
    # The parallel samplers take fewer rounds than steps, and the real ParaDiGMS pipeline ran.
    assert rows["diffusers StableDiffusionParadigmsPipeline (tol 0.1)"]["rounds"] < 10
    default = next(r for name, r in rows.items() if name.startswith("paratime picard, default tol"))
    assert default["rounds"] < 10 and default["max_diff"] <= 1e-2
    table = markdown(list(rows.values()), steps=10, window=4, repeats=1)
    assert all(name in table for name in rows)


def test_policy_latency_against_the_paradigms_loop(keep_threads, capsys):
    from paratime.bench.policy_latency import main

    assert main(["--threads", "1", "--chunks", "1", "--reps", "1"]) == 0
    out = capsys.readouterr().out.splitlines()

    def row(name):
        return next(ln.split() for ln in out if ln.strip().startswith(name))

    # columns: name..., min, median, max, rounds, NFE, max |Δ|, vs sequential, vs ParaDiGMS
    sequential, picard, paradigms = row("paratime sequential"), row("paratime Picard"), row("diffusers ParaDiGMS")
    assert int(sequential[-5]) == 100 and int(picard[-5]) < 100 and int(paradigms[-5]) < 100
    assert float(sequential[-3]) == 0 and 0 < float(picard[-3]) < 0.1 and 0 < float(paradigms[-3]) < 0.1
    # The timed loop is diffusers' real class's: the same rounds and chunk on the first observation.
    assert any(ln.startswith("anchor: ") and ln.endswith(": the same") for ln in out)


def test_window_sweep_rows_and_recommendation(keep_threads):
    """The measurement behind the default window: rounds and NFE against W, relative to the full window."""
    from paratime.bench.window_sweep import recommend, sweep

    rows = sweep("mlp/ddim-100", batch=1, reps=1)
    assert [r["window"] for r in rows] == [100, 64, 50, 32, 25, 16, 8]
    assert rows[0]["rounds_rel"] == 1 and rows[0]["nfe_rel"] == 1
    assert rows[-1]["nfe"] < rows[0]["nfe"] and rows[-1]["rounds"] > rows[0]["rounds"]   # the trade it measures
    best = recommend(rows)["mlp/ddim-100"]
    assert next(r for r in rows if r["window"] == best)["rounds_rel"] <= 1.15


def test_backends_round_reports_the_engine_overhead(keep_threads):
    """The local backend's per-round figures, with the time outside the network's forward calls."""
    import argparse

    from paratime.bench.backends_round import measure

    from paratime import ParallelSampler

    rec = measure("local", argparse.Namespace(steps=20, window=20, batch=2, reps=1))
    assert rec["rounds"] >= 2 and rec["per_round_s"] > 0 and rec["bytes_per_round"] == 0
    assert 0 < rec["overhead_per_round_s"] < rec["per_round_s"] and 0 < rec["overhead_share"] < 1
    # The timed network is the model's own: the same run as the other backends' (a wrapper hid the digits network's
    # data range, and the local row sampled with a tolerance in other units).
    plain = ParallelSampler("digits", steps=20, window=20, progress=False).sample(2, seed=0).stats
    assert (rec["rounds"], rec["nfe"]) == (plain.rounds, plain.nfe)


def test_gpu_scripts_run_their_path_on_a_cpu(keep_threads, tmp_path, capsys):
    """The GPU benchmarks' smoke runs (``--device cpu --tiny``): the same models, samplers and printing as on a GPU;
    the curves are measured, increasing from one row, and written as the table ``cost=`` takes; each sampler's
    sample is within 1e-2 of sequential's, and the planner says what it chose."""
    import json

    from paratime.bench import gpu_curves, gpu_sd
    from paratime.cost import make_cost

    path = tmp_path / "curves.json"
    assert gpu_curves.main(["--device", "cpu", "--tiny", "--rows", "1", "2", "4", "--repeats", "1",
                            "--json", str(path)]) == 0
    curves = json.loads(path.read_text())["curves"]
    assert set(curves) == {"sd15-unet float32", "digits float32", "policy float32"}
    for c in curves.values():
        assert c["rows"] == [1, 2, 4] and all(s > 0 for s in c["seconds"])
        make_cost(dict(zip(c["rows"], c["seconds"])))          # the table ParallelSampler(cost=) takes
    assert gpu_curves.main(["--device", "cpu", "--rows", "2", "4"]) == 2
    assert gpu_curves.main(["--device", "cpu", "--tiny", "--rows", "1", "2", "--repeats", "1", "--sizes", "8", "16",
                            "--json", str(path)]) == 0
    assert {"sd15-unet float32 8x8", "sd15-unet float32 16x16"} <= set(json.loads(path.read_text())["curves"])
    # 128x128 latents hold 4x a 64x64 row's pixels: rows up to a quarter of the largest, one row at least.
    rows = (1, 2, 4, 8, 16, 32, 64, 128)
    assert gpu_curves.rows_for(rows, 128) == (1, 2, 4, 8, 16, 32) and gpu_curves.rows_for(rows, 64) == rows
    assert gpu_curves.rows_for(rows, None) == rows and gpu_curves.rows_for((1, 2), 1024) == (1,)
    assert gpu_sd.main(["--device", "cpu", "--tiny", "--size", "16", "--steps", "4", "--windows", "2",
                        "--repeats", "1"]) == 0
    assert "latents 4x16x16" in capsys.readouterr().out
    assert gpu_sd.main(["--device", "cpu", "--tiny", "--steps", "8", "--windows", "4", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {ln[:22].strip(): ln.split() for ln in lines if ln[:22].strip() in
            ("sequential", "picard W=4", "planner (auto)", "parareal")}
    assert set(rows) == {"sequential", "picard W=4", "planner (auto)", "parareal"}
    delta = {label: float(cols[-5]) for label, cols in rows.items()}      # max|Δ| against sequential
    # Against the sequential run's own sample: 0 there, and a parallel run's small but not 0 (a tol-bounded run
    # compared with itself, or with another parallel run, would not give both).
    assert delta["sequential"] == 0 and 0 < delta["picard W=4"] <= 1e-2 and 0 < delta["parareal"] <= 1e-2, delta
    assert delta["planner (auto)"] <= 1e-2
    assert any(ln.strip().startswith("plan: ") for ln in lines)


def test_gpu_scripts_refuse_bad_options_before_the_work(capsys):
    """``--repeats 0`` (gpu_sd.py failed later on an unbound result) and a mistyped ``GPU_CHECKS`` step (skipped
    every step and exited 0) are refused up front, naming the option."""
    import subprocess
    from pathlib import Path

    from paratime.bench import gpu_curves, gpu_sd

    for main, bad in ((gpu_sd.main, ["--repeats", "0"]), (gpu_curves.main, ["--repeats", "0"]),
                      (gpu_sd.main, ["--size", "12"]), (gpu_curves.main, ["--sizes", "64", "12"])):
        with pytest.raises(SystemExit):
            main(["--device", "cpu", "--tiny", *bad])
        assert bad[0] in capsys.readouterr().err, bad
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_checks.sh"
    run = subprocess.run(["bash", str(script)], env={**os.environ, "GPU_CHECKS": "tests bogus"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "GPU_CHECKS: unknown step 'bogus'" in run.stderr, run.stderr


@pytest.mark.parametrize("name", ["pipeline_table.py", "sd_paradigms.py"])
def test_script_help_runs_as_a_file(name):
    """python benchmarks/X.py --help, as the other scripts answer it: these two raised ImportError (relative
    imports) when run as files."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-800:]
    assert "usage:" in r.stdout


def test_parareal_sde_sweep_runs_and_holds_the_tolerance(capsys):
    """benchmarks/parareal_sde.py, the README's Parareal-on-SDE figure: every case row printed, exit 0 (no case over
    its tolerance) on a small batch."""
    from benchmarks.parareal_sde import GRIDS, SOLVERS, main

    assert main(["--seeds", "1", "--batch", "4"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ddpm") or ln.startswith("| euler")]
    assert len(rows) == len(SOLVERS) * len(GRIDS)

