"""``benchmarks/auto_stochastic.py`` (the README's runs of ``method="auto"`` on stochastic solvers against
sequential sampling) on a tiny grid: every run's SCE equals its network calls priced by hand, ``c(ceil(rows / K))``
summed, sequential's is N such calls of the batch, and a run slower than sequential is reported and fails the run."""

import itertools
import math

import pytest
import torch

from paratime import ParallelSampler
from paratime.backends import LocalBackend
from paratime.bench import auto_stochastic as aus

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = dict(models=("gmm",), solvers=("ddpm", "euler_ancestral"), steps=(20,), batches=(1, 3), devices=(1, 2),
            costs=("compute", "latency"), seeds=1)


class _Calls(LocalBackend):
    """Reports ``workers`` devices and keeps each network call's rows."""

    def __init__(self, workers):
        super().__init__()
        self.workers, self.rows = workers, []

    def evaluate(self, x, *args, **kwargs):
        self.rows.append(x.shape[0])
        return super().evaluate(x, *args, **kwargs)


def _by_hand(rows, cost, k):
    """SCE of calls of ``rows`` rows on ``k`` devices: ``c(r) = r`` or ``c(r) = 1`` at ``ceil(rows / k)``."""
    return sum(math.ceil(r / k) if cost == "compute" else 1 for r in rows)


@pytest.fixture(scope="module")
def records():
    return aus.sweep(**GRID)


def test_every_run_of_the_grid_is_there(records):
    keys = [(r["model"], r["solver"], r["steps"], r["batch"], r["cost"], r["K"], r["seed"]) for r in records]
    assert keys == list(itertools.product(*(GRID[k] for k in ("models", "solvers", "steps", "batches", "costs",
                                                             "devices")), range(GRID["seeds"])))


def test_each_run_is_priced_from_its_calls_and_sequential_is_n_calls_of_the_batch(records):
    assert any(r["method"] != "sequential" for r in records)        # the grid prices parallel plans too
    for r in records:
        backend = _Calls(r["K"])
        with torch.no_grad():
            st = ParallelSampler("gmm", solver=r["solver"], steps=r["steps"], method="auto", cost=r["cost"],
                                 backend=backend, progress=False).sample(r["batch"], seed=r["seed"]).stats
        assert (st.method, st.window, st.rounds) == (r["method"], r["window"], r["rounds"])
        if r["cost"] == "compute":
            assert sum(st.round_device_rows) == _by_hand(backend.rows, "compute", r["K"])
        assert r["sce"] == r["priced"] == _by_hand(backend.rows, r["cost"], r["K"])
        assert r["seq"] == r["steps"] * _by_hand([r["batch"]], r["cost"], r["K"])
    assert not aus.slower(records) and not aus.mispriced(records)


def test_a_run_slower_than_sequential_is_reported_and_fails(records, monkeypatch, capsys):
    slow = dict(records[-1], method="picard", window=4, rounds=23, sce=23.0, priced=23.0, seq=20.0, seed=7)
    assert aus.slower([*records, slow]) == [slow]
    assert any(line.startswith("SLOWER:") and "seed 7" in line and "23.0 against 20.0" in line
               for line in aus.summary([*records, slow]))
    assert any("**slower**" in line for line in aus.table([*records, slow]))
    monkeypatch.setattr(aus, "sweep", lambda *args, **kwargs: [*records, slow])
    assert aus.main(["--models", "gmm"]) == 1
    assert "slower than sequential: 1;" in capsys.readouterr().out
    monkeypatch.setattr(aus, "sweep", lambda *args, **kwargs: list(records))
    assert aus.main(["--models", "gmm"]) == 0


def test_a_mispriced_run_fails(records, monkeypatch):
    off = dict(records[0], priced=records[0]["sce"] + 1)
    monkeypatch.setattr(aus, "sweep", lambda *args, **kwargs: [*records, off])
    assert aus.main(["--models", "gmm"]) == 1


@pytest.mark.parametrize("argv", [["--models", "policy"], ["--solvers", "ddim"], ["--costs", "measure"],
                                  ["--steps", "1"], ["--devices", "x"], ["--seeds", "0"]])
def test_bad_options_are_refused(argv):
    with pytest.raises(SystemExit):
        aus.main(argv)
