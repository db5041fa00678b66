"""Speed-up on K devices at matched sample quality (issue 21): paratime's planner and Picard windows of K and 2K
points against the CHORDS port, on the digits U-Net (compute-bound), where CHORDS's paper reports its speed-ups:
2.1x on 4 devices and 2.9x on 8 "without quality loss".

What is measured: ``--samples`` samples, each drawn alone (batch 1; sample ``i`` is seed 0, ``first_sample=i``,
label ``i % 10``, as :mod:`paratime.bench.devices` draws them), by sequential DDIM and by every method and setting
at every K. Speed-up is ``N / mean SCE`` on K devices (:mod:`paratime.bench.devices`). Quality is the Fréchet
distance (FD) between the logits of the digits classifier (:mod:`paratime.digits_eval`) on the samples and on the
1,797 real digits; its standard error is the bootstrap's over the samples (``--boot`` resamples). A setting is
*matched* when its FD is within the standard error of sequential sampling's FD (the issue's test), and passes the
stricter *paired* test when the paired difference ``FD - FD(sequential)`` over the same resamples is within twice
its standard error (both sides share their noise, so this one sees much smaller losses); beside them, max |Δ|
against the sequential sample of the same seed, in units of the data range.
The best matched setting per method is an oracle over its settings on these samples (a tolerance for paratime, a
core index for CHORDS), the same for both.

The baseline a parallel method must beat at equal cost: sequential DDIM with fewer steps (:data:`FEWER`; SCE = its
steps at any K), drawn from the same initial noise, passes the same tests when the FD cannot tell it from the
N-step sampler; and quality at matched SCE: per K, sequential DDIM with as many steps as the SCE of paratime's
fastest setting that passes the paired test, scored the same way.

Usage::

    OMP_NUM_THREADS=1 python -m paratime.bench.devices_quality [--samples 512] [--steps 50] [--devices 2,4,8]
        [--out DIR]                     # tables, devices_quality.json

Exits 1 when a check fails: the planner's default never below sequential and matched, CHORDS's core 0 (the
sequential solution) matched with the same FD.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from paratime.bench.devices import chords_runs, draw_alone, make_sampler
from paratime.bench.quality_depth import frechet_distance

#: paratime's fixed windows: (width in units of K, tolerances in units of the data range)
WINDOWS = (1, 2)
TOLS = (1e-2, 3e-2, 0.1, 0.3)
#: CHORDS's published speed-ups without quality loss (Han et al., ICCV 2025), per K
PUBLISHED = {4: 2.1, 8: 2.9}
#: sequential DDIM with fewer steps (fractions of N; 10, 13, 17, 25, 35 of 50): SCE N' at any K, the baseline a
#: parallel method must beat at equal cost
FEWER = (0.2, 0.26, 0.34, 0.5, 0.7)


def logits(judge, x: torch.Tensor) -> np.ndarray:
    """The classifier's logits of ``(n, 1, 8, 8)`` samples: the FD's features, ``(n, 10)``."""
    from paratime.digits_eval import _to_features

    return judge.clf.decision_function(_to_features(x))


class Quality:
    """FD against the real digits with bootstrap standard errors; the resamples are drawn once, so every setting is
    scored on the same ones (the paired difference to sequential shares their noise)."""

    def __init__(self, judge, seq: np.ndarray, boot: int, seed: int = 0):
        self.real = judge.clf.decision_function(judge.real)
        self.idx = np.random.default_rng(seed).integers(0, len(seq), size=(boot, len(seq)))
        self.seq_fd = frechet_distance(seq, self.real)
        self.seq_boot = np.array([frechet_distance(seq[i], self.real) for i in self.idx])
        self.se = float(self.seq_boot.std(ddof=1))

    def score(self, feats: np.ndarray) -> dict:
        fd = frechet_distance(feats, self.real)
        diff = np.array([frechet_distance(feats[i], self.real) for i in self.idx]) - self.seq_boot
        se = float(diff.std(ddof=1))
        return {"fd": fd, "dfd": fd - self.seq_fd, "dfd_se": se, "matched": abs(fd - self.seq_fd) <= self.se,
                "paired": abs(fd - self.seq_fd) <= 2 * se}


def _paratime(steps: int, K: int, n: int, **options) -> dict:
    """Digits DDIM-``steps`` samples ``0 .. n - 1`` each drawn alone on ``K`` compute-bound devices."""
    return draw_alone("digits", steps, "compute", K, n, **options)


def _fewer(steps: int, n: int) -> torch.Tensor:
    """Sequential DDIM-``steps``, the ``n`` samples in one batch (noise per seed and sample: the same draws as
    :func:`_paratime`'s one by one)."""
    labels = torch.arange(n) % 10                     # devices._cond's label i % 10 for sample i
    return make_sampler("digits", steps, "compute", 1, method="sequential").sample(n, seed=0, labels=labels).samples


def measure(steps: int, devices: list[int], n: int, boot: int, log=print, windows: tuple[int, ...] = WINDOWS,
            tols: tuple[float, ...] = TOLS) -> dict:
    """Every method and setting at every K: records with speed-up, max |Δ|, FD, its difference to sequential; the
    sequential sampler with fewer steps (``fewer``, at any K), and per K the one at the SCE of paratime's fastest
    setting that passes the paired test (``at_sce``)."""
    from paratime.digits_eval import DigitsJudge

    judge = DigitsJudge(seed=0)
    seq = _paratime(steps, 1, n, method="sequential")["x"]
    rng = float(seq.abs().max())
    q = Quality(judge, logits(judge, seq), boot)
    log(f"sequential DDIM-{steps}, {n} samples: FD {q.seq_fd:.2f} ± {q.se:.2f} (bootstrap SE, {boot} resamples); "
        f"data range {rng:.2f}")
    out = {"steps": steps, "samples": n, "boot": boot, "range": rng, "seq_fd": q.seq_fd, "seq_se": q.se, "K": {},
           "fewer": [], "at_sce": {}}

    def record(K: int | None, method: str, setting: str, sce: float, x: torch.Tensor, **extra) -> dict:
        r = {"method": method, "setting": setting, "sce": sce, "speedup": steps / sce,
             "err": float((x - seq).abs().max()) / rng, **q.score(logits(judge, x)), **extra}
        log(f"  {'any K' if K is None else f'K={K}'} {method} {setting}: {r['speedup']:.2f}x, max|Δ| {r['err']:.1e}, "
            f"FD {r['fd']:.2f} (Δ {r['dfd']:+.2f} ± {r['dfd_se']:.2f}){'' if r['matched'] else ', not matched'}")
        return r

    def fewer(m: int) -> dict:
        return record(None, "sequential", f"DDIM-{m}", float(m), _fewer(m, n).to(seq.dtype))

    out["fewer"] = [fewer(m) for m in sorted({round(f * steps) for f in FEWER}) if 2 <= m < steps]

    for K in devices:
        rows = []
        p = _paratime(steps, K, n, method="auto")
        chosen = p["plan"]["method"] + ("" if p["plan"]["window"] is None else f" W={p['plan']['window']}")
        rows.append(record(K, "planner", f"defaults ({chosen})", p["sce"], p["x"]))
        for w in windows:
            if w * K > steps or w * K < 2:
                continue
            for tol in tols:
                p = _paratime(steps, K, n, window=w * K, tol=tol)
                rows.append(record(K, f"paratime W={w * K}", f"tol {tol:g}", p["sce"], p["x"], window=w * K,
                                   tol=tol))
        runs = chords_runs("digits", steps, K, n)
        cores = len(runs[0])              # hit j: the j-th core to finish, on every sample; the last is core 0
        for j in range(cores):
            x = torch.cat([hits[j][1] for hits in runs]).to(seq.dtype)
            label = "core 0 (sequential)" if j == cores - 1 else f"hit {j}" + (" (recommended)" if j == 1 else "")
            rows.append(record(K, "CHORDS port", label, statistics.mean(hits[j][0] for hits in runs), x, hit=j))
        out["K"][K] = rows
        fastest = best(rows, "paratime", "paired")
        if fastest is not None and round(fastest["sce"]) < steps:      # quality at matched SCE
            out["at_sce"][K] = fewer(max(2, round(fastest["sce"])))
    return out


def best(rows: list[dict], prefix: str, test: str = "matched") -> dict | None:
    """The fastest setting of the methods named ``prefix...`` that passes ``test`` (``matched`` or ``paired``)."""
    ok = [r for r in rows if r["method"].startswith(prefix) and r[test]]
    return max(ok, key=lambda r: r["speedup"]) if ok else None


def _cell(r: dict | None, test: str) -> str:
    if r is None:
        return "–"
    return (f"{r['speedup']:.2f}x ({r['setting']}; Δ {r['dfd']:+.2f} ± {r['dfd_se']:.2f}; {r['err']:.1e})"
            + ("" if r[test] else " **fails**"))


def table(res: dict) -> list[str]:
    lines = [f"digits DDIM-{res['steps']}, compute-bound, batch 1, {res['samples']} samples; sequential FD "
             f"{res['seq_fd']:.2f} ± {res['seq_se']:.2f} (SE). Speed-up N / SCE of the fastest setting that passes "
             "each test (its setting; FD - sequential ± paired SE; max |Δ| / data range)", "",
             "| K | test | planner (defaults) | paratime, fastest | CHORDS port, fastest | CHORDS recommended stop "
             "(hit 1) | sequential, fewer steps, fastest | CHORDS published |", "|---|---|---|---|---|---|---|---|"]
    for K, rows in sorted(res["K"].items()):
        planner = next(r for r in rows if r["method"] == "planner")
        rec = next((r for r in rows if r["method"] == "CHORDS port" and r.get("hit") == 1), None)
        pub = f"{PUBLISHED[K]:.1f}x" if K in PUBLISHED else "–"
        for test, name in (("matched", "FD within sequential's SE"), ("paired", "paired Δ within 2 SE")):
            lines.append(f"| {K} | {name} | {_cell(planner, test)} | {_cell(best(rows, 'paratime', test), test)} | "
                         f"{_cell(best(rows, 'CHORDS', test), test)} | {_cell(rec, test)} | "
                         f"{_cell(best(res['fewer'], 'sequential', test), test)} | {pub} |")
    return lines


def at_sce(res: dict) -> list[str]:
    """Quality at matched SCE: paratime's fastest setting passing the paired test against sequential DDIM with as
    many steps as its SCE (the same cost on K devices)."""
    lines = ["| K | paratime, fastest passing the paired test: SCE, FD - sequential (± SE) | sequential DDIM at that "
             "SCE: FD - sequential (± SE), paired test |", "|---|---|---|"]
    for K, r in sorted(res["at_sce"].items()):
        b = best(res["K"][K], "paratime", "paired")
        lines.append(f"| {K} | {b['sce']:.1f} ({b['method']}, {b['setting']}): {b['dfd']:+.2f} ± {b['dfd_se']:.2f} | "
                     f"{r['setting']}: {r['dfd']:+.2f} ± {r['dfd_se']:.2f}, {'passes' if r['paired'] else 'fails'} |")
    return lines


def detail(res: dict) -> list[str]:
    lines = ["| K | method | setting | SCE | speed-up | max \\|Δ\\| / range | FD | FD - sequential (± SE) | matched "
             "| paired |", "|---|---|---|---|---|---|---|---|---|---|"]
    for K, rows in [("any", res["fewer"]), *sorted(res["K"].items())]:
        lines += [f"| {K} | {r['method']} | {r['setting']} | {r['sce']:.1f} | {r['speedup']:.2f}x | {r['err']:.1e} | "
                  f"{r['fd']:.2f} | {r['dfd']:+.2f} ± {r['dfd_se']:.2f} | {'yes' if r['matched'] else 'no'} | "
                  f"{'yes' if r['paired'] else 'no'} |"
                  for r in rows]
    return lines


def targets(res: dict) -> list[str]:
    out = []
    for K, pub in PUBLISHED.items():
        if K not in res["K"]:
            continue
        for test in ("matched", "paired"):
            b = best(res["K"][K], "paratime", test)
            got = 0.0 if b is None else b["speedup"]
            out.append(f"K={K}, {test}: paratime {got:.2f}x against CHORDS's published {pub:.1f}x: "
                       f"{'met' if got > pub else 'MISSED'}")
    return out


def against_fewer(res: dict) -> list[str]:
    """Per K and test: whether paratime's fastest passing setting beats the fewest sequential steps that pass."""
    out = []
    for K, rows in sorted(res["K"].items()):
        for test in ("matched", "paired"):
            b, f = best(rows, "paratime", test), best(res["fewer"], "sequential", test)
            got, base = (0.0 if b is None else b["speedup"]), (1.0 if f is None else f["speedup"])
            out.append(f"K={K}, {test}: paratime {got:.2f}x against sequential with fewer steps "
                       f"{base:.2f}x ({'DDIM-%d' % res['steps'] if f is None else f['setting']}): "
                       f"{'ahead' if got > base else 'BEHIND'}")
    return out


def checks(res: dict) -> list[str]:
    fails = []
    for K, rows in res["K"].items():
        p = next(r for r in rows if r["method"] == "planner")
        if p["speedup"] < 1.0 - 1e-9 or not p["matched"]:
            fails.append(f"K={K}: the planner's default at {p['speedup']:.2f}x, FD {p['fd']:.2f} "
                         f"({'matched' if p['matched'] else 'not matched'})")
        core0 = next(r for r in rows if r["method"] == "CHORDS port" and "core 0" in r["setting"])
        if not core0["matched"] or abs(core0["dfd"]) > 1e-3:
            fails.append(f"K={K}: CHORDS's core 0 is not the sequential sample's quality (FD Δ {core0['dfd']:+.3f})")
    return fails


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=512, help="samples per setting (each drawn alone)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--devices", default="2,4,8", help="comma-separated K")
    p.add_argument("--boot", type=int, default=200, help="bootstrap resamples for the standard errors")
    p.add_argument("--windows", default=",".join(map(str, WINDOWS)),
                   help="paratime's fixed windows, comma-separated, in units of K")
    p.add_argument("--tols", default=",".join(f"{t:g}" for t in TOLS),
                   help="paratime's tolerances for the fixed windows, comma-separated (data-range units)")
    p.add_argument("--out", default="bench_out", help="folder for devices_quality.json")
    a = p.parse_args(argv)
    if a.samples < 20:
        p.error("--samples: at least 20 (the FD fits a 10-dimensional covariance)")
    if a.steps < 4:
        p.error("--steps: at least 4")
    if a.boot < 10:
        p.error("--boot: at least 10")
    try:
        devices = sorted({int(k) for k in a.devices.split(",")})
    except ValueError:
        p.error(f"--devices: comma-separated integers, got {a.devices!r}")
    if not devices or devices[0] < 2:
        p.error(f"--devices: each K at least 2, got {a.devices!r}")
    try:
        windows = tuple(sorted({int(w) for w in a.windows.split(",")}))
        tols = tuple(sorted({float(t) for t in a.tols.split(",")}))
    except ValueError:
        p.error(f"--windows, --tols: comma-separated numbers, got {a.windows!r}, {a.tols!r}")
    if not windows or windows[0] < 1:
        p.error(f"--windows: each at least 1 (a window of K points), got {a.windows!r}")
    if not tols or not all(t > 0 for t in tols):
        p.error(f"--tols: each above 0, got {a.tols!r}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    res = measure(a.steps, devices, a.samples, a.boot, log=lambda s: print(s, file=sys.stderr, flush=True),
                  windows=windows, tols=tols)
    print("\n".join(table(res)) + "\n\n" + "\n".join(at_sce(res)) + "\n\n" + "\n".join(detail(res)) + "\n")
    print("\n".join(targets(res) + against_fewer(res)))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "devices_quality.json").write_text(json.dumps(res, indent=1))
    fails = checks(res)
    for f in fails:
        print(f"check failed: {f}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
