"""Malformed inputs, table-driven, through the Python API and the command line: every one ends in a clear error of
the right type whose message names the argument; on the command line exit code 2, one line ``paratime: error: ...``
on stderr, no traceback and nothing sampled. Then the valid inputs that used to go wrong give the right answer."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import paratime
from paratime import Denoiser, ParallelSampler, SamplerConfig, VESchedule
from paratime.cli import build_parser, main

NAN, INF = float("nan"), float("inf")
HAS_CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one intra-op thread (conftest)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _gmm(**kw):
    return ParallelSampler("gmm", steps=5, progress=False, **kw)


def _digits_sample(**cond):
    return ParallelSampler("digits", steps=2, method="sequential", progress=False).sample(2, **cond)


def _train(**kw):
    from paratime.zoo.digits import train_digits

    return train_digits(None, progress=False, **kw)


# (id, call, error type, name the message must start with)
API_CASES = [
    # Options: integers refuse bools and floats, numbers refuse NaN/inf, names list the allowed ones.
    ("steps=0", lambda: ParallelSampler("gmm", steps=0), ValueError, "steps"),
    ("steps=True", lambda: ParallelSampler("gmm", steps=True), TypeError, "steps"),
    ("steps=2.5", lambda: ParallelSampler("gmm", steps=2.5), TypeError, "steps"),
    ("steps='10'", lambda: ParallelSampler("gmm", steps="10"), TypeError, "steps"),
    ("window=True", lambda: _gmm(window=True), TypeError, "window"),
    ("update=magic", lambda: _gmm(update="magic"), ValueError, "update"),
    ("init=magic", lambda: _gmm(init="magic"), ValueError, "init"),
    ("fill=3", lambda: _gmm(fill=3), ValueError, "fill"),
    ("window=0", lambda: _gmm(window=0), ValueError, "window"),
    ("window=1.5", lambda: _gmm(window=1.5), TypeError, "window"),
    ("tol=-1", lambda: _gmm(tol=-1.0), ValueError, "tol"),
    ("tol=nan", lambda: _gmm(tol=NAN), ValueError, "tol"),
    ("tol=inf", lambda: _gmm(tol=INF), ValueError, "tol"),
    ("tol='0.1'", lambda: _gmm(tol="0.1"), TypeError, "tol"),
    ("tol=True", lambda: _gmm(tol=True), TypeError, "tol"),
    ("method=magic", lambda: _gmm(method="magic"), ValueError, "method"),
    ("method=None", lambda: _gmm(method=None), ValueError, "method"),
    ("solver=rk45", lambda: ParallelSampler("gmm", solver="rk45"), ValueError, "solver"),
    ("eta=2", lambda: _gmm(eta=2.0), ValueError, "eta"),
    ("eta=nan", lambda: _gmm(eta=NAN), ValueError, "eta"),
    ("eta=-0.1", lambda: _gmm(eta=-0.1), ValueError, "eta"),
    ("heun+eta", lambda: ParallelSampler("gmm", solver="heun", eta=0.5), ValueError, "eta"),
    ("spacing=odd", lambda: _gmm(spacing="odd"), ValueError, "spacing"),
    ("max_rounds=0", lambda: _gmm(max_rounds=0), ValueError, "max_rounds"),
    ("max_rounds=True", lambda: _gmm(max_rounds=True), TypeError, "max_rounds"),
    ("slices=0", lambda: _gmm(method="parareal", slices=0), ValueError, "slices"),
    ("slices>steps", lambda: _gmm(method="parareal", slices=50), ValueError, "slices"),
    ("coarse_steps=0", lambda: _gmm(method="parareal", coarse_steps=0), ValueError, "coarse_steps"),
    ("coarse=3", lambda: _gmm(method="parareal", coarse=3), TypeError, "coarse"),
    ("shared_window='yes'", lambda: _gmm(shared_window="yes"), TypeError, "shared_window"),
    ("unknown option", lambda: _gmm(windw=5), TypeError, "windw"),
    ("guidance=nan", lambda: ParallelSampler("digits", guidance=NAN), ValueError, "guidance"),
    ("guidance=inf", lambda: ParallelSampler("digits", guidance=INF), ValueError, "guidance"),
    ("guidance=-1", lambda: ParallelSampler("digits", guidance=-1.0), ValueError, "guidance"),
    ("guidance_rescale=2", lambda: ParallelSampler("digits", guidance=2.0, guidance_rescale=2.0), ValueError,
     "guidance_rescale"),
    ("Denoiser guidance=nan", lambda: Denoiser(lambda x, t: x, VESchedule(), "eps", guidance=NAN), ValueError,
     "guidance"),
    ("clip_x0=-1", lambda: _gmm(clip_x0=-1.0), ValueError, "clip_x0"),
    ("latent_scale=0", lambda: _gmm(latent_scale=0.0), ValueError, "latent_scale"),
    ("corrector_snr=-1", lambda: _gmm(corrector_snr=-1.0), ValueError, "corrector_snr"),
    ("corrector_steps=0", lambda: _gmm(corrector_snr=0.1, corrector_steps=0), ValueError, "corrector_steps"),
    ("state_dtype=int32", lambda: _gmm(state_dtype=torch.int32), TypeError, "state_dtype"),
    ("dtype='half'", lambda: _gmm(dtype="half"), TypeError, "dtype"),
    ("backend=mpi", lambda: _gmm(backend="mpi"), ValueError, "backend"),
    ("backend_options", lambda: _gmm(backend_options={"nodes": 3}), ValueError, "backend_options"),
    ("device=nonsense", lambda: _gmm(device="nonsense"), ValueError, "device"),
    ("model=nope", lambda: ParallelSampler("nope"), ValueError, "model"),
    ("model=3", lambda: ParallelSampler(3), TypeError, "model"),
    ("raw net, no schedule", lambda: ParallelSampler(lambda x, t: x), ValueError, "schedule"),
    # sample(): shapes, noise, seeds.
    ("shape (4, 3)", lambda: _gmm().sample((4, 3)), ValueError, "shape"),
    ("no shape", lambda: _gmm().sample(), ValueError, "shape"),
    ("shape 0", lambda: _gmm().sample(0), ValueError, "shape"),
    ("shape 2.5", lambda: _gmm().sample(2.5), TypeError, "shape"),
    ("shape True", lambda: _gmm().sample(True), TypeError, "shape"),
    ("sample(10**7)", lambda: ParallelSampler("gmm", steps=1000, progress=False).sample(10**7), ValueError, "shape"),
    ("noise nan", lambda: _gmm().sample(noise=torch.full((4, 2), NAN)), ValueError, "noise"),
    ("noise long", lambda: _gmm().sample(noise=torch.ones(4, 2, dtype=torch.long)), TypeError, "noise"),
    ("noise 1-D", lambda: _gmm().sample(noise=torch.ones(4)), ValueError, "noise"),
    ("seed=-1", lambda: _gmm().sample(4, seed=-1), ValueError, "seed"),
    ("seed=1.5", lambda: _gmm().sample(4, seed=1.5), ValueError, "seed"),
    ("seed=True", lambda: _gmm().sample(4, seed=True), ValueError, "seed"),
    ("first_sample=-1", lambda: _gmm().sample(4, first_sample=-1), ValueError, "first_sample"),
    ("first_sample=1.5", lambda: _gmm().sample(4, first_sample=1.5), ValueError, "first_sample"),
    ("generator='x'", lambda: _gmm().sample(4, generator="x"), TypeError, "generator"),
    ("cond batch", lambda: _gmm().sample(4, labels=torch.zeros(3)), ValueError, "labels"),
    # The digits model's conditioning: classes 0..9 as an integer tensor, nothing else.
    ("labels=10", lambda: _digits_sample(labels=torch.full((2,), 10)), ValueError, "labels"),
    ("labels=-1", lambda: _digits_sample(labels=torch.full((2,), -1)), ValueError, "labels"),
    ("labels=3.7", lambda: _digits_sample(labels=torch.full((2,), 3.7)), TypeError, "labels"),
    ("labels=3 (int)", lambda: _digits_sample(labels=3), TypeError, "labels"),
    ("digits cond key", lambda: _digits_sample(text=torch.zeros(2)), ValueError, "text"),
    ("guidance, no labels", lambda: ParallelSampler("digits", steps=2, guidance=3.0, progress=False).sample(2),
     ValueError, "labels"),
    # Training the digits model: checked before any data is loaded.
    ("train steps=0", lambda: _train(steps=0), ValueError, "steps"),
    ("train lr=nan", lambda: _train(lr=NAN), ValueError, "lr"),
    ("train channels=12", lambda: _train(channels=12), ValueError, "channels"),
    ("train batch=1.5", lambda: _train(batch=1.5), TypeError, "batch"),
    ("train ema=1", lambda: _train(ema=1.0), ValueError, "ema"),
]


@pytest.mark.parametrize("call, error, name", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_input_is_a_clear_error(call, error, name):
    with pytest.raises(error) as info:
        call()
    assert str(info.value).startswith(name), str(info.value)


def test_cuda_device_without_cuda_is_a_clear_error():
    if HAS_CUDA:
        pytest.skip("this machine has CUDA")
    from paratime.config import check_device

    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="^device: .*no CUDA device"):
            check_device(device)


MISSING = "/nonexistent-paratime-dir/x"

# (id, argv, what the one-line message must contain: the flag)
CLI_CASES = [
    ("steps 0", ["--steps", "0"], "--steps"),
    ("steps x", ["--steps", "x"], "--steps"),
    ("window 0", ["--window", "0"], "--window"),
    ("window 1.5", ["--window", "1.5"], "--window"),
    ("tol nan", ["--tol", "nan"], "--tol"),
    ("tol -1", ["--tol", "-1"], "--tol"),
    ("method", ["--method", "magic"], "--method"),
    ("solver", ["--model", "gmm", "--solver", "rk4"], "--solver"),
    ("eta 2", ["--eta", "2"], "--eta"),
    ("spacing", ["--spacing", "odd"], "--spacing"),
    ("max-rounds 0", ["--max-rounds", "0"], "--max-rounds"),
    ("slices 0", ["--method", "parareal", "--slices", "0"], "--slices"),
    ("coarse-steps 0", ["--method", "parareal", "--coarse-steps", "0"], "--coarse-steps"),
    ("batch 0", ["--batch", "0"], "--batch"),
    ("batch -5", ["--batch", "-5"], "--batch"),
    ("batch huge", ["--model", "gmm", "--steps", "1000", "--batch", "10000000"], "--batch"),
    ("seed -1", ["--seed", "-1"], "--seed"),
    ("label 10", ["--label", "10"], "--label"),
    ("label -1", ["--label", "-1"], "--label"),
    ("label 3.7", ["--label", "3.7"], "--label"),
    ("label on gmm", ["--model", "gmm", "--label", "3"], "--label"),
    ("guidance without label", ["--guidance", "3"], "--guidance"),
    ("guidance nan", ["--label", "3", "--guidance", "nan"], "--guidance"),
    ("guidance inf", ["--label", "3", "--guidance", "inf"], "--guidance"),
    ("guidance -1", ["--label", "3", "--guidance", "-1"], "--guidance"),
    ("model", ["--model", "nope"], "--model"),
    ("backend", ["--backend", "mpi"], "--backend"),
    ("torch workers 99", ["--backend", "torch", "--workers", "99"], "--workers"),
    ("ray workers 99", ["--backend", "ray", "--workers", "99"], "--workers"),
    ("ray workers 0", ["--backend", "ray", "--workers", "0"], "--workers"),
    ("workers with local", ["--workers", "2"], "--workers"),
    ("address with local", ["--address", "auto"], "--address"),
    ("address format", ["--backend", "ray", "--address", "foo"], "--address"),
    ("device nonsense", ["--device", "nonsense"], "--device"),
    ("device cuda:99", ["--device", "cuda:99"], "--device"),
    ("out missing dir", ["--out", MISSING + ".png"], "--out"),
    ("out not a png", ["--model", "gmm", "--out", "samples.txt"], "--out"),
    ("policy out not a png", ["--policy-demo", "--policy-out", "rollouts.jpg"], "--policy-out"),
    ("json missing dir", ["--json", MISSING + ".json"], "--json"),
    ("save missing dir", ["--save", MISSING + ".pt"], "--save"),
    ("timeout 0", ["--backend", "torch", "--timeout", "0"], "--timeout"),
    ("timeout nan", ["--backend", "ray", "--timeout", "nan"], "--timeout"),
    ("timeout past gloo's 2^31 ms", ["--backend", "torch", "--timeout", "1e10"], "--timeout"),
    ("timeout with local", ["--timeout", "5"], "--timeout"),
    ("tol with sequential", ["--method", "sequential", "--tol", "0.1"], "--tol"),
    ("likelihood tol with sequential", ["likelihood", "--method", "sequential", "--tol", "0.2"], "--tol"),
    ("likelihood staggered", ["likelihood", "--method", "staggered"], "--method"),
    ("unknown flag", ["--frobnicate"], "--frobnicate"),
    ("unknown command", ["frobnicate"], "frobnicate"),
    ("eval samples 0", ["eval-digits", "--samples", "0"], "--samples"),
    ("eval samples 3", ["eval-digits", "--samples", "3"], "--samples"),
    ("eval guidance without label", ["eval-digits", "--guidance", "2"], "--guidance"),
    ("eval label 11", ["eval-digits", "--label", "11"], "--label"),
    ("eval steps 0", ["eval-digits", "--steps", "0"], "--steps"),
    ("eval tol nan", ["eval-digits", "--tol", "nan"], "--tol"),
    ("eval steps past the schedule", ["eval-digits", "--steps", "2000"], "--steps"),
    ("eval steps off the solver's grid", ["eval-digits", "--solver", "dpmpp_singlestep", "--steps", "3"], "--steps"),
    ("eval json missing dir", ["eval-digits", "--json", MISSING + ".json"], "--json"),
    ("train steps 0", ["train-digits", "--steps", "0"], "--steps"),
    ("train lr nan", ["train-digits", "--lr", "nan"], "--lr"),
    ("train lr 0", ["train-digits", "--lr", "0"], "--lr"),
    ("train channels 12", ["train-digits", "--channels", "12"], "--channels"),
    ("train batch 0", ["train-digits", "--batch", "0"], "--batch"),
    ("train out missing dir", ["train-digits", "--out", MISSING + ".safetensors"], "--out"),
]


def _one_line_error(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert out == "", out                                     # nothing ran
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paratime: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, flag", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_input_is_a_one_line_error(argv, flag, capsys):
    assert flag in _one_line_error(capsys, argv)


def test_cli_output_that_is_a_directory_is_refused_before_sampling(tmp_path, capsys):
    for flag in ("--out", "--json", "--save"):
        line = _one_line_error(capsys, ["--model", "gmm", flag, str(tmp_path)])
        assert flag in line and "directory" in line
    assert list(tmp_path.iterdir()) == []


def test_cli_output_check_leaves_no_file_behind(tmp_path, capsys):
    js = tmp_path / "s.json"
    assert "--out" in _one_line_error(capsys, ["--model", "gmm", "--json", str(js), "--out", MISSING + ".png"])
    assert not js.exists()


def test_ray_address_where_nothing_listens_is_a_one_line_error():
    """Ray itself waits for minutes on such an address; the launcher refuses it at once."""
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "ray_sample.py"), "--address", "127.0.0.1:1", "--model",
                        "gmm", "--steps", "2", "--batch", "2", "--out", "", "--no-progress"],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("paratime: error: --address: nothing answers at 127.0.0.1:1")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_ray_address_auto_without_a_cluster_is_a_one_line_error(monkeypatch, capsys):
    """What ray.init(address="auto") raises when no cluster runs (simulated: a real one may run on this machine)."""
    ray = pytest.importorskip("ray")

    def no_cluster(*a, **k):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    line = _one_line_error(capsys, ["--backend", "ray", "--address", "auto", "--model", "gmm", "--steps", "2",
                                    "--batch", "2", "--out", "", "--no-progress"])
    assert line.startswith("paratime: error: --address: cannot reach a Ray cluster at 'auto'")


def test_cli_subprocess_user_error_has_no_traceback():
    r = subprocess.run([sys.executable, "-m", "paratime", "--device", "nonsense"], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == ("paratime: error: --device: not a device: 'nonsense'; "
                                                      "allowed: cpu, cuda, cuda:N")


# -- help ----------------------------------------------------------------------------------------------------------
def _subparsers(parser):
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    commands = list(_subparsers(build_parser()).choices)
    assert {"sample", "bench", "train-digits", "eval-digits"} <= set(commands)
    for name in commands:
        assert f"\n    {name}" in out, name


def test_every_option_has_help_and_model_lists_every_registered_name():
    sub = _subparsers(build_parser()).choices
    for command in ("sample", "train-digits", "eval-digits"):
        for action in sub[command]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{command} {action.option_strings[0]} has no help text"
    model = next(a for a in sub["sample"]._actions if a.dest == "model")
    assert model.choices is None           # a registered name or package.module:factory, checked by the CLI
    for name in paratime.models.MODELS:
        assert name in model.help


# -- valid inputs that used to go wrong ----------------------------------------------------------------------------
def test_cli_guidance_reaches_the_sampler(tmp_path):
    """--guidance used to be parsed and dropped: the CLI's samples now equal the API's guided ones and differ from
    the unguided ones."""
    common = ["--label", "3", "--steps", "4", "--batch", "2", "--method", "sequential", "--no-compare",
              "--no-policy-demo", "--no-progress", "--out", ""]
    paths = {g: tmp_path / f"g{g}.pt" for g in ("none", "3")}
    assert main([*common, "--save", str(paths["none"])]) == 0
    assert main([*common, "--guidance", "3", "--save", str(paths["3"])]) == 0
    labels = torch.full((2,), 3)
    api = ParallelSampler("digits", steps=4, method="sequential", guidance=3.0, progress=False).sample(
        2, labels=labels).samples
    guided, plain = torch.load(paths["3"]), torch.load(paths["none"])
    torch.testing.assert_close(guided, api, rtol=0, atol=0)
    assert float((guided - plain).abs().max()) > 1e-3


def test_eval_digits_forwards_guidance(monkeypatch):
    """eval-digits hands --guidance to both of its samplers, the sequential reference and Picard (recorded at
    construction; the classifier that scores them is a stand-in)."""
    import paratime.digits_eval as de
    import paratime.sampler as ps

    seen = []

    class Recorder(ps.ParallelSampler):
        def __init__(self, model, **kw):
            seen.append(kw)
            super().__init__(model, **kw)

    class Judge:
        def __init__(self, seed=0):
            pass

        def real_baseline(self):
            return 0.9

        def score(self, samples, labels=None):
            return {"confident_share": 1.0, "knn_precision": 1.0, "knn_recall": 1.0, "class_hist": [0.1] * 10}

    monkeypatch.setattr(ps, "ParallelSampler", Recorder)
    monkeypatch.setattr(de, "DigitsJudge", Judge)
    args = build_parser().parse_args(["eval-digits", "--label", "2", "--guidance", "2.5", "--samples", "4",
                                      "--steps", "2"])
    de.run_eval(args)
    assert [(kw["method"], kw.get("guidance")) for kw in seen] == [("sequential", 2.5), ("picard", 2.5)]


def test_sequential_progress_bar_shows_no_nan_residual(capsys):
    ParallelSampler("gmm", steps=5, method="sequential", progress=True).sample(4)
    err = capsys.readouterr().err
    assert "sequential" in err and "nan" not in err


def test_labels_in_range_are_used():
    """Each class 0..9 is accepted, and the labels change the samples."""
    s = ParallelSampler("digits", steps=3, method="sequential", progress=False)
    labels = torch.arange(10)
    a = s.sample(10, labels=labels).samples
    b = s.sample(10).samples
    assert a.shape == (10, 1, 8, 8) and math.isfinite(float(a.abs().max()))
    assert float((a - b).abs().max()) > 1e-3


# -- numpy scalars, an init that a window of one never reads, ints beyond float (review, stop 47) -----------------

NUMPY_CASES = [
    dict(steps=np.int64(20), method="picard", window=np.int64(5)),
    dict(steps=20, method="staggered", window=np.int64(4), tol=np.float32(1e-3)),
    dict(steps=20, method="staggered", window=4, data_scale=np.float32(2.0)),
    dict(steps=20, method="picard", max_rounds=np.int64(3)),
    dict(steps=20, solver="ddim", eta=np.float32(0.5)),
    dict(steps=20, solver="ddpm", corrector_snr=np.float32(0.1), corrector_steps=np.int64(2)),
]


@pytest.mark.parametrize("kw", NUMPY_CASES)
def test_numpy_scalar_options_sample_as_python_numbers(kw):
    """numpy scalars passed the config's checks (numbers.Integral / Real), then crashed or were refused under
    internal names further in (steps: 'must be an integer >= 1, got np.int64(20)'; cores; tol_scale), or made
    stats.converged np.bool_ that JSON refused."""
    from paratime.results import json_text

    plain = {k: v.item() if isinstance(v, np.generic) else v for k, v in kw.items()}
    with ParallelSampler("gmm", progress=False, **kw) as s, ParallelSampler("gmm", progress=False, **plain) as ref:
        r, want = s.sample(2, seed=1), ref.sample(2, seed=1)
    assert (r.samples == want.samples).all()
    assert r.stats.converged == want.stats.converged
    json.loads(json_text(r.stats.to_dict()))


def test_numpy_window_covering_the_grid_refuses_fill_like_an_int():
    with pytest.raises(ValueError, match="fill: applies only to a sliding window"):
        ParallelSampler("gmm", steps=20, method="picard", window=np.int64(20), fill="copy", progress=False)


def test_numpy_integer_seed_and_first_sample():
    with ParallelSampler("gmm", steps=10, solver="ddpm", method="sequential", progress=False) as s:
        want = s.sample(2, seed=3, first_sample=4).samples
        got = s.sample(2, seed=np.int64(3), first_sample=np.int32(4)).samples
        x = s.sample(2, seed=3).samples
        nats = s.log_likelihood(x, steps=5, solver="euler", divergence="hutchinson", seed=np.uint64(3)).nats
        ref = s.log_likelihood(x, steps=5, solver="euler", divergence="hutchinson", seed=3).nats
    assert torch.equal(got, want)
    assert torch.equal(nats, ref)


@pytest.mark.parametrize("shape", [np.int64(3), (np.int64(3), 2), (3, np.int32(2))])
def test_numpy_integer_shape_samples_as_the_python_int(shape):
    """sample(np.int64(3)) was refused ('expected an int or a tuple ..., got int64') and (np.int64(3), 2) was
    'not of positive integers', while steps=, window= and seed= take numpy integers."""
    with ParallelSampler("gmm", steps=5, method="sequential", progress=False) as s:
        got, want = s.sample(shape, seed=1).samples, s.sample((3, 2), seed=1).samples
    assert torch.equal(got, want)


class _CountingNet(torch.nn.Module):
    """eps-network ``net(x, t, emb=None)`` that counts its calls."""

    def __init__(self):
        super().__init__()
        self.lin, self.calls = torch.nn.Linear(2, 2), 0

    def forward(self, x, t, emb=None):
        self.calls += 1
        return self.lin(x) * 0.1


@pytest.mark.parametrize("cond, message", [
    (dict(tol=0.1), r"tol: not an argument of the network, which takes emb=; tol is a sampler option"),
    (dict(embb=torch.zeros(2, 3)), r"embb: not an argument of the network, which takes emb=$"),
    (dict(emb=torch.zeros(2, 3), uncond={"embb": torch.zeros(2, 3)}), r"uncond\.embb: not an argument"),
])
def test_conditioning_a_network_does_not_take_is_refused_before_any_call(cond, message):
    """A key that the network's forward does not name (a sampler option given to sample(), a typo) reached the
    network's first call, after the plan and the noise: 'Net.forward() got an unexpected keyword argument'."""
    from paratime import DiscreteVPSchedule

    net = _CountingNet()
    guided = {"guidance": 2.0} if "uncond" in cond else {}
    with ParallelSampler(net, schedule=DiscreteVPSchedule.from_betas("linear"), prediction="eps", steps=5,
                         method="picard", progress=False, **guided) as s:
        with pytest.raises(ValueError, match=message):
            s.sample((2, 2), seed=0, **cond)
        assert net.calls == 0
        s.sample((2, 2), seed=0, emb=torch.zeros(2, 3), **({"uncond": {"emb": torch.zeros(2, 3)}} if guided else {}))
    assert net.calls > 0


@pytest.mark.parametrize("options", [dict(window=1), dict(window=20, max_rounds=1), dict(window=5, max_rounds=1)])
def test_init_x0_on_a_window_of_one_point_is_refused(options):
    """max_rounds=1 spends its one round on init's call, then steps a window of one point: the guess is never read."""
    from paratime.config import SamplerConfig
    from paratime.methods.picard import sample_picard

    with pytest.raises(ValueError, match="init: applies only to a window wider than one point"):
        SamplerConfig(steps=20, method="picard", init="x0", **options)
    with pytest.raises(ValueError, match="^init: applies only to a window wider than one point"):
        sample_picard(torch.zeros(1, 2), None, init="x0", **options)
    if "max_rounds" in options:                                       # a second round reads the guess
        SamplerConfig(steps=20, method="picard", init="x0", window=options["window"], max_rounds=2)


def test_a_planned_window_of_one_point_makes_no_guess_call():
    """steps=1: the planner's window of one read no guess, yet init='x0' made one (2 calls, 2 rounds, not 1)."""
    from dataclasses import replace

    from paratime.zoo import ring_gmm

    den = ring_gmm()
    counts = {}
    for init in ("noise", "x0"):
        calls = []
        net = den.network

        def counted(x, t, **cond):
            calls.append(1)
            return net(x, t, **cond)

        with ParallelSampler(replace(den, network=counted), steps=1, method="picard", init=init,
                             progress=False) as s:
            r = s.sample(3, seed=1)
        counts[init] = (len(calls), r.stats.rounds)
    assert counts["x0"] == counts["noise"] == (1, 1)


@pytest.mark.parametrize("value", [10**400, -10**400])
def test_an_int_beyond_float_range_is_not_finite(value):
    from paratime.checks import check_number
    from paratime.config import SamplerConfig

    with pytest.raises(ValueError, match="tol: must be a finite number"):
        check_number("tol", value, 0, none=True)
    with pytest.raises(ValueError, match="guidance: must be a finite number"):
        SamplerConfig(guidance=value)


@pytest.mark.parametrize("method", ["picard", "auto"])
@pytest.mark.parametrize("eta", [np.float64(0.0), np.float64(1.0)])
def test_numpy_float64_eta_runs_as_the_python_float(method, eta):
    """np.float64 is a float subclass: kept by SamplerConfig, it made Ancestral.stochastic a numpy bool that
    plan_sampling(stochastic=) refused (TypeError) on picard / auto."""
    kw = dict(steps=10, solver="ddim", method=method, progress=False)
    ref = ParallelSampler("gmm", eta=float(eta), **kw).sample(4, seed=3).samples
    out = ParallelSampler("gmm", eta=eta, **kw).sample(4, seed=3).samples
    assert torch.equal(out, ref)


@pytest.mark.parametrize("seed", [np.int64(3), np.uint64(2**63 + 5), np.uint32(7)])
def test_numpy_integer_seeds_draw_what_the_python_int_draws(seed):
    """The noise module's own entry points: a numpy integer seed overflowed _i64's masks (OverflowError)."""
    from paratime.noise import draw_noise, sample_keys

    torch.testing.assert_close(draw_noise(seed, 2, (3,), None, 0, np.int64(1)),
                               draw_noise(int(seed), 2, (3,), None, 0, 1), rtol=0, atol=0)
    s = torch.arange(3)
    assert torch.equal(sample_keys(seed, 0, s), sample_keys(int(seed), 0, s))


# -- option refusals the tests did not hold (mutation testing, stop 47) ------------------------------------------

def test_numpy_float64_options_are_kept_as_python_floats():
    """np.float64 is a float subclass (it passes isinstance(float)) but is still converted: the config holds the
    Python number it equals, as for np.float32 and np.int64 (repr, type checks and json see a plain float)."""
    cfg = SamplerConfig(steps=np.int64(20), method="staggered", window=np.int64(4), tol=np.float64(1e-3),
                        data_scale=np.float64(2.0), eta=np.float64(0.0))
    for name, want in (("steps", 20), ("window", 4), ("tol", 1e-3), ("data_scale", 2.0), ("eta", 0.0)):
        value = getattr(cfg, name)
        assert type(value) is type(want) and value == want, (name, value)
    assert "np." not in repr(cfg)


def test_coarse_steps_with_a_user_coarse_propagator_is_refused():
    with pytest.raises(ValueError, match="^coarse_steps: applies only to the built-in coarse propagator"):
        SamplerConfig(method="parareal", coarse=lambda x, s_from, s_to: x, coarse_steps=2)
    SamplerConfig(method="parareal", coarse=lambda x, s_from, s_to: x)            # its default: accepted
    SamplerConfig(method="parareal", coarse_steps=2)                              # the built-in one reads it


def test_classifier_scale_zero_without_a_classifier_is_refused():
    with pytest.raises(ValueError, match="^classifier_scale: given without classifier="):
        SamplerConfig(classifier_scale=0)
    SamplerConfig(classifier_scale=0, classifier=lambda x, sigma: x.sum())


def test_a_data_scale_with_absolute_tolerance_units_is_refused():
    with pytest.raises(ValueError, match="^data_scale: applies only with tol_units='data'"):
        SamplerConfig(method="picard", tol_units="absolute", data_scale=2.0)
    SamplerConfig(method="picard", tol_units="data", data_scale=2.0)
    SamplerConfig(method="picard", tol_units="absolute")


def test_accept_tol_with_the_paradigms_rule_is_refused():
    with pytest.raises(ValueError, match="^accept_tol: applies only to the final-point rule"):
        SamplerConfig(method="picard", stop="paradigms", accept_tol=0.01)
    SamplerConfig(method="picard", stop="final", accept_tol=0.01)


@pytest.mark.parametrize("method", ["parareal", "parareal_pipelined"])
@pytest.mark.parametrize("kw", [dict(tol_units="data"), dict(tol_units="absolute"), dict(data_scale=2.0)])
def test_parareal_takes_tol_in_noise_level_units_and_refuses_tol_units(method, kw):
    with pytest.raises(ValueError, match=f"^{next(iter(kw))}: applies only to the final-point rule"):
        SamplerConfig(method=method, **kw)


@pytest.mark.parametrize("options", [dict(window=1), dict(window=20, max_rounds=3)])
def test_fill_refused_where_no_point_entering_the_window_is_read(options):
    """A window of one point computes each point before reading it, and so does the one max_rounds leaves after a
    window of the whole grid: fill= is refused there, as init='x0' is on window=1 (it ran the path fill every round
    for nothing)."""
    with pytest.raises(ValueError, match="^fill: applies only to a sliding window wider than one point"):
        SamplerConfig(method="picard", steps=20, fill="copy", **options)
    SamplerConfig(method="picard", steps=20, window=8, fill="copy", max_rounds=3)     # a sliding window takes it



def test_max_batch_of_one_row_under_classifier_free_guidance_is_refused():
    """Each guided row runs twice in one call: a limit of 1 row a call was exceeded silently (every call held 2)."""
    from dataclasses import replace

    from paratime.bench.equivalence_sweep import guided_ring

    with pytest.raises(ValueError, match="^max_batch: 1 network row a call cannot hold a row under classifier-free"):
        ParallelSampler(guided_ring(), steps=4, method="sequential", guidance=2.5, backend_options={"max_batch": 1},
                        progress=False)
    rows = []
    den = guided_ring()
    net = den.network

    def counted(x, t, **cond):
        rows.append(len(x))
        return net(x, t, **cond)

    with ParallelSampler(replace(den, network=counted), steps=4, method="sequential", guidance=2.5,
                         backend_options={"max_batch": 2}, progress=False) as s:
        s.sample(3, labels=torch.tensor([0, 3, 8]))
    assert rows and max(rows) == 2


@pytest.mark.parametrize("kw, error, match", [
    (dict(window=0), ValueError, "^window: must be an integer >= 1"),
    (dict(window=-2), ValueError, "^window: must be an integer >= 1"),
    (dict(window=2.0), TypeError, "^window: expected an integer"),
    (dict(window=4, max_rounds=0), ValueError, "^max_rounds: must be an integer >= 1")])
def test_sample_picard_checks_its_window_and_round_limit(kw, error, match):
    """The public function took window=0 to a bare amax() error and window=-2 to 'upper bound and lower bound
    inconsistent' (SamplerConfig checks them; direct callers got torch's errors)."""
    from paratime.methods.picard import sample_picard

    with pytest.raises(error, match=match):
        sample_picard(torch.zeros(1, 2), None, **kw)


def test_a_solvers_own_option_given_to_the_sampler_points_to_make_solver():
    """order= beside solver="dpmpp" was 'unknown sampling option' with the list of the sampler's, none of which sets
    it; the option lives on the solver (README: pass make_solver("dpmpp", order=3))."""
    with pytest.raises(TypeError, match=r"order: unknown sampling option \(order is the solver's own option: "
                                        r"solver=make_solver\('dpmpp', order=\.\.\.\)\)"):
        ParallelSampler("gmm", solver="dpmpp", order=3)
    with pytest.raises(TypeError, match=r"order: unknown sampling option; allowed"):     # ddim has no order
        ParallelSampler("gmm", order=3)


@pytest.mark.parametrize("model, cond, message", [
    ("digits", dict(tol=0.1), r"^tol: the digits model takes only labels= .*; tol is a sampler option: "
                              r"ParallelSampler\(\.\.\., tol=\.\.\.\)$"),
    ("gmm", dict(steps=3), r"^steps: the mixture model takes no conditioning; steps is a sampler option"),
    ("digits", dict(sed=0), r"^sed: the digits model takes only labels= \(and uncond=, y= for guidance\) as "
                            r"conditioning$"),             # not an option: the model's own message alone
])
def test_a_sampler_option_given_to_sample_says_where_it_goes(model, cond, message):
    """sample(16, tol=1e-3) on a named model was refused as conditioning the model does not take, without saying
    that tol is the sampler's option."""
    with ParallelSampler(model, steps=5, progress=False) as s, pytest.raises(ValueError, match=message):
        s.sample(2, **cond)


@pytest.mark.parametrize("interpret", [None, "1"])
def test_triton_on_a_state_it_cannot_run_names_only_what_is_missing(monkeypatch, interpret):
    # The advice was the same whatever was missing: "e.g. state_dtype=torch.float32" to a float32 state
    from paratime.kernels.dispatch import triton_missing
    from paratime.sampler import check_kernels

    if triton_missing():
        pytest.skip("Triton not installed: the refusal names the extra instead")
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    cpu = torch.device("cpu")
    if interpret is None:
        with pytest.raises(ValueError, match=r"needs CUDA, or TRITON_INTERPRET=1 on CPU; kernels='auto'"):
            check_kernels("triton", torch.float32, cpu)
        with pytest.raises(ValueError, match=r"needs CUDA, or TRITON_INTERPRET=1 on CPU and a float32, float16 or "):
            check_kernels("triton", torch.float64, cpu)
    else:
        check_kernels("triton", torch.float32, cpu)                     # the interpreter runs it: no error
        with pytest.raises(ValueError, match=r"needs a float32, float16 or bfloat16 state \(e.g. state_dtype"):
            check_kernels("triton", torch.float64, cpu)
