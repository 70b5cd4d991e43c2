"""`dmd sample`: videos from an exported student, and the few-step generation that validation and evaluation share.

Seeding: `--seed N` seeds one CPU generator that draws the initial noise and then the re-noising between steps,
in that order, per prompt; each draw is made on the CPU and moved to the model's device (`dmd.wan.latents`), so a GPU
gives the video the CPU gives. diffusers' `WanPipeline` with the student's shipped scheduler draws the same stream
when it gets that generator both as `generator=` and in `scheduler.step` (the model card's snippet), so both produce
the same video for a single-block student.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dmd.core.flow_matching import classifier_free_guidance
from dmd.distill.rollout import RolloutSchedule, VelocityFn, sample, transformer_velocity
from dmd.wan.device import pick_device
from dmd.wan.latents import LatentGeometry, seeded_initial_noise

log = logging.getLogger(__name__)


def video_latent_shape(params, transformer, vae) -> tuple[int, int, int, int, int]:
    """(1, C, T, H, W) of the latents of one video of `train.validation_resolution` /
    `_num_video_frames` (what `dmd sample` and validation make), laid out as WanPipeline lays them out."""
    cfg = params.train
    height, width = cfg.validation.validation_size
    geometry = LatentGeometry.of(transformer, vae)
    problem = geometry.size_problem(height, width, cfg.validation.validation_num_video_frames)
    if problem is not None:
        raise ValueError(f"{problem}; set train.validation_resolution / train.validation_num_video_frames")
    return (1, *geometry.latent_shape(height, width, cfg.validation.validation_num_video_frames))


def guided_velocity(transformer, negative_embeds_1LD: torch.Tensor, scale: float) -> VelocityFn:
    """The student with classifier-free guidance against `negative_embeds` (scale ≤ 1: the plain student)."""
    velocity = transformer_velocity(transformer)
    if scale <= 1:
        return velocity

    def guided(x_BCTHW, frame_timesteps_BT, c_BLD):
        negative = negative_embeds_1LD.to(c_BLD).expand(c_BLD.shape[0], -1, -1)
        return classifier_free_guidance(
            velocity(x_BCTHW, frame_timesteps_BT, c_BLD),
            velocity(x_BCTHW, frame_timesteps_BT, negative),
            scale,
        )

    return guided


@torch.no_grad()
def generate_latents(
    transformer,
    schedule: RolloutSchedule,
    prompt_embeds_1LD: torch.Tensor,
    shape: tuple[int, ...],
    seed: int,
    *,
    negative_embeds_1LD: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """One video's latents: initial noise and re-noising from one CPU generator seeded `seed`."""
    device = next(transformer.parameters()).device
    noise, generator = seeded_initial_noise(seed, shape, device)
    model = (
        transformer
        if negative_embeds_1LD is None
        else guided_velocity(transformer, negative_embeds_1LD, guidance)
    )
    return sample(model, prompt_embeds_1LD.to(device), noise, schedule, generator=generator)


def video_stem(index: int, prompt: str, seed: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt"
    return f"{index:02d}-{slug}-seed{seed}"


def pipeline_arguments(params) -> dict:
    """The videos `dmd sample` makes, as `WanPipeline.__call__` arguments (the model card's snippet passes them):
    `train.validation_resolution` / `_num_video_frames`, CFG `validation_guidance` against
    `model.negative_prompt` when above 1, and `model.max_sequence_length`."""
    cfg = params.train
    height, width = cfg.validation.validation_size
    arguments = {"height": height, "width": width, "num_frames": cfg.validation.validation_num_video_frames}
    if cfg.validation.validation_guidance > 1:
        arguments.update(
            guidance_scale=cfg.validation.validation_guidance, negative_prompt=params.model.negative_prompt
        )
    else:
        arguments["guidance_scale"] = 1.0
    arguments["max_sequence_length"] = params.model.max_sequence_length
    return arguments


def student_videos(
    params, student_dir: str | Path, prompts: list[str], seed: int
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """(latents, uint8 (T, H, W, 3) frames) of each prompt from the exported student, as `dmd sample` makes them."""
    from dmd.student.export import load_student
    from dmd.wan.decode import LatentDecoder
    from dmd.wan.loading import encode_prompts, load_text_encoder, load_vae

    device = pick_device()
    transformer, schedule = load_student(student_dir, params)
    transformer.to(device)
    tokenizer, text_encoder = load_text_encoder(params.model, device)
    vae = load_vae(params.model, device)
    decode = LatentDecoder(vae)
    arguments = pipeline_arguments(params)
    shape = video_latent_shape(params, transformer, vae)
    length = arguments["max_sequence_length"]
    negative = None
    if "negative_prompt" in arguments:
        negative = encode_prompts(tokenizer, text_encoder, [arguments["negative_prompt"]], length)
    for prompt in prompts:
        embeds = encode_prompts(tokenizer, text_encoder, [prompt], length)
        latents = generate_latents(
            transformer,
            schedule,
            embeds,
            shape,
            seed,
            negative_embeds_1LD=negative,
            guidance=arguments["guidance_scale"],
        )
        yield latents, decode(latents)[0]


def sample_student(
    params, student_dir: str | Path, prompts: list[str], seed: int, output_dir: str | Path
) -> list[Path]:
    """mp4s of `prompts` from the exported student (see `student_videos`)."""
    from dmd.core.video import write_video

    paths = []
    for i, (prompt, (_, frames)) in enumerate(
        zip(prompts, student_videos(params, student_dir, prompts, seed))
    ):
        path = write_video(
            Path(output_dir) / f"{video_stem(i, prompt, seed)}.mp4", frames, fps=params.generate.fps
        )
        log.info("wrote %s", path)
        paths.append(path)
    return paths


def main(args) -> int:
    from dmd.core.config import load

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load(args.params, args.overrides)
    for path in sample_student(params, args.student, args.prompt, args.seed, args.output):
        print(path)
    return 0
