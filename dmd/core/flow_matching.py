"""The flow-matching conventions, written once (as diffusers' Wan pipeline and FlowMatchEulerDiscreteScheduler).

x_σ = (1 − σ)·x0 + σ·ε        v ≈ ε − x0        x0 = x_σ − σ·v        timestep = 1000·σ
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def sigma_to_timestep(sigma: torch.Tensor | float) -> torch.Tensor | float:
    return sigma * NUM_TRAIN_TIMESTEPS


def timestep_to_sigma(timestep: torch.Tensor | float) -> torch.Tensor | float:
    return timestep / NUM_TRAIN_TIMESTEPS


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """shift(σ, s) = s·σ / (1 + (s − 1)·σ): s > 1 moves σ towards 1 (more noise)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def denoising_sigmas(steps: list[int], warp_shift: float | None = None) -> torch.Tensor:
    """σ of each `dmd_denoising_steps` entry (0–1000 scale), in order, optionally warped through a shift.

    Unwarped (the default), step 757 is σ = 0.757. Warped, it is shift(0.757, s), as a diffusers scheduler
    built with `shift=s` would place it; with s > 1 every step moves towards more noise.
    """
    sigmas = torch.tensor([float(timestep_to_sigma(t)) for t in steps], dtype=torch.float64)
    if warp_shift is not None:
        sigmas = shift_sigma(sigmas, warp_shift)
    return sigmas.float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε; `sigma` is a float or one value per sample (B,)."""
    sigma = _per_sample(sigma, x0)
    return (1 - sigma) * x0 + sigma * noise


def x0_from_velocity(
    x_sigma: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float
) -> torch.Tensor:
    """x0 = x_σ − σ·v (not (x − σv)/(1 − σ))."""
    return x_sigma - _per_sample(sigma, x_sigma) * velocity


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target v = ε − x0."""
    return noise - x0


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """x_cfg = x_uncond + w·(x_cond − x_uncond); w = 1 is the conditional prediction alone."""
    return uncond + scale * (cond - uncond)


def _per_sample(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1:
        return sigma.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return sigma
