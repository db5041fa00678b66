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
    import torch

    from paratime import ParallelSampler

    seq = ParallelSampler("digits", solver="ddim", steps=100, method="sequential", progress=False).sample(16, seed=0)
    pic = ParallelSampler("digits", solver="ddim", steps=100, method="picard", progress=False).sample(16, seed=0)
    diff = float((pic.samples - seq.samples).abs().max())
    nfe = round(pic.stats.nfe)
    return [f"Picard {pic.stats.rounds} rounds / {nfe} NFE per sample", f"max difference {_sig(diff)}"]


CHECKS: list[Check] = [
    Check("main-job", "paratime sample", True, _main_job),
]


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
        failed += bool(lacks)
        print(f"{c.name} ({c.command}): {len(lines) - len(lacks)}/{len(lines)} lines in the README")
        for ln in (lines if args.print else lacks):
            print(f"  {'MISSING ' if ln in lacks else ''}{ln}")
    print(f"{len(checks) - failed} of {len(checks)} checks agree with the README")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
