"""LMS, DEIS, UniPC, single-step DPM++ and PLMS: the cancellation-free ``next_state`` is the same step as
``x + increment`` (float64, to rounding) at every step index (short history, lower_order_final, the step to sigma 0,
PLMS's step-0 Heun correction, UniPC's corrector with and without disable_corrector), on VP, VE, EDM and flow grids,
rows at mixed steps, with and without host steps. (tests/test_precision.py's TWO_FORMS leaves out lms, deis and
plms, whose two forms are written separately.)"""

import itertools

import pytest
import torch

from paratime.schedules import DiscreteVPSchedule, EDMSchedule, FlowSchedule, VESchedule
from paratime.solvers import DEIS, LMS, PLMS, DPMSolverSinglestep, UniPC

GRIDS = {"vp": lambda n: DiscreteVPSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012).grid(n).sigmas,
         "ve": lambda n: VESchedule().grid(n).sigmas, "edm": lambda n: EDMSchedule().grid(n).sigmas,
         "flow": lambda n: FlowSchedule(shift=3.0).grid(n).sigmas}
SOLVERS = ([LMS(order=o) for o in (1, 2, 3, 4)]
           + [DEIS(order=o, lower_order_final=lof) for o in (1, 2, 3) for lof in (True, False)]
           + [UniPC(order=o, lower_order_final=lof, disable_corrector=dc)
              for o, lof, dc in itertools.product((1, 2, 3), (True, False), ((), (0, 2, 4)))]
           + [DPMSolverSinglestep(order=o, solver_type=t, lower_order_final=True) for o in (1, 2, 3)
              for t in ("midpoint", "heun")]
           + [PLMS()])


@pytest.mark.parametrize("solver", SOLVERS, ids=str)
@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("steps", [2, 5, 9])
def test_next_state_is_x_plus_increment(solver, grid, steps):
    sig = GRIDS[grid](steps).double()
    if solver.sigma_linear and float((sig[:-1] / sig[1:])[sig[1:] > 0].max()) > 100:
        pytest.skip("refused by check_grid (x + dx's predictor itself is off by 1e-9 relative there)")
    g = torch.Generator().manual_seed(steps)
    B, D = 6, 3
    A = torch.randn(D, D, generator=g, dtype=torch.float64) / D
    c = torch.randn(B, D, generator=g, dtype=torch.float64)

    def evaluate(x, i, b):              # D at the predictor: linear in x, so rounding of x_pred is not amplified
        return c[b] + x @ A / (1 + sig[i, None] ** 2)

    b = torch.arange(B)
    cases = [([n] * B, n) for n in range(steps)] + [([k % steps for k in range(B)], None)]
    for steps_h, host in cases:
        i = torch.tensor(steps_h)
        x = torch.randn(B, D, generator=g, dtype=torch.float64) * sig[i, None] + 0.5
        den = torch.randn(B, D, generator=g, dtype=torch.float64)
        prev = tuple(torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(solver.history_depth))
        prev = prev[0] if solver.history_depth == 1 else prev
        for hs in (host if host is not None else steps_h, None):
            args = (x, i, b, den, prev, None, sig, evaluate)
            got = solver.next_state(*args, host_steps=hs)
            want = x + solver.increment(*args, host_steps=hs)
            # x + dx itself rounds at ulp(x) (~1e-16 |x|): the bound is relative to the larger of |x| and the result
            scale = torch.maximum(x.abs(), got.abs()).clamp_min(1)
            assert float(((got - want).abs() / scale).max()) <= 1e-12, (steps_h, hs)


def test_a_solver_defines_increment_or_next_state_and_gets_the_other():
    """``Solver``'s defaults: ``next_state = x + increment`` and ``increment = next_state - x``; a solver that defines
    neither is refused by name (no recursion between the two defaults)."""
    from paratime.solvers import Solver

    class Halves(Solver):
        def next_state(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
            return (x + denoised) / 2

    class Nothing(Solver):
        pass

    x, d = torch.tensor([[4.0, -2.0]]), torch.tensor([[1.0, 1.0]])
    args = (torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), d, None, None, None, None)
    assert torch.equal(Halves().increment(x, *args), torch.tensor([[-1.5, 1.5]]))
    with pytest.raises(NotImplementedError, match="Nothing: define increment or next_state"):
        Nothing().next_state(x, *args)


def test_last_step_evals_counts_the_calls_into_the_final_point():
    """Heun's step to sigma 0 makes one call (its second is skipped), to sigma > 0 two; a one-call solver one."""
    from paratime.solvers import make_solver

    to_zero, to_min = torch.tensor([10.0, 1.0, 0.0]), torch.tensor([10.0, 1.0, 0.1])
    assert [make_solver("heun").last_step_evals(s) for s in (to_zero, to_min)] == [1, 2]
    assert [make_solver("ddim").last_step_evals(s) for s in (to_zero, to_min)] == [1, 1]
