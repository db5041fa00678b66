"""The benchmark harness measures what it says: rounds and NFE match the sampler's, speed-ups are derived from the
sequential run, and the ParaDiGMS loop of diffusers reproduces its own sequential sampler at tol 0."""

import pytest
import torch

from paratime import ParallelSampler
from paratime.models import as_denoiser
from paratime.bench import Case, paradigms_loop, run_suite, to_markdown
from paratime.bench.suite import failures


def test_suite_records_and_markdown():
    d = dict(model="gmm", solver="ddim", steps=30, batch=16, reps=2, warmup=1)
    recs = run_suite([Case(method="sequential", **d), Case(method="picard", **d), Case(method="parareal", **d)])
    assert [r["method"] for r in recs] == ["sequential", "picard", "parareal"]
    pic = ParallelSampler("gmm", steps=30, tol=0.1, progress=False).sample(16, seed=0)      # the Case's tol
    assert recs[1]["rounds"] == pic.stats.rounds and recs[1]["nfe"] == pytest.approx(pic.stats.nfe)
    # Speed-ups come from the record's own interleaved sequential runs (same process, same load), not from the
    # sequential record timed at another moment; the sequential record's ratio is against itself run twice.
    for r in recs:
        assert len(r["walls_s"]) == len(r["sequential_walls_s"]) == 2
        ratios = sorted(q / w for q, w in zip(r["sequential_walls_s"], r["walls_s"]))
        assert r["speedup"] == pytest.approx((ratios[0] + ratios[1]) / 2)
    seq = ParallelSampler("gmm", steps=30, method="sequential", progress=False).sample(16, seed=0)
    par = ParallelSampler("gmm", steps=30, method="parareal", tol=0.1, progress=False).sample(16, seed=0)
    assert recs[1]["max_abs_diff"] == pytest.approx(float((pic.samples - seq.samples).abs().max()))
    assert recs[2]["max_abs_diff"] == pytest.approx(float((par.samples - seq.samples).abs().max()))
    assert recs[1]["max_abs_diff"] > 0                       # tol 0.1: the reference really is another run
    assert recs[2]["nfe_fine"] > 0 and recs[2]["pipelined_rounds"] <= recs[2]["rounds"]
    md = to_markdown(recs)
    assert md.count("\n") == 2 + 3 and "| gmm/ddim-30/b16 | picard | local | 1 | 0.1 |" in md
    assert failures(recs) == []                              # Picard's final rule kept its bound


def test_suite_check_fails_when_a_bounded_method_exceeds_its_tolerance():
    rec = {"label": "gmm/ddim-30/b16", "method": "picard", "backend": "local", "workers": 1, "tol": 1e-3}
    assert failures([{**rec, "max_abs_diff": 5e-4}]) == []
    assert failures([{**rec, "max_abs_diff": 2e-3}]) != []
    assert failures([{**rec, "method": "parareal", "max_abs_diff": 2e-3}]) == []    # its tol bounds no difference
    # The tolerance in force is relative to the data scale (a model without one: each sample's max-abs): a diff of
    # 16 within tol 0.1 of a sample of scale ~490 holds; the ratio to the tolerance in force decides.
    assert failures([{**rec, "tol": 0.1, "max_abs_diff": 16.0, "diff_over_tol": 0.33}]) == []
    assert failures([{**rec, "tol": 0.1, "max_abs_diff": 0.05, "diff_over_tol": 1.2}]) != []


def test_suite_records_the_diff_against_the_tolerance_in_force():
    """A model that declares no data scale (the tiny UNet): tol is relative to each sample's max-abs, and the record's
    ``diff_over_tol`` is the diff over that (``paratime bench --quick`` failed on an absolute comparison)."""
    pytest.importorskip("diffusers")          # the tiny UNet is diffusers'
    from paratime.bench.suite import Case, run_case

    case = Case("unet", "ddim", 10, "picard", 2, window=10, tol=0.1, reps=1)
    ref = ParallelSampler("unet", solver="ddim", steps=10, method="sequential", progress=False).sample(2, seed=0)
    rec = run_case(case, ref.samples)
    res = ParallelSampler("unet", solver="ddim", steps=10, window=10, tol=0.1, progress=False).sample(2, seed=0)
    per = (res.samples - ref.samples).flatten(1).abs().amax(1) / torch.tensor(res.stats.tol_abs)
    assert rec["diff_over_tol"] == pytest.approx(float(per.max()))
    assert rec["diff_over_tol"] <= 1 and failures([rec]) == []


def test_mlp_fixture_is_latency_sized():
    from paratime.models import load_model

    den = load_model("mlp")
    x = torch.randn(4, 32)
    out = den.network(x, torch.full((4,), 500.0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert sum(p.numel() for p in den.network.parameters()) < 200_000


def test_diffusers_paradigms_loop_at_tol_zero_is_its_sequential_sampler():
    diffusers = pytest.importorskip("diffusers")
    from paratime.zoo import load_model

    model = load_model("gmm")
    net = lambda x, t: model.network(x, t)  # noqa: E731
    sch = diffusers.DDIMParallelScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                          beta_end=0.02, timestep_spacing="trailing", clip_sample=False,
                                          set_alpha_to_one=True)
    x = torch.randn(8, 2, dtype=torch.float64)
    seq, seq_rounds, _ = paradigms_loop(net, sch, x, 20, 1, 0.0, torch.Generator().manual_seed(0))
    par, rounds, _ = paradigms_loop(net, sch, x, 20, 20, 0.0, torch.Generator().manual_seed(0))
    assert seq_rounds == 20 and rounds <= 20
    torch.testing.assert_close(par, seq, rtol=0, atol=1e-9)
    ours = ParallelSampler(model, steps=20, method="sequential", progress=False).sample(noise=x).samples
    torch.testing.assert_close(ours, seq, rtol=1e-5, atol=1e-5)   # same DDIM chain; diffusers keeps alphas in fp32


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_the_paradigms_loop_is_diffusers_real_class(solver):
    """The loop the benchmarks time (``paradigms_loop``, no pipeline around it) against diffusers' real
    ``StableDiffusionParadigmsPipeline`` on the same network, noise, window and tolerance: the same network calls
    and the same samples, bit for bit."""
    pytest.importorskip("diffusers")
    from dataclasses import replace

    from paratime.bench.rounds_at_accuracy import CASES, real_class, sd_scheduler

    case = replace(CASES[f"gmm-{solver}{'100' if solver == 'ddim' else '1000'}"], steps=20, window=8)
    pipe, unet, call = real_class(case, 4)
    calls = []
    unet.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    with torch.no_grad():
        real = pipe(**call, parallel=8, tolerance=0.1, generator=torch.Generator().manual_seed(0)).images
        model = as_denoiser("gmm")
        x, rounds, _ = paradigms_loop(lambda y, t: model.network(y.to(torch.float64), t.to(torch.float32)).to(y.dtype),
                                      sd_scheduler(case), call["latents"], 20, 8, 0.1, torch.Generator().manual_seed(0))
    assert rounds == len(calls)
    assert torch.equal(real.reshape(x.shape).to(x.dtype), x)


def test_the_paradigms_comparison_checks_its_loop_against_the_class():
    pytest.importorskip("diffusers")
    from paratime.bench.suite import compare_paradigms

    rows = compare_paradigms("digits", (("ddim", 20),), batch=2, window=8, tol=0.1)
    assert rows[0]["anchor"] is True and rows[0]["anchor_line"].endswith(": the same")
    assert [r["impl"] for r in rows] == ["diffusers ParaDiGMS", "paratime"]


def test_the_paradigms_compare_script_runs_and_prints_its_anchor(capsys):
    pytest.importorskip("diffusers")
    from paratime.bench.paradigms_compare import main

    assert main(["--model", "gmm", "--batch", "2", "--window", "8", "--cases", "ddim:20,ddpm:20"]) == 0
    out = capsys.readouterr().out
    assert "gmm/ddim-20/b2" in out and "gmm/ddpm-20/b2" in out and out.rstrip().endswith(": the same")


def test_shared_window_reproduces_diffusers_paradigms_rounds_and_nfe():
    diffusers = pytest.importorskip("diffusers")
    from paratime.noise import INITIAL, draw_noise
    from paratime.zoo import load_model

    model = load_model("gmm")
    sch = diffusers.DDIMParallelScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                          beta_end=0.02, timestep_spacing="trailing", clip_sample=False,
                                          set_alpha_to_one=True)
    x = draw_noise(0, 64, (2,), None, INITIAL)
    theirs, rounds, nfe = paradigms_loop(lambda x, t: model.network(x, t), sch, x, 50, 50, 0.1,
                                         torch.Generator().manual_seed(0))
    ours = ParallelSampler(model, steps=50, tol=0.1, stop="paradigms", update="picard", shared_window=True,
                           progress=False).sample(64, seed=0)      # ParaDiGMS's plain update and stopping rule
    assert ours.stats.rounds == rounds and ours.stats.nfe == nfe
    torch.testing.assert_close(ours.samples, theirs, rtol=1e-5, atol=1e-5)


def test_bench_output_folder_that_cannot_be_made_is_refused_before_the_work(tmp_path, capsys):
    from paratime.bench.suite import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as info:
        main(["--quick", "--out", str(blocker / "b")])            # a folder inside a file: no traceback, exit 2
    assert info.value.code == 2 and "--out: cannot make the folder" in capsys.readouterr().err
    assert blocker.read_text() == ""
