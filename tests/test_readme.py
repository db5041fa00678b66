"""The README is tested: every ```python block runs as written, and every command line in a ```bash block names a
real command with options it accepts (``paratime`` lines parse with the CLI's own parser, each flag spelled out;
``python`` scripts exist and define each flag used; ``torchrun`` lines name a launch script whose parser accepts
them). Its sentences' inline code is read too: the commands they quote are checked alike, and the flags, stats
fields, keyword options, repository paths and Layout modules they name must exist.

Substitutions, stated in one place (:data:`STAND_INS`): names a snippet leaves to the reader (``my_unet``, ``emb``)
are defined by a prelude, and ``from_pretrained("/path/to/...")`` of a diffusers pipeline returns the tiny pipeline of
the same class built from configs (``paratime.bench.tiny_pipelines``) — the README's code runs unchanged otherwise.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced block of ``lang`` in the README."""
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


class _TinyUNet(torch.nn.Module):
    """A v-predicting stand-in for a U-Net, ``net(x, t, encoder_hidden_states=...)``: a 1x1 convolution plus the
    mean of the embedding, so it depends on every input."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, t, encoder_hidden_states):
        return self.conv(x) * 0.1 + encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1)


def _tiny_unet_prelude() -> dict:
    """``my_unet`` and ``emb`` for the snippet that brings its own network."""
    torch.manual_seed(0)
    return {"my_unet": _TinyUNet(), "emb": torch.randn(4, 3, 8)}


def _pipeline_stand_ins(monkeypatch) -> None:
    """``Pipeline.from_pretrained(path, ...)`` -> the tiny pipeline of that class (built from configs, offline)."""
    diffusers = pytest.importorskip("diffusers")
    from paratime.bench import tiny_pipelines as tiny

    makers = {"StableDiffusionPipeline": tiny.tiny_sd, "StableDiffusionXLPipeline": tiny.tiny_sdxl,
              "StableDiffusion3Pipeline": tiny.tiny_sd3}
    for name, make in makers.items():
        def from_pretrained(path, *args, _make=make, **kwargs):
            pipe = _make(text=True)                      # tiny CLIP tokenizers: string prompts work
            dtype = kwargs.get("torch_dtype")
            return pipe if dtype in (None, torch.float32) else pipe.to(dtype=dtype)
        monkeypatch.setattr(getattr(diffusers, name), "from_pretrained", staticmethod(from_pretrained))


STAND_INS = {"prelude": _tiny_unet_prelude, "pipelines": _pipeline_stand_ins}
PYTHON = blocks("python")


def test_the_readme_has_code_to_test():
    assert len(PYTHON) >= 3 and len(blocks("bash")) >= 2


@pytest.mark.parametrize("line,code", PYTHON, ids=[f"README.md:{n}" for n, _ in PYTHON])
def test_python_block_runs(line, code, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)                          # files a snippet writes land in a temporary folder
    namespace = {"__name__": "readme"}
    if "from_pretrained(" in code:
        STAND_INS["pipelines"](monkeypatch)
    if "my_unet" in code:
        namespace.update(STAND_INS["prelude"]())
    exec(compile(code, f"README.md:{line}", "exec"), namespace)


def _commands() -> list[tuple[int, list[str]]]:
    """Every command line of the README's bash blocks (continuations joined, comments dropped)."""
    out = []
    for line, code in blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", code)
        for k, raw in enumerate(joined.splitlines()):
            for part in raw.split("&&"):
                words = shlex.split(part, comments=True)
                if words:
                    out.append((line + 1 + k, words))
    return out


COMMANDS = _commands()


def _flags(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("--")]


def _check_cli(args: list[str]) -> None:
    """``paratime ARGS``: parsed by the CLI's own parser (``paratime bench`` hands its arguments to the suite)."""
    if args[:1] == ["bench"]:
        _check_source_flags(ROOT / "benchmarks" / "suite.py", args[1:])
        return
    from paratime.cli import build_parser
    build_parser().parse_args(args)
    # argparse takes an unambiguous prefix (--thread for --threads): the README spells every flag out
    sub = args[0] if args and not args[0].startswith("-") else "sample"
    options = _subcommand_parsers()[sub]._option_string_actions
    assert [f for f in _flags(args) if f not in options] == [], f"paratime {sub}: a flag not spelled as its option"


#: the CLI's functions that add a subcommand's options to a parser, and those subcommands: a script that builds its
#: parser with one takes their flags (``benchmarks/likelihood.py`` takes ``paratime likelihood``'s)
PARSER_BUILDERS = {"add_likelihood_parser": ("likelihood",), "add_policy_parsers": ("train-policy", "eval-policy")}


def _check_source_flags(script: Path, args: list[str]) -> None:
    """A script that forwards to ``paratime.cli.main([...fixed..., *sys.argv[1:]])`` is parsed by the CLI; any other
    script must define every flag used (or take it from a subcommand's parser, :data:`PARSER_BUILDERS`)."""
    assert script.exists(), f"no script {script.relative_to(ROOT)}"
    source = script.read_text()
    forward = re.search(r"main\(\[(.*?)\*sys\.argv\[1:\]\]\)", source)
    if forward:
        _check_cli([*ast.literal_eval(f"[{forward.group(1)}]"), *args])
        return
    borrowed = {flag for builder, subs in PARSER_BUILDERS.items() if f"{builder}(" in source
                for name in subs for flag in _subcommand_parsers()[name]._option_string_actions}
    for flag in _flags(args):
        assert f'"{flag}"' in source or flag in borrowed, f"{flag} is not an option of {script.relative_to(ROOT)}"


@pytest.mark.parametrize("line,words", COMMANDS, ids=[f"README.md:{n}:{w[0]}" for n, w in COMMANDS])
def test_command_line_is_accepted(line, words):
    _check_command(line, words)


def _check_command(line: int, words: list[str]) -> None:
    """A command line of the README (a block's or a sentence's): see the module docstring."""
    head, args = words[0], words[1:]
    if head == "paratime":
        _check_cli(args)
    elif head in ("python", "python3") and args[:2] == ["-m", "paratime"]:
        _check_cli(args[2:])
    elif head in ("python", "python3") and args[:1] == ["-m"]:
        spec = importlib.util.find_spec(args[1])
        assert spec is not None, f"no module {args[1]}"
        _check_source_flags(Path(spec.origin), args[2:])
    elif head in ("python", "python3"):
        _check_source_flags(ROOT / args[0], args[1:])
    elif head == "torchrun":
        k = next(k for k, w in enumerate(args) if w.endswith(".py"))
        _check_source_flags(ROOT / args[k], args[k + 1:])
    elif head == "bash":
        assert (ROOT / args[0]).exists(), f"no script {args[0]}"
    elif head != "pip":
        pytest.fail(f"README.md:{line}: a command the README test does not know: {' '.join(words)}")


# Command lines that finish in seconds run as the README gives them (the others are parsed above): each with the
# files its --json / --out name, which it must write.
RUN = ["paratime sample --model gmm --solver ddpm --steps 100 --batch 256 --json stats.json --out gmm.png"]


def test_the_commands_to_run_are_the_readmes():
    assert all(any(words == shlex.split(cmd) for _, words in COMMANDS) for cmd in RUN)


@pytest.mark.parametrize("cmd", RUN)
def test_fast_command_line_runs(cmd, monkeypatch, tmp_path, capsys):
    from paratime.cli import main

    monkeypatch.chdir(tmp_path)
    words = shlex.split(cmd)
    assert main(words[1:]) == 0, capsys.readouterr().err
    written = [words[k + 1] for k, w in enumerate(words) if w in ("--json", "--out")]
    assert written and all((tmp_path / name).is_file() for name in written)


def test_readme_figures_agree_with_a_fresh_run(capsys):
    """The quick form of benchmarks/readme_figures.py: the deterministic figures the README quotes are re-measured
    and must appear in it as printed."""
    pytest.importorskip("sklearn")            # the likelihood figures score scikit-learn's digits
    from paratime.bench import readme_figures

    code = readme_figures.main(["--quick"])
    assert code == 0, capsys.readouterr().out


def test_readme_figures_detect_a_stale_figure():
    from paratime.bench.readme_figures import missing

    assert missing(["Picard 12 rounds / 479 NFE"], "… Picard 12 rounds /\n479 NFE per sample") == []
    assert missing(["Picard 12 rounds / 479 NFE"], "Picard 12 rounds / 480 NFE") == ["Picard 12 rounds / 479 NFE"]


def test_readme_figures_fail_a_check_that_ran_nothing(monkeypatch, capsys):
    """A check that renders no line compared nothing, and a command that crashed (a traceback, exit 1 like a
    benchmark whose own checks missed) is an error: both passed as agreeing before."""
    from paratime.bench import readme_figures

    monkeypatch.setattr(readme_figures, "CHECKS", [readme_figures.Check("empty", "nothing", True, lambda: [])])
    assert readme_figures.main(["--quick"]) == 1
    assert "rendered no lines" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="exited 1"):
        readme_figures._printed("paratime.bench.sd_paradigms", "--window", "0")


# -- the prose: what the text around the code names must exist -----------------------------------------------------
# The blocks above run or parse; these checks read the inline code of the sentences, where a renamed option, flag or
# stats field otherwise outlives the code it describes.

def _prose() -> str:
    """The README with its fenced blocks blanked (line numbers kept)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), README.read_text())


def _user_part(text: str) -> str:
    """The user-facing sections: everything before ``## Figures`` and ``## Layout`` on (the rest blanked)."""
    lines = text.split("\n")
    figures = lines.index("## Figures")
    layout = lines.index("## Layout")
    return "\n".join(lines[:figures] + [""] * (layout - figures) + lines[layout:])


def spans(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every inline code span of ``text``, its whitespace collapsed (a span may wrap a line)."""
    return [(text[:m.start()].count("\n") + 1, " ".join(m.group(1).split()))
            for m in re.finditer(r"`([^`]+)`", text)]


#: words that stand for what the reader supplies in a prose command (``paratime SUBCOMMAND --help``)
PLACEHOLDERS = {"SUBCOMMAND", "script.py"}
_ENV = re.compile(r"[A-Z_]+=\S*")


def _command(code: str) -> list[str] | None:
    """The words of a code span that is a command line (``OMP_NUM_THREADS=1 python ...``; the environment dropped,
    and optional parts' brackets: ``[--tol 0.03]`` is checked as ``--tol 0.03``), else None."""
    try:
        words = [w.strip("[]") for w in shlex.split(code)]
    except ValueError:
        return None
    while words and _ENV.fullmatch(words[0]):
        words = words[1:]
    is_command = words[:1] in (["paratime"], ["python"], ["python3"], ["torchrun"], ["bash"]) and len(words) > 1
    return [w for w in words if w] if is_command else None


def _prose_commands(text: str) -> list[tuple[int, list[str]]]:
    """The command lines among the prose's code spans, but those with a :data:`PLACEHOLDERS` word."""
    commands = [(line, _command(code)) for line, code in spans(text)]
    return [(line, words) for line, words in commands if words and not PLACEHOLDERS & set(words)]


PROSE_COMMANDS = _prose_commands(_prose())


def _check_python_c(code: str) -> None:
    """``python -c CODE``: it compiles, and each ``from M import N`` names a module and something it defines."""
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom):
            spec = importlib.util.find_spec(node.module)
            assert spec is not None, f"no module {node.module}"
            source = Path(spec.origin).read_text()
            for alias in node.names:
                assert re.search(rf"^(def|class) {alias.name}\b|^{alias.name}\s*[:=]", source, re.M), \
                    f"{node.module} defines no {alias.name}"


def test_the_prose_has_commands_to_check():
    assert len(PROSE_COMMANDS) >= 20


@pytest.mark.parametrize("line,words", PROSE_COMMANDS, ids=[f"README.md:{n}:{w[0]}" for n, w in PROSE_COMMANDS])
def test_prose_command_is_accepted(line, words):
    """A command quoted in a sentence is checked as a block's is; ``--help`` names a real subcommand."""
    if words[0] in ("python", "python3") and words[1] == "-c":
        _check_python_c(words[2])
    elif words[0] == "paratime" and "--help" in words:
        from paratime.cli import build_parser

        build_parser().parse_args([w for w in words[1:] if w != "--help"])
    else:
        _check_command(line, words)


@functools.lru_cache(maxsize=1)
def _subcommand_parsers() -> dict:
    """``paratime``'s subcommand parsers by name (``bench`` aside: it hands its arguments to the suite)."""
    from paratime.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in sub.choices.items() if name != "bench"}


FLAG_SPANS = [(line, code) for line, code in spans(_user_part(_prose())) if code.startswith("--")]


def test_the_prose_names_flags():
    assert len(FLAG_SPANS) >= 20


@pytest.mark.parametrize("line,code", FLAG_SPANS, ids=[f"README.md:{n}:{c}" for n, c in FLAG_SPANS])
def test_prose_flag_is_an_option(line, code):
    """A flag the user-facing text names on its own (``--cost measure``, ``--no-progress``) is an option of a
    ``paratime`` subcommand, and one given with a value parses with it there."""
    from paratime.cli import UsageError

    words = shlex.split(code)
    parsers = _subcommand_parsers()
    having = [name for name, p in parsers.items() if words[0] in p._option_string_actions]
    assert having, f"README.md:{line}: {words[0]} is not an option of any paratime subcommand"
    if len(words) > 1:
        parsed = []
        for name in having:
            try:
                parsers[name].parse_args(words)
                parsed.append(name)
            except UsageError:
                pass
        assert parsed, f"README.md:{line}: no paratime subcommand of {', '.join(having)} accepts {code!r}"


@pytest.fixture(scope="module")
def planned_run():
    """The stats of a planned Picard run (``method="auto"``): every field, ``extra`` key and ``plan`` key set."""
    from paratime import ParallelSampler

    return ParallelSampler("gmm", steps=20, method="auto", progress=False).sample(8, seed=0).stats


def test_stats_the_readme_names_exist(planned_run):
    """``stats.X`` (``result.stats.X``, ``out.paratime_stats.X``) is a :class:`~paratime.SampleStats` field,
    ``.X`` right after one too (``result.stats.tol_units``, ``.data_scale``), and every ``extra["k"]`` and
    ``plan["k"]`` the README names is one a planned run reports."""
    from dataclasses import fields

    from paratime import SampleStats

    text = _prose()
    names = set(re.findall(r"stats\.(\w+)", text))
    for m in re.finditer(r"stats\.\w+`((?:,? (?:and )?`\.\w+`)+)", text):
        names |= set(re.findall(r"`\.(\w+)`", m.group(1)))
    assert {"rounds", "tol_units", "data_scale", "tol_abs", "round_sce"} <= names     # the scan sees them
    assert sorted(names - {f.name for f in fields(SampleStats)}) == []
    extra = set(re.findall(r'extra\["(\w+)"\]', text))
    assert extra and sorted(extra - set(planned_run.extra)) == []
    plan = set(re.findall(r'plan\["(\w+)"\]', text))
    assert plan and sorted(plan - set(planned_run.plan)) == []


#: top-level folders whose paths the README names
_TREES = ("paratime", "tests", "benchmarks", "launch", "kernels", "docs", ".ci")


def test_paths_the_readme_names_exist():
    """Every repository path the README names (``tests/test_precision.py``, ``paratime/methods/``, a glob such as
    ``tests/test_pipelines*.py``) is there."""
    text = README.read_text()
    named = {m.rstrip(".") for m in re.findall(rf"(?<![\w/.-])(?:{'|'.join(map(re.escape, _TREES))})/[\w./*-]*", text)}
    assert len(named) >= 30
    missing = sorted(p for p in named if not any(ROOT.glob(p.rstrip("/"))))
    assert missing == []


#: keywords the user-facing text names that are not paratime's options: diffusers' (a pipeline's, a scheduler's
#: config, a ControlNet's) and the conditioning keys of a ``sample()`` call (the digits labels, the unconditional
#: inputs, a classifier's labels)
FOREIGN_KEYWORDS = {"global_pool_conditions", "prediction_type", "skip_prk_steps", "timesteps", "sigmas",
                    "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "labels", "uncond", "y"}


def _keywords() -> set[str]:
    """The keyword arguments of what the README's options belong to: the sampler, its config, ``sample``,
    ``log_likelihood``, ``parallelize``, the backends, ``make_solver``'s solvers, ``FlowSchedule``."""
    import inspect
    from dataclasses import fields

    from paratime import SOLVERS, ParallelSampler, SamplerConfig, parallelize
    from paratime.backends import Backend
    from paratime.backends.local import LocalBackend
    from paratime.backends.ray_actors import RayBackend
    from paratime.backends.torch_dist import TorchDistributedBackend
    from paratime.schedules import FlowSchedule

    names = {f.name for cls in (SamplerConfig, FlowSchedule, *SOLVERS.values()) for f in fields(cls)}
    for fn in (ParallelSampler.__init__, ParallelSampler.sample, ParallelSampler.log_likelihood, parallelize,
               Backend.evaluate, LocalBackend.__init__, RayBackend.__init__, TorchDistributedBackend.__init__):
        names |= set(inspect.signature(fn).parameters)
    return names


def test_keywords_the_readme_names_are_options():
    """Every ``name=`` in the user-facing text's inline code (``accept_tol=``, ``make_solver("dpmpp", order=3,
    sde=True)``, and the keys of ``backend_options={"workers": 4}``) is a keyword of paratime's API, or one of
    :data:`FOREIGN_KEYWORDS`; commands are checked above."""
    named = {}
    for line, code in spans(_user_part(_prose())):
        if _command(code) is None:
            for name in re.findall(r"(?<![\w.-])([a-z_]\w*)=(?!=)", code):
                named.setdefault(name, line)
            for options in re.findall(r"backend_options=\{([^}]*)\}", code):     # the backends' keywords
                for name in re.findall(r'"(\w+)":', options):
                    named.setdefault(name, line)
    assert {"accept_tol", "backend_options", "kernels", "order", "num_gpus"} <= set(named)    # the scan sees them
    unknown = {name: line for name, line in named.items() if name not in _keywords() | FOREIGN_KEYWORDS}
    assert unknown == {}, "README.md lines: " + ", ".join(f"{n}= ({line})" for n, line in unknown.items())


def test_layout_rows_name_every_module_of_their_folder():
    """A ``## Layout`` row that lists a folder's modules lists them all (``paratime/methods/`` had left out
    ``staggered.py``)."""
    layout = README.read_text().split("## Layout", 1)[1]
    rows = re.findall(r"^\| `([\w/]+/)` \| (.*) \|$", layout, re.M)
    listing = [(folder, set(re.findall(r"(\w+\.py)", what))) for folder, what in rows if ".py" in what]
    assert len(listing) >= 3
    for folder, named in listing:
        modules = {p.name for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"}
        assert sorted(modules - named) == [], f"Layout: {folder} leaves out modules"
