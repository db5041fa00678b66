"""Mutation-found gaps in the command line (paratime/cli.py) and the policy's evaluation (paratime/policy_eval.py):
options that must reach the sampler (the CLI's samples equal ParallelSampler's with the same options), refusals that
must name their flag before any work, the README's defaults, the printed table against the JSON record, and the
evaluation's seeds, columns and counts computed independently."""

import json
import re
from pathlib import Path

import pytest
import torch

import paratime.cli as cli
import paratime.policy_eval as pe
from paratime import ParallelSampler
from paratime.cli import build_parser, main
from paratime.policy_eval import EVAL_SEED, EvalResult
from paratime.tasks.reach import ReachConfig, make_episodes, observe

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one intra-op thread (conftest)

QUIET = ["--no-progress", "--no-policy-demo", "--out", ""]
MISSING = "/nonexistent-paratime-dir/x"


def _error(capsys, argv) -> str:
    """The one stderr line of a refused command (exit 2, nothing on stdout)."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paratime: error: "), err
    return lines[0]


@pytest.fixture
def no_demo(monkeypatch):
    calls = []
    monkeypatch.setattr(pe, "policy_demo", lambda out, **kw: calls.append((out, kw)))
    return calls


@pytest.fixture
def no_work(monkeypatch):
    """Sampling, training data and the policy's comparison fail the test: refusals come before any work."""
    import paratime.zoo.digits

    def work(*a, **k):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(paratime.zoo.digits, "load_digits_data", work)
    monkeypatch.setattr(pe, "compare_methods", work)
    monkeypatch.setattr(ParallelSampler, "sample", work)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# -- sample: the options reach the sampler ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv, options, without", [
    (["--steps", "20", "--shared-window", "--tol", "0.2"], dict(steps=20, shared_window=True, tol=0.2),
     "shared_window"),
    (["--steps", "12", "--method", "parareal_pipelined", "--slices", "4", "--coarse-steps", "2", "--tol", "0.5"],
     dict(steps=12, method="parareal_pipelined", slices=4, coarse_steps=2, tol=0.5), "coarse_steps"),
    (["--steps", "8", "--method", "sequential", "--no-compare", "--seed", "5"], dict(steps=8, method="sequential"),
     None),
])
def test_sample_options_reach_the_sampler(argv, options, without, tmp_path):
    """The CLI's saved samples equal the API's with the same options (seed included), and the option changes them:
    --shared-window was dropped, --coarse-steps refused with parareal_pipelined, --seed ignored."""
    pt = tmp_path / "s.pt"
    extra = [] if "--no-compare" in argv else ["--no-compare"]
    assert main(["sample", "--model", "gmm", "--batch", "4", *argv, *extra, *QUIET, "--save", str(pt)]) == 0
    seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 0
    api = ParallelSampler("gmm", solver="ddim", progress=False, **options)
    torch.testing.assert_close(torch.load(pt), api.sample(4, seed=seed).samples, rtol=0, atol=0)
    if without is None:                                       # the seed: another seed, other samples
        assert not torch.equal(api.sample(4, seed=0).samples, torch.load(pt))
    else:
        plain = {k: v for k, v in options.items() if k != without}
        ref = ParallelSampler("gmm", solver="ddim", progress=False, **plain).sample(4, seed=seed).samples
        assert not torch.equal(ref, torch.load(pt)), without


def test_shared_window_comparison_is_against_plain_sequential_sampling(tmp_path):
    """The sequential reference drops the parallel options (--shared-window included): max |diff| is the distance to
    the API's sequential samples."""
    pt, js = tmp_path / "s.pt", tmp_path / "s.json"
    assert main(["sample", "--model", "gmm", "--steps", "20", "--batch", "4", "--shared-window", "--tol", "0.2",
                 *QUIET, "--save", str(pt), "--json", str(js)]) == 0
    seq = ParallelSampler("gmm", solver="ddim", steps=20, method="sequential", progress=False).sample(4, seed=0)
    assert json.loads(js.read_text())["max_abs_diff"] == float((torch.load(pt) - seq.samples).abs().max())


def test_defaults_are_the_readmes_main_job(tmp_path, monkeypatch):
    """README: ``paratime sample`` is digits DDIM-100, batch 16, Picard, writing paratime_samples.png and the policy's
    policy_rollouts.png, compared with sequential sampling; the noise seed defaults to 0."""
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["sample"])
    cli._check_sample_args(args)
    got = {k: getattr(args, k) for k in ("model", "solver", "steps", "batch", "method", "seed", "out", "policy_out",
                                         "policy_demo", "compare", "progress", "backend")}
    assert got == dict(model="digits", solver="ddim", steps=100, batch=16, method="picard", seed=0,
                       out="paratime_samples.png", policy_out="policy_rollouts.png", policy_demo=True, compare=True,
                       progress=True, backend="local")
    assert list(tmp_path.iterdir()) == []                     # the output checks leave nothing behind


def test_window_auto_is_parsed_as_auto():
    for command in ("sample", "eval-digits"):
        assert build_parser().parse_args([command, "--window", "auto"]).window == "auto"


def test_help_shows_boolean_defaults_as_on_and_off():
    sample = next(a for a in build_parser()._actions if a.dest == "command").choices["sample"]
    helps = {a.dest: " ".join(sample._get_formatter()._expand_help(a).split()) for a in sample._actions
             if a.dest in ("progress", "shared_window")}
    assert helps["progress"].endswith("(default: on)") and helps["shared_window"].endswith("(default: off)")


@pytest.mark.parametrize("cpus, want", [(8, 2), (1, 1)])
def test_worker_backends_default_to_two_workers_and_the_timeout_to_300s(cpus, want, monkeypatch):
    """--backend torch without --workers: min(2, usable cores); --timeout 300 s; no policy demo (it runs with
    --backend local only: on by default with digits, it is turned off, not refused)."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(cli, "_usable_cpus", lambda: cpus)
    args = build_parser().parse_args(["sample", "--backend", "torch", "--steps", "4", "--batch", "2", "--out", ""])
    cli._check_sample_args(args)
    assert (args.workers, args.timeout, args.policy_demo) == (want, 300.0, False)


def test_a_ray_cluster_gets_two_actors_by_default_whatever_the_cores_here(monkeypatch):
    """With --address the cluster's resources are Ray's: --workers defaults to 2, not capped by this machine."""
    monkeypatch.setattr(cli, "_check_ray_address", lambda address: None)      # no cluster to reach in a test
    monkeypatch.setattr(cli, "_usable_cpus", lambda: 1)
    args = build_parser().parse_args(["sample", "--backend", "ray", "--address", "10.0.0.1:6379", "--model", "gmm",
                                      "--out", ""])
    cli._check_sample_args(args)
    assert args.workers == 2


def test_workers_may_use_every_core(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(cli, "_usable_cpus", lambda: 3)
    args = build_parser().parse_args(["sample", "--backend", "torch", "--workers", "3", "--model", "gmm", "--out", ""])
    cli._check_sample_args(args)
    assert args.workers == 3
    args = build_parser().parse_args(["sample", "--backend", "torch", "--workers", "4", "--model", "gmm", "--out", ""])
    with pytest.raises(cli.UsageError, match="^--workers: 4 exceeds the 3 usable CPU cores"):
        cli._check_sample_args(args)


@pytest.mark.parametrize("backend, argv, want", [
    ("torch", ["--timeout", "7"], {"timeout_s": 7.0}),
    ("ray", ["--workers", "2", "--timeout", "9", "--address", "10.0.0.1:6379"],
     {"workers": 2, "address": "10.0.0.1:6379", "timeout_s": 9.0}),
])
def test_backend_options_reach_the_backend(backend, argv, want, monkeypatch):
    import paratime.sampler

    seen = {}

    class Capture:
        def __init__(self, model, backend=None, backend_options=None, **kw):
            seen.update(backend_options)

    monkeypatch.setattr(paratime.sampler, "ParallelSampler", Capture)
    args = build_parser().parse_args(["sample", "--model", "gmm", "--backend", backend, *argv])
    cli._sampler(args, {"device": torch.device("cpu")}, "picard")
    assert {k: seen[k] for k in want} == want


def test_policy_demo_gets_the_default_png_and_the_progress_flag(no_demo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--model", "gmm", "--steps", "4", "--batch", "2", "--no-compare", "--out", "",
                 "--policy-demo", "--no-progress"]) == 0
    assert no_demo == [("policy_rollouts.png", {"progress": False})]


def test_pipeline_turns_the_default_policy_demo_off(tmp_path):
    """With --pipeline the model default ("digits") is not sampled, so the main job's policy half is off."""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    args = build_parser().parse_args(["sample", "--pipeline", str(tmp_path), "--prompt", "a cat", "--out", ""])
    cli._check_sample_args(args)
    assert args.policy_demo is False


# -- refusals name their flag, before any work -----------------------------------------------------------------------
@pytest.fixture
def pipeline_dir(tmp_path):
    """A folder that passes the pre-load checks: a text-to-image class and a 10-timestep scheduler."""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 10}))
    return str(tmp_path)


@pytest.mark.parametrize("argv, flag", [
    (["--label", "0"], "--label"),                            # 0 was taken for "not given" (0 == False): ignored
    (["--eta", "0"], "--eta"),
    (["--eta", "0.5"], "--eta"),
    (["--guidance", "-1"], "--guidance"),
    (["--steps", "11"], "--steps"),                           # past the scheduler's 10 timesteps
])
def test_pipeline_refusals_name_the_flag(argv, flag, pipeline_dir, capsys, no_work):
    line = _error(capsys, ["sample", "--pipeline", pipeline_dir, "--prompt", "a cat", "--steps", "5", *argv])
    assert line.startswith(f"paratime: error: {flag}:"), line


def test_pipeline_accepts_the_scheduler_grid_and_sizes_a_multiple_of_8(pipeline_dir):
    args = build_parser().parse_args(["sample", "--pipeline", pipeline_dir, "--prompt", "a cat", "--steps", "10",
                                      "--height", "72", "--width", "40", "--out", "x.png"])
    cli._check_sample_args(args)
    assert (args.steps, args.height, args.width) == (10, 72, 40)


FACTORIES = '''
import torch

def zeros():
    return lambda x, t: torch.zeros_like(x)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "mut_cli_models.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mut_cli_models:zeros"


@pytest.mark.parametrize("argv, message", [
    (["--sample-shape", "2,0", "--out", ""], "--sample-shape: expected positive integers"),
    (["--sample-shape", "3", "--out", "x.png"], "--out: a PNG shows (B, 2) points"),    # 3-D points: no PNG
])
def test_user_model_shape_refusals(argv, message, user_module, capsys, no_work):
    line = _error(capsys, ["sample", "--model", user_module, "--prediction", "eps", "--schedule", "ddpm-linear",
                           "--no-progress", *argv])
    assert line.startswith(f"paratime: error: {message}"), line


@pytest.mark.parametrize("argv, flag", [
    (["sample", "--width", "64"], "--width"),                 # applies only with --pipeline
    (["sample", "--height", "0"], "--height"),                # ... given as 0 too (it was ignored)
    (["sample", "--label", "10"], "--label"),                 # the API's "labels" named as the flag
    (["eval-digits", "--seed", "-1"], "--seed"),
    (["eval-policy", "--seed", "-1"], "--seed"),
])
def test_refusals_name_the_flag_before_any_work(argv, flag, capsys, no_work):
    line = _error(capsys, argv)
    assert line.startswith(f"paratime: error: {flag}:"), line


def test_one_file_named_two_ways_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    same = str(tmp_path / "s.pt")                             # the same file, named relative and absolute
    line = _error(capsys, ["sample", "--model", "gmm", *QUIET, "--save", "s.pt", "--json", same])
    assert f"--json: {same} is the file --save writes too" in line and not list(tmp_path.iterdir())


def test_a_refused_run_leaves_an_existing_output_as_it_was(tmp_path, capsys):
    pt = tmp_path / "s.pt"
    pt.write_text("keep")
    assert "--json" in _error(capsys, ["sample", "--model", "gmm", *QUIET, "--save", str(pt),
                                       "--json", MISSING + ".json"])
    assert pt.read_text() == "keep"


def test_an_upper_case_png_suffix_is_a_png(tmp_path):
    png = tmp_path / "S.PNG"
    assert main(["sample", "--model", "gmm", "--steps", "4", "--batch", "2", "--no-compare", "--no-progress",
                 "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the printed table ------------------------------------------------------------------------------------------------
def test_the_table_rows_are_the_json_records(tmp_path, capsys):
    js = tmp_path / "s.json"
    assert main(["sample", "--model", "gmm", "--steps", "12", "--batch", "2", "--window", "3", "--no-progress",
                 "--out", "", "--json", str(js)]) == 0
    rec = json.loads(js.read_text())
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if re.match(r"\s*(sequential|picard) ", line)}
    assert rows["sequential"][1:] == [str(rec["sequential_rounds"]), "12", f"{rec['sequential_wall_s']:.3f}", "1.00",
                                      "0"]
    assert rows["picard"][1:] == ["W=3", str(rec["rounds"]), f"{rec['nfe']:.0f}", f"{rec['wall_s']:.3f}",
                                  f"{rec['speedup']:.2f}", f"{rec['max_abs_diff']:.3g}"]


def test_an_explicit_cost_auto_is_starred_like_the_default(tmp_path, capsys):
    """--cost auto off CUDA assumes c(r) = 1 without timing it, given or not: the prediction is starred."""
    assert main(["sample", "--model", "gmm", "--steps", "12", "--batch", "2", "--device", "cpu", "--cost", "auto",
                 "--no-progress", "--out", ""]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("picard"))
    assert row.split()[-2].endswith("*") and "\n* assumed latency-bound" in out


# -- train-digits, eval-policy and train-policy: the options reach the work ------------------------------------------
def test_train_digits_options_reach_the_trainer_and_default_to_its_own(tmp_path, monkeypatch, capsys):
    import functools
    import inspect

    import paratime.zoo.digits as digits

    defaults = {k: v.default for k, v in inspect.signature(digits.train_digits).parameters.items()
                if k in ("steps", "batch", "lr", "channels", "seed")}
    args = build_parser().parse_args(["train-digits"])
    assert {k: getattr(args, k) for k in defaults} == defaults
    seen = {}

    @functools.wraps(digits.train_digits)                     # its signature: the parser's defaults
    def fake(out, **kw):
        seen.update(kw, out=out)
        return {"seconds": 0.0, "meta": {"final_loss": 0.0}}

    monkeypatch.setattr(digits, "train_digits", fake)
    out = str(tmp_path / "w.safetensors")
    assert main(["train-digits", "--steps", "3", "--batch", "5", "--lr", "0.01", "--channels", "16", "--seed", "2",
                 "--out", out, "--no-progress"]) == 0
    assert seen == dict(out=out, steps=3, batch=5, lr=0.01, channels=16, seed=2, progress=False)


def test_policy_parser_defaults_are_the_evaluations_and_the_shipped_weights():
    """eval-policy's defaults are compare_methods' own (100 episodes of seed 1000, 20 timed chunks); train-policy's
    are the options the shipped weights were trained with (their record beside them)."""
    import inspect

    from paratime.zoo.policy import WEIGHTS

    sig = inspect.signature(pe.compare_methods).parameters
    e = build_parser().parse_args(["eval-policy"])
    assert (e.episodes, e.seed, e.latency_chunks) == (sig["episodes"].default, EVAL_SEED, sig["latency_chunks"].default)
    assert (e.out, e.methods) == ("policy_rollouts.png", "sequential,picard,parareal")
    record = json.loads(WEIGHTS.with_suffix(".json").read_text())
    t = build_parser().parse_args(["train-policy"])
    for k in ("steps", "batch", "lr", "seed", "episodes", "threads"):
        assert getattr(t, k) == record[k], k
    assert (t.width, t.blocks) == (record["config"]["width"], record["config"]["blocks"])


def _fake_result(name, n=2):
    return EvalResult(name, torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool),
                      torch.full((n,), 80), torch.zeros(n, 81, 2, dtype=torch.float64), 10, 0.0)


def test_eval_policy_options_reach_the_comparison(tmp_path, monkeypatch, capsys, threads):
    """--tol reaches Picard and Parareal, --threads sets torch's threads, the counts and the seed reach the
    comparison and the PNG, and --json is written with the records."""
    seen = {}

    def compare(methods, episodes, seed, latency_chunks, options=None, progress=False):
        seen.update(methods=methods, episodes=episodes, seed=seed, latency_chunks=latency_chunks, options=options,
                    threads=torch.get_num_threads())
        return {"results": {m: _fake_result(m) for m in methods}, "records": {m: {"x": 1} for m in methods}}

    monkeypatch.setattr(pe, "compare_methods", compare)
    monkeypatch.setattr(pe, "format_records", lambda records: [])
    monkeypatch.setattr(pe, "rollouts_png", lambda path, results, seed=EVAL_SEED: seen.update(png=(path, seed)))
    png, js = str(tmp_path / "r.png"), tmp_path / "r.json"
    assert main(["eval-policy", "--methods", "picard,parareal", "--tol", "0.2", "--threads", "2", "--episodes", "3",
                 "--latency-chunks", "4", "--seed", "7", "--out", png, "--json", str(js), "--no-progress"]) == 0
    assert seen == dict(methods=("picard", "parareal"), episodes=3, seed=7, latency_chunks=4,
                        options={"picard": {"tol": 0.2}, "parareal": {"tol": 0.2}}, threads=2, png=(png, 7))
    rec = json.loads(js.read_text())
    assert (rec["episodes"], rec["seed"], rec["threads"], rec["records"]) == (3, 7, 2, {"picard": {"x": 1},
                                                                                       "parareal": {"x": 1}})


# -- policy_eval: counts, seeds and columns ---------------------------------------------------------------------------
def test_summary_counts():
    r = EvalResult("x", torch.tensor([True, False, False, True]), torch.tensor([False, True, False, False]),
                   torch.tensor([10, 80, 80, 30]), torch.zeros(4, 2, 2), 3, 0.5)
    s = r.summary()
    assert (s["episodes"], s["success_rate"], s["collision_rate"], s["timeouts"], s["mean_steps_success"]) == (
        4, 0.5, 0.25, 1, 20.0)


def test_rollout_executes_n_exec_actions_of_each_chunk():
    """Standing still until the time limit: max_steps / n_exec chunks, n_exec recorded positions each; a chunk of
    exactly n_exec actions is enough."""
    cfg = ReachConfig()
    r = pe.rollout(lambda obs, c: torch.zeros(obs.shape[0], cfg.n_exec, 2), episodes=3, seed=4)
    chunks = -(-cfg.max_steps // cfg.n_exec)
    assert r.chunks == chunks and r.paths.shape == (3, 1 + chunks * cfg.n_exec, 2)
    assert r.steps.tolist() == [cfg.max_steps] * 3 and not bool(r.success.any())
    torch.testing.assert_close(r.paths[:, -1], make_episodes(3, seed=4).start, rtol=0, atol=0)


def test_policy_sampler_is_ddpm_100_with_overrides():
    s = pe.policy_sampler("picard", window=8)
    assert (s.solver.name, s.config.steps, s.config.window, s.config.tol) == ("ddpm", 100, 8, 0.3)
    assert pe.policy_sampler("sequential").config.steps == 100


def test_chunk_noise_is_keyed_by_seed_plus_chunk_and_reaches_the_rollout():
    s = pe.policy_sampler("sequential", steps=3)
    obs = pe.episode_observations(2)
    act = pe.sampler_act(s, seed=7)
    torch.testing.assert_close(act(obs, 3), s.sample(2, seed=10, obs=obs).samples, rtol=0, atol=0)
    got = pe.evaluate_policy("sequential", episodes=2, seed=5, steps=3)
    want = pe.rollout(pe.sampler_act(s, 5), 2, 5)
    torch.testing.assert_close(got.paths, want.paths, rtol=0, atol=0)


class _Clock:
    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        return self.t


def test_chunk_latency_figures_from_a_scripted_clock(monkeypatch):
    """Seeds seed + i per observation; min, median, rounds and NFE medians of the timed calls (warm-up untimed)."""
    clock = _Clock()
    monkeypatch.setattr(pe, "time", clock)
    walls = iter([0.0, 0.3, 0.1, 0.2])                        # one warm-up call, then three timed ones
    seeds = []

    class Fake:
        def sample(self, n, seed, obs):
            seeds.append(seed)
            clock.t += next(walls)
            k = len(seeds)
            return type("R", (), {"stats": type("S", (), {"rounds": k, "nfe": 10 * k})()})()

    lat = pe.chunk_latency({"f": Fake()}, torch.zeros(3, 4), seed=5, warmup=1)["f"]
    assert seeds == [5, 5, 6, 7]
    assert lat["wall_s"] == pytest.approx([0.3, 0.1, 0.2]) and lat["min_s"] == pytest.approx(0.1)
    assert lat["median_s"] == pytest.approx(0.2) and (lat["rounds"], lat["nfe"]) == (3, 30)


def test_chunk_latency_refuses_no_observations():
    """Zero observations timed nothing: it returned no figures (or divided by zero in the warm-up) without a word."""
    with pytest.raises(ValueError, match="^observations: expected"):
        pe.chunk_latency({}, torch.zeros(0, 12))


def test_latency_observations_start_at_the_episodes_first_observation():
    torch.testing.assert_close(pe.latency_observations(1, seed=3), observe(make_episodes(1, seed=3)), rtol=0, atol=0)


def test_rollouts_png_draws_the_seeded_layout(tmp_path):
    """The discs drawn are episode 0's of the seed given: its first disc's centre pixel is grey."""
    import numpy as np
    Image = pytest.importorskip("PIL.Image")

    r = pe.rollout(lambda obs, c: torch.zeros(obs.shape[0], 8, 2), episodes=1, seed=3, name="x")
    png = pe.rollouts_png(tmp_path / "r.png", [r], episodes=1, seed=3)
    img = torch.from_numpy(np.asarray(Image.open(png)).copy())
    ep = make_episodes(1, seed=3)
    cx, cy = ep.centers[0, 0].tolist()
    i, j = round((1 - cy) / 2 * 199), round((cx + 1) / 2 * 199)
    assert img[i, j].tolist() == [170, 170, 170]


def test_compare_methods_refuses_unused_options():
    with pytest.raises(ValueError, match="^options: overrides for 'picard'"):
        pe.compare_methods(("sequential",), options={"picard": {"tol": 0.1}})


def test_compare_methods_records_the_speed_up_window_and_seed(monkeypatch):
    seen = []
    monkeypatch.setattr(pe, "rollout", lambda act, episodes, seed, name=None, progress=False:
                        seen.append(("rollout", name, episodes, seed)) or _fake_result(name, episodes))
    monkeypatch.setattr(pe, "evaluate_baseline", lambda episodes=100, seed=EVAL_SEED:
                        seen.append(("baseline", "baseline", episodes, seed)) or _fake_result("baseline", episodes))
    monkeypatch.setattr(pe, "latency_observations", lambda n, seed=EVAL_SEED:
                        seen.append(("latency", None, n, seed)) or torch.zeros(n, 12))
    medians = {"sequential": 0.5, "picard": 0.125}
    monkeypatch.setattr(pe, "chunk_latency", lambda samplers, obs, seed: {
        m: {"min_s": 0.0, "median_s": medians[m], "rounds": 1, "nfe": 1} for m in samplers})
    rec = pe.compare_methods(("sequential", "picard"), episodes=2, seed=7, latency_chunks=3)["records"]
    assert sorted(seen) == [("baseline", "baseline", 2, 7), ("latency", None, 3, 7), ("rollout", "picard", 2, 7),
                            ("rollout", "sequential", 2, 7)]
    assert (rec["sequential"]["speedup"], rec["picard"]["speedup"]) == (1.0, 4.0)
    assert (rec["picard"]["window"], rec["sequential"]["window"]) == (32, None)


def test_format_records_columns():
    r = {"success_rate": 0.9, "collision_rate": 0.05, "timeouts": 2, "latency_min_s": 0.0121,
         "latency_median_s": 0.0153, "latency_rounds": 7, "latency_nfe": 224, "speedup": 2.5}
    lines = pe.format_records({"picard": r, "baseline": {"success_rate": 0.0, "collision_rate": 0.75, "timeouts": 1}})
    assert lines[1].split() == ["picard", "90%", "5%", "2", "12.1", "15.3", "7", "224", "2.50x"]
    assert lines[2].split() == ["baseline", "0%", "75%", "1", "-", "-", "-", "-", "-"]


def test_policy_demo_restores_torch_threads(monkeypatch, threads):
    inside = []

    def compare(methods, episodes, seed, latency_chunks, progress=False):
        inside.append(torch.get_num_threads())
        lat = {"latency_median_s": 0.01, "speedup": 1.0}
        return {"results": {}, "records": {m: dict(lat) for m in methods}}

    monkeypatch.setattr(pe, "compare_methods", compare)
    monkeypatch.setattr(pe, "format_records", lambda records: [])
    torch.set_num_threads(2)
    pe.policy_demo(None, threads=1, emit=lambda line: None)
    assert inside == [1] and torch.get_num_threads() == 2


def test_pipeline_without_compare_runs_once_and_saves_the_images_it_wrote(tmp_path, capsys):
    """--no-compare with --pipeline: no sequential run (no row, no speed-up); --save holds the images the PNGs show
    (diffusers' numpy_to_pil: round(255 x))."""
    pytest.importorskip("diffusers")
    import numpy as np
    from PIL import Image

    from paratime.bench.tiny_pipelines import tiny_sd

    folder = tmp_path / "tiny-sd"
    tiny_sd(text=True).save_pretrained(folder)
    pt, js = tmp_path / "i.pt", tmp_path / "r.json"
    assert main(["sample", "--pipeline", str(folder), "--prompt", "a cat", "--steps", "2", "--batch", "1", "--height",
                 "64", "--width", "64", "--no-compare", "--save", str(pt), "--out", str(tmp_path / "c.png"),
                 "--json", str(js), "--no-progress"]) == 0
    assert not any(line.split()[:1] == ["sequential"] for line in capsys.readouterr().out.splitlines())
    assert "speedup" not in json.loads(js.read_text())
    images = torch.load(pt)
    assert images.shape == (1, 64, 64, 3)
    png = np.asarray(Image.open(tmp_path / "c-0.png")).astype(int)
    assert (png == (images[0].numpy() * 255).round().astype(int)).all()
