"""The three roles on one base: the teacher stays the teacher, each update touches only its own weights."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from dmd.core.config import Params
from dmd.distill.method import DMDMethod
from dmd.distill.roles import RoleError, build_roles, make_roles
from dmd.distill.rollout import RolloutSchedule
from dmd.training.optim import build_critic_optimizer
from dmd.wan.loading import quantize_int8
from dmd.wan.tiny import build_transformer


def _params(**dc) -> Params:
    return Params.model_validate(
        {
            "train": {
                "lora_rank": 4,
                "lora_alpha": 4,
                "distillation_config": {"num_training_frames": 2, "num_frame_per_block": 2, **dc},
            }
        }
    )


def _batch(b=2):
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        latents_BCTHW=torch.randn(b, 4, 2, 4, 4, generator=g),
        prompt_embeds_BLD=torch.randn(b, 5, 32, generator=g),
        noise_BCTHW=None,
        captions=["x"] * b,
        keys=[str(i) for i in range(b)],
    )


def _method(roles, params):
    return DMDMethod(
        params, roles, RolloutSchedule.from_params(params), torch.zeros(1, 5, 32), torch.zeros(1, 5, 32)
    )


def _perturb_adapter(model, adapter):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{adapter}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _inputs():
    g = torch.Generator().manual_seed(2)
    return (
        torch.randn(2, 4, 2, 4, 4, generator=g),
        torch.full((2, 2), 600.0),
        torch.randn(2, 5, 32, generator=g),
    )


def _snapshot(*modules):
    return {
        (i, n): p.detach().clone()
        for i, m in enumerate(modules)
        if m is not None
        for n, p in m.named_parameters()
    }


def _changed(before, *modules):
    after = _snapshot(*modules)
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_real_score_is_the_untouched_teacher_while_student_lora_is_nonzero():
    base = build_transformer(num_layers=1)
    teacher = copy.deepcopy(base)
    roles = make_roles(base, _params(fake_score_lora_rank=4).train)
    _perturb_adapter(base, "student")
    _perturb_adapter(base, "critic")
    x, t, c = _inputs()
    with torch.no_grad():
        want = teacher(x, t[:, 0], c, return_dict=False)[0]
        student = roles.student(x, t, c)
        real = roles.real(x, t, c)
        fake = roles.fake(x, t, c)
        real_again = roles.real(x, t, c)
    torch.testing.assert_close(real, want)
    torch.testing.assert_close(real_again, want)
    assert not torch.allclose(student, want, atol=1e-4) and not torch.allclose(fake, want, atol=1e-4)
    assert not torch.allclose(student, fake, atol=1e-4)


@pytest.mark.parametrize("critic_rank", [4, None])
def test_critic_step_changes_only_the_critic_and_generator_step_only_the_student(critic_rank):
    params = _params(fake_score_lora_rank=critic_rank, real_score_guidance_scale=2.0)
    roles = make_roles(build_transformer(num_layers=1), params.train)
    method = _method(roles, params)
    critic_ids = {id(p) for p in method.critic_parameters()}
    student_ids = {id(p) for p in method.student_parameters()}
    names = {
        (i, n): id(p)
        for i, m in enumerate((roles.base, roles.critic_copy))
        if m is not None
        for n, p in m.named_parameters()
    }
    gen = torch.Generator().manual_seed(0)

    before = _snapshot(roles.base, roles.critic_copy)
    opt = build_critic_optimizer(method.params, method.critic_parameters())
    loss, _ = method.critic_loss(_batch(), gen)
    loss.backward()
    opt.step()
    changed = _changed(before, roles.base, roles.critic_copy)
    assert changed and {names[k] for k in changed} <= critic_ids
    assert all(p.grad is None for p in method.student_parameters())

    opt.zero_grad(set_to_none=True)
    # make the student's LoRA non-zero so its A factors receive gradient too
    _perturb_adapter(roles.base, "student")
    before = _snapshot(roles.base, roles.critic_copy)
    student_opt = torch.optim.SGD(method.student_parameters(), lr=1.0)
    loss, metrics = method.generator_loss(_batch(), gen)
    loss.backward()
    student_opt.step()
    changed = _changed(before, roles.base, roles.critic_copy)
    assert changed and {names[k] for k in changed} <= student_ids
    assert all(p.grad is None for p in method.critic_parameters())
    assert metrics["dmd_loss"] > 0


def test_full_student_is_a_trainable_copy_and_base_stays_teacher():
    params = _params(fake_score_lora_rank=4)
    params.train.student.model_type = "full"
    base = build_transformer(num_layers=1)
    roles = make_roles(base, params.train)
    assert roles.student_copy is not None and roles.critic_copy is None
    assert {id(p) for p in roles.student_parameters()} == {id(p) for p in roles.student_copy.parameters()}
    assert all(not p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)


def test_start_up_checks_catch_a_trainable_teacher():
    roles = make_roles(build_transformer(num_layers=1), _params(fake_score_lora_rank=4).train)
    roles.base.proj_out.weight.requires_grad_(True)
    with pytest.raises(RoleError, match="teacher's weights must be frozen.*proj_out"):
        roles.check()


def test_int8_base_with_full_copies_copies_the_float_weights():
    """The seed's config: int8 base, full-copy critic. The copies are taken before quantization, so they are the
    teacher's float weights and train; the base (the real score) is int8."""
    from optimum.quanto import QModuleMixin

    params = _params()
    params.train.student.model_type = "full"
    base = build_transformer(num_layers=1).requires_grad_(False)
    float_weight = base.blocks[0].attn1.to_q.weight.detach().clone()
    roles = make_roles(base, params.train, quantize_base=quantize_int8)
    for copy_ in (roles.student_copy, roles.critic_copy):
        assert not isinstance(copy_.blocks[0].attn1.to_q, QModuleMixin)
        assert torch.equal(copy_.blocks[0].attn1.to_q.weight, float_weight)
        assert copy_.blocks[0].attn1.to_q.weight.requires_grad
    assert isinstance(roles.base.blocks[0].attn1.to_q, QModuleMixin)
    method = _method(roles, params)
    loss, m = method.critic_loss(_batch(), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in method.critic_parameters() if p.requires_grad)


def test_int8_quanto_base_with_lora_student_and_lora_critic_trains_on_cpu():
    params = _params(fake_score_lora_rank=4)
    base = build_transformer(num_layers=1).requires_grad_(False)
    roles = make_roles(base, params.train, quantize_base=quantize_int8)
    method = _method(roles, params)
    critic_opt = build_critic_optimizer(params, method.critic_parameters())
    student_opt = torch.optim.AdamW(method.student_parameters(), lr=1e-3)
    student_before = [p.detach().clone() for p in method.student_parameters()]
    critic_before = [p.detach().clone() for p in method.critic_parameters()]
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        loss, m = method.critic_loss(_batch(), gen)
        critic_opt.zero_grad()
        loss.backward()
        critic_opt.step()
        loss, g = method.generator_loss(_batch(), gen)
        student_opt.zero_grad()
        loss.backward()
        student_opt.step()
        assert torch.isfinite(torch.tensor([m["critic_loss"], g["generator_loss"]])).all()
    assert any(not torch.equal(a, p) for a, p in zip(student_before, method.student_parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(critic_before, method.critic_parameters()))


def test_build_roles_loads_the_teacher_from_params(tiny_params):
    roles = build_roles(tiny_params)
    assert roles.student_adapter == "student"
    assert roles.critic_adapter is None and roles.critic_copy is not None
