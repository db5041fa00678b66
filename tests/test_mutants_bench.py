"""The accounting behind the benchmarks' figures of record that mutation testing found unpinned
(benchmarks/devices.py, benchmarks/rounds_at_accuracy.py, benchmarks/chords_ref.py): each record's speed-up, SCE and
max |Δ| from hand-made samples, the configurations swept, the best setting under an accuracy level, the checks that
make a run exit 1, the peer's best tolerance and the headline's checks, on hand-made records with known answers."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from benchmarks import devices
from benchmarks import rounds_at_accuracy as ra
from benchmarks.chords_ref import stagger
from paratime import ParallelSampler

N = 10
#: two sequential samples (seeds 0 and 1), float64; the data range is their largest |x|, 2 (the largest x is 1.5)
SEQ = torch.tensor([[0.5, -2.0, 1.0], [0.25, 1.5, -0.75]], dtype=torch.float64)


def _config(workers: int, kw: dict) -> tuple:
    return workers, kw.get("method", "picard"), kw.get("window"), kw.get("tol")


def _sce(workers: int, kw: dict) -> float:
    """A made-up mean SCE per configuration (exact in binary)."""
    method = kw.get("method", "picard")
    if method == "auto":
        return 4.0
    if method == "picard":
        return (2.0 + kw["window"] / 2 + 32 * kw["tol"]) / workers
    return {"parareal_pipelined": 8.0, "staggered": 6.0}[method] / workers


def _delta(kw: dict) -> float:
    """A made-up largest |difference| per configuration (exact in binary, as SEQ's entries are)."""
    method = kw.get("method", "picard")
    if method == "picard":
        return {3e-2: 1 / 64, 1e-2: 1 / 256, 2e-3: 1 / 2048}[kw["tol"]] * kw["window"]
    return {"auto": 1 / 1024, "parareal_pipelined": 1 / 8, "staggered": 1 / 256}[method]


@pytest.fixture
def fake(monkeypatch):
    """devices.draw_alone and devices.chords_runs replaced by made-up samples: sequential is SEQ at SCE N; every
    other configuration SEQ with seed 1's last entry moved down by :func:`_delta` (its max |Δ| is that over 2, the
    range; its largest signed difference 0), at :func:`_sce`; the CHORDS port's hits per seed: the zeroth
    (tick K, off by 1/16 on seed 0, 1/32 on seed 1), hit 1 (tick 6; 1/64 on seed 0, 1/512 on seed 1) and core 0
    (tick N, the sequential sample)."""
    calls = []

    def draw_alone(model, steps, cost, workers, seeds, **kw):
        assert (model, steps, cost, seeds) == ("digits", N, "compute", 2)
        if kw.get("method") == "sequential":
            return {"x": SEQ.clone(), "sce": float(N), "plan": None}
        calls.append(_config(workers, kw))
        x = SEQ.clone()
        x[1, 2] -= _delta(kw)
        return {"x": x, "sce": _sce(workers, kw), "plan": {"devices": workers}}

    def chords_runs(model, steps, workers, seeds):
        out = []
        for i, (far, near) in enumerate(((1 / 16, 1 / 64), (1 / 32, 1 / 512))):
            out.append([(workers, (SEQ[i] + far)[None]), (6, (SEQ[i] - near)[None]), (N, SEQ[i][None].clone())])
        return out

    monkeypatch.setattr(devices, "draw_alone", draw_alone)
    monkeypatch.setattr(devices, "chords_runs", chords_runs)
    return calls


def test_measure_records_speedup_sce_and_max_delta_of_every_configuration(fake):
    """Full mode (not --quick) on made-up samples: every configuration swept (windows K, 2K, 4K and N within
    2 .. N, every tolerance; staggered at K cores for K >= 2), each record's speed-up sequential's SCE over its own,
    its max |Δ| the largest |difference| over both seeds as a fraction of the range (largest |x|), the CHORDS
    port's per hit index the mean tick and the largest error over seeds, core 0's error 0."""
    res = devices.measure("digits", N, [1, 2, 4], 2)
    assert res["range"] == 2.0
    want = []
    for K in (1, 2, 4):
        rec = res["K"][K]
        assert rec["sequential"] == {"sce": 10.0, "speedup": 1.0, "err": 0.0}
        windows = {1: (2, 4, 10), 2: (2, 4, 8, 10), 4: (4, 8, 10)}[K]
        picard = [(K, "picard", w, tol) for w in windows for tol in devices.PICARD_TOLS]
        parareal = [(K, "parareal_pipelined", None, tol) for tol in devices.PARAREAL_TOLS]
        staggered = [(K, "staggered", K, tol) for tol in devices.PICARD_TOLS] if K >= 2 else []
        want += [(K, "auto", None, None), *picard, *parareal, *staggered]
        assert [(r["window"], r["tol"]) for r in rec["windows"]] == [(w, tol) for _, _, w, tol in picard]
        for key, configs in (("windows", picard), ("parareal_pipelined", parareal), ("staggered", staggered)):
            assert [r["tol"] for r in rec[key]] == [tol for *_, tol in configs]
            for r, (_, method, w, tol) in zip(rec[key], configs):
                kw = {"method": method, "window": w, "tol": tol}
                assert r["sce"] == _sce(K, kw) and r["speedup"] == 10.0 / _sce(K, kw)
                assert r["err"] == _delta(kw) / 2
        assert rec["planner"]["speedup"] == 2.5 and rec["planner"]["err"] == 1 / 2048
        assert [(h["hit"], h["sce"], h["speedup"], h["err"]) for h in rec["chords"]] == [
            (0, K, 10.0 / K, 1 / 32), (1, 6, 10.0 / 6, 1 / 128), (2, N, 1.0, 0.0)]
        assert rec["chords_core0_err"] == 0.0
    assert Counter(fake) == Counter(want)


def test_a_configuration_that_raises_is_recorded_as_failed_not_as_exact(monkeypatch, fake):
    draw = devices.draw_alone

    def failing(model, steps, cost, workers, seeds, **kw):
        if kw.get("method") == "parareal_pipelined":
            raise ValueError("no")
        return draw(model, steps, cost, workers, seeds, **kw)

    monkeypatch.setattr(devices, "draw_alone", failing)
    res = devices.measure("digits", N, [2], 2, quick=True)
    (r,) = res["K"][2]["parareal_pipelined"]
    assert r["err"] == float("inf") and r["speedup"] != r["speedup"] and "no" in r["error"]
    lines, series = devices.table(res, devices.LEVELS[1])
    assert series["pipelined Parareal"] == [None]
    assert devices.checks(res) == [f"digits K=2: {r['error']}"]


def _rec(**over) -> dict:
    """A made-up record at one K (speed-ups and max |Δ| chosen so every pick is known at 2e-3 and 5e-2)."""
    rec = {"sequential": {"sce": 10.0, "speedup": 1.0, "err": 0.0},
           "planner": {"sce": 5.0, "speedup": 2.0, "err": 3e-3,
                       "plan": {"method": "picard", "window": 4, "speedup": 2.1}},
           "windows": [{"window": 8, "tol": 3e-2, "sce": 2.5, "speedup": 4.0, "err": 1e-2},
                       {"window": 4, "tol": 1e-2, "sce": 10 / 3, "speedup": 3.0, "err": 2e-3},      # at the level
                       {"window": 2, "tol": 1e-2, "sce": 4.0, "speedup": 2.5, "err": 1e-4},
                       {"window": 2, "tol": 2e-3, "sce": 10 / 1.5, "speedup": 1.5, "err": 0.0}],
           "parareal_pipelined": [{"tol": 0.1, "sce": 10 / 1.2, "speedup": 1.2, "err": 1e-3}],
           "staggered": [{"tol": 1e-2, "sce": 10 / 1.8, "speedup": 1.8, "err": 1e-3},
                         {"tol": 3e-2, "sce": 10 / 1.9, "speedup": 1.9, "err": 0.1}],
           "chords": [{"hit": 0, "sce": 2.0, "speedup": 5.0, "err": 0.04},
                      {"hit": 1, "sce": 4.0, "speedup": 2.5, "err": 1e-2},
                      {"hit": 2, "sce": 7.0, "speedup": 10 / 7, "err": 1e-3},
                      {"hit": 3, "sce": 10.0, "speedup": 1.0, "err": 0.0}],
           "chords_core0_err": 0.0}
    return rec | over


def test_table_picks_the_fastest_setting_within_each_level():
    """Per method the fastest row whose max |Δ| is within the level (a row exactly at the level is in); the planner
    only if within; the CHORDS port's earliest hit within; its recommended stop hit 1, only if within."""
    res = {"model": "digits", "cost": "compute", "solver": "ddim", "steps": N, "K": {2: _rec()}}
    picks = {2e-3: {"sequential": 1.0, "planner": None, "best fixed window": 3.0, "pipelined Parareal": 1.2,
                    "staggered (K cores)": 1.8, "CHORDS port": 10 / 7, "CHORDS recommended stop": None},
             5e-2: {"sequential": 1.0, "planner": 2.0, "best fixed window": 4.0, "pipelined Parareal": 1.2,
                    "staggered (K cores)": 1.8, "CHORDS port": 5.0, "CHORDS recommended stop": 2.5}}
    for level, want in picks.items():
        lines, series = devices.table(res, level)
        assert series == {m: [v] for m, v in want.items()}, level
    lines, _ = devices.table(res, 2e-3)
    assert "| best fixed window | 3.00x (2.0e-03) |" in lines and "| planner | – |" in lines
    assert devices._best([], 1.0) is None and devices._best(_rec()["windows"], 1e-5)["speedup"] == 1.5


def test_checks_fail_the_planner_below_sequential_or_level_a_failed_row_and_chords_core0():
    """Exactly the failing conditions: the planner's speed-up below 1 (1 - 1e-6 fails, 1 - 1e-10 is rounding), its
    max |Δ| above 2e-3 (2e-3 itself passes), a row that raised, CHORDS's core 0 over CORE0_TOL (CORE0_TOL passes)."""
    ok = _rec(planner={"speedup": 1.0 - 1e-10, "err": 2e-3, "plan": None}, chords_core0_err=devices.CORE0_TOL)
    bad = _rec(planner={"speedup": 1.0 - 1e-6, "err": 2.1e-3, "plan": None}, chords_core0_err=2e-5,
               windows=[{"window": 2, "tol": 1e-2, "speedup": float("nan"), "err": float("inf"), "error": "boom"}])
    assert devices.checks({"model": "m", "K": {1: ok}}) == []
    fails = devices.checks({"model": "m", "K": {1: ok, 2: bad}})
    assert len(fails) == 4 and all(f.startswith("m K=2: ") for f in fails), fails
    for what in ("boom", "planner below sequential", "planner's max|Δ| 2.1e-03", "CHORDS core 0"):
        assert sum(what in f for f in fails) == 1, (what, fails)


def test_a_failed_check_makes_the_run_exit_1(monkeypatch, tmp_path, capsys):
    pytest.importorskip("matplotlib")             # devices.main plots (and checks) what it measured
    rec = _rec(planner={"sce": 12.0, "speedup": 10 / 12, "err": 0.0,
                        "plan": {"method": "picard", "window": 4, "speedup": 2.0}})
    res = {"model": "digits", "cost": "compute", "solver": "ddim", "steps": N, "seeds": 1, "range": 1.0,
           "K": {1: rec}}
    monkeypatch.setattr(devices, "measure", lambda *a, **k: res)
    assert devices.main(["--quick", "--models", "digits", "--out", str(tmp_path)]) == 1
    assert "FAILED: digits K=1: planner below sequential" in capsys.readouterr().out


def test_draw_alone_reports_the_mean_sce_of_samples_drawn_alone():
    """Each sample drawn alone with its own conditioning: its rows of ``x`` and the mean of their SCEs (the two
    samples here take different rounds, so a max or a first would differ)."""
    d = devices.draw_alone("digits", N, "compute", 2, 2, window=N, tol=1e-2)
    s = devices.make_sampler("digits", N, "compute", 2, window=N, tol=1e-2)
    alone = [s.sample(1, seed=0, first_sample=i, **devices._cond("digits", i)) for i in range(2)]
    assert alone[0].stats.sce != alone[1].stats.sce
    assert d["sce"] == (alone[0].stats.sce + alone[1].stats.sce) / 2
    assert torch.equal(d["x"], torch.cat([r.samples for r in alone]))


def test_chords_zeroth_hit_on_one_core_is_the_one_step_ddim_sample():
    """On one core the zeroth hit is the solver's jump from x_T straight to the end with the score held: the DDIM
    sampler on a one-step grid, exactly (the port's long jumps, not only core 0's steps, are DDIM's)."""
    for i, hits in enumerate(devices.chords_runs("digits", N, 1, 2)):
        one = ParallelSampler("digits", steps=1, method="sequential", progress=False).sample(
            1, seed=0, first_sample=i, **devices._cond("digits", i)).samples
        assert hits[0][0] == 1 and torch.equal(hits[0][1], one)


def test_stagger_rescales_the_reference_schedule_to_the_nearest_point():
    assert stagger(50, 8) == [0, 2, 4, 8, 16, 24, 32, 40] and stagger(50, 2) == [0, 40]
    assert stagger(10, 4) == [0, 2, 5, 8] and stagger(10, 2) == [0, 8]          # 1.6, 4.8 to the nearest


# -- rounds_at_accuracy.py ------------------------------------------------------------------------------------------
RUNS = [{"tol": 0.3, "rounds": 5, "nfe": 50.0, "max_abs_diff": 3e-2, "max_rel_diff": 3e-3},
        {"tol": 0.1, "rounds": 7, "nfe": 80.0, "max_abs_diff": 2e-3, "max_rel_diff": 2e-4},
        {"tol": 0.03, "rounds": 7, "nfe": 70.0, "max_abs_diff": 1e-3, "max_rel_diff": 1e-4},
        {"tol": 0.01, "rounds": 9, "nfe": 90.0, "max_abs_diff": 1e-4, "max_rel_diff": 1e-5}]


def test_at_accuracy_takes_the_fewest_rounds_then_nfe_within_the_target():
    assert ra.at_accuracy(RUNS, 2e-3)["tol"] == 0.03                       # 7 rounds twice: the fewer NFE
    assert ra.at_accuracy(RUNS, 1e-3)["tol"] == 0.03                       # at the target: in
    assert ra.at_accuracy(RUNS, 1e-4)["tol"] == 0.01
    assert ra.at_accuracy(RUNS, 3e-3, "max_rel_diff")["tol"] == 0.3 and ra.at_accuracy(RUNS, 3e-3)["tol"] == 0.03
    assert ra.at_accuracy(RUNS, 1e-5 / 2) is None


def test_sweep_stops_at_the_first_run_within_the_floor_of_its_key():
    seen = []

    def run(tol):
        seen.append(tol)
        r = {x["tol"]: x for x in RUNS}[tol]
        return r["rounds"], r["nfe"], r["max_abs_diff"], r["max_rel_diff"]

    assert [r["tol"] for r in ra.sweep(run, [r["tol"] for r in RUNS], 2e-3)] == [0.3, 0.1] == seen
    seen.clear()
    assert [r["tol"] for r in ra.sweep(run, [r["tol"] for r in RUNS], 3e-3, key="max_rel_diff")] == [0.3] == seen


def test_errors_take_largest_absolute_differences_over_the_references_scale():
    ref = torch.tensor([[1.0, -4.0], [0.5, 0.25]], dtype=torch.float64)
    x = ref + torch.tensor([[0.0, -2.0], [-0.125, 0.0]], dtype=torch.float64)   # x's own max-abs: 6, not 4
    assert ra.errors(x, ref, None) == (2.0, 0.5)
    assert ra.errors(x, ref, 4.0) == (2.0, 0.5) and ra.errors(x, ref, 0.5) == (2.0, 4.0)


def test_sd_cases_have_no_declared_scale():
    assert ra.data_scale(ra.CASES["sd-ddim50"]) is None and ra.data_scale(ra.CASES["sd-ddpm100"]) is None


REF = torch.tensor([[1.0, -4.0], [0.5, 0.25]], dtype=torch.float64)       # per-sample max-abs 4 and 0.5


def _headline(monkeypatch, moved: float, rounds: int, nfe: float):
    """headline() on the SD case (no declared scale) with made-up samples: paratime's default moves sample 0's -4
    down by ``moved`` (max rel Δ ``moved / 4``, its own max-abs grows: the reference's is the scale), tol 2e-3 in
    data units, ``rounds`` and ``nfe``; the real class's runs RUNS-like (its best at 2e-3 relative: tol 0.03, 12
    rounds, 320 NFE, though no run is within 2e-3 absolute); the rule's run records the tol it got."""
    got = []

    def sample(case, batch, **options):
        if options.get("method") == "sequential":
            return SimpleNamespace(samples=REF.clone())
        x = REF.clone()
        if "tol" in options:                                                # the rule at the peer's tol
            got.append(options["tol"])
            return SimpleNamespace(samples=x, stats=SimpleNamespace(rounds=12, nfe=320.0))
        x[0, 1] -= moved
        stats = SimpleNamespace(tol=2e-3, tol_units="data", tol_abs=[8e-3, 1e-3], rounds=rounds, nfe=nfe, window=50)
        return SimpleNamespace(samples=x, stats=stats)

    peer = [{"tol": 0.1, "rounds": 9, "nfe": 150.0, "max_abs_diff": 0.5, "max_rel_diff": 5e-3},
            {"tol": 0.03, "rounds": 12, "nfe": 320.0, "max_abs_diff": 0.1, "max_rel_diff": 1e-3},
            {"tol": 0.01, "rounds": 14, "nfe": 400.0, "max_abs_diff": 0.01, "max_rel_diff": 1e-4}]
    monkeypatch.setattr(ra, "sample", sample)
    monkeypatch.setattr(ra, "real_class_runs", lambda *a, **k: peer)
    res = ra.headline("sd-ddim50", batch=2)
    assert got == [0.03] and res["peer"]["tol"] == 0.03 and res["rule"]["tol"] == 0.03
    return res


def test_headline_checks_pass_on_known_figures(monkeypatch):
    """Max rel Δ 6e-4 (2.4e-3 absolute: the target is relative) in [tol/4, tol]; 8 rounds against the peer's 12
    (exactly 1.5x); 300 NFE against 320."""
    res = _headline(monkeypatch, 2.4e-3, 8, 300.0)
    assert res["default"]["max_rel_diff"] == pytest.approx(6e-4, rel=1e-12)
    assert res["default"]["max_abs_diff"] == pytest.approx(2.4e-3, rel=1e-12)
    assert res["checks"] == {"max rel Δ <= target": True, "max rel Δ in [tol/4, tol]": True,
                             "rounds >= 1.5x fewer": True, "rounds, NFE <= peer's": True}
    line = ra.headline_markdown([res])
    assert "| 0.03 / 12 / 320 / 0.001 | 1.50x | 12 / 320 |" in line and "**MISSED**" not in line


def test_headline_checks_miss_on_known_figures(monkeypatch):
    """Max rel Δ 1e-4 below tol/4; 9 rounds (the peer's 12 is 1.33x); 400 NFE above the peer's 320. Then max
    rel Δ 2.4e-3, over the target and tol."""
    res = _headline(monkeypatch, 4e-4, 9, 400.0)
    assert res["checks"] == {"max rel Δ <= target": True, "max rel Δ in [tol/4, tol]": False,
                             "rounds >= 1.5x fewer": False, "rounds, NFE <= peer's": False}
    res = _headline(monkeypatch, 9.6e-3, 8, 300.0)
    assert res["checks"] == {"max rel Δ <= target": False, "max rel Δ in [tol/4, tol]": False,
                             "rounds >= 1.5x fewer": True, "rounds, NFE <= peer's": True}


def test_headline_run_exits_1_when_a_check_misses(monkeypatch, capsys):
    res = {"case": "policy", "batch": 2, "window": 32, "rule": None, "peer": None, "peer_runs": [],
           "default": {"tol": 2e-3, "tol_units": "data", "rounds": 5, "nfe": 50.0, "max_rel_diff": 1e-3},
           "checks": {"real class ran (diffusers)": False}}
    monkeypatch.setattr(ra, "headline", lambda name, batch=None: res)
    assert ra.main(["--headline", "--cases", "policy"]) == 1


def test_markdown_columns_at_each_target_and_at_todays_accuracy():
    """Fewest rounds (NFE) within each target, and within the old default's accuracy (today: 1e-4 here)."""
    res = {"case": "c", "batch": 2, "window": 10, "today": RUNS[3], "runs": {"x": RUNS, "y": RUNS[:1]}}
    lines = ra.to_markdown([res]).splitlines()[-2:]
    assert lines == ["| c b2 W10 | x | 7 (70) | 7 (70) | 9 (90) | 9 (90) (max Δ 0.0001) |",
                     "| c b2 W10 | y | not reached | not reached | not reached | not reached (max Δ 0.0001) |"]


def test_merge_keeps_cases_of_another_batch_apart():
    a = {"case": "c", "batch": 4, "window": 10, "today": RUNS[0], "runs": {"x": RUNS}, "combos": {}}
    assert len(ra.merge([a, {**a, "batch": 8}])) == 2 and len(ra.merge([a, {**a, "window": 5}])) == 2


# -- devices.py --paradigms: diffusers' pipeline, its rows per UNet call ----------------------------------------------
#: made-up UNet rows per call of the pipeline at each ``parallel`` (guided: 2 rows a point) and its latents' largest
#: |difference| from the sequential pipeline's (whose largest |latent| is 4, its largest latent 1)
PARA_ROWS = {2: [4] * 10 + [2], 4: [8] * 6 + [6], 8: [10] + [16] * 3, 16: [32, 32, 30]}
PARA_DIFF = {2: 1 / 16, 4: 1 / 256, 8: 1 / 64, 16: 1 / 32}


@pytest.fixture
def fake_pipelines(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    import paratime.bench.tiny_pipelines as tiny

    ref = torch.tensor([[1.0, -4.0, 0.5]])

    class Pipe:
        """The sequential pipeline (16 calls of 2 rows) or, built as the ParaDiGMS class, PARA_ROWS' calls."""

        def __init__(self, unet=None, **parts):
            self.unet = unet or torch.nn.Identity()
            self.vae = self.text_encoder = self.scheduler = None

        def set_progress_bar_config(self, **kw):
            pass

        def __call__(self, parallel=None, tolerance=None, **args):
            assert args["num_inference_steps"] == 16 and args["guidance_scale"] == 5.0 and tolerance in (None, 0.1)
            for rows in PARA_ROWS[parallel] if parallel else [2] * 16:
                self.unet(torch.zeros(rows, 1))
            x = ref.clone()
            if parallel:
                x[0, 1] -= PARA_DIFF[parallel]
            return SimpleNamespace(images=x)

    monkeypatch.setitem(vars(diffusers), "StableDiffusionParadigmsPipeline", Pipe)     # not loading the real one
    monkeypatch.setattr(tiny, "tiny_sd", lambda scheduler: Pipe())
    monkeypatch.setattr(tiny, "prompt_embeddings", lambda pipe, batch: {})


def test_paradigms_prices_each_unet_call_at_ceil_rows_over_k(fake_pipelines):
    """SCE = sum over calls of ceil(rows / K), worked by hand from PARA_ROWS; the sequential pipeline's 16 calls of 2
    rows cost 32 at K = 1 and 16 at K = 2 and 4; at K the windows up to 4K, and N; max |Δ| over the largest
    |latent|, 4."""
    res = devices.paradigms(16, [1, 2, 4], quick=True)
    seq = {1: 32, 2: 16, 4: 16}
    sce = {1: {2: 42, 4: 54, 16: 94}, 2: {2: 21, 4: 27, 8: 29, 16: 47}, 4: {2: 11, 4: 14, 8: 15, 16: 24}}
    for K, rows in res["K"].items():
        assert [r["window"] for r in rows] == list(sce[K]) and all(r["tol"] == 0.1 for r in rows)
        for r in rows:
            W = r["window"]
            assert r["speedup"] == seq[K] / sce[K][W] and r["err"] == PARA_DIFF[W] / 4
            assert r["rows_per_call"] == max(PARA_ROWS[W])
    lines = devices.paradigms_table(res)
    # 2e-3: parallel=2 (1.6e-2) and 8 (3.9e-3) are out; 5e-2: every window is in
    cells = [[c.strip() for c in line.split("|")[-4:-1]] for line in lines[2:]]
    assert cells == [["0.59x (parallel=4, tol 0.1)"] * 2 + ["1.14x (parallel=4, tol 0.1)"],
                     ["0.76x (parallel=2, tol 0.1)"] * 2 + ["1.45x (parallel=2, tol 0.1)"]]


def test_run_case_today_is_the_old_defaults_run_at_tol_0_1(monkeypatch):
    """The "today" column's accuracy: the old default's row at tol 0.1 of its sweep, else one run at 0.1."""
    calls = []

    def runs(case, batch, combo, ref, floor, tols=None):
        calls.append((combo.label, floor, tols))
        if tols is None:
            return [r for r in RUNS if r["tol"] != 0.1] if combo.update == "picard" and not full else RUNS
        return [{"tol": tols[0], "rounds": 3, "nfe": 30.0, "max_abs_diff": 0.5}]

    monkeypatch.setattr(ra, "sample", lambda case, batch, **options: SimpleNamespace(samples=REF))
    monkeypatch.setattr(ra, "paratime_runs", runs)
    old = ra.Combo("picard", "paradigms").label
    for full in (True, False):
        calls.clear()
        res = ra.run_case("gmm-ddim100", 2, [ra.Combo("secant", "final")], with_diffusers=False)
        assert list(res["runs"]) == ["secant + final rule (default)", old]
        if full:
            assert res["today"] == RUNS[1] and [c[1:] for c in calls] == [(5e-4, None)] * 2
        else:
            assert res["today"]["tol"] == 0.1 and res["today"]["rounds"] == 3 and calls[-1] == (old, 0.0, (0.1,))


def test_real_class_errors_are_over_the_declared_scale_and_its_sweep_stops_on_them():
    """The real class's runs (tiny settings): on digits (declared scale 1) the relative error is the absolute one;
    on the SD latents (no declared scale, |latent| ~ 70) the sweep stops on the relative error, not the absolute."""
    pytest.importorskip("diffusers")
    from dataclasses import replace

    (run,) = ra.real_class_runs(replace(ra.CASES["digits-ddim100"], steps=20, window=8), 2, (0.3,), float("inf"))
    assert run["max_rel_diff"] == run["max_abs_diff"] > 0
    sd = replace(ra.CASES["sd-ddim50"], steps=20, window=8)
    (first,) = ra.real_class_runs(sd, 2, (0.3, 0.1), float("inf"))
    assert first["max_abs_diff"] > first["max_rel_diff"] > 0
    assert ra.real_class_runs(sd, 2, (0.3, 0.1), first["max_rel_diff"]) == [first]
