"""``benchmarks/bound_hunt.py`` (the README's bound hunt) on a tiny grid: each case's score equals the same quotient
recomputed from the public API; a case over tol or failed is listed with its command and exits 1; a refused case is
listed."""

import itertools
import json

import pytest
import torch

from paratime import ParallelSampler
from paratime.bench import bound_hunt as bh
from paratime.bench.equivalence_sweep import guided_ring
from paratime.evaluator import NonFiniteOutputError
from paratime.zoo.gmm import mixture_3d

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = dict(models=["mix3", "guided"], solvers=["lms"], steps=[20], windows=[4, "all"], updates=["secant"],
            tols=[2e-3, 0.1], seeds=[0], batch=8)


def _ratios(model, cond, window, tol, **options) -> tuple[list[float], object]:
    """Each sample's max |Δ| / tol_abs, recomputed from the public API (LMS-20, seed 0, 8 samples), and the result."""
    seq = ParallelSampler(model, solver="lms", steps=20, method="sequential", progress=False, **options).sample(
        8, seed=0, **cond).samples
    res = ParallelSampler(model, solver="lms", steps=20, window=20 if window == "all" else window, tol=tol,
                          update="secant", progress=False, **options).sample(8, seed=0, **cond)
    return [float((res.samples[b] - seq[b]).abs().max()) / res.stats.tol_abs[b] for b in range(8)], res


def test_each_case_is_its_worst_samples_error_over_tol_abs():
    rows = bh.hunt(**GRID)
    assert [(r["model"], r["window"], r["tol"]) for r in rows] == list(itertools.product(
        GRID["models"], GRID["windows"], GRID["tols"]))
    models = {"mix3": mixture_3d(), "guided": guided_ring()}
    labels = torch.randint(0, 9, (8,), generator=torch.Generator().manual_seed(0))     # the guided ring's, seed 0
    for r in rows:
        cond = {"labels": labels} if r["model"] == "guided" else {}
        ratios, res = _ratios(models[r["model"]], cond, r["window"], r["tol"])
        i = ratios.index(max(ratios))
        assert r["worst"] == pytest.approx(ratios[i], rel=1e-9) and r["sample"] == i
        assert r["over"] == sum(v > 1 for v in ratios) and r["rounds"] == res.stats.rounds
        assert r["rolled_back"] == res.stats.extra["rolled_back"][i]
    # The 3-D mixture's sample 4 under LMS-20 at window 4 (README *Where it fails*; tests/test_accuracy.py) ended 4.6x
    # over tol under a guard that rolled back to half its start; rolled back to the grid's start it holds, and no
    # sample is over tol.
    (w4,) = [r for r in rows if (r["model"], r["window"], r["tol"]) == ("mix3", 4, 2e-3)]
    assert w4["over"] == 0 and w4["worst"] <= 1


def test_guidance_is_the_trajectorys_for_both_samplers():
    """``--guidance 2``: the guided ring's reference and Picard run both guide; the 3-D mixture (no unconditional
    input) refuses it."""
    (guided, mix3) = bh.hunt(["guided", "mix3"], ["lms"], [20], [4], ["secant"], [0.1], [0], 8, guidance=2.0)
    labels = torch.randint(0, 9, (8,), generator=torch.Generator().manual_seed(0))
    ratios, _ = _ratios(guided_ring(), {"labels": labels}, 4, 0.1, guidance=2.0)
    plain, _ = _ratios(guided_ring(), {"labels": labels}, 4, 0.1)
    assert guided["worst"] == pytest.approx(max(ratios), rel=1e-9) and abs(max(ratios) / max(plain) - 1) > 1e-3
    assert guided["guidance"] == 2.0 and "--guidance 2" in bh.command(guided)
    assert mix3["refused"].startswith("guidance:")


def test_a_case_over_tol_is_listed_with_its_command_and_exits_1(monkeypatch, tmp_path, capsys):
    argv = ["--models", "gmm", "--solvers", "ddim,heun", "--steps", "10", "--windows", "4", "--updates", "secant",
            "--tols", "0.1,0.05", "--batch", "6"]
    assert bh.main(argv) == 0                                           # within tol as drawn
    assert "0 over tol" in capsys.readouterr().out
    tol_abs = ParallelSampler("gmm", solver="heun", steps=10, window=4, tol=0.1, progress=False).sample(
        6, seed=0).stats.tol_abs
    sequential = bh.sequential

    def moved(name, solver, steps, batch, seed, **options):  # heun's sample 3 moved by 1 (tol_abs <= 0.4), 2 by 1.5x
        ref = sequential(name, solver, steps, batch, seed, **options).clone()
        if solver == "heun":
            ref[3] += 1.0
            ref[2] += 1.5 * tol_abs[2]
        return ref

    monkeypatch.setattr(bh, "sequential", moved)
    out = tmp_path / "rows.json"
    assert bh.main(argv + ["--json", str(out)]) == 1
    text = capsys.readouterr().out
    ddim1, ddim05, heun1, heun05 = json.loads(out.read_text())
    assert max(ddim1["worst"], ddim05["worst"]) < 1 < heun1["worst"] < heun05["worst"]
    assert heun1["sample"] == heun05["sample"] == 3 and heun1["over"] == heun05["over"] == 2
    over = [line for line in text.splitlines() if line.startswith("- ") and "x sample" in line]
    assert over == [f"- {r['worst']:.3g}x sample 3 rolled_back={r['rolled_back']}: OMP_NUM_THREADS=1 python -m "
                    "paratime.bench.bound_hunt --models gmm --solvers heun --steps 10 --windows 4 --updates secant "
                    f"--tols {r['tol']:g} --seeds 0 --batch 6" for r in (heun1, heun05)]
    assert f"| heun | {heun05['worst']:.3g} |" in text and "4 cases run, 2 over tol, 0 failed" in text


def test_a_failed_case_is_listed_with_its_command_and_exits_1(monkeypatch, capsys):
    """A case whose network output turns non-finite (the policy's consistency step, 100 steps, window 32, the plain
    update, diverges so) is a failure: listed with its command, the hunt goes on, exit 1."""
    score = bh.score

    def diverging(name, solver, *args, **options):
        if solver == "heun":
            raise NonFiniteOutputError("network output is not finite at step 7 (sigma=1, model time=1), sample 2")
        return score(name, solver, *args, **options)

    monkeypatch.setattr(bh, "score", diverging)
    assert bh.main(["--models", "gmm", "--solvers", "heun,ddim", "--steps", "10", "--windows", "4", "--updates",
                    "secant", "--tols", "0.1", "--batch", "4"]) == 1
    text = capsys.readouterr().out
    assert "| heun | - |" in text and "1 cases run, 0 over tol, 1 failed, 0 refused" in text
    assert ("- network output is not finite at step 7 (sigma=1, model time=1), sample 2: OMP_NUM_THREADS=1 python -m "
            "paratime.bench.bound_hunt --models gmm --solvers heun --steps 10 --windows 4 --updates secant --tols 0.1 "
            "--seeds 0 --batch 4") in text.splitlines()


def test_a_refused_case_is_counted_and_listed(capsys):
    """dpmpp_singlestep cannot split 5 steps into its order list: refused by the reference, every window listed."""
    assert bh.main(["--models", "gmm", "--solvers", "dpmpp_singlestep,ddim", "--steps", "5", "--windows", "2,all",
                    "--updates", "picard", "--tols", "0.1", "--batch", "4"]) == 0
    text = capsys.readouterr().out
    assert "| dpmpp_singlestep | - |" in text and "2 cases run, 0 over tol, 0 failed, 2 refused" in text
    assert "- gmm dpmpp_singlestep-5, 2 cases: steps: diffusers' single-step order list" in text
    rows = bh.hunt(["gmm"], ["ddim"], [5], [0], ["picard"], [0.1], [0], 4)   # refused by the sampler itself
    assert rows[0]["refused"].startswith("window: must be an integer >= 1")


@pytest.mark.parametrize("argv", [["--models", "mnist"], ["--solvers", "rk4"], ["--updates", "newton"],
                                  ["--windows", "0"], ["--tols", "0"], ["--seeds", "a"], ["--batch", "0"]])
def test_bad_options_are_refused(argv):
    with pytest.raises(SystemExit):
        bh.main(argv)
