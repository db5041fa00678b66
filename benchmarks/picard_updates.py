"""Picard's update rules and initial guesses at fixed accuracy (issue 17): rounds and NFE at max |Δ| <= 1e-2, 2e-3,
5e-4 from the sequential samples, for each (update, stop, init) variant, on the cases of ``rounds_at_accuracy.py``.

    python benchmarks/picard_updates.py                                  # gmm DDIM-100 (256 samples)
    python benchmarks/picard_updates.py --cases gmm-ddpm1000,digits-ddim100 --variants anderson,secant-noise-copy
    python benchmarks/picard_updates.py --cases digits-ddim100 --diffusers --json out.json

Variants are ``update[-init][-fill][@stop]``: ``init`` one of ``auto`` (default), ``noise``, ``x0`` (its extra
network call counted as a round and an NFE), ``fill`` one of ``path`` (default), ``copy``; ``@paradigms`` uses
ParaDiGMS's stopping rule instead of the final-point rule. Rounds are sequential network calls, NFE
time-point evaluations per sample: both deterministic, independent of the machine and threads.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from paratime.methods import METHODS, sample_picard
from paratime.methods.picard import FILLS, INITS, STOPS, UPDATES

from rounds_at_accuracy import CASES, SWEEPS, TARGETS, at_accuracy, diffusers_runs, sample, sweep

DIFFUSERS = "diffusers ParaDiGMS loop"


def _picard_with(init: str, fill: str):
    """A ``method`` for the sampler's registry: Picard with ``init`` and ``fill`` (the sampler config has neither)."""
    def method(x, problem, cfg):
        return sample_picard(x, problem, cfg.window_size, cfg.tol, cfg.max_rounds, cfg.shared_window, stop=cfg.stop,
                             update=cfg.update, accept_tol=cfg.accept_tol, init=init, fill=fill)
    return method


for _init in INITS:
    for _fill in FILLS:
        METHODS.setdefault(f"picard-{_init}-{_fill}", _picard_with(_init, _fill))


@dataclass(frozen=True)
class Variant:
    update: str
    stop: str = "final"
    init: str = INITS[0]
    fill: str = FILLS[0]

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """``update[-init][-fill][@stop]``, e.g. ``secant``, ``secant-noise-copy``, ``anderson-x0@paradigms``."""
        name, _, stop = text.partition("@")
        update, *flags = name.split("-")
        init = next((f for f in flags if f in INITS), INITS[0])
        fill = next((f for f in flags if f in FILLS), FILLS[0])
        unknown = [f for f in flags if f not in INITS + FILLS]
        if unknown:
            raise ValueError(f"--variants: unknown flag {unknown[0]!r}; allowed: {', '.join(INITS + FILLS)}")
        return cls(update, stop or "final", init, fill)

    @property
    def label(self) -> str:
        flags = [f for f, default in ((self.init, INITS[0]), (self.fill, FILLS[0])) if f != default]
        return "-".join([self.update, *flags]) + ("" if self.stop == "final" else "@" + self.stop)

    def options(self) -> dict:
        return dict(update=self.update, stop=self.stop, method=f"picard-{self.init}-{self.fill}")


def run_case(name: str, variants: list[Variant], batch: int | None, with_diffusers: bool) -> dict:
    case = CASES[name]
    batch = batch or case.batch
    floor = min(TARGETS)
    rows = {}
    with torch.no_grad():
        ref = sample(case, batch, method="sequential").samples
        for v in variants:
            def run(tol, v=v):
                res = sample(case, batch, tol=tol, **v.options())
                return res.stats.rounds, res.stats.nfe, float((res.samples - ref).abs().max())

            rows[v.label] = sweep(run, SWEEPS[v.stop], floor)
            print(f"  {name} {v.label}: " + ", ".join(f"tol {r['tol']:g}: {r['rounds']} ({r['nfe']:.0f}), "
                                                     f"{r['max_abs_diff']:.2g}" for r in rows[v.label]), flush=True)
    if with_diffusers:
        d = diffusers_runs(case, batch, SWEEPS["paradigms"], floor)
        if d:
            rows[DIFFUSERS] = d
    return {"case": name, "batch": batch, "window": case.window or case.steps, "runs": rows}


def to_markdown(results: list[dict]) -> str:
    lines = ["| case | variant | " + " | ".join(f"rounds (NFE) at {t:g}" for t in TARGETS) + " |",
             "|" + "---|" * (len(TARGETS) + 2)]
    for res in results:
        for label, runs in res["runs"].items():
            cells = [at_accuracy(runs, t) for t in TARGETS]
            lines.append(f"| {res['case']} b{res['batch']} W{res['window']} | {label} | " + " | ".join(
                f"{r['rounds']} ({r['nfe']:.0f})" if r else "not reached" for r in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="gmm-ddim100", help=f"comma-separated of {', '.join(CASES)}")
    ap.add_argument("--variants", default=",".join(UPDATES + tuple(f"{u}-noise-copy" for u in UPDATES)),
                    help="comma-separated update[-init][-fill][@stop]")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--diffusers", action="store_true", help="also sweep diffusers' ParaDiGMS loop")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        variants = [Variant.parse(t) for t in args.variants.split(",")]
    except ValueError as e:
        ap.error(str(e))
    for v in variants:
        if v.update not in UPDATES or v.stop not in STOPS:
            ap.error(f"--variants: bad {v}; updates {', '.join(UPDATES)}, stops {', '.join(STOPS)}")
    names = args.cases.split(",")
    for n in names:
        if n not in CASES:
            ap.error(f"--cases: unknown {n!r}; allowed: {', '.join(CASES)}")
    results = [run_case(n, variants, args.batch, args.diffusers) for n in names]
    print(to_markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
