"""The README is tested: every ```python block runs as written, and every command line in a ```bash block names a
real command with options it accepts (``paratime`` lines parse with the CLI's own parser; ``python`` scripts exist
and define each flag used; ``torchrun`` lines name a launch script whose parser accepts them).

Substitutions, stated in one place (:data:`STAND_INS`): names a snippet leaves to the reader (``my_unet``, ``emb``)
are defined by a prelude, and ``from_pretrained("/path/to/...")`` of a diffusers pipeline returns the tiny pipeline of
the same class built from configs (``paratime.bench.tiny_pipelines``) — the README's code runs unchanged otherwise.
"""

from __future__ import annotations

import ast
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


def _check_source_flags(script: Path, args: list[str]) -> None:
    """A script that forwards to ``paratime.cli.main([...fixed..., *sys.argv[1:]])`` is parsed by the CLI; any other
    script must define every flag used."""
    assert script.exists(), f"no script {script.relative_to(ROOT)}"
    source = script.read_text()
    forward = re.search(r"main\(\[(.*?)\*sys\.argv\[1:\]\]\)", source)
    if forward:
        _check_cli([*ast.literal_eval(f"[{forward.group(1)}]"), *args])
        return
    for flag in _flags(args):
        assert f'"{flag}"' in source, f"{flag} is not an option of {script.relative_to(ROOT)}"


@pytest.mark.parametrize("line,words", COMMANDS, ids=[f"README.md:{n}:{w[0]}" for n, w in COMMANDS])
def test_command_line_is_accepted(line, words):
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
