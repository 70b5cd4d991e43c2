"""The teacher as diffusers runs it: `WanPipeline` with its own scheduler at the configured shift, CFG when the
guidance is above 1, from initial noise the caller draws. The generate stage and the evaluation both sample
through `TeacherSampler`.

A run can also return its trajectory at any σs (`denoise_with_trajectory`): the pipeline hands over its
latents after every step, and the point at σ* between grid points σ_i ≥ σ* > σ_{i+1} is the Euler iterate x_i
carried by a partial step to σ*. An Euler step is linear in σ, so that is the linear interpolation of x_i and
x_{i+1} in σ; only a first-order, deterministic flow-matching Euler scheduler has that property
(`trajectory_scheduler_problem`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dmd.core.config import ModelConfig
from dmd.wan.latents import LatentGeometry
from dmd.wan.loading import encode_prompts, load_text_encoder, load_transformer, load_vae

# FlowMatchEulerDiscreteScheduler calls the shift `shift`, UniPC (the stock Wan 2.1 scheduler) `flow_shift`
SHIFT_KEYS = ("flow_shift", "shift")
EULER_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# how far a σ may sit above the scheduler's first σ and still count as it: the float32 rounding of either
SIGMA_TOLERANCE = 1e-6


class TrajectoryError(ValueError):
    """A trajectory that this teacher run cannot give: a scheduler whose iterates are not linear in σ, or a σ
    outside the run (above its first σ or below 0)."""


def trajectory_scheduler_problem(config: Mapping) -> str | None:
    """Why the iterates of a scheduler with this config cannot be read off between its grid points by linear
    interpolation in σ, or None when they can: only FlowMatchEulerDiscreteScheduler without stochastic sampling
    takes straight steps (a multistep solver such as UniPC bends them; stochastic sampling re-noises each step)."""
    name = config.get("_class_name")
    if name != EULER_SCHEDULER:
        return f"its scheduler is {name}, not the first-order {EULER_SCHEDULER}"
    if config.get("stochastic_sampling"):
        return f"its {EULER_SCHEDULER} has stochastic_sampling: true, which re-noises every step"
    return None


def load_teacher_pipeline(model: ModelConfig, device: torch.device | str, shift: float):
    """WanPipeline of the teacher: its components through dmd.wan.loading (precision, int8), the scheduler from its
    directory rebuilt with `shift`."""
    from diffusers import WanPipeline

    tokenizer, text_encoder = load_text_encoder(model, device)
    pipe = WanPipeline.from_pretrained(
        model.pretrained_model_name_or_path,
        revision=model.revision,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=load_transformer(model, device),
        vae=load_vae(model, device),
    )
    pipe.scheduler = scheduler_with_shift(pipe.scheduler, shift)
    return pipe


def scheduler_with_shift(scheduler, shift: float):
    """The scheduler rebuilt with `shift` under whichever name its class gives it."""
    for key in SHIFT_KEYS:
        if key in scheduler.config:
            return type(scheduler).from_config(scheduler.config, **{key: shift})
    return scheduler


class TeacherSampler:
    """One teacher run: `steps` steps of the pipeline's scheduler, CFG `guidance` against `negative_prompt`."""

    def __init__(self, pipe, steps: int, guidance: float, negative_prompt: str, max_sequence_length: int):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.steps = steps
        self.guidance = guidance
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length
        self.geometry = LatentGeometry.of(pipe.transformer, pipe.vae)
        pipe.set_progress_bar_config(disable=True)

    def encode(self, prompt: str | list[str]) -> dict[str, torch.Tensor]:
        """The embeddings of one prompt or a batch, and of the negative prompt (one per prompt) when CFG is on:
        what WanPipeline computes from the same text."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds = {"prompt_embeds": self._encode(prompts)}
        if self.guidance > 1:  # WanPipeline's own condition for CFG
            embeds["negative_prompt_embeds"] = self._encode([self.negative_prompt] * len(prompts))
        return embeds

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts, self.max_sequence_length)

    @torch.no_grad()
    def denoise(
        self, embeds: dict[str, torch.Tensor], noise_BCTHW: torch.Tensor, seed: int | None = None
    ) -> torch.Tensor:
        """Normalised latents from `noise_BCTHW` (the seed is in the noise already; the pipeline draws nothing)."""
        return self._run(embeds, noise_BCTHW)

    @torch.no_grad()
    def denoise_with_trajectory(
        self, embeds: dict[str, torch.Tensor], noise_BCTHW: torch.Tensor, sigmas: Sequence[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`denoise`, and the run's trajectory at `sigmas` (K σs on the 0–1 scale, in any order): (latents,
        trajectory_BKCTHW float32). Raises TrajectoryError when the scheduler's iterates are not linear in σ or a
        σ lies outside the run."""
        scheduler = self.pipe.scheduler  # its class, which a scheduler built in code has not in its config
        problem = trajectory_scheduler_problem({**scheduler.config, "_class_name": type(scheduler).__name__})
        if problem:
            raise TrajectoryError(
                f"the teacher's trajectory at given σs needs straight Euler steps: {problem}"
            )
        recorder = _TrajectoryRecorder(noise_BCTHW, sigmas)
        latents = self._run(
            embeds,
            noise_BCTHW,
            callback_on_step_end=recorder,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        return latents, recorder.trajectory()

    def _run(self, embeds: dict[str, torch.Tensor], noise_BCTHW: torch.Tensor, **callback) -> torch.Tensor:
        _, _, t, h, w = noise_BCTHW.shape
        geometry = self.geometry
        return self.pipe(
            prompt_embeds=embeds["prompt_embeds"],
            negative_prompt_embeds=embeds.get("negative_prompt_embeds"),
            height=h * geometry.spatial_factor,
            width=w * geometry.spatial_factor,
            num_frames=(t - 1) * geometry.temporal_factor + 1,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            latents=noise_BCTHW,
            output_type="latent",
            return_dict=False,
            **callback,
        )[0]


class _TrajectoryRecorder:
    """WanPipeline's `callback_on_step_end`: keeps the previous iterate and, as each step lands, the trajectory
    points that fall in it, so no more than one step's latents are held besides the points."""

    def __init__(self, noise_BCTHW: torch.Tensor, sigmas: Sequence[float]):
        self.sigmas = [float(s) for s in sigmas]
        self.previous = noise_BCTHW
        self.points: dict[int, torch.Tensor] = {}

    def __call__(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        grid = pipe.scheduler.sigmas.tolist()
        current = callback_kwargs["latents"]
        if i == 0:
            outside = [s for s in self.sigmas if not 0.0 <= s <= grid[0] + SIGMA_TOLERANCE]
            if outside:
                raise TrajectoryError(
                    f"trajectory σ {outside} outside the teacher's run, which goes from σ = {grid[0]} to 0"
                )
        hi, lo = grid[i], grid[i + 1]
        last = i + 2 == len(grid)
        for k, sigma in enumerate(self.sigmas):
            if k in self.points or not (sigma > lo or (last and sigma >= lo)):
                continue
            weight = min(max((hi - sigma) / (hi - lo), 0.0), 1.0)
            if weight == 0.0:  # on the grid point itself: the iterate, unrounded
                point = self.previous
            elif weight == 1.0:
                point = current
            else:
                previous = self.previous.float()
                point = previous + weight * (current.float() - previous)
            self.points[k] = point.float().clone()
        self.previous = current
        return {}

    def trajectory(self) -> torch.Tensor:
        """(B,K,C,T,H,W) float32, in the order the σs were given."""
        return torch.stack([self.points[k] for k in range(len(self.sigmas))], dim=1)
