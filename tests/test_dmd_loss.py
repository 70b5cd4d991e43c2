"""The DMD losses against hand-derived references on random tensors."""

from __future__ import annotations

import numpy as np
import torch

from dmd.distill.method import critic_flow_matching_loss, dmd_gradient, dmd_loss, guided_x0, regression_loss


def _tensors(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 4, 5, 6, 6)
    scales = torch.tensor([0.1, 1.0, 10.0][:b]).view(-1, 1, 1, 1, 1)
    x0 = torch.randn(shape, generator=g) * scales
    real = x0 + torch.randn(shape, generator=g) * scales
    fake = x0 + torch.randn(shape, generator=g) * scales
    return x0, real, fake


def test_dmd_gradient_is_normalised_per_sample():
    x0, real, fake = _tensors()
    got = dmd_gradient(x0, real, fake).numpy()
    for i in range(x0.shape[0]):
        a, r, f = x0[i].numpy(), real[i].numpy(), fake[i].numpy()
        np.testing.assert_allclose(got[i], (f - r) / np.mean(np.abs(a - r)), rtol=1e-5)
    # per-sample: each sample's gradient has the same scale although inputs differ by 100x
    mags = np.abs(got).reshape(3, -1).mean(1)
    assert mags.max() / mags.min() < 2


def test_dmd_gradient_floor_keeps_it_finite():
    x0 = torch.ones(2, 1, 1, 2, 2)
    g = dmd_gradient(x0, x0.clone(), x0 + 1)
    assert torch.isfinite(g).all()


def test_autograd_of_dmd_loss_is_g_over_n():
    x0, real, fake = _tensors()
    x0 = x0.clone().requires_grad_(True)
    g = dmd_gradient(x0.detach(), real, fake)
    dmd_loss(x0, g).backward()
    torch.testing.assert_close(x0.grad, g / x0.numel())


def test_critic_loss_is_velocity_mse():
    x0, noise, pred = _tensors(seed=3)
    want = np.mean((pred.numpy() - (noise.numpy() - x0.numpy())) ** 2)
    assert np.isclose(float(critic_flow_matching_loss(pred, x0, noise)), want, rtol=1e-6)


def test_regression_loss_is_mse():
    a, b, _ = _tensors(seed=4)
    assert np.isclose(float(regression_loss(a, b)), np.mean((a.numpy() - b.numpy()) ** 2), rtol=1e-6)


class _Exact:
    """A score that knows x0 and ε for each prompt: returns v = ε − x0, shifted by the prompt's bias."""

    def __init__(self, x0, noise):
        self.x0, self.noise, self.calls = x0, noise, []

    def __call__(self, x, frame_timesteps_BT, c):
        self.calls.append((x.shape[0], frame_timesteps_BT.clone()))
        reps = x.shape[0] // self.x0.shape[0]
        bias = c[:, 0, 0].view(-1, 1, 1, 1, 1)
        return (self.noise - self.x0).repeat(reps, 1, 1, 1, 1) + bias


def test_x0_recovery_and_cfg_combination_by_hand():
    x0, noise, _ = _tensors(b=2, seed=5)
    sigma = torch.tensor([0.3, 0.8])
    x_s = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
    cond = torch.zeros(2, 3, 4)
    uncond = torch.ones(2, 3, 4)  # the exact score is off by +1 velocity under the negative prompt
    model = _Exact(x0, noise)
    # x0 recovery: x_σ − σ·v gives the clean sample back
    torch.testing.assert_close(guided_x0(model, x_s, sigma, cond, None, 3.0), x0, rtol=1e-5, atol=1e-5)
    assert model.calls[-1][1].shape == (2, 5) and torch.allclose(model.calls[-1][1][:, 0], sigma * 1000)
    # CFG: x_u + w(x_c − x_u) with x_u = x0 − σ·1, one batched call of 2B
    w = 3.0
    x_u = x0 - sigma.view(-1, 1, 1, 1, 1)
    want = x_u + w * (x0 - x_u)
    torch.testing.assert_close(guided_x0(model, x_s, sigma, cond, uncond, w), want, rtol=1e-5, atol=1e-5)
    assert model.calls[-1][0] == 4
    # w = 1 is the conditional prediction alone, without the unconditional pass
    torch.testing.assert_close(guided_x0(model, x_s, sigma, cond, uncond, 1.0), x0, rtol=1e-5, atol=1e-5)
    assert model.calls[-1][0] == 2
