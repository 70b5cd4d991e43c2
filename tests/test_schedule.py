"""Schedule maths against hand-written formulas: step σs, shift and its inverse, score-timestep bounds, exits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmd.schedule import (
    ScoreTimestepRange,
    choose_exit_indices,
    denoising_sigmas,
    exit_bounds,
    unshift_sigma,
)


def _shift(s, x):
    return s * x / (1 + (s - 1) * x)


def test_denoising_sigmas_unwarped_are_steps_over_1000():
    assert denoising_sigmas([1000, 757, 522]).tolist() == pytest.approx([1.0, 0.757, 0.522])


def test_denoising_sigmas_warped_follow_the_shift_formula():
    got = denoising_sigmas([1000, 757, 522], warp_shift=3.0).numpy()
    want = [_shift(3.0, t / 1000) for t in (1000, 757, 522)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] == pytest.approx(1.0) and all(got[1:] > [0.757, 0.522])


def test_unshift_inverts_shift_on_random_sigmas():
    sigma = torch.rand(1000, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0, 7.0):
        shifted = torch.from_numpy(_shift(s, sigma.numpy()))
        torch.testing.assert_close(unshift_sigma(shifted, s), sigma)


def test_score_sigmas_are_shifted_uniform_within_ratio_range():
    rng = ScoreTimestepRange(min_ratio=0.2, max_ratio=0.9, shift=3.0)
    sigma = rng.sample(20000, torch.Generator().manual_seed(0)).double()
    assert sigma.min() >= _shift(3.0, 0.2) - 1e-6 and sigma.max() <= _shift(3.0, 0.9) + 1e-6
    # undoing the shift by hand must give a uniform on [0.2, 0.9]: check its quartiles
    u = sigma / (3.0 - 2.0 * sigma)
    np.testing.assert_allclose(np.quantile(u.numpy(), [0.25, 0.5, 0.75]), [0.375, 0.55, 0.725], atol=0.01)


def test_score_sigmas_respect_floor_ceiling_and_min_score_timestep():
    gen = torch.Generator().manual_seed(1)
    rng = ScoreTimestepRange(min_ratio=0.02, max_ratio=0.98, min_sigma=0.3)
    sigma = rng.sample(5000, gen, floor=0.1, ceiling=0.6)
    assert sigma.min() >= 0.3 - 1e-6 and sigma.max() <= 0.6 + 1e-6
    assert sigma.mean() == pytest.approx(0.45, abs=0.01)
    # a floor above the range: pinned at the range's top, never outside it
    assert torch.allclose(rng.sample(10, gen, floor=0.99), torch.tensor(0.98))


def test_exit_bounds_follow_self_forcing():
    sigmas = torch.tensor([1.0, 0.757, 0.522])
    assert exit_bounds(sigmas, 0, ts_schedule=True, ts_schedule_max=False) == pytest.approx((0.757, 1.0))
    assert exit_bounds(sigmas, 1, ts_schedule=True, ts_schedule_max=True) == pytest.approx((0.522, 0.757))
    assert exit_bounds(sigmas, 2, ts_schedule=True, ts_schedule_max=True) == pytest.approx((0.0, 0.522))
    assert exit_bounds(sigmas, 1, ts_schedule=False, ts_schedule_max=False) == (0.0, 1.0)
    assert exit_bounds(sigmas, None, ts_schedule=True, ts_schedule_max=True) == (0.0, 1.0)


def test_exit_indices_modes():
    gen = torch.Generator().manual_seed(0)
    draws = [choose_exit_indices(3, 4, gen, False, False) for _ in range(50)]
    assert any(len(set(d)) > 1 for d in draws)
    assert {k for d in draws for k in d} == {0, 1, 2}
    shared = [choose_exit_indices(3, 4, gen, True, False) for _ in range(50)]
    assert all(len(set(d)) == 1 for d in shared) and {d[0] for d in shared} == {0, 1, 2}
    assert all(choose_exit_indices(3, 4, gen, s, True) == [2] * 4 for s in (False, True))
