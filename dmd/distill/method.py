"""DMD (Distribution Matching Distillation): the losses as small pure functions, and `DMDMethod`, which runs
one step of them on the three roles (DESIGN.md, "DMD, one training step").

The method computes losses and metrics only; the training loop (dmd/training/loop.py) owns backward passes,
clipping and optimizer steps, and runs one step in this order:

    if method.updates_generator(step):   # the student first, on steps 0, n, 2n, …
        student.update(method.generator_loss, micro_batches)   # backward, average, clip, step; then the EMA
    critic.update(method.critic_loss, micro_batches)            # every step, after the student's update

With `critic_reuses_generator_rollout` the critic's loss on a batch the generator's loss has just seen trains on
that step's rollout, detached, instead of rolling the student out again. The mode-coverage terms (regression,
DMD2's GAN term in dmd/distill/gan.py, the consistency term in dmd/distill/consistency.py) are added by their weight keys.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dmd.core.config import Params
from dmd.core.flow_matching import add_noise, classifier_free_guidance, sigma_to_timestep, x0_from_velocity
from dmd.distill.consistency import consistency_loss, euler_step, point_on_pair, teacher_sigma_grid
from dmd.distill.gan import ClassificationHead, FeatureTap, gan_critic_loss, gan_generator_loss
from dmd.distill.roles import Roles
from dmd.distill.rollout import RolloutSchedule, VelocityFn, rollout
from dmd.distill.schedule import ScoreTimestepRange, choose_exit_indices, exit_bounds
from dmd.wan.causal import block_causal

NORMALISER_FLOOR = 1e-6


# ---- pure maths -----------------------------------------------------------------------------------------------


def dmd_gradient(
    x0_student: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, floor: float = NORMALISER_FLOOR
) -> torch.Tensor:
    """g = (f − r) / mean_{C,T,H,W}|x̂0 − r|, normalised per sample (the floor keeps the division finite)."""
    dims = tuple(range(1, x0_student.ndim))
    normaliser = (x0_student - real_x0).abs().mean(dim=dims, keepdim=True).clamp_min(floor)
    return (fake_x0 - real_x0) / normaliser


def dmd_loss(x0_student: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """½·mean((x̂0 − sg(x̂0 − g))²): its gradient with respect to x̂0 is g / N."""
    target = (x0_student - gradient).detach()
    return 0.5 * ((x0_student - target) ** 2).mean()


def critic_flow_matching_loss(
    velocity_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """mean((F_v(x_σ) − (ε − x̂0))²): the critic learns the student's distribution by flow matching."""
    return ((velocity_pred - (noise - x0.detach())) ** 2).mean()


def regression_loss(x0_student: torch.Tensor, teacher_x0: torch.Tensor) -> torch.Tensor:
    """mean((G(ε) − y)²) on the teacher's own (noise ε → latents y) pairs: the original DMD's mode-collapse guard."""
    return ((x0_student - teacher_x0) ** 2).mean()


def fake_cfg_scale(fake_score_guidance_scale: float) -> float:
    """Self-Forcing's fake-score guidance f = F_c + w·(F_c − F_u) in diffusers' form F_u + s·(F_c − F_u): s = 1 + w.

    So w = 0 is the conditional score alone, and the score is continuous in w."""
    return 1.0 + fake_score_guidance_scale


def guided_x0(
    model: VelocityFn,
    x_BCTHW: torch.Tensor,
    sigma_B: torch.Tensor,
    cond_BLD: torch.Tensor,
    uncond_BLD: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """x0-prediction of `model` at per-sample σ, with CFG x_u + w·(x_c − x_u) when `uncond_BLD` is given and
    w ≠ 1 (cond and uncond run as one batch)."""
    frame_timesteps_BT = sigma_to_timestep(sigma_B)[:, None].expand(-1, x_BCTHW.shape[2])
    if uncond_BLD is None or guidance_scale == 1.0:
        return x0_from_velocity(x_BCTHW, model(x_BCTHW, frame_timesteps_BT, cond_BLD), sigma_B)
    velocity = model(
        torch.cat([x_BCTHW, x_BCTHW]),
        torch.cat([frame_timesteps_BT, frame_timesteps_BT]),
        torch.cat([cond_BLD, uncond_BLD]),
    )
    cond_v, uncond_v = velocity.chunk(2)
    x0_cond = x0_from_velocity(x_BCTHW, cond_v, sigma_B)
    x0_uncond = x0_from_velocity(x_BCTHW, uncond_v, sigma_B)
    return classifier_free_guidance(x0_cond, x0_uncond, guidance_scale)


# ---- the method -----------------------------------------------------------------------------------------------


@dataclass
class _Conditioning:
    """What one batch conditions the step on. The rollout's prompts may be dropped captions and its clip a prefix
    of the cached one; the teacher's (noise → clip) pair stays whole, under the caption it was made with."""

    rollout_shape: tuple[int, ...]
    latents_BCTHW: torch.Tensor
    prompt_embeds_BLD: torch.Tensor
    negative_BLD: torch.Tensor
    teacher_noise_BCTHW: torch.Tensor | None
    teacher_latents_BCTHW: torch.Tensor
    teacher_prompt_embeds_BLD: torch.Tensor


@dataclass
class _Rollout:
    """A generator step's rollout, detached, kept for the critic's step on the same batch."""

    batch: object
    cond: _Conditioning
    x0_BCTHW: torch.Tensor
    exits: list[int]


class DMDMethod:
    """One DMD step on `roles`: `generator_loss` when `updates_generator(step)`, then `critic_loss` every step;
    the student rolls out along `schedule`.

    `negative_prompt_embeds` (1, L, D) are the unconditional side of both scores' CFG (as the teacher's own
    sampling used them); `empty_prompt_embeds` (1, L, D) replace a sample's prompt with probability
    `train.caption_dropout_probability` (for student and scores alike).
    """

    def __init__(
        self,
        params: Params,
        roles: Roles,
        schedule: RolloutSchedule,
        negative_prompt_embeds: torch.Tensor,
        empty_prompt_embeds: torch.Tensor,
    ):
        self.params = params
        self.config = params.train.distillation_config
        self.roles = roles
        self.schedule = schedule
        self.score_range = ScoreTimestepRange.from_config(self.config)
        self.device = roles.base.scale_shift_table.device
        self.negative_prompt_embeds = negative_prompt_embeds.to(self.device, torch.float32)
        self.empty_prompt_embeds = empty_prompt_embeds.to(self.device, torch.float32)
        self.caption_dropout_probability = params.train.batch.caption_dropout_probability
        self._reusable: dict[int, _Rollout] = {}
        self.gan_tap: FeatureTap | None = None
        self.gan_head: ClassificationHead | None = None
        if self.config.guidance_cls_loss_weight > 0:
            critic = roles.critic_transformer
            self.gan_tap = FeatureTap(critic, self.config.cls_feature_layer)
            self.gan_head = ClassificationHead(self.gan_tap.dim).to(self.device)
        if self.config.consistency_loss_weight > 0:
            self.consistency_sigmas = teacher_sigma_grid(
                self.config.consistency_grid_steps, params.model.flow_schedule_shift
            )

    # ---- the interface the training loop calls -------------------------------------------------------------------

    def updates_generator(self, step: int) -> bool:
        """True on steps 0, n, 2n, … for n = generator_update_interval (the critic updates on every step)."""
        return step % self.config.generator_update_interval == 0

    def student_parameters(self) -> list[torch.nn.Parameter]:
        return self.roles.student_parameters()

    def critic_parameters(self) -> list[torch.nn.Parameter]:
        """The critic's weights, and the GAN head's when there is one: it trains beside the critic."""
        head = list(self.gan_head.parameters()) if self.gan_head is not None else []
        return self.roles.critic_parameters() + head

    def generator_loss(
        self, batch, generator: torch.Generator, exits_generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """L = L_dmd (+ regression_loss_weight · L_reg); the gradient reaches only the student's exit steps.
        `exits_generator` draws the exit steps when they must not depend on the process (see `_rollout`)."""
        cond = self._conditioning(batch, generator)
        x0_student, exits = self._rollout(cond, generator, exits_generator)
        if self.config.critic_reuses_generator_rollout:
            self._keep_for_critic(_Rollout(batch, cond, x0_student.detach(), exits))
        b = x0_student.shape[0]
        sigma_s = self._score_sigmas(b, exits, generator)
        noise = self._randn(x0_student.shape, generator)
        with torch.no_grad():
            x_s = add_noise(x0_student.detach(), noise, sigma_s)
            real_x0 = guided_x0(
                self.roles.real,
                x_s,
                sigma_s,
                cond.prompt_embeds_BLD,
                cond.negative_BLD,
                self.config.real_score_guidance_scale,
            )
            fake_scale = self.config.fake_score_guidance_scale
            fake_x0 = guided_x0(
                self.roles.fake,
                x_s,
                sigma_s,
                cond.prompt_embeds_BLD,
                cond.negative_BLD if fake_scale != 0 else None,
                fake_cfg_scale(fake_scale),
            )
            gradient = dmd_gradient(x0_student.detach(), real_x0, fake_x0)
        loss = dmd_loss(x0_student, gradient)
        metrics = {
            "dmd_loss": float(loss.detach()),
            "dmd_gradient_abs": float(gradient.abs().mean()),
            "score_sigma": float(sigma_s.mean()),
            "exit_step": sum(exits) / len(exits),
        }
        if self.config.regression_loss_weight > 0:
            reg = self._regression_loss(cond, generator)
            loss = loss + self.config.regression_loss_weight * reg
            metrics["regression_loss"] = float(reg.detach())
        if self.config.gen_cls_loss_weight > 0:
            # the same noised clip the scores saw, now with the gradient into x̂0
            logits = self._gan_logits(add_noise(x0_student, noise, sigma_s), sigma_s, cond.prompt_embeds_BLD)
            gan = gan_generator_loss(logits)
            loss = loss + self.config.gen_cls_loss_weight * gan
            metrics["gen_cls_loss"] = float(gan.detach())
        if self.config.consistency_loss_weight > 0:
            consistency = self._consistency_loss(cond, generator)
            loss = loss + self.config.consistency_loss_weight * consistency
            metrics["consistency_loss"] = float(consistency.detach())
        metrics["generator_loss"] = float(loss.detach())
        return loss, metrics

    def critic_loss(
        self, batch, generator: torch.Generator, exits_generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Flow-matching loss of the critic on a detached rollout of the student: the generator step's own on this
        batch under critic_reuses_generator_rollout, else a fresh one. With guidance_cls_loss_weight, plus the GAN
        head's real-vs-student loss (real: the cached teacher clips, noised to the same σ)."""
        reused = self._reusable.pop(id(batch), None)
        if reused is not None and reused.batch is batch:  # the same object, not a new one at a recycled id
            cond, x0_student, exits = reused.cond, reused.x0_BCTHW, reused.exits
        else:
            cond = self._conditioning(batch, generator)
            with torch.no_grad():
                x0_student, exits = self._rollout(cond, generator, exits_generator)
        sigma = self._score_sigmas(x0_student.shape[0], exits, generator)
        noise = self._randn(x0_student.shape, generator)
        x_sigma = add_noise(x0_student, noise, sigma)
        frame_timesteps_BT = sigma_to_timestep(sigma)[:, None].expand(-1, x_sigma.shape[2])
        # the GAN head reads the features of this same pass: the student's clip costs the critic nothing extra
        with self.gan_tap.capture() if self.gan_tap is not None else contextlib.nullcontext():
            velocity = self.roles.fake(x_sigma, frame_timesteps_BT, cond.prompt_embeds_BLD)
        loss = critic_flow_matching_loss(velocity, x0_student, noise)
        metrics = {"critic_loss": float(loss.detach()), "critic_sigma": float(sigma.mean())}
        if self.gan_head is None:
            return loss, metrics
        fake_logits = self.gan_head(self.gan_tap.features)
        real = add_noise(cond.latents_BCTHW, self._randn(x0_student.shape, generator), sigma)
        real_logits = self._gan_logits(real, sigma, cond.prompt_embeds_BLD)
        gan = gan_critic_loss(real_logits, fake_logits)
        metrics.update(
            guidance_cls_loss=float(gan.detach()),
            cls_real_accuracy=float((real_logits > 0).float().mean()),
            cls_fake_accuracy=float((fake_logits < 0).float().mean()),
        )
        return loss + self.config.guidance_cls_loss_weight * gan, metrics

    # ---- the parts -----------------------------------------------------------------------------------------------

    def _conditioning(self, batch, generator: torch.Generator) -> _Conditioning:
        latents = batch.latents_BCTHW.to(self.device, torch.float32)
        frames = self.schedule.rollout_frames(latents.shape[2])
        reads_teacher_clip = self.config.rollout_from == "data" or self.config.guidance_cls_loss_weight > 0
        if reads_teacher_clip and frames > latents.shape[2]:
            raise ValueError(
                f"train.distillation_config.num_training_frames={frames} is longer than the cached clips "
                f"({latents.shape[2]} latent frames), and rollout_from: data / guidance_cls_loss_weight read the "
                "teacher's clip frame by frame: lower num_training_frames or cache longer clips"
            )
        prompts = teacher_prompts = batch.prompt_embeds_BLD.to(self.device, torch.float32)
        b, length = prompts.shape[:2]
        for name, emb in (("negative", self.negative_prompt_embeds), ("empty", self.empty_prompt_embeds)):
            if emb.shape[-2:] != prompts.shape[-2:]:
                raise ValueError(
                    f"the {name} prompt embeddings are {tuple(emb.shape[-2:])} but the batch's are "
                    f"{tuple(prompts.shape[-2:])}; rebuild the cache with one model.max_sequence_length"
                )
        if self.caption_dropout_probability > 0:
            drop = (
                torch.rand(b, generator=generator, device=generator.device) < self.caption_dropout_probability
            )
            prompts = torch.where(drop.to(self.device)[:, None, None], self.empty_prompt_embeds, prompts)
        teacher_noise = batch.noise_BCTHW
        if teacher_noise is not None:
            teacher_noise = teacher_noise.to(self.device, torch.float32)
        return _Conditioning(
            rollout_shape=(b, latents.shape[1], frames, *latents.shape[3:]),
            latents_BCTHW=latents[:, :, :frames],
            prompt_embeds_BLD=prompts,
            negative_BLD=self.negative_prompt_embeds.expand(b, length, -1),
            teacher_noise_BCTHW=teacher_noise,
            teacher_latents_BCTHW=latents,
            teacher_prompt_embeds_BLD=teacher_prompts,
        )

    def _rollout(
        self, cond: _Conditioning, generator: torch.Generator, exits_generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """The student's clip and its blocks' exit steps. The exits set how many times the student runs; from
        `exits_generator` (one per step, the same on every process) every process runs it equally often, which
        sharded weights need (each forward all-gathers them)."""
        n_blocks = len(self.schedule.block_ranges(cond.rollout_shape[2]))
        exits = choose_exit_indices(
            self.schedule.num_steps,
            n_blocks,
            exits_generator or generator,
            same_step_across_blocks=self.config.same_step_across_blocks,
            last_step_only=self.config.last_step_only,
        )
        start = cond.latents_BCTHW if self.config.rollout_from == "data" else None
        noise = self._randn(cond.rollout_shape, generator)
        x0 = self._student_rollout(cond.prompt_embeds_BLD, noise, exits, generator, start)
        return x0, exits

    def _student_rollout(
        self,
        prompt_embeds_BLD: torch.Tensor,
        noise_BCTHW: torch.Tensor,
        exits: list[int],
        generator: torch.Generator,
        start_latents_BCTHW: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The student's rollout; a block-causal student's with its attention made block-causal for the rollout
        only (the scores share its transformer when it is an adapter, and they see whole clips)."""
        args = (self.roles.student, prompt_embeds_BLD, noise_BCTHW, self.schedule, exits, generator)
        if not self.schedule.causal:
            return rollout(*args, start_latents_BCTHW=start_latents_BCTHW)
        with block_causal(self.roles.student_transformer) as causal:
            return rollout(*args, start_latents_BCTHW=start_latents_BCTHW, causal=causal)

    def _score_sigmas(self, batch_size: int, exits: list[int], generator: torch.Generator) -> torch.Tensor:
        # as Self-Forcing: the exit bounds the score timestep only when one exit is shared by construction
        shared_exit = exits[0] if self.config.same_step_across_blocks else None
        floor, ceiling = exit_bounds(
            self.config.dmd_denoising_steps,
            shared_exit,
            ts_schedule=self.config.ts_schedule,
            ts_schedule_max=self.config.ts_schedule_max,
        )
        return self.score_range.sample(batch_size, generator, floor, ceiling).to(self.device)

    def _keep_for_critic(self, kept: _Rollout) -> None:
        """Keep a generator step's rollout for the critic's step on the same batch: at most one step's micro-batches,
        so a generator step whose critic step never came leaves nothing behind."""
        self._reusable[id(kept.batch)] = kept
        while len(self._reusable) > self.params.train.batch.gradient_accumulation_steps:
            self._reusable.pop(next(iter(self._reusable)))

    def _teacher_noise(self, cond: _Conditioning, key: str) -> torch.Tensor:
        if cond.teacher_noise_BCTHW is None:
            raise ValueError(
                f"train.distillation_config.{key} > 0 needs the teacher's initial noise in the cache: set "
                f"generate.save_noise: true, regenerate and re-cache, or set {key}: 0"
            )
        return cond.teacher_noise_BCTHW

    def _regression_loss(self, cond: _Conditioning, generator: torch.Generator) -> torch.Tensor:
        noise = self._teacher_noise(cond, "regression_loss_weight")
        n_blocks = len(self.schedule.block_ranges(noise.shape[2]))
        # the first step is the student's only deterministic map from the teacher's noise to a clip; the pair is
        # the teacher's whole clip under the caption it was made with
        x0 = self._student_rollout(cond.teacher_prompt_embeds_BLD, noise, [0] * n_blocks, generator)
        return regression_loss(x0, cond.teacher_latents_BCTHW)

    def _gan_logits(
        self, x_BCTHW: torch.Tensor, sigma_B: torch.Tensor, prompts_BLD: torch.Tensor
    ) -> torch.Tensor:
        """The head's logits on the critic's features of `x` at σ (the critic's conditional pass)."""
        frame_timesteps_BT = sigma_to_timestep(sigma_B)[:, None].expand(-1, x_BCTHW.shape[2])
        with self.gan_tap.capture() as tap:
            self.roles.fake(x_BCTHW, frame_timesteps_BT, prompts_BLD)
            return self.gan_head(tap.features)

    def _consistency_loss(self, cond: _Conditioning, generator: torch.Generator) -> torch.Tensor:
        noise = self._teacher_noise(cond, "consistency_loss_weight")
        clip = cond.teacher_latents_BCTHW
        if len(self.schedule.block_ranges(clip.shape[2])) > 1:
            raise ValueError(
                "train.distillation_config.consistency_loss_weight > 0 runs the student on whole clips at one σ: "
                "it needs a one-block student (num_frame_per_block = the clip's latent frames)"
            )
        grid = self.consistency_sigmas
        step = torch.randint(0, len(grid) - 1, (clip.shape[0],), generator=generator, device=generator.device)
        sigma_a, sigma_b = grid[step].to(self.device), grid[step + 1].to(self.device)
        prompts = cond.teacher_prompt_embeds_BLD
        x_a = point_on_pair(clip, noise, sigma_a)
        with torch.no_grad():
            teacher_x0 = guided_x0(
                self.roles.real,
                x_a,
                sigma_a,
                prompts,
                cond.negative_BLD,
                self.config.real_score_guidance_scale,
            )
            x_b = euler_step(x_a, teacher_x0, sigma_a, sigma_b)
            target = guided_x0(self.roles.student, x_b, sigma_b, prompts, None, 1.0)
        online = guided_x0(self.roles.student, x_a, sigma_a, prompts, None, 1.0)
        return consistency_loss(online, target)

    def _randn(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=generator.device).to(self.device)
