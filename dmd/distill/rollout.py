"""The student's few-step rollout over time blocks: used with gradient by training and without by inference.

A clip's latent frames are split into blocks (`num_frame_per_block`; `independent_first_frame` makes the first
block one frame). Blocks are generated in order. For block b the transformer sees the earlier blocks' clean
output, re-noised to `context_noise`, followed by the block itself at the current step's σ — one timestep per
token, which the stock `WanTransformer3DModel` accepts as a (B, seq_len) tensor, so no new model class is
needed. A block as large as the clip is ordinary bidirectional few-step generation.

A block-causal student (`RolloutSchedule.causal`, Self-Forcing / CausVid) runs the same steps with a KV cache
instead (dmd.wan.causal): block b sees only its own frames, at their place in the clip, and the cached keys and
values of the blocks before it; each finished block is run once more, re-noised to `context_noise`, to add its
keys and values to the cache. The cache is built without gradient and never re-fed, so a block costs the same
whatever its place, and no block can change an earlier one.

Within a block, steps before its exit index run without gradient; the exit step runs in the caller's grad mode,
so only it carries the student's gradient (DESIGN.md, "DMD, one training step").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dmd.core.config import time_block_problem
from dmd.core.flow_matching import (
    add_noise,
    denoising_sigmas,
    sigma_to_timestep,
    timestep_to_sigma,
    x0_from_velocity,
)
from dmd.core.noise import randn
from dmd.wan.causal import BlockCausal, KVCache, block_causal

# (x_BCTHW, frame_timesteps_BT on the 0–1000 scale, prompt_embeds_BLD) -> velocity_BCTHW
VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RolloutSchedule:
    """The student's steps (as σ, decreasing) and its time-block layout."""

    sigmas: tuple[float, ...]
    num_frame_per_block: int
    independent_first_frame: bool = False
    context_sigma: float = 0.0
    num_training_frames: int | None = None
    causal: bool = False

    @classmethod
    def from_params(cls, params) -> RolloutSchedule:
        dc = params.train.distillation_config
        warp = params.model.flow_schedule_shift if dc.warp_denoising_steps else None
        return cls(
            sigmas=tuple(denoising_sigmas(dc.dmd_denoising_steps, warp).tolist()),
            num_frame_per_block=dc.num_frame_per_block,
            independent_first_frame=dc.independent_first_frame,
            context_sigma=float(timestep_to_sigma(dc.context_noise)),
            num_training_frames=dc.num_training_frames,
            causal=params.train.student.causal,
        )

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def block_ranges(self, num_frames: int) -> list[tuple[int, int]]:
        """[(start, end)) latent-frame ranges of the blocks of a clip with `num_frames` latent frames."""
        problem = time_block_problem(num_frames, self.num_frame_per_block, self.independent_first_frame)
        if problem:
            raise ValueError(f"{problem} (a clip of {num_frames} latent frames)")
        first = 1 if self.independent_first_frame and num_frames > 1 else 0
        ranges = [(0, 1)] if first else []
        ranges += [
            (s, s + self.num_frame_per_block) for s in range(first, num_frames, self.num_frame_per_block)
        ]
        return ranges

    def cache_frames(self) -> int | None:
        """Frames a block-causal student's KV cache keeps: the trained rollout's length less one block, so a block
        never sees more context than in training, also past that length (a rolling window); None: all."""
        if self.num_training_frames is None:
            return None
        return max(self.num_training_frames - self.num_frame_per_block, 1)

    def rollout_frames(self, clip_frames: int) -> int:
        """Latent frames a training rollout makes: `num_training_frames` (Self-Forcing's rollout length), or the
        cached clip's length when it is unset."""
        return clip_frames if self.num_training_frames is None else self.num_training_frames


def frame_timesteps_to_tokens(frame_timesteps_BT: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Per-frame timesteps → the transformer's timestep argument: (B,) when all frames agree (Wan 2.1's own
    form), else one per token, (B, T·tokens_per_frame), frame-major as the transformer flattens its patches."""
    if bool((frame_timesteps_BT == frame_timesteps_BT[:, :1]).all()):
        return frame_timesteps_BT[:, 0]
    return frame_timesteps_BT.repeat_interleave(tokens_per_frame, dim=1)


def transformer_dtype(transformer) -> torch.dtype:
    """The dtype a diffusers transformer computes in: its inputs must have it.

    That is diffusers' `ModelMixin.dtype`, the one WanPipeline casts latents and prompt embeddings to: the dtype of
    the weights outside `_keep_in_fp32_modules`. Loaded with `torch_dtype=bf16` (or fp16) a Wan transformer keeps
    its scale_shift_table, time embedder and norms in fp32 while the patch embedding and attention are bf16, so no
    single named weight stands for the model. An int8-quanto weight reports the float dtype it computes in, and a
    model with diffusers' layerwise casting its compute dtype.
    """
    return transformer.dtype


def transformer_velocity(transformer) -> VelocityFn:
    """A `WanTransformer3DModel` as a VelocityFn (inputs cast to its compute dtype, output back to float32)."""
    p_t, p_h, p_w = transformer.config.patch_size
    dtype = transformer_dtype(transformer)

    def velocity(
        x_BCTHW: torch.Tensor, frame_timesteps_BT: torch.Tensor, c_BLD: torch.Tensor
    ) -> torch.Tensor:
        if p_t != 1:
            raise ValueError(f"time blocks need a temporal patch size of 1, got {p_t}")
        h, w = x_BCTHW.shape[-2:]
        timestep = frame_timesteps_to_tokens(frame_timesteps_BT, (h // p_h) * (w // p_w))
        out = transformer(
            hidden_states=x_BCTHW.to(dtype),
            timestep=timestep.to(x_BCTHW.device),
            encoder_hidden_states=c_BLD.to(dtype),
            return_dict=False,
        )[0]
        return out.float()

    return velocity


def denoise_block(
    model: VelocityFn,
    x_BCTHW: torch.Tensor,
    sigma: float,
    c_BLD: torch.Tensor,
    context_BCTHW: torch.Tensor | None = None,
    context_sigma: float = 0.0,
) -> torch.Tensor:
    """x̂0 of one block at σ, the model seeing `context` (already noised to context_sigma) in front of it."""
    b, t = x_BCTHW.shape[0], x_BCTHW.shape[2]
    n_ctx = 0 if context_BCTHW is None else context_BCTHW.shape[2]
    inputs = x_BCTHW if context_BCTHW is None else torch.cat([context_BCTHW, x_BCTHW], dim=2)
    frame_sigmas = torch.tensor([context_sigma] * n_ctx + [sigma] * t, dtype=torch.float32)
    frame_timesteps_BT = sigma_to_timestep(frame_sigmas).expand(b, -1)
    velocity = model(inputs, frame_timesteps_BT, c_BLD)[:, :, n_ctx:]
    return x0_from_velocity(x_BCTHW, velocity, sigma)


def rollout(
    model: VelocityFn,
    prompt_embeds_BLD: torch.Tensor,
    noise_BCTHW: torch.Tensor,
    schedule: RolloutSchedule,
    exit_indices: list[int],
    generator: torch.Generator,
    start_latents_BCTHW: torch.Tensor | None = None,
    causal: BlockCausal | None = None,
) -> torch.Tensor:
    """The student's x̂0 for a whole clip, block by block; only each block's exit step is in the caller's grad mode.

    From noise (`start_latents_BCTHW` None): block b starts at `noise` with σ_0 and runs steps 0…k_b, re-noising
    x̂0 to σ_{i+1} with fresh noise between steps. From data: block b starts at the clean latents noised to its
    exit σ_{k_b} and runs that one step (FastVideo's default).

    `causal` (the handle `block_causal(transformer)` gives for the transformer `model` runs) makes it the
    block-causal rollout with a KV cache; a schedule with `causal` set needs it.
    """
    ranges = schedule.block_ranges(noise_BCTHW.shape[2])
    if len(exit_indices) != len(ranges):
        raise ValueError(f"{len(exit_indices)} exit indices for {len(ranges)} time blocks")
    if schedule.causal != (causal is not None):
        raise ValueError(
            "a block-causal schedule needs the block_causal() handle of the student's transformer, and only it"
        )
    cache = KVCache(noise_BCTHW.shape[0], max_frames=schedule.cache_frames()) if causal else None
    blocks: list[torch.Tensor] = []
    for (start, end), k in zip(ranges, exit_indices):
        noise = noise_BCTHW[:, :, start:end]
        if start_latents_BCTHW is None:
            x, first = noise, 0
        else:
            x, first = add_noise(start_latents_BCTHW[:, :, start:end], noise, schedule.sigmas[k]), k
        if causal is None:
            context = _noised_context(torch.cat(blocks, dim=2), schedule, generator) if blocks else None
            x0 = _denoise_steps(model, x, first, k, prompt_embeds_BLD, schedule, generator, context)
        else:
            with causal.attend(cache):
                x0 = _denoise_steps(model, x, first, k, prompt_embeds_BLD, schedule, generator)
            if end < noise_BCTHW.shape[2]:  # the last block's keys and values would never be read
                with causal.fill(cache):
                    denoise_block(
                        model,
                        _noised_context(x0, schedule, generator),
                        schedule.context_sigma,
                        prompt_embeds_BLD,
                    )
        blocks.append(x0)
    return torch.cat(blocks, dim=2)


def _noised_context(
    clean_BCTHW: torch.Tensor, schedule: RolloutSchedule, generator: torch.Generator
) -> torch.Tensor:
    """Finished blocks as the next block sees them: detached, re-noised to `context_noise` with fresh noise."""
    clean = clean_BCTHW.detach()
    return add_noise(clean, randn(clean.shape, generator, clean.device, clean.dtype), schedule.context_sigma)


def _denoise_steps(
    model: VelocityFn,
    x_BCTHW: torch.Tensor,
    first: int,
    exit_index: int,
    prompt_embeds_BLD: torch.Tensor,
    schedule: RolloutSchedule,
    generator: torch.Generator,
    context_BCTHW: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps first…exit_index of one block; all but the exit step without gradient."""
    sigmas = schedule.sigmas
    for i in range(first, exit_index + 1):
        grad_mode = contextlib.nullcontext() if i == exit_index else torch.no_grad()
        with grad_mode:
            x0 = denoise_block(
                model, x_BCTHW, sigmas[i], prompt_embeds_BLD, context_BCTHW, schedule.context_sigma
            )
        if i < exit_index:
            x_BCTHW = add_noise(x0, randn(x0.shape, generator, x0.device, x0.dtype), sigmas[i + 1])
    return x0


@torch.no_grad()
def sample(
    transformer,
    prompt_embeds_BLD: torch.Tensor,
    noise_BCTHW: torch.Tensor,
    schedule: RolloutSchedule,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Few-step generation: the training rollout with every block exiting at the last step, no gradient.

    `transformer` is a `WanTransformer3DModel` carrying the student's weights (or any VelocityFn, for a
    bidirectional student). A block-causal student generates block by block with its KV cache, and a clip longer
    than it trained on keeps a rolling window of the cache (`RolloutSchedule.cache_frames`).

    `generator` draws the re-noising between steps (default: seeded 0, so equal noise gives equal clips).
    """
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    n_blocks = len(schedule.block_ranges(noise_BCTHW.shape[2]))
    exits = [schedule.num_steps - 1] * n_blocks
    if not isinstance(transformer, torch.nn.Module):
        if schedule.causal:
            raise ValueError(
                "a block-causal student samples through its transformer module, not a VelocityFn"
            )
        return rollout(transformer, prompt_embeds_BLD, noise_BCTHW, schedule, exits, generator)
    model = transformer_velocity(transformer)
    if not schedule.causal:
        return rollout(model, prompt_embeds_BLD, noise_BCTHW, schedule, exits, generator)
    with block_causal(transformer) as causal:
        return rollout(model, prompt_embeds_BLD, noise_BCTHW, schedule, exits, generator, causal=causal)
