"""Regenerate the README's deterministic figures (rounds, NFE, differences, success rates) and fail when the README
disagrees with them.

    python -m paratime.bench.readme_figures [--quick] [--only NAME ...] [--print]

Each check runs the command the README names for a figure and renders the lines the README must contain (a table row,
or a phrase of the text) from what it measured, in the README's own format. The script prints every rendered line
that the README lacks and exits 1 when there is one (``--print`` prints every rendered line, to paste). Wall times are
not checked (they depend on the load); ``--quick`` runs the checks that take seconds (CI runs it through
``tests/test_readme.py``); without it every check runs, the long ones too (minutes each, noted per check).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["Check", "CHECKS", "missing", "main"]

README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass(frozen=True)
class Check:
    """One figure source: ``run()`` measures and returns the README lines it implies; ``command`` is what the README
    cites for it; ``quick``: seconds on one thread (run in CI)."""

    name: str
    command: str
    quick: bool
    run: Callable[[], list[str]]


def _sig(x: float, digits: int = 2) -> str:
    """``8.2e-05`` -> ``8.2e-5``: the README's short scientific format."""
    mant, exp = f"{x:.{digits - 1}e}".split("e")
    return f"{mant}e{int(exp)}"


def _main_job() -> list[str]:
    """The quick start's digits figures: ``paratime sample --no-policy-demo`` (rounds, NFE, max difference)."""
    from paratime import ParallelSampler

    seq = ParallelSampler("digits", solver="ddim", steps=100, method="sequential", progress=False).sample(16, seed=0)
    pic = ParallelSampler("digits", solver="ddim", steps=100, method="picard", progress=False).sample(16, seed=0)
    diff = float((pic.samples - seq.samples).abs().max())
    nfe = round(pic.stats.nfe)
    return [f"Picard {pic.stats.rounds} rounds / {nfe} NFE per sample", f"max difference {_sig(diff)}"]


def _printed(module: str, *args: str) -> list[str]:
    """What ``python -m module args`` prints (one torch thread, offline), as lines; exits non-zero: an error."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                         cwd=README.parent, timeout=3600)
    # 1: a benchmark whose own checks missed (the README says so); an uncaught exception exits 1 too, with a
    # traceback: that is a failure to run, not a figure.
    if out.returncode not in (0, 1) or "Traceback (most recent call last)" in out.stderr:
        raise RuntimeError(f"{module} {' '.join(args)} exited {out.returncode}:\n{out.stderr[-2000:]}")
    return out.stdout.splitlines()


def _rows(lines: list[str]) -> list[str]:
    """The body rows of the markdown tables in ``lines`` (headers and separators excluded)."""
    rows = [ln.strip() for ln in lines if ln.strip().startswith("| ")]
    return [r for r in rows if not set(r) <= set("|-: ") and r not in {x for x in rows if x.startswith("| case")}]


def _cells(row: str, keep: list[int]) -> list[str]:
    """Row fragments made of the cells ``keep`` (runs of adjacent kept cells stay one fragment), so a row's
    deterministic cells are checked and its wall times are not."""
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    frags, run = [], []
    for i, c in enumerate(cells):
        if i in keep:
            run.append(c)
        elif run:
            frags.append(run)
            run = []
    if run:
        frags.append(run)
    n = len(cells)
    out = []
    for f in frags:
        first = cells.index(f[0])
        text = " | ".join(f)
        out.append(("| " if first == 0 else "| ") + text + (" |" if first + len(f) <= n else ""))
    return out


def _sd_paradigms() -> list[str]:
    """The side-by-side with ``StableDiffusionParadigmsPipeline``: rounds, NFE and max diff (not the wall times)."""
    lines = []
    for row in _rows(_printed("paratime.bench.sd_paradigms", "--repeats", "1")):
        lines += _cells(row, [0, 1, 2]) + _cells(row, [5])
    return lines


def _policy() -> list[str]:
    """``paratime eval-policy``'s success, collisions and timeouts per method (not the latencies)."""
    lines = _printed("paratime", "eval-policy", "--episodes", "100", "--latency-chunks", "2", "--threads", "1")
    return [" ".join(ln.split()[:4]) for ln in lines
            if ln.split() and ln.split()[0] in ("sequential", "picard", "parareal", "baseline")]


def _likelihood() -> list[str]:
    """The digits likelihood table's sequential bits/dim (mean ± standard error per set: Hutchinson's probes and the
    dequantisation noise depend on the seed and the image only), not the wall times or Picard's rows."""
    lines = _printed("paratime", "likelihood", "--sets", "real,shuffled,uniform", "--samples", "32", "--method",
                     "sequential", "--threads", "1", "--no-progress")
    rows = [ln.split() for ln in lines if len(ln.split()) > 2 and ln.split()[1] == "sequential"]
    return [" ".join(r[r.index("±") - 1:r.index("±") + 2]) for r in rows if "±" in r]


CHECKS: list[Check] = [
    Check("main-job", "paratime sample", True, _main_job),
    Check("policy", "paratime eval-policy --episodes 100", True, _policy),
    Check("likelihood", "paratime likelihood --samples 32 --method sequential", True, _likelihood),
    Check("sd-paradigms", "python -m paratime.bench.sd_paradigms", True, _sd_paradigms),
    Check("pipelines", "python -m paratime.bench.pipeline_table (2 min)", False,
          lambda: _rows(_printed("paratime.bench.pipeline_table"))),
    Check("staggered", "python benchmarks/staggered_vs_picard.py (20 s)", True,     # in CI: it went stale outside
          lambda: _rows(_printed("paratime.bench.staggered_vs_picard"))),
    Check("devices", "python -m paratime.bench.devices --seeds 16 (10 min)", False,
          lambda: _rows(_printed("paratime.bench.devices", "--seeds", "16", "--out", _tmpdir()))),
    Check("headline", "python -m paratime.bench.rounds_at_accuracy --headline --cases "
          "digits-ddim100,sd-ddim50,policy,sd-ddpm100,gmm-ddpm1000 (20 min)", False,
          lambda: _rows(_printed("paratime.bench.rounds_at_accuracy", "--headline", "--cases",
                                 "digits-ddim100,sd-ddim50,policy,sd-ddpm100,gmm-ddpm1000"))),
]


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="readme-figures-")


def missing(lines: list[str], text: str) -> list[str]:
    """The rendered lines the README text lacks (whitespace-normalised)."""
    norm = " ".join(text.split())
    return [ln for ln in lines if " ".join(ln.split()) not in norm]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="readme_figures", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the checks that take seconds (what CI runs)")
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=[c.name for c in CHECKS],
                    help="run these checks only (default: all, or the quick ones with --quick)")
    ap.add_argument("--print", action="store_true", help="print every rendered line, not only the missing ones")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; figures do not depend on it)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads: must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    text = README.read_text()
    checks = [c for c in CHECKS if (c.name in args.only if args.only else (c.quick or not args.quick))]
    failed = 0
    for c in checks:
        lines = c.run()
        lacks = missing(lines, text)
        failed += bool(lacks) or not lines           # nothing rendered: nothing was checked
        if not lines:
            print(f"  {c.name}: rendered no lines (no figure to compare)")
        print(f"{c.name} ({c.command}): {len(lines) - len(lacks)}/{len(lines)} lines in the README")
        for ln in (lines if args.print else lacks):
            print(f"  {'MISSING ' if ln in lacks else ''}{ln}")
    print(f"{len(checks) - failed} of {len(checks)} checks agree with the README")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
