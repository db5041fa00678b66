"""Benchmarks: rounds, NFE, wall time, per-round time, speed-up, efficiency, communication share and difference
from the sequential samples, for every method on 1, 2, ... workers of each backend present.

    paratime bench [--quick] [--out DIR]          (also: python benchmarks/scaling.py)

Warm-up runs are excluded; each case is repeated and the median and min/max wall time are reported. torch.distributed
cases run under torchrun subprocesses on 127.0.0.1 (rank 0 measures); Ray cases in-process with local actors. Writes
``DIR/bench.json`` (every run and the machine), ``DIR/bench.md`` (a table) and, with matplotlib, ``DIR/*.png``.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from paratime.bench.scoring import sample_errors

__all__ = ["Case", "run_case", "run_suite", "default_suite", "to_markdown", "plot", "machine", "worker",
           "compare_paradigms", "paradigms_markdown", "paradigms_loop", "failures"]


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    model: str
    solver: str
    steps: int
    method: str
    batch: int
    backend: str = "local"
    workers: int = 1
    window: int | None = None
    tol: float = 0.1
    slices: int | None = None
    reps: int = 3
    warmup: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.solver}-{self.steps}/b{self.batch}"


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _sampler(case: Case, method: str, backend=None):
    from paratime.sampler import ParallelSampler

    opts = dict(solver=case.solver, steps=case.steps, method=method, progress=False, **case.extra)
    if method != "sequential":
        opts["tol"] = case.tol                 # an option a method does not read is refused: only where it applies
    if method in ("picard", "staggered"):
        opts["window"] = case.window           # an option a method does not read is refused: only where it applies
    if method.startswith("parareal"):
        opts["slices"] = case.slices
    if backend is not None:
        return ParallelSampler(case.model, backend=backend, **opts)
    return ParallelSampler(case.model, **opts)


def _measure(case: Case, backend, reference: torch.Tensor | None) -> dict:
    """Time ``case`` interleaved with its own sequential baseline on the same backend, in this process: each repeat
    runs the sequential sampler and then the method, so both see the same load, and the speed-up is the median of
    the per-repeat ratios (not two medians taken at different moments)."""
    sampler = _sampler(case, case.method, backend)
    baseline = sampler if case.method == "sequential" else _sampler(case, "sequential", backend)
    for _ in range(case.warmup):
        sampler.sample(case.batch, seed=0)
        if baseline is not sampler:
            baseline.sample(case.batch, seed=0)
    walls, seq_walls, comm = [], [], []
    for _ in range(case.reps):
        seq_walls.append(baseline.sample(case.batch, seed=0).stats.wall_s)
        c0 = backend.timings.get("comm_s", 0.0) if backend is not None else 0.0
        res = sampler.sample(case.batch, seed=0)
        walls.append(res.stats.wall_s)
        comm.append((backend.timings.get("comm_s", 0.0) - c0) if backend is not None else 0.0)
    st = res.stats
    wall = statistics.median(walls)
    rec = {**asdict(case), "label": case.label, "rounds": st.rounds, "iterations": st.iterations, "nfe": st.nfe,
           "wall_s": wall, "wall_min_s": min(walls), "wall_max_s": max(walls), "per_round_s": wall / max(st.rounds, 1),
           "walls_s": walls, "sequential_walls_s": seq_walls, "sequential_wall_s": statistics.median(seq_walls),
           "speedup": statistics.median(q / w for q, w in zip(seq_walls, walls)) if min(walls) > 0 else None,
           "comm_share": statistics.median(comm) / wall if wall > 0 else 0.0,
           "comm_per_round_s": statistics.median(comm) / max(st.rounds, 1)}
    rec.update({k: v for k, v in st.extra.items() if isinstance(v, (int, float))})
    if reference is not None:
        d = (res.samples.double() - reference.double())
        rec["max_abs_diff"] = float(d.abs().max())
        rec["rms_diff"] = float(d.pow(2).mean().sqrt())
        if st.tol_abs is not None:          # the final rule's tolerance in force, per sample, in the samples' units
            rec["diff_over_tol"] = float(sample_errors(res.samples, reference, st.tol_abs)[1].max())
    return rec


def run_case(case: Case, reference: torch.Tensor | None = None) -> dict:
    """Measure one case (``local`` and ``ray`` in-process; ``torch`` through torchrun subprocesses)."""
    if case.backend == "torch":
        return _run_torchrun(case, reference)
    backend = None
    if case.backend == "ray":
        from paratime.backends.ray_actors import RayBackend

        backend = RayBackend(workers=case.workers, model=case.model, num_cpus=1)
    try:
        return _measure(case, backend, reference)
    finally:
        if backend is not None:
            backend.close()


def _run_torchrun(case: Case, reference) -> dict:
    with tempfile.TemporaryDirectory() as d:
        spec, out, ref = Path(d, "case.json"), Path(d, "rec.json"), Path(d, "ref.pt")
        spec.write_text(json.dumps(asdict(case)))
        if reference is not None:
            torch.save(reference, ref)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2)
                                                                                // case.workers)))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={case.workers}",
               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "paratime", "bench", "--worker", str(spec),
               str(out), str(ref)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            raise RuntimeError(f"torchrun case {case.label} failed:\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())


def worker(spec: str, out: str, ref: str) -> None:
    """One rank of a torch.distributed case (``paratime bench --worker SPEC OUT REF`` under torchrun)."""
    from paratime.backends.torch_dist import TorchDistributedBackend

    case = Case(**json.loads(Path(spec).read_text()))
    reference = torch.load(ref) if Path(ref).exists() else None
    with TorchDistributedBackend(timeout_s=600) as be:
        rec = _measure(case, be, reference)
        if be.rank == 0:
            Path(out).write_text(json.dumps(rec))


def default_suite(quick: bool = False) -> list[Case]:
    """The README's suite; ``quick`` trims repetitions and sizes."""
    reps = 1 if quick else 3
    cases = []
    # Compute-bound: the digits U-Net, a large window batch; 1 and 2 workers on each backend.
    d = dict(model="digits", solver="ddim", steps=100, batch=32 if quick else 64, reps=reps, window=100)
    cases.append(Case(method="sequential", **d))
    cases.append(Case(method="picard", **d))
    cases.append(Case(method="parareal", **d))
    for be in ("torch", "ray"):
        for w in (1, 2):
            cases.append(Case(method="picard", backend=be, workers=w, **d))
    # Latency-bound: a policy-sized MLP, one sample, DDPM-100 and DDIM-100.
    for solver in ("ddim", "ddpm"):
        p = dict(model="mlp", solver=solver, steps=100, batch=1, reps=3 if quick else 5, warmup=2)
        cases.append(Case(method="sequential", **p))
        cases.append(Case(method="picard", **p))
        cases.append(Case(method="parareal", **p))
    # A diffusers UNet built from a config (cost profile of a real diffusers model), when diffusers is installed.
    if _available("diffusers"):
        u = dict(model="unet", solver="ddim", steps=50, batch=4, reps=reps, window=50)
        cases += [Case(method="sequential", **u), Case(method="picard", **u)]
    # The analytic mixture.
    g = dict(model="gmm", solver="ddim", steps=100, batch=256, reps=reps)
    for m in ("sequential", "picard", "parareal"):
        cases.append(Case(method=m, **g))
    return cases


def _available(name: str) -> bool:
    """Whether an optional package (``ray``, ``diffusers``) is importable; other backends always are."""
    if name in ("ray", "diffusers"):
        import importlib.util

        return importlib.util.find_spec(name) is not None
    return True


def run_suite(cases: list[Case], log=lambda line: None) -> list[dict]:
    """Run every case whose backend is available; the sequential local run of each label is the reference."""
    records, refs = [], {}
    ray_started = False
    try:
        for case in cases:
            if not _available(case.backend):
                log(f"skip {case.label} {case.method} on {case.backend}: not installed")
                continue
            if case.backend == "ray" and not ray_started:
                import ray

                if not ray.is_initialized():
                    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, _node_ip_address="127.0.0.1",
                             log_to_driver=False, configure_logging=False)
                ray_started = True
            key = (case.model, case.solver, case.steps, case.batch)
            if key not in refs:
                refs[key] = _sampler(Case(**{**asdict(case), "method": "sequential"}), "sequential").sample(
                    case.batch, seed=0).samples
            t0 = time.perf_counter()
            rec = run_case(case, refs[key])
            records.append(rec)
            log(f"{case.label:<26} {case.method:<10} {case.backend:>5}x{case.workers} rounds={rec['rounds']:<4} "
                f"nfe={rec['nfe']:<7.1f} wall={rec['wall_s']:.3f}s ({time.perf_counter() - t0:.0f}s)")
    finally:
        if ray_started:
            import ray

            ray.shutdown()
    _derive(records)
    return records


def _derive(records: list[dict]) -> None:
    """Parallel efficiency against the same method on one worker of the same backend (the speed-up over sequential
    is measured interleaved, per record, in :func:`_measure`)."""
    one = {(r["label"], r["method"], r["backend"]): r["wall_s"] for r in records if r["workers"] == 1}
    for r in records:
        base = one.get((r["label"], r["method"], r["backend"]))
        r["efficiency"] = base / (r["wall_s"] * r["workers"]) if base and r["wall_s"] > 0 else None


#: methods whose ``tol`` bounds the returned sample's max |difference| from the sequential sample (Picard's final
#: rule); Parareal's ``tol`` is a noise-level test per slice, so its difference is reported, not checked
BOUNDED = ("picard",)


def failures(records: list[dict]) -> list[str]:
    """Records whose max |difference| from the sequential sample exceeds the tolerance that bounds it: the tolerance
    in force per sample (``SampleStats.tol_abs``: ``tol`` times the data scale, or each sample's own max-abs where
    the model declares none), else ``tol`` itself."""
    def over(r):
        return r["diff_over_tol"] if "diff_over_tol" in r else r["max_abs_diff"] / r["tol"]

    return [f"{r['label']} {r['method']} {r['backend']}x{r['workers']}: max diff {r['max_abs_diff']:.3g} is "
            f"{over(r):.3g}x the tolerance in force (tol {r['tol']:g})" for r in records
            if r["method"] in BOUNDED and r.get("max_abs_diff") is not None and over(r) > 1]


def to_markdown(records: list[dict]) -> str:
    head = ("| model | method | backend | workers | tol | rounds | NFE/sample | wall s (min-max) | per round ms | "
            "speed-up (interleaved) | efficiency | comm share | max diff |")
    rows = [head, "|" + "---|" * 13]
    f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
    for r in records:
        tol = "" if r["method"] == "sequential" else f"{r['tol']:g}"
        rows.append(f"| {r['label']} | {r['method']} | {r['backend']} | {r['workers']} | {tol} | {r['rounds']} | "
                    f"{r['nfe']:.0f} | {r['wall_s']:.3f} ({r['wall_min_s']:.3f}-{r['wall_max_s']:.3f}) | "
                    f"{1000 * r['per_round_s']:.2f} | {f(r.get('speedup'), '.2f')} | {f(r.get('efficiency'), '.2f')} | "
                    f"{r['comm_share']:.2f} | {f(r.get('max_abs_diff'), '.3g')} |")
    return "\n".join(rows) + "\n"


def plot(records: list[dict], out: Path) -> list[Path]:
    """Speed-up (interleaved, over sequential) and rounds against workers: one colour per method, one line style per
    case and backend, the worker axis showing exactly the worker counts measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    methods = sorted({r["method"] for r in records if r["method"] != "sequential"})
    colours = {m: plt.get_cmap("tab10")(k % 10) for k, m in enumerate(methods)}
    styles = ["-", "--", ":", "-."]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["method"] != "sequential":
            groups.setdefault((r["label"], r["backend"], r["method"]), []).append(r)
    series = sorted({(label, backend) for label, backend, _ in groups})
    for (label, backend, method), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["workers"])
        ls = styles[series.index((label, backend)) % len(styles)]
        kw = dict(color=colours[method], linestyle=ls, marker="o", label=f"{method}: {label} {backend}")
        axes[0].plot([r["workers"] for r in rs], [r["speedup"] or 0 for r in rs], **kw)
        axes[1].plot([r["workers"] for r in rs], [r["rounds"] for r in rs], **kw)
    workers = sorted({r["workers"] for r in records})
    for ax, ylabel in zip(axes, ("speed-up over sequential (interleaved)", "rounds (sequential network calls)")):
        ax.set(xlabel="workers", ylabel=ylabel, xticks=workers, xlim=(workers[0] - 0.5, workers[-1] + 0.5))
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    path = out / "scaling.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def paradigms_loop(net, scheduler, latents, steps, parallel, tolerance, generator):
    """The ParaDiGMS loop of diffusers' StableDiffusionParadigmsPipeline (no guidance), returning (x, rounds, nfe)."""
    scheduler.set_timesteps(steps)
    parallel = min(parallel, len(scheduler.timesteps))
    begin_idx, end_idx = 0, parallel
    buf = torch.stack([latents] * (len(scheduler.timesteps) + 1))
    noise_array = torch.zeros_like(buf)
    for j in range(len(scheduler.timesteps)):
        base = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
        noise_array[j] = (scheduler._get_variance(scheduler.timesteps[j]) ** 0.5) * base
    inv = 1.0 / torch.tensor([scheduler._get_variance(scheduler.timesteps[j])
                              for j in range(len(scheduler.timesteps))] + [0])
    inv = inv[:, None] / noise_array[0, 0].numel()
    rounds = nfe = 0
    B = latents.shape[0]
    while begin_idx < len(scheduler.timesteps):
        plen = end_idx - begin_idx
        block = buf[begin_idx:end_idx]
        block_t = scheduler.timesteps[begin_idx:end_idx, None].repeat(1, B)
        out = net(block.flatten(0, 1), block_t.flatten(0, 1).float())
        rounds += 1
        nfe += plen
        den = scheduler.batch_step_no_noise(model_output=out, timesteps=block_t.flatten(0, 1),
                                            sample=block.flatten(0, 1)).reshape(block.shape)
        cum_delta = torch.cumsum(den - block, dim=0)
        cum_noise = 0 if scheduler._is_ode_scheduler else torch.cumsum(noise_array[begin_idx:end_idx], dim=0)
        new = buf[begin_idx][None] + cum_delta + cum_noise
        err = torch.linalg.norm((new - buf[begin_idx + 1:end_idx + 1]).reshape(plen, B, -1), dim=-1).pow(2)
        ratio = torch.nn.functional.pad(err * inv[begin_idx + 1:end_idx + 1], (0, 0, 0, 1), value=1e9)
        ind = torch.argmax(torch.max(ratio > tolerance**2, dim=1).values.int()).item()
        new_begin = begin_idx + min(1 + ind, parallel)
        new_end = min(new_begin + parallel, len(scheduler.timesteps))
        buf[begin_idx + 1:end_idx + 1] = new
        buf[end_idx:new_end + 1] = buf[end_idx][None]
        begin_idx, end_idx = new_begin, new_end
    return buf[-1], rounds, nfe


def compare_paradigms(model_name: str = "digits", cases=(("ddim", 100), ("ddpm", 1000)), batch: int = 16,
                      window: int = 100, tol: float = 0.1) -> list[dict]:
    """diffusers' ParaDiGMS loop (DDIM/DDPMParallelScheduler) and paratime's Picard on the same model, schedule,
    window and tolerance; each compared with its own sequential sampler. Empty if diffusers is missing.

    Differences in the definitions: diffusers slides one window for the whole batch (a point must converge for
    every sample), paratime one window per sample; both count time-point evaluations per sample as NFE, both use
    rms change <= tol * sqrt(DDPM variance) and accept 1 + ind points, both iterate on the VP latents.

    The loop timed here is checked against diffusers' real ``StableDiffusionParadigmsPipeline`` on the first case
    (:func:`~paratime.bench.rounds_at_accuracy.loop_is_the_class`): its row's ``anchor`` says whether the calls and
    samples agree bit for bit (and ``anchor_line`` how).
    """
    try:
        from diffusers import DDIMParallelScheduler, DDPMParallelScheduler
    except ImportError:
        return []
    from paratime.noise import INITIAL, draw_noise
    from paratime.sampler import ParallelSampler
    from paratime.models import load_model

    model = load_model(model_name)
    net = lambda x, t: model.network(x.float(), t).to(x.dtype)  # noqa: E731
    common = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  timestep_spacing="trailing", clip_sample=False)
    out = []
    for solver, steps in cases:
        sch = (DDIMParallelScheduler(**common, set_alpha_to_one=True) if solver == "ddim"
               else DDPMParallelScheduler(**common))
        x_T = draw_noise(0, batch, model.sample_shape, None, INITIAL, dtype=torch.float32)
        with torch.no_grad():
            t0 = time.perf_counter()
            ref, seq_rounds, _ = paradigms_loop(net, sch, x_T, steps, 1, tol, torch.Generator().manual_seed(0))
            t1 = time.perf_counter()
            par, rounds, nfe = paradigms_loop(net, sch, x_T, steps, window, tol, torch.Generator().manual_seed(0))
            t2 = time.perf_counter()
        d = (par - ref).double()
        case = f"{model_name}/{solver}-{steps}/b{batch}"
        out.append({"case": case, "impl": "diffusers ParaDiGMS", "rounds": rounds, "seq_rounds": seq_rounds,
                    "nfe": nfe, "wall_s": t2 - t1, "seq_wall_s": t1 - t0, "max_abs_diff": float(d.abs().max()),
                    "rms_diff": float(d.pow(2).mean().sqrt())})
        if len(out) == 1:                    # the first case: the loop against the real class
            from .rounds_at_accuracy import loop_is_the_class

            out[0]["anchor"], out[0]["anchor_line"] = loop_is_the_class(model, sch, x_T, steps, window, tol)
        seq = ParallelSampler(model, solver=solver, steps=steps, method="sequential", progress=False).sample(
            batch, seed=0)
        pt = ParallelSampler(model, solver=solver, steps=steps, window=window, tol=tol, progress=False).sample(
            batch, seed=0)
        d = (pt.samples - seq.samples).double()
        out.append({"case": case, "impl": "paratime", "rounds": pt.stats.rounds, "seq_rounds": seq.stats.rounds,
                    "nfe": pt.stats.nfe, "wall_s": pt.stats.wall_s, "seq_wall_s": seq.stats.wall_s,
                    "max_abs_diff": float(d.abs().max()), "rms_diff": float(d.pow(2).mean().sqrt())})
    return out


def paradigms_markdown(rows: list[dict]) -> str:
    lines = ["| case | implementation | rounds | sequential rounds | NFE/sample | wall s | sequential wall s | "
             "max diff | rms diff |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['case']} | {r['impl']} | {r['rounds']} | {r['seq_rounds']} | {r['nfe']:.0f} | "
                     f"{r['wall_s']:.2f} | {r['seq_wall_s']:.2f} | {r['max_abs_diff']:.3g} | {r['rms_diff']:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, parser_class=None) -> int:
    """``paratime bench``: run the scaling suite, write JSON, Markdown and plots, print the table. ``parser_class``:
    the command line's (one-line errors, as every other subcommand's), else argparse's."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)

    if argv and argv[0] == "--worker":          # one torchrun rank of a torch.distributed case
        worker(*argv[1:4])
        return 0
    ap = (parser_class or argparse.ArgumentParser)(prog="paratime bench", description=(
        "The benchmark suite (benchmarks/suite.py): scaling over methods, backends and workers on digits, the mlp and "
        "unet fixtures and gmm; diffusers' ParaDiGMS loop and StableDiffusionParadigmsPipeline side by side; the "
        "diffusion policy's latency. It prints a line per case; its length depends on the cores, the load and the "
        "backends installed."))
    ap.add_argument("--out", default="bench_out", help="folder for bench.json, bench.md and the plots")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and smaller batches")
    args = ap.parse_args(argv)
    out = Path(args.out)                                 # the outputs are checked before the work
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.error(f"--out: cannot make the folder {out}: {e.strerror or e}")
    if not os.access(out, os.W_OK):
        ap.error(f"--out: {out} is not writable")
    import time

    t0 = time.perf_counter()
    records = run_suite(default_suite(args.quick), log=print)
    (out / "bench.json").write_text(json.dumps({"machine": machine(), "runs": records}, indent=1))
    md = to_markdown(records)
    (out / "bench.md").write_text(md)
    plots = plot(records, out)
    print(md)
    rows = compare_paradigms(batch=8 if args.quick else 16,
                             cases=(("ddim", 100),) if args.quick else (("ddim", 100), ("ddpm", 1000)))
    anchor_failed = False
    if rows:
        pmd = paradigms_markdown(rows)
        (out / "paradigms.md").write_text(pmd)
        (out / "paradigms.json").write_text(json.dumps(rows, indent=1))
        print(pmd)
        print(rows[0]["anchor_line"])
        anchor_failed = not rows[0]["anchor"]
    else:
        print("diffusers is not installed (pip install 'paratime[diffusers]'): ParaDiGMS comparison skipped")
    from .sd_paradigms import compare as compare_sd, markdown as sd_markdown   # the real ParaDiGMS SD pipeline

    try:
        smd = sd_markdown(compare_sd(repeats=1 if args.quick else 3), repeats=1 if args.quick else 3)
        (out / "sd_paradigms.md").write_text(smd)
        print(smd)
    except ImportError as e:
        print(f"SD ParaDiGMS comparison skipped: {e} (pip install 'paratime[diffusers]')")
    # Last, because it sets this process's torch threads to 1: the trained diffusion policy's per-chunk latency.
    from .policy_latency import main as policy_latency

    print("Trained diffusion policy, DDPM-100, batch 1: paratime sequential / Picard and diffusers' ParaDiGMS loop")
    try:
        anchor_failed |= policy_latency(["--threads", "1", "--chunks", "5" if args.quick else "20",
                                         "--reps", "1" if args.quick else "3"]) != 0
    except ImportError as e:
        print(f"policy latency comparison skipped: {e} (pip install 'paratime[diffusers]')")
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}" + "".join(f", {p}" for p in plots)
          + f" in {time.perf_counter() - t0:.0f} s")
    bad = failures(records) + (["the timed ParaDiGMS loop differs from diffusers' class (see the anchor lines)"]
                               if anchor_failed else [])
    for line in bad:
        print(f"CHECK FAILED: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
