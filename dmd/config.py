"""Typed settings: `params.yaml` is read and validated here, once, and nowhere else.

Keys keep the names of the seed trainer's config (`distillation_config.*`, `learning_rate`, `lora_rank`, ...)
so a user of that trainer recognises them. Unknown keys are errors that name the key and the closest valid one.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRECISIONS = ("no_change", "fp32", "bf16", "fp16", "int8-quanto")
Precision = Literal["no_change", "fp32", "bf16", "fp16", "int8-quanto"]

DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class ConfigError(ValueError):
    """Bad settings. `problems` holds one human-readable line per problem, each naming its key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


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

    @property
    def text_encoder_path(self) -> str:
        return self.pretrained_t5_model_name_or_path or self.pretrained_model_name_or_path


class ToyConfig(Section):
    """The built-in toy video world (dmd/toy/world.py)."""

    seed: int = 0
    height: int = 32
    width: int = 32
    num_frames: int = 21
    fps: int = 8
    num_held_out: int = Field(
        6, ge=1, description="Caption combinations kept out of training, for evaluation."
    )

    @model_validator(mode="after")
    def _frames(self):
        _check_frames("toy.num_frames", self.num_frames)
        return self


class ToyTeacherConfig(Section):
    """Training of the tiny teacher on the toy world (dmd/toy/teacher.py)."""

    output_dir: str = "models/toy-teacher"
    seed: int = 0
    num_clips: int = 2048
    vae_steps: int = 1500
    vae_batch_size: int = 16
    vae_learning_rate: float = 2e-3
    transformer_steps: int = 4000
    transformer_batch_size: int = 32
    transformer_learning_rate: float = 1e-3
    caption_dropout_probability: float = Field(0.1, ge=0, lt=1)
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    ffn_dim: int = 256
    z_dim: int = 8
    vae_base_dim: int = 16
    text_dim: int = 32


class GenerateConfig(Section):
    """Teacher data generation (dmd/generate.py)."""

    output_dir: str = "data/teacher"
    prompts: str = Field(
        "toy", description="'toy' for the toy world's training captions, or a txt/jsonl/parquet file."
    )
    negative_prompt: str | None = Field(None, description="Defaults to train.validation_negative_prompt.")
    num_videos: int = Field(64, ge=1)
    shard_size: int = Field(16, ge=1)
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    flow_shift: float | None = Field(None, gt=0, description="Defaults to model.flow_schedule_shift.")
    height: int = 32
    width: int = 32
    num_frames: int = 21
    fps: int = 8
    batch_size: int = Field(16, ge=1)
    seed: int = 0
    save_latents: bool = True
    save_noise: bool = True
    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: str | None = Field(
        None, description="An existing Dask scheduler; None starts a local cluster."
    )
    retries: int = Field(2, ge=0)
    backfill_interval_seconds: int | None = Field(3600, ge=1)
    backfill_cron: str | None = None
    backfill_shards_per_run: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _shape(self):
        _check_frames("generate.num_frames", self.num_frames)
        return self

    @property
    def num_shards(self) -> int:
        return -(-self.num_videos // self.shard_size)


class DatasetConfig(Section):
    """One dataset, in the shape of the seed trainer's multidatabackend.json entries."""

    id: str = "teacher"
    dataset_type: Literal["video"] = "video"
    manifest: str | None = Field(
        None, description="A manifest.parquet (or a directory of shards) with captions."
    )
    instance_data_dir: str | None = Field(None, description="A folder of videos with sidecar .txt captions.")
    caption_column: str = "prompt"
    cache_dir: str | None = None
    resolution_type: Literal["pixel_area", "area", "pixel"] | None = None
    resolution: float | None = None
    crop: bool = False
    num_frames: int = 21
    frame_interval: int = Field(1, ge=1)
    minimum_image_size: float | None = None
    repeats: int = Field(0, ge=0)
    disabled: bool = False

    @model_validator(mode="after")
    def _source(self):
        if (self.manifest is None) == (self.instance_data_dir is None):
            raise ValueError(f"dataset '{self.id}': set exactly one of 'manifest' or 'instance_data_dir'")
        return self


class CacheConfig(Section):
    """VAE latent + T5 embedding cache (dmd/cache.py)."""

    output_dir: str = "cache"
    data_backend_config: str | None = Field(
        None, description="A multidatabackend.json; its entries are added to `datasets`."
    )
    datasets: list[DatasetConfig] = Field(default_factory=lambda: [DatasetConfig(manifest="data/teacher")])
    resolution_type: Literal["pixel_area", "area", "pixel"] = "pixel_area"
    resolution: float = Field(32, gt=0)
    minimum_image_size: float = Field(0, ge=0)
    aspect_bucket_rounding: int = Field(2, ge=0)
    compress_disk_cache: bool = False
    delete_problematic_images: bool = False
    disable_bucket_pruning: bool = True
    vae_batch_size: int = Field(4, ge=1)
    chunk_size: int = Field(64, ge=1)
    use_teacher_latents: bool = Field(
        True, description="Take exact teacher latents from the shards when present."
    )
    num_workers: int = Field(2, ge=0)


class DistillationConfig(Section):
    """`distillation_config` of the seed trainer, every key live (dmd/method.py, dmd/rollout.py)."""

    dmd_denoising_steps: list[int] = Field(default_factory=lambda: [1000, 757, 522])
    warp_denoising_steps: bool = Field(
        False, description="Warp dmd_denoising_steps through flow_schedule_shift before use."
    )
    generator_update_interval: int = Field(1, ge=1)
    real_score_guidance_scale: float = Field(3.0, ge=0)
    fake_score_guidance_scale: float = Field(0.0, ge=0)
    fake_score_lr: float = Field(1e-5, gt=0)
    fake_score_weight_decay: float = Field(0.01, ge=0)
    fake_score_betas: tuple[float, float] = (0.9, 0.999)
    fake_score_eps: float = Field(1e-8, gt=0)
    fake_score_grad_clip: float = Field(1.0, ge=0)
    fake_score_lora_rank: int | None = Field(
        None, ge=1, description="Critic as a LoRA adapter of this rank on the shared base; None: a full copy."
    )
    fake_score_lora_alpha: float | None = None
    min_timestep_ratio: float = Field(0.02, ge=0, le=1)
    max_timestep_ratio: float = Field(0.98, ge=0, le=1)
    num_frame_per_block: int = Field(3, ge=1)
    independent_first_frame: bool = False
    same_step_across_blocks: bool = False
    last_step_only: bool = False
    num_training_frames: int = Field(
        21, ge=1, description="Cap on the latent frames a training rollout makes."
    )
    context_noise: float = Field(0, ge=0, le=1000)
    ts_schedule: bool = True
    ts_schedule_max: bool = False
    min_score_timestep: float = Field(0, ge=0, le=1000)
    timestep_shift: float = Field(1.0, gt=0)
    rollout_from: Literal["noise", "data"] = "noise"
    regression_loss_weight: float = Field(0.0, ge=0)

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
        return self


class TrainConfig(Section):
    """The DMD training run (dmd/train.py); flat keys as in the seed trainer's config."""

    distillation_method: Literal["dmd"] = "dmd"
    distillation_config: DistillationConfig = Field(default_factory=DistillationConfig)
    model_type: Literal["lora", "full"] = "lora"
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_type: Literal["standard"] = "standard"
    learning_rate: float = Field(5e-5, gt=0)
    optimizer: Literal["adamw", "adamw_bf16"] = "adamw"
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr"] = (
        "constant"
    )
    lr_warmup_steps: int = Field(0, ge=0)
    lr_min_ratio: float = Field(
        0.1, ge=0, le=1, description="Floor of cosine_with_min_lr, as a fraction of lr."
    )
    grad_clip_method: Literal["value", "norm"] = "norm"
    max_grad_norm: float = Field(1.0, ge=0)
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    train_batch_size: int = Field(8, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    use_ema: bool = True
    ema_decay: float = Field(0.99, gt=0, lt=1)
    ema_update_interval: int = Field(1, ge=1)
    ema_validation: Literal["none", "ema_only", "comparison"] = "ema_only"
    seed: int = 1000
    max_train_steps: int = Field(600, ge=0)
    num_train_epochs: int = Field(0, ge=0)
    ignore_final_epochs: bool = True
    caption_dropout_probability: float = Field(0.0, ge=0, lt=1)
    output_dir: str = "output/student"
    checkpoint_dir: str = "checkpoints"
    checkpoint_step_interval: int = Field(200, ge=1)
    checkpoints_total_limit: int = Field(3, ge=1)
    resume_from_checkpoint: str | None = "latest"
    report_to: Literal["none", "wandb", "dvclive"] = "dvclive"
    tracker_project_name: str = "dmd-training"
    tracker_run_name: str = "dmd-student"
    webhook_config: str | None = None
    push_to_hub: bool = False
    push_checkpoints_to_hub: bool = False
    hub_model_id: str | None = None
    disable_benchmark: bool = True
    validation_step_interval: int = Field(200, ge=1)
    validation_prompt: str | None = None
    validation_prompt_library: str | None = None
    validation_negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    validation_guidance: float = Field(1.0, ge=0)
    validation_num_inference_steps: int = Field(3, ge=1)
    validation_resolution: str = "32x32"
    validation_num_video_frames: int = 21
    validation_seed: int = 42
    max_consecutive_nonfinite: int = Field(5, ge=1)

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


class EvaluateConfig(Section):
    """Student vs teacher (dmd/evaluate.py)."""

    prompts: str = Field("toy", description="'toy' for the held-out captions, or a JSON prompt library.")
    num_seeds: int = Field(4, ge=1)
    seed: int = 7
    teacher_steps: int = Field(50, ge=1)
    teacher_guidance: float = Field(3.0, ge=0)
    feature_model: str | None = Field(
        None, description="CLIP id or directory for Fréchet distance and CLIP score."
    )
    metrics_path: str = "metrics/eval.json"
    report_dir: str = "reports"
    videos_dir: str = "reports/videos"


class Params(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    toy: ToyConfig = Field(default_factory=ToyConfig)
    toy_teacher: ToyTeacherConfig = Field(default_factory=ToyTeacherConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _cross_checks(self):
        problems = []
        dc = self.train.distillation_config
        problems += block_problems(dc, dc.num_training_frames)
        if self.train.num_train_epochs == 0 and self.train.max_train_steps == 0:
            problems.append("train.max_train_steps and train.num_train_epochs are both 0: set one of them")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def negative_prompt(self) -> str:
        np_ = self.generate.negative_prompt
        return self.train.validation_negative_prompt if np_ is None else np_


def block_problems(dc: DistillationConfig, latent_frames: int) -> list[str]:
    """Time-block checks for `latent_frames` latent frames; shared by config load and the trainer."""
    first = 1 if dc.independent_first_frame else 0
    rest = latent_frames - first
    if rest % dc.num_frame_per_block:
        ok = [b for b in range(1, rest + 1) if rest % b == 0]
        return [
            f"train.distillation_config.num_frame_per_block={dc.num_frame_per_block} does not divide the "
            f"{rest} latent frames{' after the independent first frame' if first else ''} "
            f"(num_training_frames={dc.num_training_frames}); use one of {ok}"
        ]
    return []


def _check_frames(key: str, frames: int) -> None:
    if frames < 1 or (frames - 1) % 4:
        lo = max(1, (frames - 1) // 4 * 4 + 1)
        raise ValueError(
            f"{key}={frames} is not 4k+1 (Wan's VAE packs 4 frames per latent); use {lo} or {lo + 4}"
        )


# --------------------------------------------------------------------------------------------------------------
# Loading


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _all_keys(ann, prefix + name + ".")
    return keys


def _format_error(err: dict, source_keys: list[str]) -> str:
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


def read_raw(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            str(path), [f"file not found; create it or pass --params FILE (see {Path('params.yaml')})"]
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [f"not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["top level must be a mapping of sections (model:, train:, ...)"])
    return raw


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply `section.key=value` overrides (values parsed as YAML), like `dvc exp run -S`."""
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    problems = []
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected section.key=value, e.g. train.max_train_steps=100")
            continue
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                problems.append(f"--set {key}: '{p}' is not a section")
                break
        else:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    if problems:
        raise ConfigError("--set", problems)
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
