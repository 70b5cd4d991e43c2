"""The time-block rollout against a hand-written loop, and per-token timesteps on the stock Wan transformer."""

from __future__ import annotations

import pytest
import torch

from dmd.distill.rollout import (
    RolloutSchedule,
    frame_timesteps_to_tokens,
    rollout,
    sample,
    transformer_velocity,
)
from dmd.wan.tiny import build_transformer

SIGMAS = (1.0, 0.757, 0.522)


class Recorder:
    """A deterministic VelocityFn (v = a·x + b per frame timestep) that records what it is shown."""

    def __init__(self):
        self.weight = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def __call__(self, x, frame_timesteps_BT, c):
        self.calls.append(
            dict(x=x.detach().clone(), t=frame_timesteps_BT.clone(), grad=torch.is_grad_enabled())
        )
        return self.weight * x + frame_timesteps_BT[:, None, :, None, None] / 1000 + c.mean()


def _clip(b=2, t=6, seed=0):
    return torch.randn(b, 4, t, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_block_layouts():
    assert RolloutSchedule(SIGMAS, 3).block_ranges(6) == [(0, 3), (3, 6)]
    assert RolloutSchedule(SIGMAS, 6).block_ranges(6) == [(0, 6)]
    assert RolloutSchedule(SIGMAS, 3, independent_first_frame=True).block_ranges(7) == [
        (0, 1),
        (1, 4),
        (4, 7),
    ]
    with pytest.raises(
        ValueError, match="num_frame_per_block=4 does not divide the 6 latent frames.*use one of"
    ):
        RolloutSchedule(SIGMAS, 4).block_ranges(6)


def test_one_block_rollout_equals_hand_written_chain_and_only_exit_step_has_gradient():
    noise, c = _clip(), torch.zeros(2, 3, 8)
    model = Recorder()
    gen = torch.Generator().manual_seed(7)
    out = rollout(model, c, noise, RolloutSchedule(SIGMAS, 6), [2], gen)
    assert [call["grad"] for call in model.calls] == [False, False, True]
    assert out.requires_grad
    # by hand, with the same stream of re-noising draws
    ref_gen = torch.Generator().manual_seed(7)
    x = noise
    for i, s in enumerate(SIGMAS):
        x0 = x - s * (0.5 * x + s)
        if i + 1 < len(SIGMAS):
            x = (1 - SIGMAS[i + 1]) * x0 + SIGMAS[i + 1] * torch.randn(x0.shape, generator=ref_gen)
    torch.testing.assert_close(out.detach(), x0)
    torch.testing.assert_close(model.calls[1]["t"], torch.full((2, 6), 757.0))


def test_later_blocks_see_earlier_output_renoised_to_context_noise():
    noise, c = _clip(), torch.zeros(2, 3, 8)
    for context_sigma in (0.0, 0.2):
        model = Recorder()
        schedule = RolloutSchedule(SIGMAS, 3, context_sigma=context_sigma)
        out = rollout(model, c, noise, schedule, [0, 1], torch.Generator().manual_seed(0))
        first, *second = model.calls
        assert first["x"].shape[2] == 3 and all(call["x"].shape[2] == 6 for call in second)
        ctx_t = torch.tensor([context_sigma * 1000] * 3)
        for call, step_sigma in zip(second, SIGMAS):
            torch.testing.assert_close(call["t"][0], torch.cat([ctx_t, torch.full((3,), step_sigma * 1000)]))
        context = second[0]["x"][:, :, :3]
        if context_sigma == 0:
            torch.testing.assert_close(context, out[:, :, :3].detach())
        else:
            assert not torch.allclose(context, out[:, :, :3].detach())
            # x_c = (1 − σ_c)·x̂0 + σ_c·ε: the residual is σ_c times a unit-variance draw
            resid = (context - (1 - context_sigma) * out[:, :, :3].detach()) / context_sigma
            assert 0.7 < float(resid.std()) < 1.3


def test_rollout_from_data_starts_at_the_exit_step():
    noise, latents, c = _clip(), _clip(seed=1), torch.zeros(2, 3, 8)
    model = Recorder()
    rollout(model, c, noise, RolloutSchedule(SIGMAS, 6), [1], torch.Generator(), start_latents_BCTHW=latents)
    (call,) = model.calls
    assert call["grad"]
    torch.testing.assert_close(call["x"], (1 - 0.757) * latents + 0.757 * noise)


def test_sample_is_the_rollout_exiting_last_without_gradient():
    noise, c = _clip(), torch.zeros(2, 3, 8)
    schedule = RolloutSchedule(SIGMAS, 3, context_sigma=0.1)
    a = sample(Recorder(), c, noise, schedule, torch.Generator().manual_seed(3))
    model = Recorder()
    b = rollout(model, c, noise, schedule, [2, 2], torch.Generator().manual_seed(3))
    assert not a.requires_grad
    torch.testing.assert_close(a, b.detach())


def test_per_token_timesteps_on_the_stock_wan_transformer():
    model = build_transformer(num_layers=1)
    x = _clip(b=1, t=4, seed=2)
    c = torch.randn(1, 5, 32)
    p_h, p_w = model.config.patch_size[1:]
    tokens_per_frame = (4 // p_h) * (4 // p_w)
    with torch.no_grad():
        scalar = model(x, torch.tensor([300.0]), c, return_dict=False)[0]
        per_token = model(x, torch.full((1, 4 * tokens_per_frame), 300.0), c, return_dict=False)[0]
        torch.testing.assert_close(per_token, scalar)
        velocity = transformer_velocity(model)
        mixed = velocity(x, torch.tensor([[0.0, 0.0, 300.0, 300.0]]), c)
        assert not torch.allclose(mixed, scalar)
        # the last frames' timestep is what the last frames' tokens get (frame-major order)
        ts = frame_timesteps_to_tokens(torch.tensor([[0.0, 300.0]]), tokens_per_frame)
        assert ts.tolist() == [[0.0] * tokens_per_frame + [300.0] * tokens_per_frame]
    assert frame_timesteps_to_tokens(torch.tensor([[5.0, 5.0], [7.0, 7.0]]), 3).tolist() == [5.0, 7.0]


def test_sample_with_a_transformer_returns_a_clip():
    model = build_transformer(num_layers=1)
    noise = _clip(b=1)
    out = sample(model, torch.randn(1, 5, 32), noise, RolloutSchedule(SIGMAS, 3))
    assert out.shape == noise.shape and torch.isfinite(out).all()
