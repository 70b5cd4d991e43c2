"""The block-causal student's rollout (KV cache) against an independent reference: the same steps as block-causal
full passes over [earlier blocks re-noised to the context level, the block], re-fed every time, no cache."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from dmd.core.flow_matching import add_noise, sigma_to_timestep, x0_from_velocity
from dmd.core.noise import randn
from dmd.distill.rollout import RolloutSchedule, rollout, sample, transformer_velocity
from dmd.wan.causal import block_causal
from dmd.wan.tiny import build_transformer

SIGMAS = (1.0, 0.757, 0.522)
C, H, W = 4, 4, 4


def _model(seed=0) -> WanTransformer3DModel:
    return build_transformer(
        in_channels=C, text_dim=16, ffn_dim=32, seed=seed, freq_dim=16, rope_max_seq_len=1024
    ).eval()


def _inputs(b=2, frames=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, C, frames, H, W, generator=g), torch.randn(b, 5, 16, generator=g)


def _reference_rollout(model, c, noise, schedule, exits, generator):
    """Block by block with no cache: block b's every step is one block-causal full pass over the earlier blocks'
    context (each re-noised once, when it finished, as the cache holds it) followed by the block at its σ, with a
    timestep per token. Draws come in the rollout's order: a block's re-noising, then its context noise."""
    ranges = schedule.block_ranges(noise.shape[2])
    velocity = transformer_velocity(model)
    contexts, outputs = [], []
    with block_causal(model) as causal:
        for b, ((start, end), k) in enumerate(zip(ranges, exits)):
            x = noise[:, :, start:end]
            for i in range(k + 1):
                inputs = torch.cat([*contexts, x], dim=2)
                frame_sigmas = torch.tensor(
                    [schedule.context_sigma] * start + [schedule.sigmas[i]] * (end - start)
                )
                with causal.full(ranges[: b + 1]):
                    v = velocity(inputs, sigma_to_timestep(frame_sigmas).expand(x.shape[0], -1), c)
                x0 = x0_from_velocity(x, v[:, :, start:], schedule.sigmas[i])
                if i < k:
                    x = add_noise(x0, randn(x0.shape, generator, x0.device, x0.dtype), schedule.sigmas[i + 1])
            outputs.append(x0)
            if end < noise.shape[2]:
                contexts.append(
                    add_noise(x0, randn(x0.shape, generator, x0.device, x0.dtype), schedule.context_sigma)
                )
    return torch.cat(outputs, dim=2)


@pytest.mark.parametrize(
    "layout",
    [dict(num_frame_per_block=3, independent_first_frame=True), dict(num_frame_per_block=2)],
    ids=["independent_first_frame", "blocks_of_2"],
)
@pytest.mark.parametrize("context_sigma", [0.0, 0.1])
@torch.no_grad()
def test_cached_rollout_equals_the_re_fed_block_causal_reference(layout, context_sigma):
    model = _model()
    frames = 7 if layout.get("independent_first_frame") else 6
    noise, c = _inputs(frames=frames)
    schedule = RolloutSchedule(SIGMAS, context_sigma=context_sigma, causal=True, **layout)
    exits = [2, 0, 1, 2][: len(schedule.block_ranges(frames))]
    with block_causal(model) as causal:
        ours = rollout(
            transformer_velocity(model),
            c,
            noise,
            schedule,
            exits,
            torch.Generator().manual_seed(3),
            causal=causal,
        )
    reference = _reference_rollout(model, c, noise, schedule, exits, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_one_block_causal_student_is_the_bidirectional_student():
    model = _model()
    noise, c = _inputs(frames=6)
    bidirectional = sample(model, c, noise, RolloutSchedule(SIGMAS, 6))
    causal = sample(model, c, noise, RolloutSchedule(SIGMAS, 6, causal=True))
    assert torch.equal(causal, bidirectional)


@torch.no_grad()
def test_causal_and_re_fed_prefix_students_differ_with_several_blocks():
    model = _model()
    noise, c = _inputs(frames=6)
    prefix = sample(model, c, noise, RolloutSchedule(SIGMAS, 3, context_sigma=0.1))
    causal = sample(model, c, noise, RolloutSchedule(SIGMAS, 3, context_sigma=0.1, causal=True))
    assert torch.equal(causal[:, :, :3], prefix[:, :, :3])  # the first block sees no context in either
    assert not torch.allclose(causal[:, :, 3:], prefix[:, :, 3:], atol=1e-4)


def test_gradient_reaches_the_student_only_through_each_blocks_exit_step():
    model = _model()
    noise, c = _inputs(b=1, frames=6)
    schedule = RolloutSchedule(SIGMAS, 3, causal=True)
    calls = []
    velocity = transformer_velocity(model)

    def recording(x, t, cc):
        calls.append(torch.is_grad_enabled())
        return velocity(x, t, cc)

    with block_causal(model) as causal:
        out = rollout(recording, c, noise, schedule, [1, 2], torch.Generator().manual_seed(0), causal=causal)
    # block 0: steps 0, 1 (exit), then its cache fill; block 1: steps 0, 1, 2 (exit), no fill after the last block
    assert calls == [False, True, False, False, False, True]
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def test_sampling_past_the_trained_length_keeps_a_rolling_window():
    """A 12-frame clip from a student trained on 6 blocks of 3: the cache keeps 3 frames, so the first two blocks
    are as without a window and the later ones differ (dmd.wan.causal's tests check what the window holds)."""
    model = _model()
    noise, c = _inputs(b=1, frames=12)
    schedule = RolloutSchedule(SIGMAS, 3, causal=True, num_training_frames=6)
    assert schedule.cache_frames() == 3
    long = sample(model, c, noise, schedule, torch.Generator().manual_seed(5))
    assert long.shape == noise.shape and torch.isfinite(long).all()
    unbounded = sample(
        model, c, noise, RolloutSchedule(SIGMAS, 3, causal=True), torch.Generator().manual_seed(5)
    )
    assert torch.equal(long[:, :, :6], unbounded[:, :, :6])  # within the trained length the window holds all
    assert not torch.allclose(long[:, :, 9:], unbounded[:, :, 9:], atol=1e-4)


def test_a_causal_schedule_needs_the_block_causal_handle():
    model = _model()
    noise, c = _inputs(b=1, frames=6)
    with pytest.raises(ValueError, match="block-causal schedule needs the block_causal"):
        rollout(
            transformer_velocity(model),
            c,
            noise,
            RolloutSchedule(SIGMAS, 3, causal=True),
            [2, 2],
            torch.Generator(),
        )
    with pytest.raises(ValueError, match="samples through its transformer module"):
        sample(transformer_velocity(model), c, noise, RolloutSchedule(SIGMAS, 3, causal=True))
