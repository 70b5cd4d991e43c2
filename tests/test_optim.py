"""Optimisation keys: AdamW with fp32 master weights, lr schedules, clipping, accumulation, non-finite skips."""

from __future__ import annotations

import math

import pytest
import torch

from dmd.core.config import TrainConfig
from dmd.training.checkpoint import flatten_state, unflatten_state
from dmd.training.loop import planned_steps
from dmd.training.optim import (
    AdamWMasterWeights,
    TrainableGroup,
    build_lr_scheduler,
    build_optimizer,
    clip_gradients,
)

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


def _grads(n_steps: int, shape=(7, 5), seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n_steps)]


def _run(opt, p, grads):
    for grad in grads:
        p.grad = grad.to(p.dtype)
        opt.step()


def test_master_weights_equal_torch_adamw_on_fp32():
    start = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    ours, ref = start.clone().requires_grad_(), start.clone().requires_grad_()
    grads = _grads(20)
    _run(AdamWMasterWeights([ours], **HYPER), ours, grads)
    _run(torch.optim.AdamW([ref], foreach=False, **HYPER), ref, grads)
    assert torch.equal(ours, ref)


def test_adamw_bf16_keeps_updates_that_bf16_rounds_away():
    """bf16 weights near 1 have a step of 2^-7; lr 1e-4 updates vanish in plain bf16 AdamW, not with masters."""
    hyper = dict(HYPER, lr=1e-4, weight_decay=0.0)
    start = torch.ones(64)
    grads = [torch.ones(64)] * 50
    plain = start.to(torch.bfloat16).requires_grad_()
    _run(torch.optim.AdamW([plain], foreach=False, **hyper), plain, grads)
    assert torch.equal(plain.float(), start), "plain bf16 AdamW should lose these updates"

    ours = start.to(torch.bfloat16).requires_grad_()
    opt = build_optimizer([ours], "adamw_bf16", **hyper)
    _run(opt, ours, grads)
    fp32 = start.clone().requires_grad_()
    _run(torch.optim.AdamW([fp32], foreach=False, **hyper), fp32, grads)
    master = opt.state[ours]["master"]
    assert master.dtype == torch.float32 and torch.equal(master, fp32.detach())
    assert torch.equal(ours, fp32.detach().to(torch.bfloat16))
    assert (ours.float() < 1).all()  # 50 × 1e-4 = 5e-3 moved the bf16 weights by a bf16 step or more


def test_adamw_bf16_state_survives_a_checkpoint_round_trip():
    grads = _grads(12)
    hyper = dict(HYPER, lr=1e-3)
    straight = torch.ones(7, 5, dtype=torch.bfloat16, requires_grad=True)
    opt = AdamWMasterWeights([straight], **hyper)
    _run(opt, straight, grads)

    first = torch.ones(7, 5, dtype=torch.bfloat16, requires_grad=True)
    opt1 = AdamWMasterWeights([first], **hyper)
    _run(opt1, first, grads[:5])
    structure, tensors = flatten_state(opt1.state_dict())
    resumed = first.detach().clone().requires_grad_()
    opt2 = AdamWMasterWeights([resumed], **hyper)
    opt2.load_state_dict(unflatten_state(structure, tensors))
    assert all(opt2.state[resumed][k].dtype == torch.float32 for k in ("master", "exp_avg", "exp_avg_sq"))
    _run(opt2, resumed, grads[5:])
    assert torch.equal(resumed, straight)


def _lrs(cfg: TrainConfig, total: int, read: int | None = None) -> list[float]:
    """The lr at steps 0..read-1 of a schedule over `total` steps."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.learning_rate)
    sched = build_lr_scheduler(opt, cfg, total)
    lrs = []
    for _ in range(read or total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_with_min_lr_warms_up_then_decays_to_the_floor():
    lr, warmup, total, floor = 1e-3, 10, 110, 0.1
    cfg = TrainConfig(
        learning_rate=lr, lr_scheduler="cosine_with_min_lr", lr_warmup_steps=warmup, lr_min_ratio=floor
    )
    lrs = _lrs(cfg, total, read=total + 1)
    for s in range(warmup):
        assert lrs[s] == pytest.approx(lr * s / warmup)
    for s in range(warmup, total + 1):
        progress = (s - warmup) / (total - warmup)
        expected = lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert lrs[s] == pytest.approx(expected, rel=1e-6)
    assert lrs[-1] == pytest.approx(lr * floor)


def test_constant_ignores_warmup_and_constant_with_warmup_ramps():
    assert _lrs(TrainConfig(learning_rate=1.0, lr_scheduler="constant", lr_warmup_steps=4), 6) == [1.0] * 6
    ramp = _lrs(TrainConfig(learning_rate=1.0, lr_scheduler="constant_with_warmup", lr_warmup_steps=4), 6)
    assert ramp == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1])


def test_warmup_longer_than_the_run_is_rejected():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        build_lr_scheduler(opt, TrainConfig(lr_scheduler="cosine", lr_warmup_steps=50), 50)


def test_clipping_by_norm_rescales_and_by_value_clamps():
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.tensor([3.0, 4.0])
    clip_gradients([p], "norm", 1.0)
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8]))
    p.grad = torch.tensor([3.0, -0.5])
    clip_gradients([p], "value", 1.0)
    assert torch.equal(p.grad, torch.tensor([1.0, -0.5]))
    p.grad = torch.tensor([3.0, 4.0])
    clip_gradients([p], "norm", 0.0)
    assert torch.equal(p.grad, torch.tensor([3.0, 4.0]))


def _group(weights: torch.Tensor, clip=("norm", 0.0)) -> TrainableGroup:
    opt = torch.optim.AdamW([weights], lr=1e-2, foreach=False)
    sched = build_lr_scheduler(opt, TrainConfig(lr_scheduler="constant"), 10)
    return TrainableGroup("student", [weights], opt, sched, *clip)


def _mse(weights):
    def loss_fn(batch):
        x, y = batch
        return ((x @ weights - y) ** 2).mean(), {"n": float(len(x))}

    return loss_fn


def test_accumulating_two_batches_of_one_equals_one_batch_of_two():
    g = torch.Generator().manual_seed(3)
    x, y, start = torch.randn(2, 4, generator=g), torch.randn(2, generator=g), torch.randn(4, generator=g)
    whole = start.clone().requires_grad_()
    r_whole = _group(whole).update(_mse(whole), [(x, y)])
    split = start.clone().requires_grad_()
    r_split = _group(split).update(_mse(split), [(x[:1], y[:1]), (x[1:], y[1:])])
    assert torch.allclose(whole, split, atol=1e-7)
    assert r_whole.loss == pytest.approx(r_split.loss)
    assert r_whole.grad_norm == pytest.approx(r_split.grad_norm)
    assert not torch.equal(whole.detach(), start)


def test_a_non_finite_loss_skips_the_update():
    weights = torch.ones(4, requires_grad=True)
    group = _group(weights)
    result = group.update(lambda b: ((weights * float("nan")).sum(), {}), [None])
    assert not result.finite and math.isnan(result.loss)
    assert torch.equal(weights.detach(), torch.ones(4))
    assert group.scheduler.last_epoch == 0 and not group.optimizer.state


@pytest.mark.parametrize(
    "steps,epochs,ignore,expected",
    [(100, 0, True, 100), (0, 3, True, 3 * 5), (100, 3, True, 100), (100, 3, False, 15), (10, 3, False, 10)],
)
def test_run_length_from_max_train_steps_and_epochs(steps, epochs, ignore, expected):
    cfg = TrainConfig(max_train_steps=steps, num_train_epochs=epochs, ignore_final_epochs=ignore,
                      gradient_accumulation_steps=2)  # fmt: skip
    assert planned_steps(cfg, batches_per_epoch=11) == expected  # 11 batches → 5 steps of 2 micro-batches
