"""Typed settings: `params.yaml` is read and validated here, once, and nowhere else.

Keys keep the names of the seed trainer's config (`distillation_config.*`, `learning_rate`, `lora_rank`, ...)
so a user of that trainer recognises them. Unknown keys are errors that name the key and the closest valid one.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

PRECISIONS = ("no_change", "fp32", "bf16", "fp16", "int8-quanto")
Precision = Literal["no_change", "fp32", "bf16", "fp16", "int8-quanto"]

DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


AUTO = "auto"
# a device entry before torch reads it: a type and an optional index (`cuda`, `cuda:1`, `cpu`)
_DEVICE_ENTRY = re.compile(r"[a-z][a-z0-9_]*(:\d+)?")


def device_setting_problem(value: str) -> str | None:
    """Why `value` is not a device setting (auto, a device name, or a comma-separated list of names), else None.
    Syntax only, so settings for a GPU machine validate anywhere; dmd.wan.device checks the devices exist."""
    if value.strip() == AUTO:
        return None
    entries = [e.strip() for e in value.split(",")]
    bad = [e for e in entries if not _DEVICE_ENTRY.fullmatch(e) or e == AUTO]
    if not bad:
        return None
    return (
        f"{value!r} is not a device setting: use 'auto' (every visible CUDA device, else the CPU), one device "
        f"such as 'cuda:0' or 'cpu', or a comma-separated list such as 'cuda:0,cuda:1'"
        + (f" (bad entry {bad[0]!r})" if len(entries) > 1 else "")
    )


def _device_setting(value: str) -> str:
    problem = device_setting_problem(value)
    if problem:
        raise ValueError(problem)
    return value


class ConfigError(ValueError):
    """Bad settings. `problems` holds one human-readable line per problem, each naming its key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:  # one line, the message a user reads first
            super().__init__(f"{source}: {problems[0]}")
        else:
            super().__init__(
                f"{source}: {len(problems)} problems\n" + "\n".join(f"  - {p}" for p in problems)
            )


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """The teacher: a diffusers Wan directory or hub id, and how to hold its frozen weights."""

    pretrained_model_name_or_path: str = "models/toy-teacher"
    pretrained_t5_model_name_or_path: str | None = Field(
        None, description="Text encoder + tokenizer location; defaults to pretrained_model_name_or_path."
    )
    revision: str | None = None
    model_family: Literal["wan"] = "wan"
    base_model_precision: Precision = "no_change"
    text_encoder_1_precision: Precision = "no_change"
    quantize_via: Literal["cpu", "accelerator"] = Field(
        "cpu", description="Where int8 quantization runs before the weights move to the training device."
    )
    attention_mechanism: str = Field(
        "diffusers",
        description="'diffusers' keeps the default; anything else is a diffusers attention backend.",
    )
    flow_schedule_shift: float = Field(
        3.0, gt=0, description="Shift of the teacher's sampling schedule (the scheduler's `shift`)."
    )
    max_sequence_length: int = Field(512, ge=1, description="T5 tokens per prompt, as WanPipeline uses.")
    negative_prompt: str = Field(
        DEFAULT_NEGATIVE_PROMPT,
        description="The unconditional side of every CFG: the teacher's samples, the real score, validation, "
        "`dmd sample` and evaluation.",
    )

    @property
    def text_encoder_path(self) -> str:
        return self.pretrained_t5_model_name_or_path or self.pretrained_model_name_or_path


class ToyConfig(Section):
    """The built-in toy video world (dmd/toy/world.py)."""

    seed: int = 0
    height: int = Field(32, gt=0)
    width: int = Field(32, gt=0)
    num_frames: int = 21
    fps: int = Field(8, gt=0, description="Frame rate of the written mp4s.")
    num_held_out: int = Field(
        6, ge=1, description="Caption combinations kept out of training, for evaluation."
    )

    @model_validator(mode="after")
    def _frames(self):
        _check_frames("toy.num_frames", self.num_frames)
        return self

    @field_validator("height", "width")
    @classmethod
    def _size(cls, value: int) -> int:
        return check_size(value)


class ToyTeacherConfig(Section):
    """Training of the tiny teacher on the toy world (dmd/toy/teacher.py)."""

    output_dir: str = "models/toy-teacher"
    seed: int = 0
    num_clips: int = Field(2048, ge=1, description="World clips drawn once from the training captions.")
    vae_steps: int = Field(3000, ge=0, description="VAE steps on windows of vae_num_frames frames.")
    vae_batch_size: int = Field(8, ge=1)
    vae_learning_rate: float = Field(2e-3, gt=0)
    vae_full_clip_steps: int = Field(
        300,
        ge=0,
        description="Then VAE steps on whole clips at vae_full_clip_learning_rate: short windows get past the "
        "background-only plateau fast, whole clips teach the causal encoder/decoder caches the full length.",
    )
    vae_full_clip_batch_size: int = Field(4, ge=1)
    vae_full_clip_learning_rate: float = Field(5e-4, gt=0)
    vae_num_frames: int = Field(
        9,
        ge=1,
        description="Frames per VAE training window (4k+1); windows shorter than the clips leave the causal "
        "caches of later latent frames untrained.",
    )
    vae_object_weight: float = Field(
        4.0,
        ge=0,
        description="Extra reconstruction weight on object pixels and their margin (objects cover ~8% of a frame).",
    )
    vae_object_margin: int = Field(
        2,
        ge=0,
        description="Background pixels within this distance of an object weigh like the object: the background "
        "a shape leaves (a cross's empty corners) is what tells it from a blob.",
    )
    vae_latent_weight: float = Field(
        1e-3,
        ge=0,
        description="Weight of an L2 penalty on the VAE's posterior means next to the reconstruction MSE.",
    )
    transformer_steps: int = Field(10000, ge=1)
    transformer_batch_size: int = Field(32, ge=1)
    transformer_learning_rate: float = Field(1e-3, gt=0)
    ema_decay: float = Field(
        0.995, ge=0, lt=1, description="EMA of the transformer weights; the EMA weights are the ones saved."
    )
    caption_dropout_probability: float = Field(0.1, ge=0, lt=1)
    num_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    attention_head_dim: int = Field(32, ge=1)
    ffn_dim: int = Field(256, ge=1)
    z_dim: int = Field(16, ge=1, description="VAE latent channels (the transformer's in/out channels).")
    vae_base_dim: int = Field(16, ge=1)
    text_dim: int = Field(32, ge=4, description="Width of the tiny UMT5 text encoder.")

    @model_validator(mode="after")
    def _frames(self):
        _check_frames("toy_teacher.vae_num_frames", self.vae_num_frames)
        return self


class GenerateConfig(Section):
    """Teacher data generation (dmd/data/generate.py): shards of teacher videos, resumable and reproducible."""

    output_dir: str = "data/teacher"
    prompts: str = Field(
        "toy",
        description="'toy' for the toy world's training captions (cycled), or a txt/jsonl/parquet prompt library.",
    )
    num_videos: int = Field(
        90,
        ge=1,
        description="Target size of the data set: shards 0..N-1 with N = ceil(num_videos / shard_size).",
    )
    shard_size: int = Field(
        15, ge=1, description="Videos per shard, the unit that is written, resumed and backfilled."
    )
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    flow_shift: float | None = Field(None, gt=0, description="Defaults to model.flow_schedule_shift.")
    height: int = Field(32, gt=0)
    width: int = Field(32, gt=0)
    num_frames: int = 21
    fps: int = Field(8, gt=0, description="Frame rate of the written mp4s.")
    batch_size: int = Field(15, ge=1, description="Videos per teacher call (a shard is sampled in batches).")
    seed: int = Field(
        0, description="Base seed; sample i's seed is a hash of (seed, i), so any shard regenerates alone."
    )
    save_latents: bool = Field(True, description="Save each video's exact teacher latents next to it.")
    save_noise: bool = Field(True, description="Save each video's initial noise next to it.")
    save_trajectory: bool = Field(
        False,
        description="Also save each video's teacher trajectory at the student's σs (train.distillation_config."
        "dmd_denoising_steps, warped when warp_denoising_steps), to initialise a student by regression on it; "
        "the clean end is the latents file. Turning it on adds trajectories to existing shards without "
        "regenerating their videos.",
    )
    device: str = Field(
        "auto",
        description="Where the teacher samples: 'auto' (every visible CUDA device, else the CPU), a torch device "
        "('cuda:0', 'cpu'), or a comma-separated list ('cuda:0,cuda:1'). One teacher per listed device; each shard "
        "runs on the least busy one. Which device made a sample does not change it.",
    )
    task_runner: Literal["thread", "dask"] = "thread"
    workers: int = Field(
        2,
        ge=1,
        description="Shards in flight per device. Thread runner: workers × devices threads; the shards on a device "
        "share its teacher and take turns per batch, so file writing overlaps sampling. Local Dask cluster: with "
        "one device, `workers` processes (each loads its own teacher); with several, one process per device "
        "with `workers` threads.",
    )
    dask_address: str | None = Field(
        None, description="An existing Dask scheduler; None starts a local cluster."
    )
    retries: int = Field(2, ge=0, description="Retries of a failed shard task.")
    retry_delay_seconds: float = Field(10, ge=0)
    backfill_interval_seconds: int | None = Field(
        3600,
        ge=1,
        description="Schedule of the generate-teacher-data/backfill deployment (or use backfill_cron).",
    )
    backfill_cron: str | None = Field(
        None, description="Cron schedule of the backfill deployment instead of an interval."
    )
    backfill_shards_per_run: int = Field(
        1, ge=1, description="Missing shards each scheduled backfill run generates."
    )

    @field_validator("height", "width")
    @classmethod
    def _size(cls, value: int) -> int:
        return check_size(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _device_setting(value)

    @model_validator(mode="after")
    def _shape(self):
        _check_frames("generate.num_frames", self.num_frames)
        if self.save_trajectory and not self.save_latents:
            raise ValueError(
                "generate.save_trajectory needs generate.save_latents: true (the latents file is the "
                "trajectory's clean end); turn save_latents on or save_trajectory off"
            )
        if self.backfill_interval_seconds is not None and self.backfill_cron is not None:
            raise ValueError(
                "generate.backfill_interval_seconds and generate.backfill_cron are both set; "
                "set one of them to null"
            )
        return self

    @property
    def num_shards(self) -> int:
        return -(-self.num_videos // self.shard_size)


class DatasetConfig(Section):
    """One dataset, in the shape of the seed trainer's multidatabackend.json entries (dmd/data/datasets.py).

    `resolution_type`, `resolution` and `minimum_image_size` left unset take the `cache` section's values.
    """

    id: str = Field("teacher", description="Name of the dataset in the cache index and in problems.parquet.")
    dataset_type: Literal["video"] = "video"
    manifest: str | None = Field(
        None,
        description="The generate stage's output: a manifest.parquet, a shard directory, or the directory that "
        "holds manifest.parquet or shard-*/manifest.parquet. Video paths are relative to their shard.",
    )
    instance_data_dir: str | None = Field(
        None,
        description="A folder of videos (searched recursively) with sidecar captions: clip.mp4 + clip.txt.",
    )
    caption_column: str = Field("prompt", description="Manifest column holding each video's caption.")
    caption_strategy: Literal["textfile", "filename"] = Field(
        "textfile",
        description="Captions of an instance_data_dir, as SimpleTuner names them: textfile, the sidecar clip.txt; "
        "filename, the file name with underscores as spaces (a_red_square.mp4 → 'a red square').",
    )
    cache_dir: str | None = Field(
        None, description="Where this dataset's latent shards go; default: <cache.output_dir>/latents/<id>."
    )
    resolution_type: Literal["pixel_area", "area", "pixel"] | None = Field(
        None,
        description="pixel_area: `resolution` is the side of a square of the target pixel area (480 → 480·480 "
        "pixels, aspect kept); area: `resolution` in megapixels; pixel: the shorter edge in pixels.",
    )
    resolution: float | None = Field(None, gt=0, description="Target size, read per resolution_type.")
    crop: bool = Field(
        False,
        description="false: resize straight to the aspect bucket (aspect off by at most the bucket rounding); "
        "true: resize to cover the bucket keeping aspect, then center-crop.",
    )
    num_frames: int = Field(
        21, ge=1, description="Frames per clip; snapped down to 4k+1 (Wan's VAE packs 4 frames per latent)."
    )
    frame_interval: int = Field(1, ge=1, description="Take every n-th frame of the source video.")
    minimum_image_size: float | None = Field(
        None,
        ge=0,
        description="Skip smaller videos; measured like `resolution`: pixel_area: sqrt(height·width) in pixels, "
        "area: megapixels, pixel: the shorter edge in pixels. 0 keeps everything.",
    )
    repeats: int = Field(0, ge=0, description="Extra times each sample is seen per epoch (0: once).")
    disabled: bool = Field(False, description="Leave this dataset out of the cache.")

    @model_validator(mode="after")
    def _source(self):
        if (self.manifest is None) == (self.instance_data_dir is None):
            raise ValueError(f"dataset '{self.id}': set exactly one of 'manifest' or 'instance_data_dir'")
        return self


class CacheConfig(Section):
    """VAE latent + T5 embedding cache (dmd/data/cache/build.py) and its training loader (cache/loader.py)."""

    output_dir: str = Field("cache", description="index.parquet, problems.parquet, text/, latents/.")
    data_backend_config: str | None = Field(
        None, description="A multidatabackend.json; its entries are added to `datasets`."
    )
    datasets: list[DatasetConfig] = Field(default_factory=lambda: [DatasetConfig(manifest="data/teacher")])
    resolution_type: Literal["pixel_area", "area", "pixel"] = Field(
        "pixel_area", description="Default for datasets that leave it unset; see DatasetConfig."
    )
    resolution: float = Field(32, gt=0, description="Default for datasets that leave it unset.")
    minimum_image_size: float = Field(0, ge=0, description="Default for datasets that leave it unset.")
    aspect_bucket_rounding: int = Field(
        2, ge=0, description="Decimal places the aspect ratio (width/height) is rounded to before bucketing."
    )
    compress_disk_cache: bool = Field(
        False, description="zstd-compress each tensor inside the safetensors shards (random access is kept)."
    )
    delete_problematic_images: bool = Field(
        False,
        description="Delete the files in problems.parquet that are no usable video at all (empty, not a video, "
        "corrupt); valid videos left out for their caption, size or length are never deleted.",
    )
    disable_bucket_pruning: bool = Field(
        True,
        description="false: the training loader drops buckets with fewer samples than its batch (logged); "
        "true: it keeps them, filling their one batch by repeating their samples.",
    )
    vae_batch_size: int = Field(4, ge=1, description="Clips per VAE encode call (all of one bucket).")
    text_batch_size: int = Field(16, ge=1, description="Captions per text-encoder call.")
    chunk_size: int = Field(64, ge=1, description="Clips per Prefect task and per latent shard.")
    use_teacher_latents: bool = Field(
        True,
        description="Take the generate stage's exact latents (and noise) when the clip is used whole at its "
        "own size and the video is unchanged since generation; otherwise encode the video.",
    )
    num_workers: int = Field(2, ge=0, description="Threads decoding and resizing videos (0: inline).")
    device: str = Field(
        "auto",
        description="Where the VAE and text encoder run, as generate.device: 'auto', a device, or a list; with "
        "several, one VAE per device and chunks encoded on all of them at once (captions on the first).",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _device_setting(value)


class OdeInitConfig(Section):
    """The student's initialisation by regression on the teacher's ODE trajectories, before DMD
    (dmd/training/ode_init.py; CausVid, Self-Forcing). Needs generate.save_trajectory."""

    enabled: bool = Field(
        False,
        description="Regress the student (block-causal when train.causal) on the teacher's trajectories at its "
        "steps, and start DMD from the result; false: DMD starts from the teacher's weights.",
    )
    output_dir: str = Field("output/ode-init", description="The ODE-initialised student and ode_init.json.")
    max_train_steps: int = Field(200, ge=1, description="Regression steps.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (train.optimizer, constant).")
    train_batch_size: int = Field(8, ge=1, description="Samples per step.")
    seed: int = Field(0, description="Seeds the data order and the steps drawn per block.")


class DistillationConfig(Section):
    """`distillation_config` of the seed trainer, every key live (dmd/distill/method.py, dmd/distill/rollout.py)."""

    dmd_denoising_steps: list[int] = Field(
        default_factory=lambda: [1000, 757, 522],
        description="The student's steps on the 0–1000 scale, decreasing; σ_i = t_i/1000 unless warped.",
    )
    warp_denoising_steps: bool = Field(
        False,
        description="Warp dmd_denoising_steps through model.flow_schedule_shift (σ = shift(t/1000)), as "
        "Self-Forcing's DMD configs do (warp_denoising_step: true). Off in the toy default, which was tuned "
        "unwarped (docs/results.md); for Wan 2.1 at flow_schedule_shift 5 follow Self-Forcing and turn it on.",
    )
    generator_update_interval: int = Field(
        1, ge=1, description="The student updates on steps 0, n, 2n, …; the critic on every step."
    )
    real_score_guidance_scale: float = Field(
        3.0,
        ge=0,
        description="CFG of the real score, x_u + w·(x_c − x_u): diffusers' form, as the seed's trainer and DMD2 "
        "(1 = no CFG). Self-Forcing's guidance_scale g is x_c + g·(x_c − x_u), i.e. w = 1 + g here.",
    )
    fake_score_guidance_scale: float = Field(
        0.0,
        ge=0,
        description="Guidance of the fake score in the DMD gradient, Self-Forcing's form F_c + w·(F_c − F_u): "
        "0 = the conditional critic alone (one pass), continuous in w.",
    )
    fake_score_lr: float = Field(1e-5, gt=0, description="The critic's AdamW learning rate.")
    fake_score_weight_decay: float = Field(0.01, ge=0, description="The critic's AdamW weight decay.")
    fake_score_betas: tuple[float, float] = Field((0.9, 0.999), description="The critic's AdamW betas.")
    fake_score_eps: float = Field(1e-8, gt=0, description="The critic's AdamW eps.")
    fake_score_grad_clip: float = Field(
        1.0, ge=0, description="Clip of the critic's gradient norm before its step (0 = no clipping)."
    )
    fake_score_lora_rank: int | None = Field(
        None, ge=1, description="Critic as a LoRA adapter of this rank on the shared base; None: a full copy."
    )
    fake_score_lora_alpha: float | None = Field(
        None, gt=0, description="LoRA alpha of the critic adapter; None = fake_score_lora_rank (scale 1)."
    )
    min_timestep_ratio: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Clamp of the score timestep, applied after the shift as in Self-Forcing and FastVideo: "
        "σ_s = clamp(shift(u, timestep_shift), min_timestep_ratio, max_timestep_ratio).",
    )
    max_timestep_ratio: float = Field(0.98, ge=0, le=1, description="Upper end of that clamp.")
    num_frame_per_block: int = Field(
        3, ge=1, description="Latent frames per time block of the rollout; the clip's length = bidirectional."
    )
    independent_first_frame: bool = Field(False, description="The first time block is the first frame alone.")
    same_step_across_blocks: bool = Field(
        False,
        description="One exit step for all time blocks (else one drawn per block). As in Self-Forcing, only a "
        "shared exit lets ts_schedule / ts_schedule_max bound the score timestep, so a one-block student "
        "that wants those bounds sets it too.",
    )
    last_step_only: bool = Field(False, description="Every block exits at the last step (no exit sampling).")
    num_training_frames: int = Field(
        21,
        ge=1,
        description="Latent frames a training rollout makes (Self-Forcing's rollout length), whatever the "
        "cached clips' length; the scores see the whole rollout (Self-Forcing, trained at 21, scores only the "
        "last 21 of a longer one). rollout_from: data needs clips at least this long.",
    )
    context_noise: float = Field(
        0,
        ge=0,
        le=1000,
        description="Timestep (0–1000) to which earlier blocks' clean output is re-noised as later blocks' context.",
    )
    ts_schedule: bool = Field(
        True,
        description="u of the score timestep at least the step after the exit step (0 after the last), before "
        "timestep_shift (Self-Forcing). Needs same_step_across_blocks: with per-block exits there is no one "
        "exit to bound by and min_score_timestep is the floor instead.",
    )
    ts_schedule_max: bool = Field(
        False,
        description="u of the score timestep at most the exit step, before timestep_shift; like ts_schedule it "
        "needs same_step_across_blocks.",
    )
    min_score_timestep: float = Field(
        0,
        ge=0,
        le=1000,
        description="Floor (0–1000) on u of the score timestep when no ts_schedule floor applies (Self-Forcing).",
    )
    timestep_shift: float = Field(
        1.0, gt=0, description="Shift of u for the score timestep, applied before the ratio clamp."
    )
    rollout_from: Literal["noise", "data"] = Field(
        "noise",
        description="noise: backward simulation from pure noise (data-free); data: cached latents noised to "
        "the exit step, one student step (FastVideo's default).",
    )
    regression_loss_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the regression of the student's first step from the teacher's noise onto the "
        "teacher's latents (needs the noise in the cache); the original DMD's guard against mode collapse. The "
        "pair is the teacher's: the whole cached clip under its own caption, whatever caption dropout and "
        "num_training_frames do to the rollout.",
    )
    gen_cls_loss_weight: float = Field(
        0.0,
        ge=0,
        description="DMD2's GAN term for the student: weight of the non-saturating loss softplus(−D) of a "
        "classification head on the critic's features of the noised student clip (needs guidance_cls_loss_weight "
        "> 0, or the head never learns).",
    )
    guidance_cls_loss_weight: float = Field(
        0.0,
        ge=0,
        description="DMD2's GAN term for the critic: weight of softplus(−D(real)) + softplus(D(fake)), the head "
        "telling the cached teacher clips from the student's, both noised to the critic's timestep. The head "
        "trains with the critic (its optimizer, its checkpoint), full copy or LoRA.",
    )
    cls_feature_layer: int | None = Field(
        None,
        ge=0,
        description="The transformer block whose output tokens the classification head reads (0 = the first); "
        "None = the middle block, as DMD2 reads the UNet's bottleneck.",
    )
    consistency_loss_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of an rCM-style consistency term on the teacher's trajectories, in discrete time: "
        "a point of the teacher's (noise → clip) pair at σ_i of the teacher's sampling grid, one teacher Euler "
        "step (its CFG) to σ_(i+1), and the student's x0 at σ_i regressed onto its own stop-gradient x0 at "
        "σ_(i+1). Needs the teacher's noise in the cache and a one-block student.",
    )
    consistency_grid_steps: int = Field(
        50,
        ge=1,
        description="Intervals of the consistency term's σ grid: uniform in t, shifted by "
        "model.flow_schedule_shift, as the teacher's sampler places generate.num_inference_steps steps; the "
        "teacher's step uses real_score_guidance_scale, the CFG it samples with.",
    )
    critic_reuses_generator_rollout: bool = Field(
        False,
        description="On steps where the student updates, the critic trains on the detached output of the "
        "student's own rollout (DMD2's way) instead of rolling out again: one rollout per step.",
    )

    @field_validator("dmd_denoising_steps", mode="before")
    @classmethod
    def _parse_steps(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return [int(v) for v in value.replace(" ", "").split(",") if v]
            except ValueError as e:
                raise ValueError(
                    f"'{value}' is not a comma-separated list of integers, e.g. '1000,757,522'"
                ) from e
        return value

    @field_validator("dmd_denoising_steps")
    @classmethod
    def _check_steps(cls, steps: list[int]) -> list[int]:
        if not steps:
            raise ValueError("needs at least one step, e.g. [1000, 757, 522]")
        if any(not 0 < t <= 1000 for t in steps):
            raise ValueError(f"{steps}: every step must lie in (0, 1000]")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"{steps}: steps must be strictly decreasing, e.g. [1000, 757, 522]")
        return steps

    @model_validator(mode="after")
    def _ratios(self):
        if self.min_timestep_ratio >= self.max_timestep_ratio:
            raise ValueError(
                f"min_timestep_ratio ({self.min_timestep_ratio}) must be below max_timestep_ratio "
                f"({self.max_timestep_ratio})"
            )
        if self.gen_cls_loss_weight > 0 and self.guidance_cls_loss_weight == 0:
            raise ValueError(
                "gen_cls_loss_weight > 0 needs guidance_cls_loss_weight > 0: the student's GAN loss reads a "
                "classification head that only the critic's GAN loss trains"
            )
        return self


class TrainGroup(Section):
    """A group of `train:` settings: grouped in code, flat in params.yaml (TrainConfig routes the keys)."""


class RunConfig(TrainGroup):
    """How long the run goes, where its student lands, and how it is launched."""

    seed: int = Field(1000, description="Seeds the LoRA init, the data order and every draw of the run.")
    max_train_steps: int = Field(
        600,
        ge=0,
        description="Steps (one critic update + maybe one student update each); 0: use num_train_epochs.",
    )
    num_train_epochs: int = Field(
        0,
        ge=0,
        description="Epochs over the cache, used when max_train_steps is 0 (or see ignore_final_epochs).",
    )
    ignore_final_epochs: bool = Field(
        True,
        description="When both max_train_steps and num_train_epochs are set: true lets max_train_steps decide the "
        "end (epochs past it are ignored); false ends at whichever comes first.",
    )
    output_dir: str = Field("output/student", description="The exported student; validation/ inside it.")
    num_processes: int | Literal["auto"] = Field(
        1,
        description="Training processes (one per GPU, or CPU processes with gloo); above 1 the train flow starts "
        "them with torchrun, every socket on loopback (dmd/training/launch.py). 'auto': one per visible CUDA "
        "device, and 1 on a machine without CUDA.",
    )
    fsdp: bool = Field(
        False,
        description="Shard the full trainable copies (a model_type: full student, a full-copy critic) over the "
        "processes with torch's FSDP2, one unit per transformer block: for students too big to hold whole on one "
        "GPU (dmd/training/sharding.py). The frozen base stays whole; checkpoints and the export are gathered.",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="accelerate autocast for the forward passes; fp16 adds a gradient scaler."
    )
    max_consecutive_nonfinite: int = Field(
        5, ge=1, description="Stop after this many consecutive steps with a non-finite loss or gradient."
    )

    @field_validator("num_processes", mode="before")
    @classmethod
    def _num_processes(cls, value: Any) -> Any:
        # one message for both members of the union, instead of pydantic's one per member
        if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(
            f"{value!r}: expected a whole number of processes (1 or more) or 'auto' (one per visible CUDA device)"
        )


class StudentConfig(TrainGroup):
    """What is trained: a LoRA on the frozen teacher or a full copy."""

    model_type: Literal["lora", "full"] = Field(
        "lora", description="Student as a LoRA adapter on the frozen teacher, or a full trainable copy."
    )
    lora_rank: int = Field(16, ge=1, description="Rank of the student's LoRA (model_type: lora).")
    lora_alpha: float = Field(16, gt=0, description="Alpha of the student's LoRA; its scale is alpha/rank.")
    lora_type: Literal["standard"] = Field("standard", description="peft LoRA on attention and FFN linears.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute transformer activations in backward (diffusers' gradient checkpointing).",
    )
    causal: bool = Field(
        False,
        description="A block-causal student with a KV cache (Self-Forcing): each time block of "
        "distillation_config attends to itself and earlier blocks only, and generates after them, streaming and "
        "past the trained length; false: each block re-reads its whole prefix bidirectionally.",
    )


class BatchConfig(TrainGroup):
    """What each step trains on."""

    train_batch_size: int = Field(8, ge=1, description="Samples per micro-batch on each process.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per step; gradients are summed, so n × batch b equals batch n·b."
    )
    caption_dropout_probability: float = Field(
        0.0, ge=0, lt=1, description="Per sample, train on the empty prompt's embeddings instead (seeded)."
    )


class OptimConfig(TrainGroup):
    """The optimizer, its schedule and gradient clipping, for student and critic."""

    learning_rate: float = Field(5e-5, gt=0, description="The student's peak learning rate.")
    optimizer: Literal["adamw", "adamw_bf16"] = Field(
        "adamw",
        description="adamw: torch AdamW; adamw_bf16: AdamW with fp32 master weights and moments for bf16/fp16 "
        "parameters (updates below bf16 precision are kept, not rounded away). Student and critic alike.",
    )
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr"] = (
        Field(
            "constant",
            description="transformers' schedules over the run's steps, for student and critic (each from its own lr). "
            "constant ignores lr_warmup_steps; the others warm up linearly first.",
        )
    )
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up from 0, in optimizer steps.")
    lr_min_ratio: float = Field(
        0.1, ge=0, le=1, description="Floor of cosine_with_min_lr, as a fraction of lr."
    )
    grad_clip_method: Literal["value", "norm"] = Field(
        "norm",
        description="The student's clipping: norm rescales to max_grad_norm, value clamps each element.",
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Limit of grad_clip_method; 0 disables clipping.")


class EmaConfig(TrainGroup):
    """The student's exponential moving average."""

    use_ema: bool = Field(True, description="Keep an EMA of the student; the export holds the EMA weights.")
    ema_decay: float = Field(
        0.99,
        gt=0,
        lt=1,
        description="Decay of the EMA after its warm-up: the n-th fold uses min(ema_decay, (1 + n)/(10 + n)) as "
        "diffusers' EMAModel, so the export holds nothing of the weights training started from.",
    )
    ema_update_interval: int = Field(
        1, ge=1, description="Fold the weights into the EMA every n student steps."
    )
    ema_validation: Literal["none", "ema_only", "comparison"] = Field(
        "ema_only", description="Validate with the live weights, the EMA weights, or both side by side."
    )


class CheckpointConfig(TrainGroup):
    """Where checkpoints go, how many are kept, and which one a run resumes from."""

    checkpoint_dir: str = "checkpoints"
    checkpoint_step_interval: int = Field(200, ge=1)
    checkpoints_total_limit: int = Field(
        3, ge=1, description="Newest checkpoints kept; older ones are deleted."
    )
    resume_from_checkpoint: str | None = Field(
        "latest", description="'latest' (fresh start when there is none), a checkpoint folder, or null."
    )


class TrackingConfig(TrainGroup):
    """Where progress is reported: metrics, trackers and webhooks."""

    report_to: Literal["none", "wandb", "dvclive"] = Field(
        "dvclive",
        description="dvclive writes metrics_dir for `dvc plots`; wandb also writes it and logs to wandb "
        "(offline without WANDB_API_KEY); none logs to the console only.",
    )
    metrics_dir: str = Field(
        "metrics/train", description="dvclive's folder: metrics.json and plots/metrics/*.tsv."
    )
    tracker_project_name: str = "dmd-training"
    tracker_run_name: str = "dmd-student"
    webhook_config: str | None = Field(
        None, description="A JSON file: webhook_url, webhook_type (raw|discord), message_prefix, log_level."
    )


class HubConfig(TrainGroup):
    """Uploads to the Hugging Face Hub."""

    push_to_hub: bool = False
    push_checkpoints_to_hub: bool = False
    hub_model_id: str | None = None


class ValidationConfig(TrainGroup):
    """Sample videos rendered during training."""

    disable_benchmark: bool = Field(
        True, description="false: also validate before the first step, as a baseline."
    )
    validation_step_interval: int = Field(200, ge=1)
    validation_prompt: str | None = None
    validation_prompt_library: str | None = Field(
        None,
        description="A JSON file: a list of prompts or {name: prompt}; validated with validation_prompt.",
    )
    validation_guidance: float = Field(1.0, ge=0, description="CFG scale of validation samples; ≤ 1: none.")
    validation_num_inference_steps: int = Field(
        3,
        ge=1,
        description="Steps of validation samples: the student's own σs when equal to their number, else that many "
        "σs spread evenly between its first and last.",
    )
    validation_resolution: str = Field(
        "32x32", description="WIDTHxHEIGHT of validation and `dmd sample` videos."
    )
    validation_num_video_frames: int = 21
    validation_seed: int = Field(
        42, description="Each validation prompt's seed, the same at every validation."
    )

    @field_validator("validation_resolution")
    @classmethod
    def _resolution(cls, value: str) -> str:
        parts = value.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"'{value}' is not WIDTHxHEIGHT, e.g. '832x480'")
        bad = [int(p) for p in parts if int(p) % 16]
        if bad:
            fixed = "x".join(str(round(int(p) / 16) * 16 or 16) for p in parts)
            raise ValueError(f"'{value}': width and height must be multiples of 16; use e.g. '{fixed}'")
        return value

    @field_validator("validation_num_video_frames")
    @classmethod
    def _val_frames(cls, value: int) -> int:
        _check_frames("validation_num_video_frames", value)
        return value

    @property
    def validation_size(self) -> tuple[int, int]:
        """(height, width) of validation videos."""
        w, h = (int(p) for p in self.validation_resolution.lower().split("x"))
        return h, w


# The flat `train:` keys in params.yaml's order, the order every dump writes them in.
TRAIN_KEY_ORDER = (
    "distillation_method",
    "distillation_config",
    "model_type",
    "lora_rank",
    "lora_alpha",
    "lora_type",
    "causal",
    "learning_rate",
    "optimizer",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_min_ratio",
    "grad_clip_method",
    "max_grad_norm",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "train_batch_size",
    "mixed_precision",
    "use_ema",
    "ema_decay",
    "ema_update_interval",
    "ema_validation",
    "seed",
    "max_train_steps",
    "num_train_epochs",
    "ignore_final_epochs",
    "caption_dropout_probability",
    "output_dir",
    "checkpoint_dir",
    "checkpoint_step_interval",
    "checkpoints_total_limit",
    "resume_from_checkpoint",
    "num_processes",
    "fsdp",
    "report_to",
    "metrics_dir",
    "tracker_project_name",
    "tracker_run_name",
    "webhook_config",
    "push_to_hub",
    "push_checkpoints_to_hub",
    "hub_model_id",
    "disable_benchmark",
    "validation_step_interval",
    "validation_prompt",
    "validation_prompt_library",
    "validation_guidance",
    "validation_num_inference_steps",
    "validation_resolution",
    "validation_num_video_frames",
    "validation_seed",
    "max_consecutive_nonfinite",
)


class TrainConfig(Section):
    """The DMD training run (dmd/training/loop.py). params.yaml keeps the seed trainer's flat keys; here they are
    grouped by the component that reads them, and dumps write them flat again in TRAIN_KEY_ORDER."""

    distillation_method: Literal["dmd"] = "dmd"
    distillation_config: DistillationConfig = Field(default_factory=DistillationConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    hub: HubConfig = Field(default_factory=HubConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @model_validator(mode="before")
    @classmethod
    def _route_flat_keys(cls, data: Any) -> Any:
        """Flat keys into their groups; an unknown key stays at the top, where extra="forbid" names it."""
        if not isinstance(data, dict):
            return data
        routed: dict = {}
        for key, value in data.items():
            if key in TRAIN_KEY_GROUPS:
                routed.setdefault(TRAIN_KEY_GROUPS[key], {})[key] = value
            elif key in TRAIN_GROUPS and isinstance(value, dict):
                routed.setdefault(key, {}).update(value)
            else:
                routed[key] = value
        return routed

    @model_serializer(mode="wrap")
    def _flat_dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        grouped = handler(self)
        flat = {k: v for k, v in grouped.items() if k not in TRAIN_GROUPS}
        for group in TRAIN_GROUPS:
            flat.update(grouped.get(group, {}))
        return {key: flat[key] for key in TRAIN_KEY_ORDER if key in flat}

    @model_validator(mode="after")
    def _gan_recompute(self):
        dc = self.distillation_config
        if (
            dc.gen_cls_loss_weight > 0
            and self.student.gradient_checkpointing
            and self.student.model_type == "lora"
            and dc.fake_score_lora_rank is not None
        ):
            raise ValueError(
                "distillation_config.gen_cls_loss_weight > 0 with gradient_checkpointing and a LoRA student and "
                "critic on one base: the student's backward recomputes both adapters' forwards, but the base holds "
                "one active adapter; turn gradient_checkpointing off, or use a full student or a full-copy critic"
            )
        return self

    @model_validator(mode="after")
    def _fsdp_scope(self):
        if (
            self.run.fsdp
            and self.student.model_type == "lora"
            and self.distillation_config.fake_score_lora_rank is not None
        ):
            raise ValueError(
                "fsdp: true shards the full copies, and with model_type: lora and a LoRA critic "
                "(distillation_config.fake_score_lora_rank set) there are none; set fsdp: false, or model_type: full"
            )
        return self

    @model_validator(mode="after")
    def _causal_sampling(self):
        if self.student.causal and self.validation.validation_guidance > 1:
            # one KV cache holds one prompt's context: CFG's unconditional pass would read the conditional one's
            raise ValueError(
                f"causal: true with validation_guidance={self.validation.validation_guidance}: a block-causal "
                "student samples without CFG (the guidance is distilled into it); set validation_guidance: 1"
            )
        return self


# Each group's attribute on TrainConfig, and the group each flat key lives in.
TRAIN_GROUPS: dict[str, type[TrainGroup]] = {
    name: field.annotation
    for name, field in TrainConfig.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, TrainGroup)
}
TRAIN_KEY_GROUPS: dict[str, str] = {
    key: name for name, group in TRAIN_GROUPS.items() for key in group.model_fields
}

# A key left out of TRAIN_KEY_ORDER would vanish from every dump, and a key in two groups would reach only one of
# them: both fail at import rather than in a run's recorded settings.
_FLAT_KEYS = [
    key
    for name in TrainConfig.model_fields
    for key in (TRAIN_GROUPS[name].model_fields if name in TRAIN_GROUPS else [name])
]
if sorted(_FLAT_KEYS) != sorted(TRAIN_KEY_ORDER):
    raise TypeError(
        f"TRAIN_KEY_ORDER must list each train key once: {sorted(set(_FLAT_KEYS) ^ set(TRAIN_KEY_ORDER))}"
    )


class EvaluateConfig(Section):
    """Student vs teacher (dmd/evaluation/evaluate.py): speed, quality and the report."""

    prompts: str = Field("toy", description="'toy' for the held-out captions, or a JSON prompt library.")
    num_seeds: int = Field(4, ge=1, description="Seeds per prompt, evaluate.seed, evaluate.seed + 1, ...")
    seed: int = 7
    teacher_steps: int = Field(50, ge=1)
    teacher_guidance: float = Field(3.0, ge=0)
    student_dir: str | None = Field(None, description="The exported student; defaults to train.output_dir.")
    height: int | None = Field(
        None, ge=16, description="Video height; defaults to toy.height (toy prompts) or generate.height."
    )
    width: int | None = Field(
        None, ge=16, description="Video width; defaults to toy.width (toy prompts) or generate.width."
    )
    num_frames: int | None = Field(
        None,
        description="Video frames (4k+1); defaults to toy.num_frames (toy prompts) or generate.num_frames.",
    )
    fps: int | None = Field(
        None,
        ge=1,
        description="Frame rate of the written mp4s; defaults to toy.fps (toy prompts) or generate.fps.",
    )
    warmup: int = Field(
        1, ge=1, description="Videos generated and thrown away per run before timing starts (same process)."
    )
    fuse_lora: bool = Field(
        True,
        description="Merge a LoRA student into its base weights before sampling, as a deployed student runs "
        "(not with an int8-quanto base, whose weights cannot absorb it).",
    )
    feature_model: str | None = Field(
        None,
        description="Vision model id or directory (CLIP, CLIP vision, or any model with a pooled output) for "
        "the Fréchet distance between student and teacher samples; None skips it.",
    )
    clip_model: str | None = Field(
        None, description="CLIP id or directory for the text-video score; defaults to feature_model."
    )
    feature_batch_size: int = Field(32, ge=1, description="Frames per forward pass of the feature model.")
    grid_frames: int = Field(4, ge=1, description="Frames shown per clip in the report's PNG grid.")
    metrics_path: str = "metrics/eval.json"
    report_dir: str = "reports"
    videos_dir: str = "reports/videos"
    teacher_reference_dir: str = Field(
        "eval_reference",
        description="The teacher runs' decoded clips, kept across evaluations under a key of everything they "
        "depend on: an evaluation whose teacher settings are unchanged takes the clips from here and samples "
        "the teacher only on the first evaluate.timed_reference_videos items, for its timings.",
    )
    timed_reference_videos: int = Field(
        2,
        ge=1,
        description="Items a teacher run whose clips come from evaluate.teacher_reference_dir is still sampled "
        "on, interleaved with the student, for its timings, NFE and memory (and to check the stored clips).",
    )

    @model_validator(mode="after")
    def _frames(self):
        if self.num_frames is not None:
            _check_frames("evaluate.num_frames", self.num_frames)
        return self

    @field_validator("height", "width")
    @classmethod
    def _size(cls, value: int | None) -> int | None:
        return None if value is None else check_size(value)

    @property
    def clip_model_path(self) -> str | None:
        return self.clip_model or self.feature_model


class Params(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    toy: ToyConfig = Field(default_factory=ToyConfig)
    toy_teacher: ToyTeacherConfig = Field(default_factory=ToyTeacherConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    ode_init: OdeInitConfig = Field(default_factory=OdeInitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _cross_checks(self):
        problems = []
        dc = self.train.distillation_config
        blocks = time_block_problem(
            dc.num_training_frames, dc.num_frame_per_block, dc.independent_first_frame
        )
        if blocks:
            problems.append(f"{blocks} (num_training_frames={dc.num_training_frames})")
        if self.train.run.num_train_epochs == 0 and self.train.run.max_train_steps == 0:
            problems.append("train.max_train_steps and train.num_train_epochs are both 0: set one of them")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def time_block_problem(
    latent_frames: int, num_frame_per_block: int, independent_first_frame: bool
) -> str | None:
    """Why time blocks of `num_frame_per_block` cannot split `latent_frames` latent frames, or None when they can;
    the one check behind config load (num_training_frames) and the rollout (each clip it makes)."""
    first = 1 if independent_first_frame and latent_frames > 1 else 0
    rest = latent_frames - first
    if rest % num_frame_per_block == 0:
        return None
    ok = [b for b in range(1, rest + 1) if rest % b == 0]
    return (
        f"train.distillation_config.num_frame_per_block={num_frame_per_block} does not divide the {rest} latent "
        f"frames{' after the independent first frame' if first else ''}; use one of {ok}"
    )


def check_size(pixels: int) -> int:
    """A video height or width: Wan's VAE downsamples 8× and its transformer patches 2×2, so a multiple of 16."""
    if pixels % 16:
        lo = max(16, pixels // 16 * 16)
        raise ValueError(
            f"{pixels} is not a multiple of 16 (Wan's VAE downsamples 8× and its transformer patches 2×2); "
            f"use {lo} or {lo + 16}"
        )
    return pixels


def _check_frames(key: str, frames: int) -> None:
    if frames < 1 or (frames - 1) % 4:
        lo = max(1, (frames - 1) // 4 * 4 + 1)
        raise ValueError(
            f"{key}={frames} is not 4k+1 (Wan's VAE packs 4 frames per latent); use {lo} or {lo + 4}"
        )


# --------------------------------------------------------------------------------------------------------------
# Loading


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key as params.yaml spells it: a TrainConfig group adds no level of its own."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, TrainGroup):
            keys += _all_keys(ann, prefix)
            continue
        keys.append(prefix + name)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _all_keys(ann, prefix + name + ".")
    return keys


def _yaml_loc(loc: tuple) -> tuple:
    """An error's location as params.yaml spells it: without the TrainConfig group that holds a flat key."""
    return tuple(
        part
        for i, part in enumerate(loc)
        if not (part in TRAIN_GROUPS and i + 1 < len(loc) and loc[i + 1] in TRAIN_GROUPS[part].model_fields)
    )


def _format_error(err: dict, source_keys: list[str]) -> str:
    err = {**err, "loc": _yaml_loc(err["loc"])}
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        name = str(err["loc"][-1])
        leaves = [k for k in source_keys if k.rsplit(".", 1)[-1] != ""]
        close = difflib.get_close_matches(loc, leaves, n=1, cutoff=0.6) or difflib.get_close_matches(
            name, [k.rsplit(".", 1)[-1] for k in leaves], n=1, cutoff=0.6
        )
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{loc}: unknown key{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if (
        "input" in err
        and err["type"] not in ("value_error", "assertion_error")
        and not isinstance(err["input"], dict)
    ):
        msg += f" (got {err['input']!r})"
    return f"{loc or '<top>'}: {msg}"


def validate(raw: dict, source: str = "params") -> Params:
    """Validate a raw dict; raise ConfigError with one line per problem."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as e:
        keys = _all_keys(Params)
        raise ConfigError(source, [_format_error(err, keys) for err in e.errors()]) from None


def load_yaml(text: str):
    """YAML 1.2, as DVC reads and writes params.yaml (`dvc exp run -S`): only true/false are booleans, so `no`,
    `off` and `yes` stay strings, and `1e-5` is a number. ruamel.yaml's pure-Python loader speaks 1.2 (its C
    loader and PyYAML speak 1.1)."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def read_raw(path: str | Path) -> dict:
    from ruamel.yaml import YAMLError

    path = Path(path)
    if not path.exists():
        raise ConfigError(
            str(path), [f"file not found; create it or pass --params FILE (see {Path('params.yaml')})"]
        )
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [f"not UTF-8 text (at byte {e.start}); save it as UTF-8"]) from None
    except YAMLError as e:
        raise ConfigError(str(path), [f"not valid YAML: {' '.join(str(e).split())}"]) from None
    if raw is None or raw == {}:
        # the built-in defaults are not the shipped params.yaml's: an empty file would silently run other settings
        raise ConfigError(
            str(path), ["no settings in it; start from the project's params.yaml (every key, with comments)"]
        )
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["top level must be a mapping of sections (model:, train:, ...)"])
    return raw


def override_value(text: str) -> Any:
    """The value of one `--set section.key=VALUE`: VALUE read as YAML 1.2, as params.yaml is. An empty VALUE is
    the empty string, as `dvc exp run -S key=` writes it; `null` is null. Commas need no quoting."""
    from ruamel.yaml import YAMLError

    if not text.strip():
        return ""
    try:
        return load_yaml(text)
    except YAMLError:
        return text  # not YAML on its own (e.g. a stray quote): the text itself, for the typed check to judge


def set_overrides(tree: dict, overrides: list[str] | None) -> None:
    """Set `section.key=value` overrides in `tree` in place (a plain dict, or the round-trip mapping DVC's YAML
    writer edits); a list entry is reached by its index, e.g. cache.datasets.0.num_frames."""
    problems = []
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected section.key=value, e.g. train.max_train_steps=100")
            continue
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = tree
        for p in parts[:-1]:
            if isinstance(node, list):
                if not (p.isdigit() and int(p) < len(node)):
                    problems.append(f"--set {key}: '{p}' is not an index of that list (0–{len(node) - 1})")
                    break
                node = node[int(p)]
            else:
                node = node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                problems.append(f"--set {key}: '{p}' is not a section")
                break
        else:
            leaf = override_value(value)
            if isinstance(node, list):
                if not (parts[-1].isdigit() and int(parts[-1]) < len(node)):
                    problems.append(f"--set {key}: '{parts[-1]}' is not an index of that list")
                    continue
                node[int(parts[-1])] = leaf
            else:
                node[parts[-1]] = leaf
    if problems:
        raise ConfigError("--set", problems)


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """A copy of `raw` with `section.key=value` overrides applied (see `set_overrides`)."""
    raw = json.loads(json.dumps(raw, default=str))  # deep copy of plain data
    set_overrides(raw, overrides)
    return raw


def load(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """The one entry point: read `path`, apply `--set` overrides, validate, resolve linked files."""
    raw = apply_overrides(read_raw(path), overrides)
    params = validate(raw, str(path))
    return resolve_backends(params, Path(path).parent, str(path))


def resolve_backends(params: Params, base: Path, source: str) -> Params:
    path = params.cache.data_backend_config
    if not path:
        return params
    file = Path(path) if Path(path).is_absolute() else base / path
    if not file.exists():
        raise ConfigError(
            source, [f"cache.data_backend_config: {file} not found; fix the path or remove the key"]
        )
    try:
        entries = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(str(file), [f"not valid JSON: {e}"]) from None
    datasets = list(params.cache.datasets)
    problems = []
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        try:
            datasets.append(DatasetConfig.model_validate({"id": entry.get("id", f"backend{i}"), **entry}))
        except ValidationError as e:
            problems += [f"[{i}].{_format_error(err, _all_keys(DatasetConfig))}" for err in e.errors()]
    if not isinstance(entries, list):
        problems.append("must be a JSON list of dataset objects")
    if problems:
        raise ConfigError(str(file), problems)
    params.cache.datasets = datasets
    return params


def dump(params: Params) -> str:
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------------------------
# What each stage reads


# The settings each stage reads, as dvc.yaml lists them under its `params` (tests/test_dvc.py checks that the two
# agree): a section, a key, or a sub-section.
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "toy_teacher": ("toy", "toy_teacher", "model.flow_schedule_shift", "model.max_sequence_length"),
    "generate": (
        "generate", "toy", "model", "train.distillation_config.dmd_denoising_steps",
        "train.distillation_config.warp_denoising_steps",
    ),
    "cache": ("cache", "model"),
    "ode_init": (
        "ode_init.enabled", "ode_init.output_dir", "ode_init.max_train_steps", "ode_init.learning_rate",
        "ode_init.train_batch_size", "ode_init.seed", "model", "cache.output_dir", "train.causal",
        "train.model_type", "train.lora_rank", "train.lora_alpha", "train.optimizer", "train.max_grad_norm",
        "train.distillation_config.dmd_denoising_steps", "train.distillation_config.warp_denoising_steps",
        "train.distillation_config.num_frame_per_block", "train.distillation_config.independent_first_frame",
    ),
    "train": (
        "train", "model", "toy", "cache.output_dir", "ode_init.enabled", "ode_init.output_dir", "generate.fps",
        "generate.prompts", "evaluate.metrics_path", "evaluate.report_dir",
    ),
    "evaluate": (
        "evaluate", "toy", "model", "train.output_dir", "train.model_type", "train.distillation_config",
        "generate.height", "generate.width",
        "generate.num_frames", "generate.fps",
    ),
}  # fmt: skip

# Settings that change how a stage runs but not what it writes: parallelism, the devices (a sample's noise is drawn on
# the CPU from its seed, so the device that made it does not show in it), encoder batch sizes (cache keys leave
# them out), retries, schedules, where progress is reported, how checkpoints are kept, where the evaluation keeps its
# teacher reference and on how many items it re-times a reused teacher run. They stay out of the
# settings a stage records inside its outputs, so changing one of them moves no output's hash.
RUN_SETTINGS = frozenset({
    "generate.device", "generate.task_runner", "generate.workers", "generate.dask_address", "generate.retries",
    "generate.retry_delay_seconds", "generate.backfill_interval_seconds", "generate.backfill_cron",
    "generate.backfill_shards_per_run",
    "cache.vae_batch_size", "cache.text_batch_size", "cache.num_workers", "cache.device",
    "train.checkpoint_dir", "train.checkpoint_step_interval", "train.checkpoints_total_limit",
    "train.resume_from_checkpoint", "train.max_consecutive_nonfinite", "train.webhook_config",
    "train.tracker_project_name", "train.tracker_run_name", "train.push_checkpoints_to_hub",
    "evaluate.warmup", "evaluate.teacher_reference_dir", "evaluate.timed_reference_videos",
})  # fmt: skip


# Settings a stage reads only while one of its own switches is on: with the switch off they are left out of what the
# stage records, so changing them (the student's steps, say) leaves that stage's outputs as they were.
SWITCHED_SETTINGS: dict[str, dict[str, str]] = {
    "ode_init": {
        key: "ode_init.enabled"
        for key in STAGE_SETTINGS["ode_init"]
        if key not in ("ode_init.enabled", "ode_init.output_dir")
    },
    "generate": {
        "train.distillation_config.dmd_denoising_steps": "generate.save_trajectory",
        "train.distillation_config.warp_denoising_steps": "generate.save_trajectory",
    },
}


def stage_settings(params: Params, stage: str) -> dict:
    """The settings `stage` reads (STAGE_SETTINGS) less RUN_SETTINGS and less the SWITCHED_SETTINGS whose switch is
    off, nested as in params.yaml."""
    full = params.model_dump(mode="json")

    def value(entry: str):
        node = full
        for name in entry.split("."):
            node = node[name]
        return node

    switched = SWITCHED_SETTINGS.get(stage, {})
    out: dict = {}
    for entry in STAGE_SETTINGS[stage]:
        if entry in switched and not value(switched[entry]):
            continue
        *parents, leaf = entry.split(".")
        target = out
        for name in parents:
            target = target.setdefault(name, {})
        target[leaf] = json.loads(json.dumps(value(entry)))
    for entry in RUN_SETTINGS:
        section, key = entry.split(".")
        out.get(section, {}).pop(key, None)
    return out


def dump_stage(params: Params, stage: str) -> str:
    """`stage_settings` as YAML: what a stage writes as params.effective.yaml beside its outputs."""
    return yaml.safe_dump(stage_settings(params, stage), sort_keys=False, allow_unicode=True)
