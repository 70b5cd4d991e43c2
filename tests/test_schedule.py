"""Schedule maths against hand-written formulas: step σs, shift and its inverse, score-timestep bounds, exits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmd.core.flow_matching import denoising_sigmas
from dmd.distill.schedule import ScoreTimestepRange, choose_exit_indices, exit_bounds


def _shift(s, x):
    return s * x / (1 + (s - 1) * x)


def test_denoising_sigmas_unwarped_are_steps_over_1000():
    assert denoising_sigmas([1000, 757, 522]).tolist() == pytest.approx([1.0, 0.757, 0.522])


def test_denoising_sigmas_warped_follow_the_shift_formula():
    got = denoising_sigmas([1000, 757, 522], warp_shift=3.0).numpy()
    want = [_shift(3.0, t / 1000) for t in (1000, 757, 522)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] == pytest.approx(1.0) and all(got[1:] > [0.757, 0.522])


def test_score_sigmas_shift_first_then_clamp():
    """Self-Forcing / FastVideo: σ_s = clamp(shift(u), min_ratio, max_ratio), u ~ U[0, 1] without bounds."""
    rng = ScoreTimestepRange(min_ratio=0.02, max_ratio=0.98, shift=5.0)
    sigma = rng.sample(40000, torch.Generator().manual_seed(0)).double()
    assert sigma.min() >= 0.02 - 1e-6 and sigma.max() <= 0.98 + 1e-6
    # mass at the upper clamp is P(shift(u, 5) > 0.98) = 1 − u* with u* = shift(0.98, 1/5)
    u_star = _shift(1 / 5, 0.98)
    assert float((sigma >= 0.98 - 1e-6).double().mean()) == pytest.approx(1 - u_star, abs=0.01)
    assert (
        1 - u_star > 0.07
    )  # the clamp holds real mass at shift 5, which clamping before the shift never had
    # below the clamp, σ is the shifted uniform: undo the shift by hand and check its quartiles on [0, u*]
    inner = sigma[(sigma > 0.02 + 1e-6) & (sigma < 0.98 - 1e-6)]
    u = _shift(1 / 5, inner.numpy())
    lo = _shift(1 / 5, 0.02)
    want = [lo + q * (u_star - lo) for q in (0.25, 0.5, 0.75)]
    np.testing.assert_allclose(np.quantile(u, [0.25, 0.5, 0.75]), want, atol=0.01)


def test_score_sigmas_bounds_apply_to_u_before_the_shift():
    gen = torch.Generator().manual_seed(1)
    rng = ScoreTimestepRange(min_ratio=0.02, max_ratio=0.98, shift=3.0, min_sigma=0.3)
    # no exit bounds: min_score_timestep is the floor of u
    sigma = rng.sample(5000, gen)
    assert sigma.min() >= _shift(3.0, 0.3) - 1e-6
    # exit bounds replace min_score_timestep (Self-Forcing: `denoised_timestep_to if ts_schedule else min`)
    sigma = rng.sample(5000, gen, floor=0.1, ceiling=0.6)
    assert sigma.min() >= _shift(3.0, 0.1) - 1e-6 and sigma.max() <= _shift(3.0, 0.6) + 1e-6
    assert float(sigma.min()) < _shift(3.0, 0.3)
    u = _shift(1 / 3.0, sigma.double().numpy())
    assert u.mean() == pytest.approx(0.35, abs=0.01)


def test_exit_bounds_follow_self_forcing():
    steps = [1000, 757, 522]
    assert exit_bounds(steps, 0, ts_schedule=True, ts_schedule_max=False) == pytest.approx((0.757, None))
    assert exit_bounds(steps, 1, ts_schedule=True, ts_schedule_max=True) == pytest.approx((0.522, 0.757))
    assert exit_bounds(steps, 2, ts_schedule=True, ts_schedule_max=True) == pytest.approx((0.0, 0.522))
    assert exit_bounds(steps, 1, ts_schedule=False, ts_schedule_max=False) == (None, None)
    assert exit_bounds(steps, None, ts_schedule=True, ts_schedule_max=True) == (None, None)


def test_exit_indices_modes():
    gen = torch.Generator().manual_seed(0)
    draws = [choose_exit_indices(3, 4, gen, False, False) for _ in range(50)]
    assert any(len(set(d)) > 1 for d in draws)
    assert {k for d in draws for k in d} == {0, 1, 2}
    shared = [choose_exit_indices(3, 4, gen, True, False) for _ in range(50)]
    assert all(len(set(d)) == 1 for d in shared) and {d[0] for d in shared} == {0, 1, 2}
    assert all(choose_exit_indices(3, 4, gen, s, True) == [2] * 4 for s in (False, True))
