"""Validation during training: the student's videos for fixed prompts and seeds, as mp4s and one PNG grid.

Prompts: `validation_prompt` plus `validation_prompt_library` (a JSON list of prompts or {name: prompt}). Each
prompt is sampled with `validation_seed`, so every validation shows the same noise and runs are comparable
across steps. `ema_validation` picks the weights: `none` the live ones, `ema_only` the EMA's, `comparison` both
(rows "live" and "ema"). Output: `<train.output_dir>/validation/step-NNNNNNN/{weights}-{name}.mp4` and
`grid.png` (a row per video, evenly spaced frames). On the toy world the judge scores the clips too.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmd.core.config import Params
from dmd.core.io import atomic_path
from dmd.core.video import write_video
from dmd.data.prompts import load_prompt_library, positional
from dmd.distill.rollout import RolloutSchedule
from dmd.student.sample import generate_latents, video_latent_shape
from dmd.training.callbacks import Callback
from dmd.training.ema import EMA

log = logging.getLogger(__name__)

GRID_FRAMES = 8
GRID_MIN_SIDE = 96  # tiny frames are enlarged (nearest neighbour) so the grid is readable


def validation_prompts(params: Params) -> dict[str, str]:
    """{name: prompt} from validation_prompt ("prompt") and the library file (dmd.data.prompts); a library without
    ids names its prompts by position."""
    cfg = params.train
    prompts = {"prompt": cfg.validation.validation_prompt} if cfg.validation.validation_prompt else {}
    if cfg.validation.validation_prompt_library:
        library = load_prompt_library(
            cfg.validation.validation_prompt_library, setting="train.validation_prompt_library"
        )
        by_position = positional(library)
        for i, p in enumerate(library):
            name = f"library{i:02d}" if by_position else re.sub(r"[^A-Za-z0-9_.-]+", "-", p.id)
            prompts[name] = p.text
    return prompts


def validation_schedule(schedule: RolloutSchedule, num_steps: int) -> RolloutSchedule:
    """The student's σs, or `num_steps` σs spread evenly (by step index) between its first and last."""
    if num_steps == schedule.num_steps:
        return schedule
    sigmas = np.interp(
        np.linspace(0, schedule.num_steps - 1, num_steps), np.arange(schedule.num_steps), schedule.sigmas
    )
    return RolloutSchedule(
        sigmas=tuple(float(s) for s in sigmas),
        num_frame_per_block=schedule.num_frame_per_block,
        independent_first_frame=schedule.independent_first_frame,
        context_sigma=schedule.context_sigma,
    )


def frame_grid(rows: list[np.ndarray], num_frames: int = GRID_FRAMES) -> np.ndarray:
    """uint8 image: one row per (T,H,W,3) clip, `num_frames` evenly spaced frames across."""
    cells = []
    for clip in rows:
        idx = np.linspace(0, len(clip) - 1, min(num_frames, len(clip))).round().astype(int)
        cells.append(np.concatenate(list(clip[idx]), axis=1))
    grid = np.concatenate(cells, axis=0)
    scale = max(1, -(-GRID_MIN_SIDE // rows[0].shape[1]))
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


@dataclass
class ValidationResult:
    folder: Path
    videos: dict[str, Path]
    grid: Path
    scores: dict[str, float]


class Validator:
    """Encodes the prompts once; `run(step, transformer, ema)` samples, writes, judges, along the student's
    `schedule` (or as many steps as validation_num_inference_steps asks, spread along it)."""

    def __init__(self, params: Params, device: torch.device | str, schedule: RolloutSchedule):
        from dmd.wan.decode import LatentDecoder
        from dmd.wan.loading import encode_prompts, load_text_encoder, load_vae

        self.params = params
        cfg = params.train
        self.prompts = validation_prompts(params)
        if not self.prompts:
            raise ValueError("validation needs train.validation_prompt or train.validation_prompt_library")
        tokenizer, text_encoder = load_text_encoder(params.model, "cpu")
        length = params.model.max_sequence_length
        self.embeds = {
            k: encode_prompts(tokenizer, text_encoder, [p], length) for k, p in self.prompts.items()
        }
        self.negative = (
            encode_prompts(tokenizer, text_encoder, [params.model.negative_prompt], length)
            if cfg.validation.validation_guidance > 1
            else None
        )
        del text_encoder
        self.vae = load_vae(params.model, device)
        self.decode = LatentDecoder(self.vae)
        self.schedule = validation_schedule(schedule, cfg.validation.validation_num_inference_steps)
        self.world = self._toy_world()
        self.root = Path(cfg.run.output_dir) / "validation"

    def _toy_world(self):
        """The toy world when every prompt is a toy caption (its judge can score them), else None."""
        if self.params.generate.prompts != "toy":
            return None
        from dmd.toy.world import ToyWorld, parse_caption

        try:
            for p in self.prompts.values():
                parse_caption(p)
        except ValueError:
            log.info("validation prompts are not all toy captions; the judge's scores are left out")
            return None
        return ToyWorld(self.params.toy)

    def weight_variants(self, ema: EMA | None) -> list[str]:
        mode = self.params.train.ema.ema_validation
        if ema is None or mode == "none":
            return ["live"]
        return ["ema"] if mode == "ema_only" else ["live", "ema"]

    @torch.no_grad()
    def run(self, step: int, transformer, ema: EMA | None, write: bool = True) -> ValidationResult | None:
        """Sample every prompt with every weight variant; decode, write and judge them where `write` (the other
        processes of a sharded run only take part in the student's forwards), else return None."""
        cfg = self.params.train
        shape = video_latent_shape(self.params, transformer, self.vae)
        folder = self.root / f"step-{step:07d}"
        videos, clips, scores = {}, {}, {}
        was_training = transformer.training
        transformer.eval()
        try:
            for variant in self.weight_variants(ema):
                weights = ema.swapped_in() if variant == "ema" else contextlib.nullcontext()
                with weights:
                    for name, embeds in self.embeds.items():
                        latents = generate_latents(
                            transformer,
                            self.schedule,
                            embeds,
                            shape,
                            cfg.validation.validation_seed,
                            negative_embeds_1LD=self.negative,
                            guidance=cfg.validation.validation_guidance,
                        )
                        if not write:
                            continue
                        clip = self.decode(latents)[0]
                        key = f"{variant}-{name}"
                        clips[key] = clip
                        videos[key] = write_video(folder / f"{key}.mp4", clip, fps=self.params.generate.fps)
                if write and self.world is not None:
                    scores.update(self._judge(variant, [clips[f"{variant}-{n}"] for n in self.embeds]))
        finally:
            transformer.train(was_training)
        if not write:
            return None
        grid_path = folder / "grid.png"
        with atomic_path(grid_path) as tmp:
            Image.fromarray(frame_grid(list(clips.values()))).save(tmp, format="PNG")
        return ValidationResult(folder, videos, grid_path, scores)

    def _judge(self, variant: str, clips: list[np.ndarray]) -> dict[str, float]:
        from dmd.toy.judge import judge_clips

        result = judge_clips(clips, list(self.prompts.values()), self.world)
        flat = {f"validation/{variant}/accuracy_{k}": v for k, v in result["accuracy"].items()}
        for key in ("accuracy_all", "sharpness", "motion_consistency", "fd", "diversity"):
            if result.get(key) is not None:
                flat[f"validation/{variant}/{key}"] = float(result[key])
        return flat


class Validation(Callback):
    """Validates the student every `validation_step_interval` steps (and before the first step unless
    `disable_benchmark`), reporting to the tracker and the webhook."""

    def __init__(
        self,
        params: Params,
        device,
        schedule: RolloutSchedule,
        roles,
        ema: EMA | None,
        tracker,
        notify,
        write: bool = True,
    ):
        self.validator = Validator(params, device, schedule)
        self.write = write
        self.roles, self.ema, self.tracker, self.notify = roles, ema, tracker, notify
        self.interval = params.train.validation.validation_step_interval
        self.before_training = not params.train.validation.disable_benchmark
        self.fps = params.generate.fps

    def on_train_start(self, run) -> None:
        if run.step == 0 and self.before_training:
            self.validate(0)

    def on_step_end(self, step: int) -> None:
        if step % self.interval == 0:
            self.validate(step)

    def validate(self, step: int) -> None:
        self.roles.activate_student()
        result = self.validator.run(step, self.roles.student_transformer, self.ema, write=self.write)
        if result is None:
            return
        self.tracker.log_media({"validation/grid": result.grid}, result.videos, step, fps=self.fps)
        if result.scores:
            self.tracker.log(result.scores, step)
        scores = ", ".join(f"{k.rsplit('/', 1)[-1]}={v:.3g}" for k, v in sorted(result.scores.items()))
        self.notify("validation", f"validation at step {step}: {result.grid}" + (f" ({scores})" if scores else ""),
                    step, grid=str(result.grid), scores=result.scores)  # fmt: skip


def has_validation(params: Params) -> bool:
    return bool(
        params.train.validation.validation_prompt or params.train.validation.validation_prompt_library
    )
