"""`dmd config validate` and `dmd config import-simpletuner`: the seed trainer's flat config.json (and its
multidatabackend.json) mapped onto this project's sections, with every key that could not be mapped reported."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dmd.config import (
    CacheConfig,
    ConfigError,
    DatasetConfig,
    DistillationConfig,
    ModelConfig,
    Params,
    TrainConfig,
    apply_overrides,
    read_raw,
    resolve_backends,
    validate,
)

# Seed keys that belong to a section other than `train` (everything else that TrainConfig knows goes to `train`).
MODEL_KEYS = set(ModelConfig.model_fields) - {"revision", "max_sequence_length"}
CACHE_KEYS = set(CacheConfig.model_fields) & {
    "aspect_bucket_rounding",
    "compress_disk_cache",
    "delete_problematic_images",
    "disable_bucket_pruning",
    "minimum_image_size",
    "resolution",
    "resolution_type",
    "vae_batch_size",
    "data_backend_config",
}
TRAIN_KEYS = set(TrainConfig.model_fields)
DEFAULT_VIDEO_SOURCE = "data/teacher"


def import_simpletuner(config: dict, backend: list | None = None) -> tuple[dict, list[str]]:
    """Map a SimpleTuner-style flat config onto params sections. Returns (raw params, notes)."""
    raw: dict[str, dict[str, Any]] = {"model": {}, "cache": {}, "train": {}}
    notes: list[str] = []
    for key, value in config.items():
        if key in MODEL_KEYS:
            raw["model"][key] = value
        elif key in CACHE_KEYS:
            if key == "data_backend_config" and backend is not None:
                notes.append(
                    f"{key}: '{value}' replaced by the datasets of --backend, inlined under cache.datasets"
                )
                continue
            raw["cache"][key] = value
        elif key == "distillation_config":
            raw["train"][key], dc_notes = _distillation(value)
            notes += dc_notes
        elif key in TRAIN_KEYS:
            raw["train"][key] = value
        else:
            notes.append(f"{key}: not mapped (this project has no setting for it); value {value!r} dropped")
    if raw["train"].get("use_ema", True) and "ema_update_interval" in raw["train"]:
        notes.append(
            "train.ema_update_interval: the EMA warms up as diffusers' EMAModel (decay min(ema_decay, "
            "(1 + n)/(10 + n)) at the n-th fold), so the export holds nothing of the initial weights"
        )
    for key in ("validation_prompt_library", "webhook_config"):
        if raw["train"].get(key):
            notes.append(
                f"train.{key}: '{raw['train'][key]}' must exist (relative to params.yaml) when training runs"
            )
    if backend is not None:
        raw["cache"]["datasets"] = [_dataset(i, entry, notes) for i, entry in enumerate(backend)]
    return raw, notes


def _distillation(value: Any) -> tuple[dict, list[str]]:
    if not isinstance(value, dict):
        return value, ["distillation_config: expected an object; kept as is for validation to report"]
    known = set(DistillationConfig.model_fields)
    mapped = {k: v for k, v in value.items() if k in known}
    notes = [
        f"distillation_config.{k}: not mapped (unknown DMD setting); dropped" for k in value if k not in known
    ]
    return mapped, notes + _reference_meanings(mapped)


def _reference_meanings(dc: dict) -> list[str]:
    """Where the seed's trainer and the DMD references (Self-Forcing, FastVideo) read a key differently, this
    project follows the references; say so for each key the imported config sets."""
    notes = []
    if dc.get("fake_score_guidance_scale", 0):
        w = dc["fake_score_guidance_scale"]
        notes.append(
            f"distillation_config.fake_score_guidance_scale={w}: read as Self-Forcing does, "
            f"F_c + {w}·(F_c − F_u) (0 = conditional critic alone), not as diffusers-form CFG"
        )
    if "min_timestep_ratio" in dc or "max_timestep_ratio" in dc or dc.get("timestep_shift", 1) != 1:
        notes.append(
            "distillation_config.min/max_timestep_ratio: clamp the score timestep after timestep_shift "
            "(Self-Forcing, FastVideo), not before it"
        )
    if "num_training_frames" in dc:
        notes.append(
            f"distillation_config.num_training_frames={dc['num_training_frames']}: the rollout's length in latent "
            "frames (Self-Forcing), not a cap on the cached clips' length"
        )
    bounded = dc.get("ts_schedule", True) or dc.get("ts_schedule_max", False)
    if bounded and not dc.get("same_step_across_blocks", False):
        notes.append(
            "distillation_config.ts_schedule / ts_schedule_max: with same_step_across_blocks false each block "
            "exits at its own step, so they bound nothing and min_score_timestep is the floor (as in "
            "Self-Forcing); set same_step_across_blocks: true to bound the score timestep by the exit step"
        )
    return notes


def _dataset(i: int, entry: dict, notes: list[str]) -> dict:
    known = set(DatasetConfig.model_fields)
    out = {k: v for k, v in entry.items() if k in known}
    out.setdefault("id", f"dataset{i}")
    for k in entry:
        if k not in known:
            notes.append(f"backend[{i}].{k}: not mapped (no dataset setting of that name); dropped")
    if "manifest" not in out and "instance_data_dir" not in out:
        out["manifest"] = DEFAULT_VIDEO_SOURCE
        notes.append(
            f"backend[{i}] names no video source: set to the generate stage's output ({DEFAULT_VIDEO_SOURCE}); "
            "for your own videos use instance_data_dir: FOLDER instead"
        )
    return out


def check_paths(params: Params, base: Path) -> list[str]:
    """Warnings for files the settings name that are not there (they may be produced by an earlier stage)."""
    warnings = []
    model = Path(params.model.pretrained_model_name_or_path)
    if not (base / model).exists() and params.model.pretrained_model_name_or_path.count("/") != 1:
        warnings.append(f"model.pretrained_model_name_or_path: {model} does not exist yet")
    for key in ("validation_prompt_library", "webhook_config"):
        value = getattr(params.train, key)
        if value and not (base / value).exists():
            warnings.append(f"train.{key}: {value} not found; training will stop at start-up until it exists")
    return warnings


def config_command(args) -> int:
    if args.config_command == "validate":
        path = Path(args.file)
        raw = apply_overrides(read_raw(path), args.overrides)
        params = resolve_backends(validate(raw, str(path)), path.parent, str(path))
        for w in check_paths(params, path.parent):
            print(f"warning: {w}", file=sys.stderr)
        dc = params.train.distillation_config
        print(
            f"{path}: OK — teacher {params.model.pretrained_model_name_or_path}, "
            f"{len(dc.dmd_denoising_steps)}-step student {dc.dmd_denoising_steps}, "
            f"{params.train.model_type} student, critic "
            f"{'LoRA r=' + str(dc.fake_score_lora_rank) if dc.fake_score_lora_rank else 'full copy'}"
        )
        return 0

    config_path = Path(args.config_json)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(str(config_path), [f"cannot read as JSON: {e}"]) from None
    backend = None
    if args.backend:
        try:
            backend = json.loads(Path(args.backend).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(args.backend, [f"cannot read as JSON: {e}"]) from None
        if not isinstance(backend, list):
            raise ConfigError(args.backend, ["must be a JSON list of dataset objects"])
    raw, notes = import_simpletuner(config, backend)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    problems: list[str] = []
    try:
        validate(raw, str(config_path))
    except ConfigError as e:
        problems = e.problems
    text = "# Imported from " + config_path.name + " by `dmd config import-simpletuner`.\n" + dump_raw(raw)
    if args.output:
        from dmd.io import write_text

        write_text(args.output, text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    for p in problems:
        print(f"fix: {p}", file=sys.stderr)
    return 1 if problems else 0


def dump_raw(raw: dict) -> str:
    """The imported keys only (what the user's config said), in the params layout."""
    import yaml

    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=100)
