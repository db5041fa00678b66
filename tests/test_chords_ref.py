"""The CHORDS port (benchmarks/chords_ref.py) on the reference's own linear test problem: the same hits (steps, tick,
output bit for bit), ticks and evaluations as the original ``algorithms/chords.py`` (github.com/hanjq17/CHORDS, not
part of this repository) on every run, against the original's hits recorded in ``chords_original_hits.json``
(``python -m paratime.bench.chords_ref --record-original PATH``), and live against the original when a copy is at
``$CHORDS_ORIGINAL``; the closed-form tick of every core's hit and the sequential solution of core 0."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks.chords_ref import (LINEAR_T, ORIGINAL_DTYPES, ORIGINAL_SCHEDULES, ORIGINAL_STOPS, case_key, euler,
                                   linear_score, linear_x0, run_chords, run_original, run_port, stagger)

T = LINEAR_T
_score = linear_score
RECORDED = json.loads((Path(__file__).parent / "chords_original_hits.json").read_text())


def _batched(points):
    return [_score(x, t) for t, x in points]


def _x0(dtype=torch.float64):
    return linear_x0(str(dtype).removeprefix("torch."))


SCHEDULES = [*ORIGINAL_SCHEDULES, [0, 1, 2, 3]]


@pytest.mark.parametrize("init_t", SCHEDULES, ids=str)
def test_every_hit_at_its_closed_form_tick(init_t):
    """Core i starts after tick i and takes one step per tick from init_t[i]: it hits T at tick i + T - init_t[i],
    having taken T - init_t[i] steps; the zeroth hit (the last core's jump to T) comes at tick K; core 0 is the
    sequential Euler solution, at tick T. Every core evaluates each of its points once."""
    run = run_chords(T, _x0(), _batched, init_t, index=10 ** 6)
    K = len(init_t)
    expect = sorted([(0, K)] + [(T - t, i + T - t) for i, t in enumerate(init_t)], key=lambda h: (h[1], -h[0]))
    got = [(h.k, h.tick) for h in run.hits]
    assert sorted(got, key=lambda h: (h[1], -h[0])) == expect
    x = _x0()
    for t in range(T):
        x = euler(x, _score(x, t), t, t + 1)
    assert torch.equal(run.hits[-1].x, x) and run.hits[-1].tick == T == run.ticks
    assert run.evaluations == sum(T - t for t in init_t)


def test_the_correction_and_the_zeroth_hit_by_hand():
    """The outputs of the cores after core 0 (the closed-form test checks only their ticks), traced by hand from the
    module's formulas on T = 4, init_t = [0, 2]: core 1 starts by G(x_0, 0 -> 2) at tick 1; the zeroth hit is its
    jump G(2 -> 4) at tick 2; at tick 3 core 0 reaches core 1's begin (t = 2), so core 1's last step is
    F(x_3) - G(begin -> 4) + G(core 0's x_2 -> 4), a hit at tick 3."""
    def G(x, t, s):
        return euler(x, _score(x, t), t, s)

    x0 = _x0()
    seq = [x0]
    for t in range(4):
        seq.append(G(seq[-1], t, t + 1))
    start = G(x0, 0, 2)                                     # core 1 at t = 2
    x3 = G(start, 2, 3)
    run = run_chords(4, x0, _batched, [0, 2], index=10)
    assert [(h.k, h.tick) for h in run.hits] == [(0, 2), (2, 3), (4, 4)]
    torch.testing.assert_close(run.hits[0].x, G(start, 2, 4), rtol=0, atol=1e-12)
    torch.testing.assert_close(run.hits[1].x, G(x3, 3, 4) - G(start, 2, 4) + G(seq[2], 2, 4), rtol=0, atol=1e-12)
    assert not torch.allclose(run.hits[1].x, G(x3, 3, 4))                  # the correction moves it
    torch.testing.assert_close(run.hits[2].x, seq[4], rtol=0, atol=0)


def test_default_stop_is_the_first_real_hit():
    run = run_chords(T, _x0(), _batched, stagger(T, 8))          # core_index, index 1
    assert len(run.hits) == 2 and run.ticks == run.hits[1].tick == 7 + T - 40


def _original():
    path = os.environ.get("CHORDS_ORIGINAL", "")
    if not path or not os.path.exists(path):
        pytest.skip("the original algorithms/chords.py is not at $CHORDS_ORIGINAL (copy it there to compare)")
    spec = importlib.util.spec_from_file_location("chords_original", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CHORDS


CASES = [(init_t, stop, dtype) for init_t in ORIGINAL_SCHEDULES for stop in ORIGINAL_STOPS
         for dtype in ORIGINAL_DTYPES]
IDS = [case_key(*c) for c in CASES]


@pytest.mark.parametrize("init_t, stop, dtype", CASES, ids=IDS)
def test_port_equals_the_originals_recorded_hits(init_t, stop, dtype):
    """Every run: the port's hits (k, tick, a digest of x's bits), ticks and evaluations equal the original's, as
    recorded (the live comparison below needs the original, which CI does not have)."""
    assert set(RECORDED["cases"]) == set(IDS)
    assert run_port(init_t, stop, dtype) == RECORDED["cases"][case_key(init_t, stop, dtype)]


@pytest.mark.parametrize("init_t, stop, dtype", CASES, ids=IDS)
def test_port_equals_the_original(init_t, stop, dtype, capsys):
    assert run_port(init_t, stop, dtype) == run_original(_original(), init_t, stop, dtype)


@pytest.mark.parametrize("kw,match", [(dict(init_t=[1, 4]), "init_t"), (dict(init_t=[0, 4, 4]), "init_t"),
                                      (dict(init_t=[0, 50]), "init_t"), (dict(criterion="magic"), "criterion"),
                                      (dict(criterion="residual"), "threshold")])
def test_bad_input(kw, match):
    args = dict(init_t=[0, 4]) | kw
    with pytest.raises(ValueError, match=match):
        run_chords(T, _x0(), _batched, **args)
    with pytest.raises(ValueError, match="cores"):
        stagger(T, 3)
