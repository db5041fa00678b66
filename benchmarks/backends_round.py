"""Per-round time of the backends on a compute-bound model, 1 and 2 workers (issue: distributed backends).

    python benchmarks/backends_round.py [--batch 64] [--steps 100]

Runs the digits U-Net with Picard (window = steps) on local, torch.distributed (gloo, torchrun on 127.0.0.1) and
Ray, and prints per-round time, the 2-worker / 1-worker ratio and the communication time per round.
"""

import argparse

from paratime.bench import Case, run_suite


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    d = dict(model="digits", solver="ddim", steps=args.steps, batch=args.batch, method="picard",
             window=args.steps, reps=args.reps)
    cases = [Case(**{**d, "method": "sequential"}), Case(**d)]
    cases += [Case(backend=b, workers=w, **d) for b in ("torch", "ray") for w in (1, 2)]
    recs = run_suite(cases, log=print)
    print(f"\n{'backend':<8} {'workers':>7} {'rounds':>6} {'per round ms':>12} {'comm ms/round':>13} {'2w/1w':>6}")
    one = {r["backend"]: r["per_round_s"] for r in recs if r["workers"] == 1 and r["method"] == "picard"}
    for r in recs:
        if r["method"] != "picard":
            continue
        ratio = r["per_round_s"] / one[r["backend"]] if r["workers"] == 2 else None
        print(f"{r['backend']:<8} {r['workers']:>7} {r['rounds']:>6} {1e3 * r['per_round_s']:>12.1f} "
              f"{1e3 * r['comm_per_round_s']:>13.1f} {'' if ratio is None else f'{ratio:.2f}':>6}")


if __name__ == "__main__":
    main()
