"""Side by side with diffusers' ParaDiGMS (DDIMParallelScheduler / DDPMParallelScheduler driven by the Picard loop
of StableDiffusionParadigmsPipeline) on the same model, schedule, window and tolerance. Also part of `paratime bench`.
The loop is checked against diffusers' real class on the first case (the same calls and samples, bit for bit); the
script exits 1 when they differ.

    python benchmarks/paradigms_compare.py [--model digits] [--batch 16] [--window 100] [--tol 0.1]
"""

import argparse

from paratime.bench import compare_paradigms, paradigms_markdown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="digits")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--tol", type=float, default=0.1)
    ap.add_argument("--cases", default="ddim:100,ddpm:1000")
    args = ap.parse_args(argv)
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    rows = compare_paradigms(args.model, cases, args.batch, args.window, args.tol)
    if not rows:
        print("diffusers is not installed (pip install 'paratime[diffusers]'): comparison skipped")
        return 0
    print(f"model={args.model} batch={args.batch} window={args.window} tol={args.tol}")
    print(paradigms_markdown(rows))
    print(rows[0]["anchor_line"])
    return 0 if rows[0]["anchor"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
