"""The CHORDS port (benchmarks/chords_ref.py) on the reference's own linear test problem: the closed-form tick of
every core's hit and the sequential solution of core 0 always; and, when a copy of the original
``algorithms/chords.py`` (github.com/hanjq17/CHORDS, not part of this repository) is at ``$CHORDS_ORIGINAL``, the same
hits (steps, tick, output bit for bit) as the original."""

import importlib.util
import os

import pytest
import torch

from benchmarks.chords_ref import euler, run_chords, stagger

T = 50


def _score(x, t):                     # the reference's test problem
    return 0.1 * x + 0.01 * t


def _batched(points):
    return [_score(x, t) for t, x in points]


def _x0(dtype=torch.float64):
    return torch.randn(128, generator=torch.Generator().manual_seed(10), dtype=dtype)


SCHEDULES = [stagger(T, 8), stagger(T, 4), stagger(T, 2), [0, 5, 6, 30], [0, 1, 2, 3]]
# The original indexes a list of cores that its own clean-up emptied when every core hits T at the same tick
# without stopping (consecutive starts, [0, 1, 2, 3]); the comparison leaves that schedule out.
ORIGINAL_SCHEDULES = SCHEDULES[:-1]


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


def _run_original(CHORDS, init_t, dtype, stop):
    """The original's own driver loop (its test()), returning (k, tick, x) per hit and the tick count."""
    algo = CHORDS(T, _x0(dtype), len(init_t), init_t="-".join(map(str, init_t)), stopping_kwargs=stop)
    while True:
        allocation = algo.get_allocation()
        if allocation == []:
            break
        algo.update_scores([(t, k, _score(x, t)) for t, k, x in allocation])
        algo.update_states(len(allocation))
        delete_ids, earlystop = algo.schedule_cores()
        if earlystop:
            break
        algo.cur_core_to_compute = algo.cur_core_to_compute[len(allocation):]
        if len(delete_ids):
            algo.cur_core_to_compute = [c for c in algo.cur_core_to_compute if c not in delete_ids]
    return algo.hits, algo.counter, algo.flops_count


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stop", [dict(criterion="core_index", index=1, threshold=None),
                                  dict(criterion="core_index", index=100, threshold=None),
                                  dict(criterion="residual", index=1, threshold=5.0),
                                  dict(criterion="residual", index=1, threshold=4e-4)], ids=str)
@pytest.mark.parametrize("init_t", ORIGINAL_SCHEDULES, ids=str)
def test_port_equals_the_original(init_t, stop, dtype, capsys):
    CHORDS = _original()
    hits, ticks, evaluations = _run_original(CHORDS, init_t, dtype, stop)
    run = run_chords(T, _x0(dtype), _batched, init_t, criterion=stop["criterion"], index=stop["index"],
                     threshold=stop["threshold"])
    assert [(h.k, h.tick) for h in run.hits] == [(k, tick) for k, tick, _ in hits]
    assert all(torch.equal(h.x, x) for h, (_, _, x) in zip(run.hits, hits))
    assert (run.ticks, run.evaluations) == (ticks, evaluations)


@pytest.mark.parametrize("kw,match", [(dict(init_t=[1, 4]), "init_t"), (dict(init_t=[0, 4, 4]), "init_t"),
                                      (dict(init_t=[0, 50]), "init_t"), (dict(criterion="magic"), "criterion"),
                                      (dict(criterion="residual"), "threshold")])
def test_bad_input(kw, match):
    args = dict(init_t=[0, 4]) | kw
    with pytest.raises(ValueError, match=match):
        run_chords(T, _x0(), _batched, **args)
    with pytest.raises(ValueError, match="cores"):
        stagger(T, 3)
