"""Every `distillation_config` key changes behaviour the way it says (one test per key, named after it).

The roles run a tiny Wan transformer; spies record what each role is shown and pass the call through.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from dmd.core.config import DistillationConfig, Params
from dmd.core.flow_matching import denoising_sigmas
from dmd.distill.method import DMDMethod
from dmd.distill.roles import make_roles
from dmd.distill.rollout import RolloutSchedule
from dmd.training.optim import build_critic_optimizer, build_groups
from dmd.wan.tiny import build_transformer

FRAMES = 6


def _params(train=None, **dc) -> Params:
    dc = {"num_training_frames": FRAMES, "num_frame_per_block": FRAMES, "fake_score_lora_rank": 2, **dc}
    return Params.model_validate(
        {"train": {"lora_rank": 2, "lora_alpha": 2, **(train or {}), "distillation_config": dc}}
    )


class Spy:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, frame_timesteps_BT, c):
        self.calls.append(
            SimpleNamespace(
                x=x.detach().clone(), t=frame_timesteps_BT.clone(), c=c.clone(), requires_grad=x.requires_grad
            )
        )
        return self.fn(x, frame_timesteps_BT, c)


def _method(params: Params, seed: int = 0):
    torch.manual_seed(seed)
    roles = make_roles(build_transformer(num_layers=1), params.train)
    spies = {}
    for role in ("student", "real", "fake"):
        spies[role] = Spy(getattr(roles, role))
        setattr(roles, role, spies[role])
    negative = torch.full((1, 5, 32), 0.5)
    return DMDMethod(
        params, roles, RolloutSchedule.from_params(params), negative, torch.zeros(1, 5, 32)
    ), spies


def _batch(b=2, frames=FRAMES, noise=False):
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        latents_BCTHW=torch.randn(b, 4, frames, 4, 4, generator=g),
        prompt_embeds_BLD=torch.randn(b, 5, 32, generator=g),
        noise_BCTHW=torch.randn(b, 4, frames, 4, 4, generator=g) if noise else None,
        captions=["x"] * b,
        keys=[str(i) for i in range(b)],
    )


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _student_timesteps(spy) -> list[float]:
    return [float(call.t[0, -1]) for call in spy.calls]


def _score_sigmas(params, n=40, role="fake", loss="critic_loss"):
    method, spies = _method(params)
    gen = _gen()
    for _ in range(n):
        getattr(method, loss)(_batch(), gen)
    return torch.cat([call.t[:, 0] / 1000 for call in spies[role].calls])


def test_every_key_has_a_test():
    tests = {name for name in dir(sys.modules[__name__]) if name.startswith("test_key_")}
    missing = [k for k in DistillationConfig.model_fields if f"test_key_{k}" not in tests]
    assert not missing, f"distillation_config keys without a behaviour test: {missing}"


def test_key_dmd_denoising_steps():
    method, spies = _method(_params(dmd_denoising_steps=[1000, 600], last_step_only=True))
    method.generator_loss(_batch(), _gen())
    assert _student_timesteps(spies["student"]) == pytest.approx([1000.0, 600.0])


def test_key_warp_denoising_steps():
    params = _params(warp_denoising_steps=True, last_step_only=True)
    params.model.flow_schedule_shift = 5.0
    method, spies = _method(params)
    method.generator_loss(_batch(), _gen())
    want = (denoising_sigmas([1000, 757, 522], 5.0) * 1000).tolist()
    assert _student_timesteps(spies["student"]) == pytest.approx(want, rel=1e-5)
    assert want[1] > 757 and want[2] > 522


def test_key_generator_update_interval():
    method, _ = _method(_params(generator_update_interval=4))
    assert [s for s in range(12) if method.updates_generator(s)] == [0, 4, 8]
    method, _ = _method(_params())
    assert all(method.updates_generator(s) for s in range(5))


def test_key_real_score_guidance_scale():
    results = {}
    for scale in (1.0, 3.0):
        method, spies = _method(_params(real_score_guidance_scale=scale))
        loss, m = method.generator_loss(_batch(), _gen())
        (call,) = spies["real"].calls
        results[scale] = (call, m["dmd_gradient_abs"])
    assert results[1.0][0].x.shape[0] == 2
    with_cfg = results[3.0][0]
    assert with_cfg.x.shape[0] == 4 and torch.all(with_cfg.c[2:] == 0.5)  # negative prompt as unconditional
    assert results[1.0][1] != pytest.approx(results[3.0][1])


def _fake_x0_by_hand(w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(f from the method, f = F_c + w·(F_c − F_u) computed by hand from the critic's own two passes)."""
    method, spies = _method(_params(fake_score_guidance_scale=w, last_step_only=True))
    captured = {}
    real_dmd_gradient = sys.modules["dmd.distill.method"].dmd_gradient

    def capture(x0, real_x0, fake_x0):
        captured["f"] = fake_x0
        return real_dmd_gradient(x0, real_x0, fake_x0)

    sys.modules["dmd.distill.method"].dmd_gradient = capture
    try:
        method.generator_loss(_batch(), _gen())
    finally:
        sys.modules["dmd.distill.method"].dmd_gradient = real_dmd_gradient
    call = spies["fake"].calls[0]
    b = 2
    x, t = call.x[:b], call.t[:b]
    sigma = t[:, 0] / 1000
    fake = spies["fake"].fn
    with torch.no_grad():
        x0_c = x - sigma.view(-1, 1, 1, 1, 1) * fake(x, t, call.c[:b])
        x0_u = x - sigma.view(-1, 1, 1, 1, 1) * fake(x, t, torch.full_like(call.c[:b], 0.5))
    return captured["f"], x0_c + w * (x0_c - x0_u)


def test_key_fake_score_guidance_scale():
    # 0: the conditional critic alone, one pass
    method, spies = _method(_params(fake_score_guidance_scale=0.0))
    method.generator_loss(_batch(), _gen())
    assert spies["fake"].calls[0].x.shape[0] == 2
    # w: Self-Forcing's F_c + w·(F_c − F_u), negative prompt as the unconditional side
    for w in (0.5, 1.5):
        got, want = _fake_x0_by_hand(w)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # continuous at 0: a tiny w is the conditional score, not the unconditional one
    f0, _ = _fake_x0_by_hand(0.0)
    f_tiny, _ = _fake_x0_by_hand(1e-3)
    f_one, _ = _fake_x0_by_hand(1.0)
    assert (f_tiny - f0).abs().max() < 1e-2 * (f_one - f0).abs().max()


@pytest.mark.parametrize(
    "key,value,group_key",
    [
        ("fake_score_lr", 3e-4, "lr"),
        ("fake_score_weight_decay", 0.2, "weight_decay"),
        ("fake_score_betas", (0.0, 0.99), "betas"),
        ("fake_score_eps", 1e-6, "eps"),
    ],
)
def test_key_fake_score_optimizer(key, value, group_key):
    method, _ = _method(_params(**{key: value}))
    opt = build_critic_optimizer(method.params, method.critic_parameters())
    assert opt.param_groups[0][group_key] == value
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in method.critic_parameters()}


test_key_fake_score_lr = test_key_fake_score_weight_decay = test_key_fake_score_betas = (
    test_key_fake_score_eps
) = test_key_fake_score_optimizer


@pytest.mark.parametrize("clip", [0.0, 1e-4])
def test_key_fake_score_grad_clip(clip):
    method, _ = _method(_params(fake_score_grad_clip=clip))
    _, critic = build_groups(method.params, method, total_steps=1)
    seen = {}
    step = critic.optimizer.step

    def clipped_step():  # the gradients the critic's optimizer steps with
        seen["norm"] = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in critic.params])))
        step()

    critic.optimizer.step = clipped_step
    before = critic.update(lambda batch: method.critic_loss(batch, _gen()), [_batch()]).grad_norm
    assert seen["norm"] == pytest.approx(before if clip == 0 else clip, rel=1e-3)


def test_key_fake_score_lora_rank():
    method, _ = _method(_params(fake_score_lora_rank=3))
    assert method.roles.critic_copy is None
    assert {p.shape[0] for n, p in method.roles.base.named_parameters() if "lora_A.critic" in n} == {3}
    method, _ = _method(_params(fake_score_lora_rank=None))
    assert method.roles.critic_copy is not None
    assert sum(p.numel() for p in method.critic_parameters()) == sum(
        p.numel() for n, p in method.roles.base.named_parameters() if "lora_" not in n
    )


def test_key_fake_score_lora_alpha():
    for alpha, want in ((None, 1.0), (6.0, 2.0)):
        method, _ = _method(_params(fake_score_lora_rank=3, fake_score_lora_alpha=alpha))
        assert method.roles.base.blocks[0].attn1.to_q.scaling["critic"] == want


def test_key_min_timestep_ratio():
    sigma = _score_sigmas(_params(min_timestep_ratio=0.6, ts_schedule=False))
    assert sigma.min() >= 0.6 - 1e-4 and sigma.max() <= 0.98 + 1e-4


def test_key_max_timestep_ratio():
    sigma = _score_sigmas(_params(max_timestep_ratio=0.3, ts_schedule=False))
    assert sigma.max() <= 0.3 + 1e-4 and sigma.min() >= 0.02 - 1e-4
    # clamped after the shift: at timestep_shift 5 every u above shift⁻¹(0.9) lands on 0.9 exactly
    sigma = _score_sigmas(_params(max_timestep_ratio=0.9, ts_schedule=False, timestep_shift=5.0), n=100)
    u_star = 0.9 / (5 - 4 * 0.9)
    assert float((sigma >= 0.9 - 1e-4).float().mean()) == pytest.approx(1 - u_star, abs=0.06)


def test_key_timestep_shift():
    plain = _score_sigmas(_params(ts_schedule=False))
    shifted = _score_sigmas(_params(ts_schedule=False, timestep_shift=5.0))
    assert shifted.mean() > plain.mean() + 0.15


def test_key_min_score_timestep():
    sigma = _score_sigmas(_params(ts_schedule=False, min_score_timestep=700))
    assert sigma.min() >= 0.7 - 1e-4
    # with per-block exits there is no ts_schedule floor, so min_score_timestep is the floor
    sigma = _score_sigmas(_params(ts_schedule=True, same_step_across_blocks=False, min_score_timestep=700))
    assert sigma.min() >= 0.7 - 1e-4
    # a ts_schedule floor replaces it (Self-Forcing): the last step's floor is 0
    sigma = _score_sigmas(
        _params(ts_schedule=True, same_step_across_blocks=True, last_step_only=True, min_score_timestep=700)
    )
    assert sigma.min() < 0.5


def _exit_and_score_sigmas(params, n=30):
    """(exit σ, score σs) per generator step of a one-block clip."""
    method, spies = _method(params)
    gen, out = _gen(), []
    for _ in range(n):
        spies["student"].calls.clear()
        spies["fake"].calls.clear()
        method.generator_loss(_batch(), gen)
        out.append((float(spies["student"].calls[-1].t[0, 0]) / 1000, spies["fake"].calls[0].t[:, 0] / 1000))
    return out


def test_key_ts_schedule():
    next_sigma = {1.0: 0.757, 0.757: 0.522, 0.522: 0.0}
    on = _exit_and_score_sigmas(_params(ts_schedule=True, same_step_across_blocks=True))
    assert all(float(s.min()) >= next_sigma[round(e, 3)] - 1e-4 for e, s in on)
    assert {round(e, 3) for e, _ in on} == {1.0, 0.757, 0.522}
    off = _exit_and_score_sigmas(_params(ts_schedule=False, same_step_across_blocks=True))
    assert any(float(s.min()) < next_sigma[round(e, 3)] for e, s in off)
    # the floor is the next step as written, shifted with u afterwards: at timestep_shift 3 it is shift(0.757)
    shifted = _exit_and_score_sigmas(
        _params(ts_schedule=True, same_step_across_blocks=True, timestep_shift=3.0)
    )
    floors = {1.0: 3 * 0.757 / (1 + 2 * 0.757), 0.757: 3 * 0.522 / (1 + 2 * 0.522), 0.522: 0.0}
    assert all(float(s.min()) >= floors[round(e, 3)] - 1e-4 for e, s in shifted)
    # per-block exits (same_step_across_blocks false): no floor, even for one block, as in Self-Forcing
    free = _exit_and_score_sigmas(_params(ts_schedule=True, same_step_across_blocks=False))
    assert any(float(s.min()) < next_sigma[round(e, 3)] for e, s in free)


def test_key_ts_schedule_max():
    bounded = {"last_step_only": True, "same_step_across_blocks": True}
    sigma = _score_sigmas(_params(ts_schedule_max=True, **bounded))
    assert sigma.max() <= 0.522 + 1e-4
    sigma = _score_sigmas(_params(ts_schedule_max=False, **bounded))
    assert sigma.max() > 0.8
    sigma = _score_sigmas(_params(ts_schedule_max=True, last_step_only=True, same_step_across_blocks=False))
    assert sigma.max() > 0.8


def test_key_num_frame_per_block():
    method, spies = _method(_params(num_frame_per_block=3, last_step_only=True))
    method.generator_loss(_batch(), _gen())
    assert [c.x.shape[2] for c in spies["student"].calls] == [3, 3, 3, 6, 6, 6]


def test_key_independent_first_frame():
    method, spies = _method(
        _params(
            num_training_frames=5, num_frame_per_block=2, independent_first_frame=True, last_step_only=True
        )
    )
    method.generator_loss(_batch(frames=5), _gen())
    assert [c.x.shape[2] for c in spies["student"].calls][::3] == [1, 3, 5]


def test_key_same_step_across_blocks():
    def exits(same):
        method, spies = _method(_params(num_frame_per_block=1, same_step_across_blocks=same))
        gen, out = _gen(), []
        for _ in range(6):
            spies["student"].calls.clear()
            method.generator_loss(_batch(), gen)
            per_block = {}
            for c in spies["student"].calls:
                per_block[c.x.shape[2]] = float(c.t[0, -1])
            out.append(set(per_block.values()))
        return out

    assert all(len(s) == 1 for s in exits(True))
    assert any(len(s) > 1 for s in exits(False))
    # and only a shared exit bounds the score timestep (ts_schedule_max caps it at the last step's σ)
    capped = {"ts_schedule_max": True, "last_step_only": True, "num_frame_per_block": 3}
    assert _score_sigmas(_params(same_step_across_blocks=True, **capped)).max() <= 0.522 + 1e-4
    assert _score_sigmas(_params(same_step_across_blocks=False, **capped)).max() > 0.8


def test_key_last_step_only():
    method, spies = _method(_params(last_step_only=True))
    gen = _gen()
    for _ in range(5):
        spies["student"].calls.clear()
        _, m = method.generator_loss(_batch(), gen)
        assert m["exit_step"] == 2 and len(spies["student"].calls) == 3


def test_key_num_training_frames():
    """The rollout's length, as in Self-Forcing: shorter or longer than the cached clips."""
    for frames in (3, 9):
        method, spies = _method(_params(num_training_frames=frames, num_frame_per_block=3))
        method.critic_loss(_batch(frames=FRAMES), _gen())
        assert spies["fake"].calls[0].x.shape[2] == frames
        assert (
            max(c.x.shape[2] for c in spies["student"].calls) == frames
        )  # the last block sees all before it
    # what reads the teacher's clip frame by frame cannot run past it
    method, _ = _method(_params(num_training_frames=9, num_frame_per_block=3, rollout_from="data"))
    with pytest.raises(ValueError, match="num_training_frames=9 is longer than the cached clips"):
        method.critic_loss(_batch(frames=FRAMES), _gen())


def test_key_context_noise():
    seen = {}
    for noise in (0, 300):
        method, spies = _method(_params(num_frame_per_block=3, context_noise=noise, last_step_only=True))
        method.generator_loss(_batch(), _gen())
        second_block = spies["student"].calls[3]
        seen[noise] = second_block.x[:, :, :3]
        assert float(second_block.t[0, 0]) == noise and float(second_block.t[0, -1]) == 1000
    assert not torch.allclose(seen[0], seen[300])


def test_key_rollout_from():
    batch = _batch()
    method, spies = _method(_params(rollout_from="data", same_step_across_blocks=True))
    method.generator_loss(batch, _gen())
    (call,) = spies["student"].calls  # one student pass, at the exit step, from the data
    sigma = float(call.t[0, 0]) / 1000
    residual = (call.x - (1 - sigma) * batch.latents_BCTHW) / max(sigma, 1e-6)
    assert 0.7 < float(residual.std()) < 1.3  # the rest is unit noise
    method, spies = _method(_params(rollout_from="noise", last_step_only=True))
    method.generator_loss(batch, _gen())
    assert len(spies["student"].calls) == 3


def test_key_regression_loss_weight():
    method, spies = _method(_params(regression_loss_weight=0.5, last_step_only=True))
    batch = _batch(noise=True)
    loss, m = method.generator_loss(batch, _gen())
    assert m["generator_loss"] == pytest.approx(m["dmd_loss"] + 0.5 * m["regression_loss"], rel=1e-5)
    # the regression pass: one student step from the teacher's own noise
    assert torch.equal(spies["student"].calls[-1].x, batch.noise_BCTHW)
    _, plain = _method(_params(last_step_only=True))[0].generator_loss(batch, _gen())
    assert "regression_loss" not in plain
    with pytest.raises(ValueError, match="save_noise"):
        method.generator_loss(_batch(noise=False), _gen())


def _fake_calls_with_grad(spy) -> int:
    return sum(1 for call in spy.calls if call.requires_grad)


def test_key_gen_cls_loss_weight():
    gan = {"guidance_cls_loss_weight": 0.1, "last_step_only": True}
    method, spies = _method(_params(gen_cls_loss_weight=0.5, **gan))
    batch = _batch()
    loss, m = method.generator_loss(batch, _gen())
    assert m["generator_loss"] == pytest.approx(m["dmd_loss"] + 0.5 * m["gen_cls_loss"], rel=1e-5)
    # one more critic pass than the DMD score needs, on the same noised clip: x̂0 carries the student's gradient
    assert len(spies["fake"].calls) == 2 and _fake_calls_with_grad(spies["fake"]) == 1
    torch.testing.assert_close(spies["fake"].calls[1].x, spies["fake"].calls[0].x)
    loss.backward()
    assert all(p.grad is not None for p in method.student_parameters())
    method, spies = _method(_params(gen_cls_loss_weight=0.0, **gan))
    _, m = method.generator_loss(batch, _gen())
    assert "gen_cls_loss" not in m and len(spies["fake"].calls) == 1
    with pytest.raises(ValueError, match="needs guidance_cls_loss_weight"):
        _params(gen_cls_loss_weight=0.5)


def test_key_guidance_cls_loss_weight():
    method, spies = _method(_params(guidance_cls_loss_weight=0.25))
    batch = _batch()
    loss, m = method.critic_loss(batch, _gen())
    assert float(loss.detach()) == pytest.approx(m["critic_loss"] + 0.25 * m["guidance_cls_loss"], rel=1e-5)
    # the critic sees the student's clip and then the cached teacher clip, both at the same σ
    student_call, real_call = spies["fake"].calls
    sigma = (real_call.t[:, 0] / 1000).view(-1, 1, 1, 1, 1)
    assert torch.equal(real_call.t, student_call.t)
    # the real sample is (1 − σ)·clip + σ·ε: other clips with the same draws move it by (1 − σ)·Δclip exactly
    shifted = _batch()
    shifted.latents_BCTHW = batch.latents_BCTHW + 1.0
    method.critic_loss(shifted, _gen())
    torch.testing.assert_close(spies["fake"].calls[-1].x - real_call.x, (1 - sigma).expand_as(real_call.x))
    spies["fake"].calls = spies["fake"].calls[:2]
    # the head trains with the critic
    head = list(method.gan_head.parameters())
    assert {id(p) for p in head} <= {
        id(p)
        for p in build_critic_optimizer(method.params, method.critic_parameters()).param_groups[0]["params"]
    }
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    method, spies = _method(_params(guidance_cls_loss_weight=0.0))
    _, m = method.critic_loss(batch, _gen())
    assert "guidance_cls_loss" not in m and len(spies["fake"].calls) == 1 and method.gan_head is None


def test_key_cls_feature_layer():
    torch.manual_seed(0)
    params = _params(guidance_cls_loss_weight=0.1, fake_score_lora_rank=None)
    roles = make_roles(build_transformer(num_layers=3), params.train)
    method = DMDMethod(
        params, roles, RolloutSchedule.from_params(params), torch.full((1, 5, 32), 0.5), torch.zeros(1, 5, 32)
    )
    assert method.gan_tap.layer == 1  # None: the middle block
    seen = {}
    for layer in (0, 2):
        params = _params(guidance_cls_loss_weight=0.1, fake_score_lora_rank=None, cls_feature_layer=layer)
        method = DMDMethod(
            params,
            roles,
            RolloutSchedule.from_params(params),
            torch.full((1, 5, 32), 0.5),
            torch.zeros(1, 5, 32),
        )
        method.critic_loss(_batch(), _gen())
        seen[layer] = method.gan_tap.features.detach()
        method.gan_tap.remove()
    assert not torch.allclose(seen[0], seen[2])
    with pytest.raises(ValueError, match="cls_feature_layer=3"):
        params = _params(guidance_cls_loss_weight=0.1, cls_feature_layer=3, fake_score_lora_rank=None)
        DMDMethod(
            params,
            roles,
            RolloutSchedule.from_params(params),
            torch.full((1, 5, 32), 0.5),
            torch.zeros(1, 5, 32),
        )


def test_key_consistency_loss_weight():
    method, spies = _method(_params(consistency_loss_weight=2.0, last_step_only=True))
    batch = _batch(noise=True)
    _, m = method.generator_loss(batch, _gen())
    assert m["generator_loss"] == pytest.approx(m["dmd_loss"] + 2.0 * m["consistency_loss"], rel=1e-5)
    # the teacher's step starts on its own (noise → clip) pair, the student's online pass at the same point
    online = spies["student"].calls[-1]
    teacher_call = spies["real"].calls[-1]
    sigma = online.t[:, 0] / 1000
    want = (1 - sigma.view(-1, 1, 1, 1, 1)) * batch.latents_BCTHW + sigma.view(
        -1, 1, 1, 1, 1
    ) * batch.noise_BCTHW
    torch.testing.assert_close(online.x, want)
    torch.testing.assert_close(teacher_call.x[:2], want)
    # the target pass sits one grid step further down, at x_b = Euler step of the guided teacher
    target = spies["student"].calls[-2]
    assert bool((target.t[:, 0] < online.t[:, 0]).all())
    _, plain = _method(_params(last_step_only=True))[0].generator_loss(batch, _gen())
    assert "consistency_loss" not in plain
    with pytest.raises(ValueError, match="save_noise"):
        method.generator_loss(_batch(noise=False), _gen())
    method, _ = _method(_params(consistency_loss_weight=2.0, num_frame_per_block=3))
    with pytest.raises(ValueError, match="one-block student"):
        method.generator_loss(batch, _gen())


def test_key_consistency_grid_steps():
    from dmd.core.flow_matching import shift_sigma

    params = _params(consistency_loss_weight=1.0, last_step_only=True, consistency_grid_steps=2)
    params.model.flow_schedule_shift = 3.0
    method, spies = _method(params)
    pairs = set()
    for seed in range(8):
        spies["student"].calls.clear()
        method.generator_loss(_batch(noise=True), _gen(seed))
        online, target = spies["student"].calls[-1], spies["student"].calls[-2]
        pairs |= {(round(float(a), 4), round(float(b), 4)) for a, b in zip(online.t[:, 0], target.t[:, 0])}
    half = round(float(shift_sigma(torch.tensor(0.5), 3.0)) * 1000, 4)
    assert pairs == {(1000.0, half), (half, 0.0)}


def test_key_critic_reuses_generator_rollout():
    """The critic's loss on the generator step's own rollout equals a separate rollout's with the same noise."""
    batch = _batch()

    def states_at_student_calls(method, spies, g):
        states = []
        fn = spies["student"].fn
        spies["student"].fn = lambda *a: (states.append(g.get_state()), fn(*a))[1]
        return states

    # separate: the critic rolls out itself; the generator state after its last student pass is what the critic's
    # own σ and noise are drawn from
    separate, spies = _method(_params(critic_reuses_generator_rollout=False))
    g = _gen(3)
    states = states_at_student_calls(separate, spies, g)
    separate_loss, _ = separate.critic_loss(batch, g)
    after_rollout = states[-1]
    # reused: the generator step rolls out with the same draws; the critic starts from the same generator state
    reused, spies = _method(_params(critic_reuses_generator_rollout=True))
    reused.generator_loss(batch, _gen(3))
    spies["student"].calls.clear()
    reused_loss, m = reused.critic_loss(batch, torch.Generator().set_state(after_rollout))
    assert spies["student"].calls == []  # no second rollout
    assert float(reused_loss) == pytest.approx(float(separate_loss), rel=1e-6)
    # a new batch object is not the one the generator saw: the critic rolls out again
    reused.critic_loss(_batch(), _gen())
    assert spies["student"].calls
    # off, the same call sequence rolls out again, from other draws
    off, spies = _method(_params(critic_reuses_generator_rollout=False))
    off.generator_loss(batch, _gen(3))
    spies["student"].calls.clear()
    off_loss, _ = off.critic_loss(batch, torch.Generator().set_state(after_rollout))
    assert spies["student"].calls and float(off_loss) != pytest.approx(float(separate_loss), rel=1e-6)
