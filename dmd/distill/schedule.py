"""Schedule maths of the DMD student: the score timesteps the real/fake scores see and its exit steps (its denoising
σs are `dmd.core.flow_matching.denoising_sigmas`, which the generate stage shares).

All σ here are on the 0–1 scale of `dmd.core.flow_matching` (timestep = 1000·σ); functions are pure and take their
randomness from an explicit `torch.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmd.core.flow_matching import shift_sigma, timestep_to_sigma


@dataclass(frozen=True)
class ScoreTimestepRange:
    """Where the real and fake scores are evaluated, as Self-Forcing and FastVideo draw it: shift first, then
    clamp — σ_s = clamp(shift(u, timestep_shift), min_ratio, max_ratio), u ~ U[lo, hi].

    `lo` is the `ts_schedule` floor when one applies, else `min_score_timestep`/1000; `hi` is the
    `ts_schedule_max` ceiling when one applies, else 1 (`exit_bounds` says when they apply). The clamp comes
    last, so σ_s never leaves [min_ratio, max_ratio] whatever the shift, and a shift that pushes u past a
    ratio piles that mass at the ratio, exactly as in the references. u is continuous here; the references
    draw integer timesteps, a difference of at most 1/1000 in σ.
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

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator,
        floor: float | None = None,
        ceiling: float | None = None,
    ) -> torch.Tensor:
        """One σ_s per sample, (batch_size,) float32; `floor`/`ceiling` bound u (None: min_score_timestep / 1)."""
        lo = self.min_sigma if floor is None else floor
        hi = 1.0 if ceiling is None else ceiling
        u = lo + (hi - lo) * torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return shift_sigma(u, self.shift).clamp(self.min_ratio, self.max_ratio).float()


def exit_bounds(
    steps: list[int], exit_index: int | None, ts_schedule: bool, ts_schedule_max: bool
) -> tuple[float | None, float | None]:
    """(floor, ceiling) on u from the student's exit step, as Self-Forcing's `denoised_timestep_to/_from`.

    `steps` are `dmd_denoising_steps` as written (0–1000): the bounds are un-warped step values, because u is
    shifted by `timestep_shift` afterwards. `ts_schedule` floors u at the step after the exit (0 after the last
    step), `ts_schedule_max` caps it at the exit step itself. `exit_index` None (the blocks' exits were drawn
    independently) gives no bounds: there is no one exit to bound by.
    """
    if exit_index is None:
        return None, None
    floor = float(timestep_to_sigma(steps[exit_index + 1])) if exit_index + 1 < len(steps) else 0.0
    ceiling = float(timestep_to_sigma(steps[exit_index]))
    return (floor if ts_schedule else None), (ceiling if ts_schedule_max else None)


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
