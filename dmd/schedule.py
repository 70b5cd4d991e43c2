"""Schedule maths of the DMD student: its denoising σs and the score timesteps the real/fake scores see.

All σ here are on the 0–1 scale of `dmd.flow_matching` (timestep = 1000·σ); functions are pure and take their
randomness from an explicit `torch.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmd.flow_matching import shift_sigma, timestep_to_sigma


def denoising_sigmas(steps: list[int], warp_shift: float | None = None) -> torch.Tensor:
    """σ of each `dmd_denoising_steps` entry (0–1000 scale), in order, optionally warped through a shift.

    Unwarped (the default), step 757 is σ = 0.757. Warped, it is shift(0.757, s), as a diffusers scheduler
    built with `shift=s` would place it; with s > 1 every step moves towards more noise.
    """
    sigmas = torch.tensor([float(timestep_to_sigma(t)) for t in steps], dtype=torch.float64)
    if warp_shift is not None:
        sigmas = shift_sigma(sigmas, warp_shift)
    return sigmas.float()


def unshift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The inverse of `shift_sigma(·, s)`, which is `shift_sigma(·, 1/s)`."""
    return shift_sigma(sigma, 1.0 / shift)


@dataclass(frozen=True)
class ScoreTimestepRange:
    """Where the real and fake scores are evaluated: σ_s = shift(u, timestep_shift), u ~ U[min_ratio, max_ratio],
    conditioned on σ_s lying in [floor, ceiling].

    Bounds follow Self-Forcing's `ts_schedule` semantics: with the student exiting at step k,
    `ts_schedule` floors σ_s at the σ of the *next* step (0 after the last step), so the scores judge the
    student's output only at noise levels it will be re-noised to or above; `ts_schedule_max` caps σ_s at the
    exit step's own σ. `min_score_timestep` (0–1000 scale) is a floor that always applies.
    """

    min_ratio: float
    max_ratio: float
    shift: float = 1.0
    min_sigma: float = 0.0

    @classmethod
    def from_config(cls, dc) -> ScoreTimestepRange:
        return cls(
            min_ratio=dc.min_timestep_ratio,
            max_ratio=dc.max_timestep_ratio,
            shift=dc.timestep_shift,
            min_sigma=float(timestep_to_sigma(dc.min_score_timestep)),
        )

    def bounds(self, floor: float = 0.0, ceiling: float = 1.0) -> tuple[float, float]:
        """(lo, hi) of σ_s: the shifted ratio range intersected with [floor, ceiling] and the min_score floor.

        If the bounds cross (a floor above the range), σ_s sits at the upper end: the range wins over the
        floor, so the score never sees a σ outside [shift(min_ratio), shift(max_ratio)].
        """
        lo = max(float(shift_sigma(self.min_ratio, self.shift)), floor, self.min_sigma)
        hi = min(float(shift_sigma(self.max_ratio, self.shift)), ceiling)
        return min(lo, hi), hi

    def sample(
        self, batch_size: int, generator: torch.Generator, floor: float = 0.0, ceiling: float = 1.0
    ) -> torch.Tensor:
        """One σ_s per sample, (batch_size,) float32.

        Drawn as u uniform between the un-shifted bounds and then shifted, which is exactly the shifted
        uniform conditioned on [lo, hi] (the shift is monotone), with no mass piled up at a clamp.
        """
        lo, hi = self.bounds(floor, ceiling)
        u_lo, u_hi = float(unshift_sigma(lo, self.shift)), float(unshift_sigma(hi, self.shift))
        u = u_lo + (u_hi - u_lo) * torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return shift_sigma(u, self.shift).float()


def exit_bounds(
    sigmas: torch.Tensor, exit_index: int | None, ts_schedule: bool, ts_schedule_max: bool
) -> tuple[float, float]:
    """(floor, ceiling) on σ_s from the student's exit step; no bounds when blocks exited at different steps
    (`exit_index` None), as in Self-Forcing."""
    if exit_index is None:
        return 0.0, 1.0
    floor = float(sigmas[exit_index + 1]) if exit_index + 1 < len(sigmas) else 0.0
    ceiling = float(sigmas[exit_index])
    return (floor if ts_schedule else 0.0), (ceiling if ts_schedule_max else 1.0)


def choose_exit_indices(
    num_steps: int,
    num_blocks: int,
    generator: torch.Generator,
    same_step_across_blocks: bool,
    last_step_only: bool,
) -> list[int]:
    """The step at which each time block leaves the rollout (and carries the student's gradient)."""
    if last_step_only:
        return [num_steps - 1] * num_blocks
    if same_step_across_blocks:
        k = int(torch.randint(num_steps, (1,), generator=generator))
        return [k] * num_blocks
    return [int(k) for k in torch.randint(num_steps, (num_blocks,), generator=generator)]
