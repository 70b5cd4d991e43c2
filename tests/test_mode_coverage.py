"""Issue 20's parts against hand-derived values: the GAN head's losses and gradients, the critic's real samples,
the teacher pairs under caption dropout and frame truncation, the consistency step, the variety measure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_method_keys import _batch, _gen, _method, _params

from dmd.distill.consistency import consistency_loss, euler_step, teacher_sigma_grid
from dmd.distill.gan import ClassificationHead, gan_critic_loss, gan_generator_loss
from dmd.toy.variety import start_position_variety


def _head() -> ClassificationHead:
    head = ClassificationHead(dim=2, hidden=2)
    with torch.no_grad():
        head.proj.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
        head.proj.bias.copy_(torch.tensor([0.0, -0.5]))
        head.out.weight.copy_(torch.tensor([[2.0, -1.0]]))
        head.out.bias.copy_(torch.tensor([0.25]))
    return head


def _silu(x):
    return x / (1 + np.exp(-x))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_gan_head_losses_and_gradients_by_hand():
    real = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 2.0], [0.0, 0.0]]])  # (B=2, L=2, D=2)
    fake = torch.tensor([[[0.0, 0.0], [1.0, -1.0]], [[-1.0, 1.0], [1.0, 1.0]]])
    W1, b1 = np.array([[1.0, -1.0], [0.5, 2.0]]), np.array([0.0, -0.5])
    w2, b2 = np.array([2.0, -1.0]), 0.25

    def by_hand(tokens):
        pooled = tokens.numpy().mean(1)
        hidden = _silu(pooled @ W1.T + b1)
        return hidden @ w2 + b2, hidden

    real_logit, real_hidden = by_hand(real)
    fake_logit, fake_hidden = by_hand(fake)
    softplus = lambda x: np.log1p(np.exp(x))  # noqa: E731
    want_critic = softplus(-real_logit).mean() + softplus(fake_logit).mean()
    want_generator = softplus(-fake_logit).mean()
    # ∂/∂w2 of the critic's loss: −σ(−l_real)/B·h_real + σ(l_fake)/B·h_fake, summed over the batch
    want_grad_w2 = (
        -_sigmoid(-real_logit)[:, None] * real_hidden + _sigmoid(fake_logit)[:, None] * fake_hidden
    ).sum(0) / 2
    want_grad_b2 = (-_sigmoid(-real_logit) + _sigmoid(fake_logit)).sum() / 2

    head = _head()
    loss = gan_critic_loss(head(real), head(fake))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(want_critic, rel=1e-6)
    np.testing.assert_allclose(head.out.weight.grad.numpy()[0], want_grad_w2, rtol=1e-5)
    assert float(head.out.bias.grad) == pytest.approx(want_grad_b2, rel=1e-5)

    # the generator's loss: −log σ(D(fake)); its gradient on the tokens is −σ(−l)/B · ∂l/∂tokens
    head = _head()
    tokens = fake.clone().requires_grad_(True)
    loss = gan_generator_loss(head(tokens))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(want_generator, rel=1e-6)
    pooled = fake.numpy().mean(1)
    pre = pooled @ W1.T + b1
    dsilu = _sigmoid(pre) * (1 + pre * (1 - _sigmoid(pre)))
    dlogit_dpooled = (w2 * dsilu) @ W1  # (B, D)
    want_tokens = (-_sigmoid(-fake_logit)[:, None] / 2 * dlogit_dpooled)[:, None, :].repeat(2, 1) / 2
    np.testing.assert_allclose(tokens.grad.numpy(), want_tokens, rtol=1e-5, atol=1e-7)


def test_critic_real_samples_are_the_cached_teacher_clips():
    batch = _batch()
    zeros = _batch()
    zeros.latents_BCTHW = torch.zeros_like(batch.latents_BCTHW)
    losses = {}
    for weight in (0.0, 0.5):
        for name, b in (("clips", batch), ("zeros", zeros)):
            method, _ = _method(_params(guidance_cls_loss_weight=weight) if weight else _params())
            losses[weight, name] = float(method.critic_loss(b, _gen())[0].detach())
    assert losses[0.5, "clips"] != pytest.approx(losses[0.5, "zeros"], rel=1e-6)
    # without the GAN term the rollout from noise reads no clip at all
    assert losses[0.0, "clips"] == losses[0.0, "zeros"]


def test_regression_pairs_survive_caption_dropout_and_frame_truncation():
    """The regression reads the teacher's pair as the teacher made it: the whole clip under its own caption."""
    params = _params(
        regression_loss_weight=1.0,
        num_training_frames=3,
        num_frame_per_block=3,
        last_step_only=True,
        train={"caption_dropout_probability": 0.99},
    )
    method, spies = _method(params)
    batch = _batch(noise=True)
    _, m = method.generator_loss(batch, _gen())
    rollout_call, regression_call = spies["student"].calls[0], spies["student"].calls[-2:]
    assert torch.all(rollout_call.c == 0)  # the rollout's captions were dropped (empty prompt = zeros here)
    # the regression's student passes: the teacher's noise block by block, under the teacher's own captions
    first, second = regression_call
    torch.testing.assert_close(first.c, batch.prompt_embeds_BLD)
    torch.testing.assert_close(first.x, batch.noise_BCTHW[:, :, :3])
    torch.testing.assert_close(second.x[:, :, 3:], batch.noise_BCTHW[:, :, 3:])
    # the loss is against the whole cached clip: recompute it from the student's own two passes by hand
    student = spies["student"].fn
    with torch.no_grad():
        x0_first = first.x - student(first.x, first.t, first.c)
        x0_second = second.x[:, :, 3:] - student(second.x, second.t, second.c)[:, :, 3:]
    want = ((torch.cat([x0_first, x0_second], 2) - batch.latents_BCTHW) ** 2).mean()
    assert m["regression_loss"] == pytest.approx(float(want), rel=1e-5)


def test_consistency_step_by_hand():
    grid = teacher_sigma_grid(4, 3.0)
    t = np.array([1.0, 0.75, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(grid.numpy(), 3 * t / (1 + 2 * t), rtol=1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 2, 2, generator=g)
    x0 = torch.randn(2, 3, 2, 2, 2, generator=g)
    sa, sb = torch.tensor([0.9, 0.4]), torch.tensor([0.6, 0.0])
    v = (x - x0) / sa.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(euler_step(x, x0, sa, sb), x + (sb - sa).view(-1, 1, 1, 1, 1) * v)
    assert torch.allclose(euler_step(x, x0, sa, sb)[1], x0[1])  # σ' = 0 lands on the teacher's x0
    online = x.clone().requires_grad_(True)
    target = x0.clone().requires_grad_(True)
    consistency_loss(online, target).backward()
    torch.testing.assert_close(online.grad, 2 * (x - x0) / x.numel())
    assert target.grad is None  # the target is a stop-gradient


def _starts(n_per_caption: int, captions: list[str], seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    out_starts, out_captions = [], []
    for caption in captions:
        for _ in range(n_per_caption):
            out_starts.append(tuple(rng.uniform(0, 10 * scale, 2)))
            out_captions.append(caption)
    return out_starts, out_captions


def test_variety_against_the_judge_and_by_hand():
    from dmd.core.config import ToyConfig
    from dmd.toy.judge import judge_clips, start_variety
    from dmd.toy.world import ToyWorld

    world = ToyWorld(ToyConfig())
    captions = [c for c in world.captions("held_out")[:2] for _ in range(5)]
    rng = np.random.default_rng(1)
    clips = [world.sample_clip(c, rng) for c in captions]
    judged = judge_clips(clips, captions, world)
    variety = start_variety(judged, world, num_resamples=50)
    assert variety["diversity"] == pytest.approx(judged["diversity"], rel=1e-9)
    # pairwise: one caption, three clips at known starts, the real ones at known starts
    got = start_position_variety(
        [(0, 0), (3, 4), (0, 8)], ["a"] * 3, [(0, 0), (0, 2), (0, 4)], ["a"] * 3, num_resamples=10
    )
    assert got["pairwise_diversity"] == pytest.approx(((5 + 8 + 5) / 3) / ((2 + 4 + 2) / 3))
    assert got["clips_per_caption"] == 3


def test_variety_spread_is_the_seed_to_seed_spread_and_shrinks_with_more_clips():
    captions = ["a", "b", "c"]
    real = _starts(64, captions, seed=99)
    # over independent seed draws, the figure's own standard deviation ≈ the bootstrap spread of one draw
    draws = [start_position_variety(*_starts(8, captions, s), *real, num_resamples=300) for s in range(40)]
    observed = np.std([d["pairwise_diversity"] for d in draws], ddof=1)
    estimated = np.mean([d["pairwise_diversity_spread"] for d in draws])
    assert 0.6 < estimated / observed < 1.5
    many = start_position_variety(*_starts(64, captions, 0), *real, num_resamples=300)
    assert many["pairwise_diversity_spread"] < 0.5 * estimated
    assert many["pairwise_diversity"] == pytest.approx(1.0, abs=0.1)  # same distribution as the real starts
    narrow = start_position_variety(*_starts(64, captions, 0, scale=0.5), *real, num_resamples=50)
    assert narrow["pairwise_diversity"] == pytest.approx(0.5, abs=0.07)


def test_evaluation_headline_reports_diversity_with_its_spread_for_teacher_and_student():
    from dmd.evaluation.evaluate import headline

    judge = {
        "teacher_full": {"diversity": 0.8, "diversity_spread": 0.04, "pairwise_diversity": 0.9,
                         "pairwise_diversity_spread": 0.05, "fd": 0.2},
        "student": {"diversity": 0.6, "diversity_spread": 0.03, "pairwise_diversity": 0.7,
                    "pairwise_diversity_spread": 0.04, "fd": 0.1},
    }  # fmt: skip
    metrics = {
        name: {"nfe": 3, "seconds_per_video": 1.0, "dit_seconds_per_video": 0.5, "judge": j}
        for name, j in judge.items()
    }
    out = headline(metrics)
    for name in ("teacher_full", "student"):
        assert out["variety"][name] == {k: v for k, v in judge[name].items() if k != "fd"}
    assert out["student"]["diversity"] == 0.6
