"""An rCM-style consistency term on the teacher's trajectories, in discrete time.

rCM adds to DMD a continuous-time consistency loss (sCM) whose tangent is a JVP of the student along the teacher's
ODE. Here the same idea runs in discrete time, as consistency distillation first did: a point x_a of the teacher's
own (noise ε → clip y) pair at σ_a, one Euler step of the teacher's guided ODE to σ_b < σ_a, and the student's x̂0
at (x_a, σ_a) regressed onto its own stop-gradient x̂0 at (x_b, σ_b). The student's x̂0 = x − σ·v is the identity
at σ = 0, the boundary condition that anchors the chain to the teacher's clips, so the term pulls the student
towards the teacher's whole ODE map (a forward divergence, mode-covering), where DMD's reverse KL seeks modes.

Discrete, not continuous: a JVP through diffusers' Wan attention is not supported on every backend (the CPU one
this project tests on included), and the discrete form needs only forward passes the method already runs.

The σ grid is the teacher's own sampling grid (generate.num_inference_steps, shifted by its flow shift), so the
pairs (σ_a, σ_b) are the steps the teacher took when it made the clips.
"""

from __future__ import annotations

import torch

from dmd.core.flow_matching import add_noise, shift_sigma


def teacher_sigma_grid(num_steps: int, shift: float) -> torch.Tensor:
    """σ_0 = 1 > σ_1 > … > σ_N = 0: `num_steps` uniform steps in t, each shifted as the teacher's scheduler does."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_sigma(t, shift).float()


def point_on_pair(clip_BCTHW: torch.Tensor, noise_BCTHW: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
    """(1 − σ)·y + σ·ε on the teacher's own pair: its ends are the ends of the teacher's trajectory."""
    return add_noise(clip_BCTHW, noise_BCTHW, sigma_B)


def euler_step(
    x_BCTHW: torch.Tensor, x0_BCTHW: torch.Tensor, sigma_from_B: torch.Tensor, sigma_to_B: torch.Tensor
) -> torch.Tensor:
    """One Euler step of the flow ODE in x0 form: x' = x0 + σ'·(x − x0)/σ, i.e. x + (σ' − σ)·v with v = (x − x0)/σ."""
    view = (-1,) + (1,) * (x_BCTHW.ndim - 1)
    ratio = (sigma_to_B / sigma_from_B).view(view)
    return x0_BCTHW + ratio * (x_BCTHW - x0_BCTHW)


def consistency_loss(x0_online: torch.Tensor, x0_target: torch.Tensor) -> torch.Tensor:
    """mean((f_θ(x_a, σ_a) − sg(f_θ(x_b, σ_b)))²)."""
    return ((x0_online - x0_target.detach()) ** 2).mean()
