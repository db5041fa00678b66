"""Bad inputs on the newer surfaces, table-driven: the likelihood, eval-policy and train-policy commands, options that
do not apply (an error, never silently ignored), the model registry and module:factory, weight files, environment
variables and callables. Each ends in a clear error naming the argument (on the command line: exit 2, one line, no
traceback), and output paths are checked before any work starts (the work functions are replaced by tripwires)."""

import math
import shutil

import pytest
import torch

import paratime.likelihood_cli
import paratime.policy_eval
import paratime.zoo.digits
import paratime.zoo.policy
from paratime import Denoiser, ParallelSampler, VESchedule
from paratime.cli import main
from paratime.models import load_factory, load_model, make_schedule, model_factory, register_model, user_model

NAN, INF = float("nan"), float("inf")
MISSING = "/nonexistent-paratime-dir/x"


@pytest.fixture
def tripwires(monkeypatch):
    """Any work (training, rollouts, likelihood solves, sampling) fails the test: the errors come first."""
    def work(*a, **k):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(paratime.zoo.policy, "_train", work)
    monkeypatch.setattr(paratime.zoo.digits, "load_digits_data", work)
    monkeypatch.setattr(paratime.policy_eval, "compare_methods", work)
    monkeypatch.setattr(paratime.likelihood_cli, "_data", work)
    monkeypatch.setattr(ParallelSampler, "sample", work)
    monkeypatch.setattr(ParallelSampler, "log_likelihood", work)


def _one_line_error(capsys, argv) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert out == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paratime: error: ") and "Traceback" not in err, err
    return lines[0]


# (id, argv, the flag the one line must name)
CLI_CASES = [
    # likelihood
    ("lik sets with gmm", ["likelihood", "--model", "gmm", "--sets", "real"], "--sets"),
    ("lik dequantize with gmm", ["likelihood", "--model", "gmm", "--no-dequantize"], "--dequantize"),
    ("lik probes with exact", ["likelihood", "--divergence", "exact", "--probes", "4"], "--probes"),
    ("lik window without picard", ["likelihood", "--method", "parareal", "--window", "8"], "--window"),
    ("lik sets unknown", ["likelihood", "--sets", "real,blurred"], "--sets"),
    ("lik sets empty item", ["likelihood", "--sets", "real,"], "--sets"),
    ("lik sets twice", ["likelihood", "--sets", "real,real"], "--sets"),
    ("lik model policy", ["likelihood", "--model", "policy"], "--model"),
    ("lik samples 0", ["likelihood", "--samples", "0"], "--samples"),
    ("lik samples 541", ["likelihood", "--samples", "541"], "--samples"),
    ("lik repeats 0", ["likelihood", "--repeats", "0"], "--repeats"),
    ("lik threads 0", ["likelihood", "--threads", "0"], "--threads"),
    ("lik solver", ["likelihood", "--solver", "rk4"], "--solver"),
    ("lik divergence", ["likelihood", "--divergence", "magic"], "--divergence"),
    ("lik probes 0", ["likelihood", "--probes", "0"], "--probes"),
    ("lik steps 0", ["likelihood", "--steps", "0"], "--steps"),
    ("lik tol nan", ["likelihood", "--tol", "nan"], "--tol"),
    ("lik json missing dir", ["likelihood", "--model", "gmm", "--json", MISSING + ".json"], "--json"),
    # eval-policy
    ("eval methods ''", ["eval-policy", "--methods", ""], "--methods"),
    ("eval methods ','", ["eval-policy", "--methods", ","], "--methods"),
    ("eval methods unknown", ["eval-policy", "--methods", "euler"], "--methods"),
    ("eval methods twice", ["eval-policy", "--methods", "picard,picard"], "--methods"),
    ("eval threads 0", ["eval-policy", "--threads", "0"], "--threads"),
    ("eval episodes 0", ["eval-policy", "--episodes", "0"], "--episodes"),
    ("eval latency-chunks 0", ["eval-policy", "--latency-chunks", "0"], "--latency-chunks"),
    ("eval window 0", ["eval-policy", "--window", "0"], "--window"),
    ("eval window without picard", ["eval-policy", "--methods", "sequential,parareal", "--window", "8"],
     "--window"),
    ("eval tol without picard/parareal", ["eval-policy", "--methods", "sequential", "--tol", "0.1"], "--tol"),
    ("eval tol nan", ["eval-policy", "--tol", "nan"], "--tol"),
    ("eval out missing dir", ["eval-policy", "--out", MISSING + ".png"], "--out"),
    ("eval out not a png", ["eval-policy", "--out", "rollouts.jpg"], "--out"),
    ("train-policy out ''", ["train-policy", "--out", ""], "--out"),          # failed after training before
    ("train-digits out ''", ["train-digits", "--out", ""], "--out"),
    ("eval-digits window foo", ["eval-digits", "--window", "foo"], "--window"),
    ("lik steps over the grid", ["likelihood", "--model", "gmm", "--steps", "1000"], "--steps"),
    ("eval json missing dir", ["eval-policy", "--json", MISSING + ".json"], "--json"),
    # train-policy: before any data is made
    ("train lr inf", ["train-policy", "--lr", "inf"], "--lr"),
    ("train lr nan", ["train-policy", "--lr", "nan"], "--lr"),
    ("train lr 0", ["train-policy", "--lr", "0"], "--lr"),
    ("train width 0", ["train-policy", "--width", "0"], "--width"),
    ("train blocks -1", ["train-policy", "--blocks", "-1"], "--blocks"),
    ("train steps 0", ["train-policy", "--steps", "0"], "--steps"),
    ("train batch 0", ["train-policy", "--batch", "0"], "--batch"),
    ("train episodes 0", ["train-policy", "--episodes", "0"], "--episodes"),
    ("train threads 0", ["train-policy", "--threads", "0"], "--threads"),
    ("train seed -1", ["train-policy", "--seed", "-1"], "--seed"),
    ("train out missing dir", ["train-policy", "--out", MISSING + ".safetensors"], "--out"),
    ("train-digits out missing dir", ["train-digits", "--out", MISSING + ".safetensors"], "--out"),
    # sample: options that do not apply
    ("max-rounds with parareal", ["sample", "--method", "parareal", "--max-rounds", "3"], "--max-rounds"),
    ("slices with picard", ["sample", "--slices", "4"], "--slices"),
    ("coarse-steps with picard", ["sample", "--coarse-steps", "2"], "--coarse-steps"),
    # ... also when the value given is the default (it passed unnoticed)
    ("coarse-steps 1 with picard", ["sample", "--coarse-steps", "1"], "--coarse-steps"),
    ("compare with sequential", ["sample", "--method", "sequential", "--compare"], "--compare"),
    ("likelihood compare with sequential", ["likelihood", "--model", "gmm", "--method", "sequential", "--compare"],
     "--compare"),
    ("max-rounds with sequential", ["sample", "--method", "sequential", "--max-rounds", "3"], "--max-rounds"),
    ("sample-shape on a named model", ["sample", "--model", "gmm", "--sample-shape", "2"], "--sample-shape"),
    ("schedule on a named model", ["sample", "--model", "gmm", "--schedule", "ve"], "--schedule"),
    ("height without pipeline", ["sample", "--height", "64"], "--height"),
    ("policy-demo with torch", ["sample", "--backend", "torch", "--workers", "1", "--policy-demo"],
     "--policy-demo"),
    ("policy-out missing dir", ["sample", "--policy-out", MISSING + ".png"], "--policy-out"),
    ("window x", ["sample", "--window", "x"], "--window"),
    ("dtype int8", ["sample", "--dtype", "int8"], "--dtype"),
]


@pytest.mark.parametrize("argv, flag", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_input_is_a_one_line_error_before_any_work(argv, flag, capsys, tripwires):
    assert flag in _one_line_error(capsys, argv)


def test_output_that_is_a_directory_is_refused_before_work(tmp_path, capsys, tripwires):
    for argv in (["train-policy", "--out"], ["eval-policy", "--out"], ["eval-policy", "--json"],
                 ["likelihood", "--model", "gmm", "--json"], ["train-digits", "--out"]):
        line = _one_line_error(capsys, [*argv, str(tmp_path)])
        assert argv[-1] in line and "directory" in line
    assert list(tmp_path.iterdir()) == []


# -- the environment under torchrun --------------------------------------------------------------------------------
ENV_CASES = [
    ("RANK abc", {"RANK": "abc", "WORLD_SIZE": "2"}, "RANK"),
    ("RANK >= WORLD_SIZE", {"RANK": "2", "WORLD_SIZE": "2"}, "RANK"),
    ("WORLD_SIZE 0", {"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE"),
    ("WORLD_SIZE missing", {"RANK": "0"}, "WORLD_SIZE"),
    ("LOCAL_RANK -1", {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK"),
    ("MASTER_ADDR missing", {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "MASTER_ADDR"),
    ("MASTER_PORT x", {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"},
     "MASTER_PORT"),
]


@pytest.mark.parametrize("env, name", [c[1:] for c in ENV_CASES], ids=[c[0] for c in ENV_CASES])
def test_rank_environment_is_checked(env, name, monkeypatch, capsys, tripwires):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    line = _one_line_error(capsys, ["sample", "--backend", "torch", "--model", "gmm", "--out", ""])
    assert line.startswith(f"paratime: error: {name}: the environment variable"), line


def test_workers_under_torchrun_must_be_the_world_size(monkeypatch, capsys, tripwires):
    """Under torchrun the world size is fixed: a different --workers was ignored silently."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29511"}.items():
        monkeypatch.setenv(key, value)
    line = _one_line_error(capsys, ["sample", "--backend", "torch", "--workers", "5", "--model", "gmm", "--out", ""])
    assert line.startswith("paratime: error: --workers: 5, but torchrun started 2 ranks"), line


# -- the API: options that do not apply, the registry, factories, callables ----------------------------------------
def _gmm(**kw):
    return ParallelSampler("gmm", steps=5, progress=False, **kw)


def _user(body: str, tmp_path, monkeypatch, **kw):
    name = f"h5_factories_{tmp_path.name.replace('-', '_').replace('[', '_').replace(']', '_')}"  # one module per case
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    return user_model(f"{name}:make", **kw)


API_CASES = [
    # silent before, errors now
    ("guidance_rescale without guidance", lambda: ParallelSampler("digits", guidance_rescale=0.5), ValueError,
     "guidance_rescale"),
    ("corrector_steps without corrector_snr", lambda: _gmm(corrector_steps=3), ValueError, "corrector_steps"),
    ("latent_scale without decoder", lambda: _gmm(latent_scale=0.18215), ValueError, "latent_scale"),
    ("max_rounds with parareal", lambda: _gmm(method="parareal", max_rounds=2), ValueError, "max_rounds"),
    ("slices with picard", lambda: _gmm(slices=2), ValueError, "slices"),
    ("slices with sequential", lambda: _gmm(method="sequential", slices=2), ValueError, "slices"),
    ("coarse_steps with picard", lambda: _gmm(coarse_steps=2), ValueError, "coarse_steps"),
    # refused by sample() before, when the sampler is built now
    ("parareal with plms", lambda: _gmm(method="parareal", solver="plms"), ValueError, "solver"),
    ("parareal with dpmpp_3m", lambda: _gmm(method="parareal", solver="dpmpp_3m", slices=1), ValueError, "solver"),
    ("dpmpp_singlestep, 3 steps", lambda: ParallelSampler("gmm", solver="dpmpp_singlestep", steps=3, progress=False),
     ValueError, "steps"),
    ("dpmpp_singlestep, 1 step", lambda: ParallelSampler("gmm", solver="dpmpp_singlestep", steps=1, progress=False),
     ValueError, "steps"),
    ("network returns a list", lambda: ParallelSampler(lambda x, t: x.tolist(), schedule=VESchedule(),
                                                       prediction="eps", steps=3, progress=False).sample((2, 3)),
     TypeError, "network"),
    ("decoder with a .decode that is not callable", lambda: _gmm(decoder=type("V", (), {"decode": 3})()), TypeError,
     "decoder"),
    # the registry
    ("register ''", lambda: register_model("", lambda: None), ValueError, "name"),
    ("register taken", lambda: register_model("gmm", lambda: None), ValueError, "name"),
    ("register non-callable", lambda: register_model("h5-x", 3), TypeError, "factory"),
    ("load unknown", lambda: load_model("nope"), ValueError, "model"),
    ("load 3", lambda: load_model(3), ValueError, "model"),
    ("load digits, an option it lacks", lambda: load_model("digits", foo=1), TypeError, "foo"),
    ("load policy, an option it lacks", lambda: load_model("policy", steps=3), TypeError, "steps"),
    ("factory unknown", lambda: model_factory("nope"), ValueError, "model"),
    ("schedule unknown", lambda: make_schedule("cosine"), ValueError, "schedule"),
    # module:factory
    ("spec without colon", lambda: load_factory("paratime.zoo"), ValueError, "model"),
    ("spec bad module", lambda: load_factory("h5_no_such_module:make"), ValueError, "model"),
    ("spec bad attribute", lambda: load_factory("math:no_such"), ValueError, "model"),
    ("spec not callable", lambda: load_factory("math:pi"), ValueError, "model"),
    ("spec 3", lambda: load_factory(3), ValueError, "model"),
    # callables
    ("callback=3", lambda: _gmm().sample(2, callback=3), TypeError, "callback"),
    ("likelihood first_sample, nothing drawn", lambda: _gmm().log_likelihood(torch.zeros(2, 2), first_sample=5),
     ValueError, "first_sample"),
    ("decoder=3", lambda: _gmm(decoder=3), TypeError, "decoder"),
    ("classifier=3", lambda: _gmm(classifier=3), TypeError, "classifier"),
    ("Denoiser(3)", lambda: Denoiser(3, VESchedule(), "eps"), TypeError, "network"),
    ("model=3", lambda: ParallelSampler(3), TypeError, "model"),
    ("act wrong chunk", lambda: paratime.policy_eval.rollout(lambda obs, c: torch.zeros(obs.shape[0], 1, 2), 2),
     ValueError, "act"),
    ("chunk_latency 1-D", lambda: paratime.policy_eval.chunk_latency({}, torch.zeros(12)), ValueError,
     "observations"),
    ("compare_methods latency_chunks 0", lambda: paratime.policy_eval.compare_methods(latency_chunks=0), ValueError,
     "latency_chunks"),
    ("policy_demo latency_chunks 0", lambda: paratime.policy_eval.policy_demo(None, latency_chunks=0), ValueError,
     "latency_chunks"),
    ("latency_observations -1", lambda: paratime.policy_eval.latency_observations(-1), ValueError, "n"),
    ("chunk_latency warmup -1", lambda: paratime.policy_eval.chunk_latency({}, torch.zeros(2, 3), warmup=-1),
     ValueError, "warmup"),
    ("chunks_png 2-D", lambda: paratime.policy_eval.chunks_png("x.png", torch.zeros(3, 2)), ValueError, "chunks"),
    # training inputs (before any data is made)
    ("train_policy lr inf", lambda: paratime.zoo.policy.train_policy(None, lr=INF), ValueError, "lr"),
    ("train_policy width 0", lambda: paratime.zoo.policy.train_policy(None, width=0), ValueError, "width"),
    ("train_policy blocks -1", lambda: paratime.zoo.policy.train_policy(None, blocks=-1), ValueError, "blocks"),
    ("train_policy width 1.5", lambda: paratime.zoo.policy.train_policy(None, width=1.5), TypeError, "width"),
    ("train_policy ema nan", lambda: paratime.zoo.policy.train_policy(None, ema=NAN), ValueError, "ema"),
]


@pytest.mark.parametrize("call, error, name", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_input_is_a_clear_error(call, error, name):
    with pytest.raises(error) as info:
        call()
    assert str(info.value).startswith(name), str(info.value)


@pytest.mark.parametrize("body, kw, error, name", [
    ("def make():\n    return 3\n", {}, TypeError, "model"),
    ("def make():\n    raise RuntimeError('boom')\n", {}, ValueError, "model"),
    ("def make():\n    return lambda x, t: x\n", {"prediction": "eps"}, ValueError, "schedule"),
    ("from paratime.zoo.gmm import ring_gmm\ndef make():\n    return ring_gmm()\n", {"schedule": "ve"}, ValueError,
     "schedule"),
])
def test_user_factory_errors(body, kw, error, name, tmp_path, monkeypatch):
    with pytest.raises(error) as info:
        _user(body, tmp_path, monkeypatch, **kw)
    assert str(info.value).startswith(name), str(info.value)


# -- weight files --------------------------------------------------------------------------------------------------
def _foreign(path):
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(3, 3)}, str(path))


WEIGHT_CASES = [
    ("empty", lambda p: p.write_bytes(b"")),
    ("truncated", lambda p: p.write_bytes(paratime.zoo.digits.WEIGHTS.read_bytes()[:1000])),
    ("text", lambda p: p.write_text("not a weights file\n" * 10)),
    ("foreign", _foreign),
    ("the other model's", "other"),
]
LOADERS = [("digits", lambda p: paratime.zoo.digits.load_digits_model(p), paratime.zoo.policy.WEIGHTS),
           ("policy", lambda p: paratime.zoo.policy.load_policy_model(p), paratime.zoo.digits.WEIGHTS),
           ("baseline", lambda p: paratime.zoo.policy.load_baseline(p), paratime.zoo.digits.WEIGHTS)]


@pytest.mark.parametrize("make", [c[1] for c in WEIGHT_CASES], ids=[c[0] for c in WEIGHT_CASES])
@pytest.mark.parametrize("load, other", [c[1:] for c in LOADERS], ids=[c[0] for c in LOADERS])
def test_bad_weight_file_names_the_argument_and_the_path(make, load, other, tmp_path):
    path = tmp_path / "w.safetensors"
    shutil.copy(other, path) if make == "other" else make(path)
    with pytest.raises(ValueError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith("path: ") and str(path) in message, message
    assert "SafetensorError" not in type(info.value).__name__


def test_weight_file_that_is_a_directory_or_missing(tmp_path):
    with pytest.raises(ValueError, match=f"^path: {tmp_path} is not a file"):
        paratime.zoo.digits.load_digits_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="^path: no digits weights at"):
        paratime.zoo.digits.load_digits_model(tmp_path / "none.safetensors")


def test_shipped_weights_still_load():
    for load in (paratime.zoo.digits.load_digits_model, paratime.zoo.policy.load_policy_model,
                 paratime.zoo.policy.load_baseline):
        assert load() is not None
    assert math.isfinite(paratime.zoo.digits._read_meta(paratime.zoo.digits.WEIGHTS)["final_loss"])
