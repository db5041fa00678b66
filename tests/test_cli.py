"""The command line: sampling, the main job's halves chosen by options, the user's own model (module:factory),
--dtype, --model policy, help text generated from the defaults, and progress off a terminal."""

import io
import json
import re

import pytest
import torch

import paratime.policy_eval as policy_eval
from paratime import ParallelSampler
from paratime.cli import build_parser, main

FAST = ["--steps", "4", "--batch", "4", "--no-progress", "--no-compare", "--out", ""]


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one intra-op thread (conftest)


@pytest.fixture
def no_demo(monkeypatch):
    """Record policy_demo calls instead of running them (~10-30 s each); the demo itself is tested in test_policy."""
    calls = []
    monkeypatch.setattr(policy_eval, "policy_demo", lambda out, **kw: calls.append((out, kw)))
    return calls


def test_cli_sample_gmm_writes_json_and_png(tmp_path, capsys):
    js, png, pt = tmp_path / "s.json", tmp_path / "s.png", tmp_path / "s.pt"
    rc = main(["sample", "--model", "gmm", "--steps", "20", "--batch", "32", "--json", str(js), "--out", str(png),
               "--save", str(pt), "--no-progress"])
    assert rc == 0
    rec = json.loads(js.read_text())
    for key in ("method", "solver", "steps", "rounds", "nfe", "wall_s", "sequential_wall_s", "speedup", "max_abs_diff"):
        assert key in rec
    assert rec["method"] == "picard" and rec["steps"] == 20 and rec["rounds"] <= 20
    # The reported comparison is the one against the API's sequential samples (seed 0), and the speed-up its ratio.
    seq = ParallelSampler("gmm", steps=20, method="sequential", progress=False).sample(32, seed=0)
    assert rec["max_abs_diff"] == float((torch.load(pt) - seq.samples).abs().max()) > 0
    assert rec["sequential_rounds"] == seq.stats.rounds == 20
    assert rec["speedup"] == pytest.approx(rec["sequential_wall_s"] / rec["wall_s"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "speed-up" in out
    for path in (pt, png, js):                      # every file written is named (--save was not)
        assert f"wrote {path}" in out


def test_cli_main_job_on_digits(tmp_path, capsys, no_demo):
    png = tmp_path / "d.png"
    assert main(["--steps", "10", "--batch", "4", "--out", str(png), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "model=digits" in out and "sequential" in out and "picard" in out
    assert png.stat().st_size > 100


@pytest.mark.parametrize("argv, runs", [
    (["sample"], True),                                   # the main job
    (["sample", "--no-progress"], True),                  # a flag no longer drops the policy half
    (["sample", "--no-policy-demo"], False),
    (["sample", "--model", "gmm"], False),                # the default: on with the digits model only
    (["sample", "--model", "gmm", "--policy-demo"], True),
])
def test_policy_half_is_chosen_by_options_not_argv(argv, runs, tmp_path, no_demo, capsys):
    assert main([*argv, *FAST, "--policy-out", str(tmp_path / "p.png")] if runs else [*argv, *FAST]) == 0
    assert len(no_demo) == int(runs)
    if runs:
        assert no_demo[0][0] == str(tmp_path / "p.png")


def test_policy_out_without_the_demo_is_an_error(capsys, no_demo):
    assert main(["sample", "--model", "gmm", *FAST, "--policy-out", "x.png"]) == 2
    assert "--policy-out" in capsys.readouterr().err and not no_demo


def test_model_policy_samples_chunks_for_the_episodes_observations(tmp_path, capsys):
    """--model policy conditions on the seeded episodes' first observations: equal to the API's samples."""
    pt, png = tmp_path / "p.pt", tmp_path / "p.png"
    assert main(["sample", "--model", "policy", "--solver", "ddpm", "--steps", "5", "--batch", "3",
                 "--method", "sequential", "--no-progress", "--save", str(pt), "--out", str(png)]) == 0
    obs = policy_eval.episode_observations(3)
    api = ParallelSampler("policy", solver="ddpm", steps=5, method="sequential", progress=False).sample(3, obs=obs)
    torch.testing.assert_close(torch.load(pt), api.samples, rtol=0, atol=0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


FACTORIES = '''
import paratime
from paratime.zoo.gmm import ring_gmm

def denoiser():
    return ring_gmm()

def network():
    return ring_gmm().network

def broken():
    raise RuntimeError("no weights here")

not_callable = 3

CALLS = []

def untrained():
    import torch
    CALLS.append(1)
    lin = torch.nn.Linear(2, 2)           # another random network at each call
    return lambda x, t: torch.tanh(lin.to(x.dtype)(x))
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "h5_user_models.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "h5_user_models"


@pytest.mark.parametrize("extra", [[":denoiser"], [":network", "--prediction", "eps", "--schedule", "ddpm-linear",
                                                   "--sample-shape", "2"]])
def test_model_module_factory_equals_the_named_model(user_module, extra, tmp_path):
    """A factory returning a Denoiser, or a raw network with --prediction / --schedule: the same samples as the
    registered gmm (its network under DDPM linear betas), bit for bit."""
    pt = tmp_path / "u.pt"
    argv = ["sample", "--model", user_module + extra[0], *extra[1:], "--steps", "6", "--batch", "5",
            "--tol", "0", "--no-progress", "--no-compare", "--out", "", "--save", str(pt)]
    assert main(argv) == 0
    ref = ParallelSampler("gmm", steps=6, tol=0.0, progress=False).sample(5).samples
    torch.testing.assert_close(torch.load(pt), ref, rtol=0, atol=0)


@pytest.mark.parametrize("spec, extra, flag", [
    (":network", [], "--prediction, --schedule:"),                       # a network needs both
    (":network", ["--prediction", "eps"], "--schedule:"),
    (":denoiser", ["--prediction", "eps"], "--prediction:"),             # a Denoiser sets its own
    (":denoiser", ["--prediction", "eps", "--schedule", "vp"], "--prediction, --schedule:"),
    (":denoiser", ["--sample-shape", "5"], "--sample-shape:"),           # it declares (2,): ran, then crashed
    (":broken", [], "--model"),
    (":not_callable", [], "--model"),
    (":missing", [], "--model"),
    ("", [], "--model"),                                                 # no ':' and not a registered name
])
def test_model_module_factory_errors_are_one_line(user_module, spec, extra, flag, capsys):
    assert main(["sample", "--model", user_module + spec, *extra, *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("paratime: error: ") and flag in err, err


@pytest.mark.parametrize("argv, message", [
    (["--nope"], "unrecognized arguments: --nope"),
    (["--out", "/proc/paratime-no-such-folder"], "--out: cannot make the folder /proc/paratime-no-such-folder"),
])
def test_bench_errors_are_one_line_like_every_subcommands(argv, message, capsys):
    """``paratime bench`` hands its flags to the suite's parser, whose errors printed its usage and ``paratime
    bench: error:`` (argparse's two lines), not the one line the other subcommands print."""
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"paratime: error: {message}"), err


def test_a_factorys_own_sample_shape_may_be_repeated(user_module, tmp_path):
    assert main(["sample", "--model", user_module + ":denoiser", "--sample-shape", "2", *FAST]) == 0


def test_named_model_refuses_factory_options(capsys):
    assert main(["sample", "--model", "gmm", "--prediction", "eps", *FAST]) == 2
    assert "--prediction" in capsys.readouterr().err


def test_dtype_runs_the_network_in_that_dtype(tmp_path):
    """--dtype bfloat16 changes the digits samples (the network runs in bf16), float32 is the model's own."""
    paths = {d: tmp_path / f"{d}.pt" for d in ("float32", "bfloat16")}
    for d, p in paths.items():
        assert main(["sample", "--model", "digits", "--dtype", d, "--method", "sequential", "--no-policy-demo",
                     *FAST, "--save", str(p)]) == 0
    ref = ParallelSampler("digits", steps=4, method="sequential", progress=False).sample(4).samples
    torch.testing.assert_close(torch.load(paths["float32"]), ref, rtol=0, atol=0)
    assert float((torch.load(paths["bfloat16"]) - ref).abs().max()) > 0


# -- help ----------------------------------------------------------------------------------------------------------
def _subcommands():
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {k: v for k, v in sub.choices.items() if k != "bench"}


def test_help_shows_every_default_from_the_parser_and_no_backticks(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "`" not in capsys.readouterr().out
    for name, parser in _subcommands().items():
        text = " ".join(parser.format_help().split())
        assert "`" not in text, name
        assert "--no-progress" in text, name
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            h = " ".join(parser._get_formatter()._expand_help(action).split())
            assert "default" in h, f"{name} {action.option_strings[0]}: {h}"
            d = action.default
            if d not in (None, "") and not isinstance(d, bool):
                assert f"default: {d}" in h, f"{name} {action.option_strings[0]}: {h}"


def test_help_states_tol_units_and_window_default():
    from paratime.methods.picard import DEFAULT_TOL
    from paratime.planner import rounds_cap

    sample = " ".join(_subcommands()["sample"].format_help().split())
    assert "relative to the data's scale" in sample and f"default {DEFAULT_TOL['final']:g}" in sample
    assert "or auto (the planner" in sample and "staggered: its cores K" in sample
    assert "min(N, max(100, N // 2))" in sample and rounds_cap(1000) == min(1000, max(100, 1000 // 2))


# -- progress off a terminal ---------------------------------------------------------------------------------------
def test_progress_off_a_terminal_is_a_line_every_interval():
    from paratime.progress import LineProgress, progress_bar

    assert isinstance(progress_bar(10, "x", stream=io.StringIO()), LineProgress)   # StringIO is no terminal
    now, out = [0.0], io.StringIO()
    bar = LineProgress(100, "train", "step", out, interval=5.0, clock=lambda: now[0])
    for _ in range(100):
        now[0] += 0.5
        bar.update(1)
        bar.set_postfix(round=3, residual="0.01")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()          # one line per 5 s of 50 s, not 100 frames
    assert re.fullmatch(r"train: 10/100 step \(10%\), round=3, residual=0.01, elapsed 5s, ETA 45s", lines[0])
    assert lines[-1].startswith("train: 100/100 step (100%)") and "ETA" not in lines[-1]


def test_sampler_progress_in_a_log_writes_lines_not_frames(capsys):
    ParallelSampler("gmm", steps=5, progress=True).sample(4)
    err = capsys.readouterr().err
    assert "\r" not in err, repr(err)
    assert err.count("\n") >= 1 and "round=" in err and "5/5 pt" in err


@pytest.mark.parametrize("argv, line", [
    (["train-policy", "--steps", "12", "--batch", "8", "--width", "16", "--blocks", "1", "--episodes", "4"],
     r"train-policy: 12/12 step \(100%\), loss=[\d.]+, elapsed \d+s"),
    (["train-digits", "--steps", "6", "--batch", "8", "--channels", "8"],
     r"train-digits: 6/6 step \(100%\), loss=[\d.]+, elapsed \d+s"),
    (["likelihood", "--model", "gmm", "--samples", "4", "--steps", "5"], r"likelihood picard/euler.*: 5/5 pt"),
    (["eval-digits", "--samples", "4", "--steps", "3"], r"picard.*: 3/3 pt .*round="),
    (["eval-policy", "--methods", "sequential", "--episodes", "1", "--latency-chunks", "1", "--out", ""],
     r"rollout sequential: \d+/\d+ chunk .*running="),
])
def test_long_commands_report_progress_as_lines_off_a_terminal(argv, line, tmp_path, capsys):
    """Training, likelihood and evaluation report progress; off a terminal (captured here) as whole lines; none with
    --no-progress (checked on the quickest). train-policy's file loads as the policy."""
    if argv[0] in ("train-digits", "eval-digits"):
        pytest.importorskip("sklearn")
    out = ["--out", str(tmp_path / "w.safetensors")] if argv[0].startswith("train") else []
    assert main([*argv, *out]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and re.search(line, err), err
    if argv[0] == "train-policy":
        from paratime.zoo.policy import load_policy_model

        assert load_policy_model(tmp_path / "w.safetensors").network.config["width"] == 16
    if argv[0] == "likelihood":         # one report per solve: the untimed warm-up solve (2 samples) reports none
        assert [len(re.findall(rf"likelihood {m}/euler.*: 5/5 pt", err)) for m in ("sequential", "picard")] == [1, 1]
        assert main([*argv, *out, "--no-progress"]) == 0
        assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv, cores", [([], 2), (["--window", "3"], 3)])
def test_staggered_memory_check_counts_the_cores_the_sampler_runs(argv, cores, monkeypatch):
    # window="auto" gives staggered one core per device (at least 2): the CLI's pre-check bounds those cores, not
    # the planner's widest Picard window (which could refuse a run that fits).
    from paratime.config import SamplerConfig

    seen = []
    check = SamplerConfig.check_memory

    def record(self, *a, **kw):
        seen.append((self.method, self.window))
        return check(self, *a, **kw)

    monkeypatch.setattr(SamplerConfig, "check_memory", record)
    assert main(["sample", "--model", "gmm", "--method", "staggered", *argv, *FAST]) == 0
    assert seen[0] == ("staggered", cores)
    assert SamplerConfig(method="staggered", steps=50).for_devices(8).window == 8
    assert SamplerConfig(method="staggered", steps=4).for_devices(8).window == 4
    assert SamplerConfig(method="picard").for_devices(8).window == "auto"


def test_cost_option_reaches_the_planner(tmp_path):
    """--cost measure: the planner prices each candidate with the measured curve and the work outside the network
    (the JSON's plan says so); --cost compute on 1 device plans sequential sampling; a name outside the list is a
    one-line error naming --cost."""
    js = tmp_path / "s.json"
    base = ["sample", "--model", "gmm", "--steps", "12", "--batch", "4", "--method", "auto", "--out", "",
            "--no-progress", "--json", str(js)]
    assert main([*base, "--cost", "measure"]) == 0
    plan = json.loads(js.read_text())["plan"]
    assert "cost measured" in plan["reason"] and "outside the network" in plan["reason"]
    assert main([*base, "--cost", "compute"]) == 0
    rec = json.loads(js.read_text())
    assert rec["plan"]["method"] == "sequential" and rec["cost"].startswith("compute")
    assert main([*base, "--cost", "cheap"]) == 2


def test_json_is_standard_and_the_table_names_the_method_that_ran(tmp_path, capsys):
    """--json wrote bare NaN (a round without a residual), which strict parsers refuse; --method auto's row read
    'auto' while the plan ran another method, then only the method that ran: a plan of sequential sampling printed
    two rows named 'sequential' beside the comparison's. It reads 'auto: sequential'."""
    import json

    out = tmp_path / "r.json"
    assert main(["sample", "--model", "gmm", "--steps", "10", "--batch", "4", "--method", "staggered", "--window", "2",
                 "--no-progress", "--no-compare", "--out", "", "--json", str(out)]) == 0
    rec = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert rec["residuals"] and None in rec["residuals"]          # staggered's residuals: NaN, written as null
    capsys.readouterr()
    assert main(["sample", "--model", "gmm", "--steps", "10", "--batch", "4", "--method", "auto", "--cost", "compute",
                 "--no-progress", "--out", "", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    ran = json.loads(out.read_text())["method"]
    names = [line.strip().split("  ")[0] for line in table.splitlines()[2:4]]
    assert ran == "sequential" and names == ["sequential", "auto: sequential"], table


@pytest.mark.parametrize("extra, assumed", [([], True), (["--cost", "compute"], False), (["--window", "3"], None)])
def test_the_table_shows_the_plans_prediction_beside_the_measured_speed_up(extra, assumed, tmp_path, capsys):
    """The predicted column: the plan's SCE for sequential sampling over its own (the measured column's baseline),
    starred with a footnote when the curve was assumed, not timed (--cost auto off CUDA); empty for a given
    window (nothing planned)."""
    js = tmp_path / "s.json"
    assert main(["sample", "--model", "gmm", "--steps", "12", "--batch", "2", "--no-progress", "--json", str(js),
                 *extra]) == 0
    out = capsys.readouterr().out
    rec = json.loads(js.read_text())
    header, seq_row, row = [line for line in out.splitlines() if re.match(r"\s*(method|sequential|picard)", line)]
    assert header.split()[:7] == ["method", "rounds", "NFE/sample", "wall", "s", "speed-up", "predicted"]
    assert len(seq_row.split()) == 6                          # sequential: nothing predicted
    footnote = [line for line in out.splitlines() if line.startswith("* assumed latency-bound")]
    if assumed is None:
        assert rec["plan"] is None and len(row.split()) == 7 and not footnote
        return
    cell = row.split()[-2]
    want = rec["plan"]["sequential_sce"] / rec["plan"]["predicted_sce"]
    assert cell == f"{want:.2f}" + ("*" if assumed else "")
    assert bool(footnote) == assumed


@pytest.mark.parametrize("argv", [["--save", "same.out", "--json", "same.out"],
                                  ["--out", "x.png", "--policy-demo", "--policy-out", "x.png"]])
def test_two_outputs_naming_one_file_are_refused_before_the_work(argv, tmp_path, monkeypatch, capsys, no_demo):
    """The later write replaced the earlier one (--save x --json x: the samples were lost), with exit 0."""
    monkeypatch.chdir(tmp_path)
    base = ["sample", "--model", "gmm", "--steps", "4", "--batch", "2", "--no-progress", "--no-compare"]
    assert main([*base, *(["--out", ""] if "--out" not in argv else []), *argv]) == 2
    assert "is the file" in capsys.readouterr().err and not list(tmp_path.iterdir()) and not no_demo


def test_a_model_factory_is_called_once_and_the_comparison_is_against_its_model(user_module, tmp_path):
    """The factory was called for the checks, the run and the sequential comparison: an untrained network's
    comparison was against another network (max |diff| 240)."""
    import importlib

    js = tmp_path / "u.json"
    argv = ["sample", "--model", user_module + ":untrained", "--prediction", "eps", "--schedule",
            "ddpm-linear", "--sample-shape", "2", "--steps", "6", "--batch", "3", "--no-progress", "--out", "",
            "--json", str(js)]
    assert main(argv) == 0
    assert len(importlib.import_module(user_module).CALLS) == 1
    rec = json.loads(js.read_text())
    assert rec["max_abs_diff"] <= 2e-3 * 10                  # within tol of the same network's sequential sample


def test_ray_actors_get_a_user_factorys_network_from_the_driver(user_module, monkeypatch):
    """Each Ray actor called a user's factory itself: an unseeded one built another network on each (max |diff| 197
    on 2 actors). A user factory's network, built once, now travels through the object store; a registered model is
    still built by the actors from its shipped weights."""
    import paratime.cli as cli
    import paratime.sampler

    seen = {}

    class Capture:
        def __init__(self, model, backend=None, backend_options=None, **kw):
            seen[backend] = (model, backend_options)

    monkeypatch.setattr(paratime.sampler, "ParallelSampler", Capture)
    for spec, registered in ((user_module + ":untrained", False), ("gmm", True)):
        extra = [] if registered else ["--prediction", "eps", "--schedule", "ddpm-linear", "--sample-shape", "2"]
        args = build_parser().parse_args(["sample", "--model", spec, *extra, "--backend", "ray", "--workers", "2"])
        cli._sampler(args, {"device": torch.device("cpu")}, "picard")
        model, options = seen["ray"]
        assert (options["model"] is not None) == registered, spec
        assert options["workers"] == 2 and model is not None


def test_eta_help_names_every_solver_that_takes_eta(capsys):
    """--eta's help named ddim/ddpm/euler_maruyama while euler and euler_ancestral take it too (the refusal of
    --eta with another solver lists all five)."""
    import dataclasses

    from paratime.solvers import SOLVERS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--help"])
    entry = " ".join(capsys.readouterr().out.split()).split("--eta ETA")[-1].split("--slices", 1)[0]
    with_eta = [n for n, c in SOLVERS.items() if "eta" in {f.name for f in dataclasses.fields(c)}]
    assert len(with_eta) >= 5 and all(re.search(rf"\b{n}\b", entry) for n in with_eta), (with_eta, entry)


def test_a_training_runs_closing_progress_line_shows_its_last_losses():
    """The bar's loss (the mean of the last `every` losses) was set at multiples of `every` only: train-digits --steps
    20 closed on 'train-digits: 20/20 step (100%), loss=1.0422' (step 0's) beside 'final loss 0.3788'."""
    from paratime.progress import LineProgress, training_step

    stream = io.StringIO()
    bar, losses = LineProgress(3, "train", unit="step", stream=stream, interval=1e9), []
    for step, loss in enumerate([4.0, 2.0, 3.0]):
        losses.append(loss)
        training_step(bar, losses, step, 50)
    bar.close()
    assert stream.getvalue().startswith("train: 3/3 step (100%), loss=3.0000,"), stream.getvalue()
