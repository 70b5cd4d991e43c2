"""`dmd config validate` and `dmd config import-simpletuner`: the seed trainer's flat config.json (and its
multidatabackend.json) mapped onto this project's sections, with every key that could not be mapped reported."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dmd.core.config import (
    TRAIN_KEY_ORDER,
    CacheConfig,
    ConfigError,
    DatasetConfig,
    DistillationConfig,
    ModelConfig,
    Params,
    ToyTeacherConfig,
    apply_overrides,
    read_raw,
    resolve_backends,
    validate,
)

# Seed keys that belong to a section other than `train` (everything else that TrainConfig knows goes to `train`).
MODEL_KEYS = set(ModelConfig.model_fields) - {"revision", "max_sequence_length", "negative_prompt"}
# Seed keys stored here under another section and name: the seed's trainer names its negative prompt after
# validation, but here it is the unconditional side of every CFG, the real score's included.
RENAMED_KEYS = {"validation_negative_prompt": ("model", "negative_prompt")}
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
TRAIN_KEYS = set(TRAIN_KEY_ORDER)
DEFAULT_VIDEO_SOURCE = "data/teacher"
TODO = "todo: "  # a note that asks the user to act before the imported settings can run
WAN_FPS = 16  # the frame rate Wan 2.1 T2V was trained and samples at
WAN_ASPECT = (832, 480)  # Wan 2.1's 480p frame (width, height), the aspect when the config names none

# SimpleTuner data-backend keys (documentation/DATALOADER.md) → this project's dataset keys, where they mean the same.
BACKEND_RENAMES = {"cache_dir_vae": "cache_dir", "disable": "disabled"}
# SimpleTuner keys that have no setting here, with why dropping them is safe or what to do instead.
BACKEND_DROPPED = {
    "type": "only local folders are read (type: local)",
    "crop_style": "crops are centred",
    "crop_aspect": "clips are bucketed by their own aspect",
    "crop_aspect_buckets": "clips are bucketed by their own aspect",
    "maximum_image_size": "clips are resized straight to their bucket",
    "target_downsample_size": "clips are resized straight to their bucket",
    "minimum_aspect_ratio": "no aspect filter here",
    "maximum_aspect_ratio": "no aspect filter here",
    "metadata_backend": "videos are discovered by listing instance_data_dir",
    "skip_file_discovery": "videos are discovered by listing instance_data_dir; the cache skips what it has",
    "preserve_data_backend_cache": "the cache skips what it has (content-addressed keys)",
    "probability": "every enabled dataset is sampled in proportion to its size (use repeats)",
    "text_embeds": "text embeddings live in <cache.output_dir>/text/",
    "image_embeds": "latents live in the dataset's cache_dir",
    "write_batch_size": "the cache writes a shard per cache.chunk_size clips",
    "disable_multiline_split": "a caption file is one caption here",
    "default": "text embeddings live in <cache.output_dir>/text/",
}


def import_simpletuner(config: dict, backend: list | None = None) -> tuple[dict, list[str]]:
    """Map a SimpleTuner-style flat config onto params sections. Returns (raw params, notes)."""
    raw: dict[str, dict[str, Any]] = {"model": {}, "cache": {}, "train": {}}
    notes: list[str] = []
    for key, value in config.items():
        if key in RENAMED_KEYS:
            section, name = RENAMED_KEYS[key]
            raw[section][name] = value
        elif key in MODEL_KEYS:
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
        datasets = [_dataset(i, entry, notes) for i, entry in enumerate(backend)]
        raw["cache"]["datasets"] = [d for d in datasets if d is not None]
    _real_model(config, raw, notes)
    return raw, notes


def _real_model(config: dict, raw: dict, notes: list[str]) -> None:
    """A teacher other than the toy one: the toy world's defaults (32×32 clips of 21 frames, its captions) do not
    fit it. Sizes come from the config and its datasets; prompts cannot, so the user is told to give them."""
    model = raw["model"].get("pretrained_model_name_or_path")
    if model is None or model == ToyTeacherConfig().output_dir:
        return
    height, width, frames, why = _video_size(config, raw)
    raw.setdefault("generate", {}).update(height=height, width=width, num_frames=frames, fps=WAN_FPS)
    notes.append(
        f"generate.height/width/num_frames={height}/{width}/{frames}, fps={WAN_FPS}: {why}; the teacher generates "
        "its videos at this size and evaluation samples at it; change them in the written file if you like"
    )
    library = raw["train"].get("validation_prompt_library")
    if library and str(library).endswith(".json"):
        raw.setdefault("evaluate", {})["prompts"] = library
        notes.append(
            f"evaluate.prompts: '{library}' (the validation prompt library) is what evaluation samples"
        )
    else:
        notes.append(
            f"{TODO}evaluate.prompts: set a JSON prompt library (a list of prompts, or name → prompt); 'toy' would "
            "evaluate the toy world's captions at its 32×32 size"
        )
    notes.append(
        f"{TODO}generate.prompts: set your prompt library (a .txt with one prompt per line, or .jsonl / .parquet "
        f"with a prompt column): the teacher ({model}) generates the training videos from it, and the default "
        "'toy' holds only the toy world's captions"
    )


def _video_size(config: dict, raw: dict) -> tuple[int, int, int, str]:
    """(height, width, frames, why): the first enabled dataset's size and length (else the config's), at the
    aspect of validation_resolution (else Wan's 832×480), in multiples of 16 and 4k+1 frames."""
    from dmd.data.buckets import snap_frames

    datasets = [d for d in raw["cache"].get("datasets", []) if not d.get("disabled")]
    first = datasets[0] if datasets else {}
    kind = first.get("resolution_type") or config.get("resolution_type") or "pixel_area"
    resolution = first.get("resolution") or config.get("resolution") or WAN_ASPECT[1]
    frames = first.get("num_frames") or config.get("validation_num_video_frames") or 81
    aspect_w, aspect_h = WAN_ASPECT
    shape = str(config.get("validation_resolution", "")).lower().split("x")
    if len(shape) == 2 and all(p.isdigit() and int(p) > 0 for p in shape):
        aspect_w, aspect_h = (int(p) for p in shape)
    aspect = aspect_w / aspect_h
    if kind == "pixel":  # the shorter edge
        short = float(resolution)
        height, width = (short, short * aspect) if aspect >= 1 else (short / aspect, short)
    else:  # an area: pixel_area is a square's side in pixels, area is megapixels
        area = float(resolution) ** 2 if kind == "pixel_area" else float(resolution) * 1e6
        width = (area * aspect) ** 0.5
        height = area / width
    height, width = (max(16, round(v / 16) * 16) for v in (height, width))
    snapped = snap_frames(int(frames), 4)
    where = "the dataset's" if first.get("num_frames") else "validation_num_video_frames'"
    why = (
        f"{resolution:g} ({kind}) at the aspect of {aspect_w}x{aspect_h}, in multiples of 16, and {where} "
        f"{frames} frames" + (f" snapped to {snapped} (4k+1)" if snapped != frames else "")
    )
    return height, width, snapped, why


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


def _dataset(i: int, entry: dict, notes: list[str]) -> dict | None:
    """One data-backend entry, as SimpleTuner's users write them, as a cache dataset (None: nothing to cache).

    Every key is mapped or reported: `dataset_type: text_embeds` / `image_embeds` entries only say where
    SimpleTuner keeps its caches (here they live under cache.output_dir); the `video` block's num_frames is the
    clip length; other keys are dropped with the reason."""
    where = f"backend[{i}]" + (f" ({entry['id']})" if "id" in entry else "")
    kind = entry.get("dataset_type", "video")
    if kind in ("text_embeds", "image_embeds"):
        notes.append(
            f"{where}: dataset_type {kind} dropped: text embeddings and latents are cached under cache.output_dir "
            "(cache_dir of a video dataset moves its latents)"
        )
        return None
    if kind != "video":
        notes.append(
            f"{TODO}{where}: dataset_type {kind} dropped: this project trains on video datasets only"
        )
        return None
    if entry.get("type", "local") != "local":
        notes.append(
            f"{TODO}{where}: type {entry['type']} dropped: only local folders are read; copy the data to a local "
            "folder and add it as instance_data_dir"
        )
        return None
    known = set(DatasetConfig.model_fields)
    out: dict[str, Any] = {}
    for key, value in entry.items():
        name = BACKEND_RENAMES.get(key, key)
        if key == "video":
            _video_block(value, out, where, notes)
        elif key == "caption_strategy" and value not in ("textfile", "filename"):
            notes.append(
                f"{TODO}{where}.caption_strategy: {value} is not supported; use textfile (clip.txt beside clip.mp4) "
                "or filename"
            )
        elif key == "crop_style" and value == "center":
            continue  # what crop does here
        elif key == "type" and value == "local":
            continue
        elif key in BACKEND_DROPPED:
            notes.append(f"{where}.{key}: not mapped ({BACKEND_DROPPED[key]}); value {value!r} dropped")
        elif name in known and name != "dataset_type":
            out[name] = value
        elif key == "dataset_type":
            continue
        else:
            notes.append(f"{where}.{key}: not mapped (no dataset setting of that name); dropped")
    if entry.get("caption_strategy") == "textfile":
        notes.append(
            f"{where}.caption_strategy: textfile reads clip.txt beside clip.mp4 as one caption (SimpleTuner "
            "would split it into one caption per line)"
        )
    out.setdefault("id", f"dataset{i}")
    if "manifest" not in out and "instance_data_dir" not in out:
        out["manifest"] = DEFAULT_VIDEO_SOURCE
        notes.append(
            f"{where} names no video source: set to the generate stage's output ({DEFAULT_VIDEO_SOURCE}); "
            "for your own videos use instance_data_dir: FOLDER instead"
        )
    return out


def _video_block(block: Any, out: dict, where: str, notes: list[str]) -> None:
    """SimpleTuner's `video: {num_frames, min_frames, max_frames, is_i2v, ...}` of a video dataset."""
    if not isinstance(block, dict):
        notes.append(f"{where}.video: expected an object; dropped")
        return
    for key, value in block.items():
        if key == "num_frames":
            out["num_frames"] = value
        elif key == "min_frames":
            notes.append(
                f"{where}.video.min_frames={value}: not mapped: clips shorter than num_frames are left out (listed "
                "in problems.parquet as too_few_frames), so num_frames is the minimum"
            )
        elif key == "max_frames":
            notes.append(
                f"{where}.video.max_frames={value}: not mapped: longer clips are kept and their first num_frames "
                "frames used"
            )
        elif key == "is_i2v":
            if value:
                notes.append(f"{TODO}{where}.video.is_i2v: true dropped: this project distils text-to-video")
        else:
            notes.append(f"{where}.video.{key}: not mapped (no clip setting of that name); dropped")


def check_paths(params: Params, base: Path) -> list[str]:
    """Warnings for files the settings name that are not there (they may be produced by an earlier stage)."""
    warnings = []
    model = Path(params.model.pretrained_model_name_or_path)
    if not (base / model).exists() and params.model.pretrained_model_name_or_path.count("/") != 1:
        warnings.append(f"model.pretrained_model_name_or_path: {model} does not exist yet")
    linked = {
        "validation_prompt_library": params.train.validation.validation_prompt_library,
        "webhook_config": params.train.tracking.webhook_config,
    }
    for key, value in linked.items():
        if value and not (base / value).exists():
            warnings.append(f"train.{key}: {value} not found; training will stop at start-up until it exists")
    if params.model.pretrained_model_name_or_path != params.toy_teacher.output_dir:
        for key in ("generate", "evaluate"):
            if getattr(params, key).prompts == "toy":
                warnings.append(
                    f"{key}.prompts is 'toy', the toy world's captions, but the teacher is "
                    f"{params.model.pretrained_model_name_or_path}; set it to your prompt library"
                )
    return warnings


def config_command(args) -> int:
    if args.config_command == "validate":
        path = Path(args.file)
        raw = apply_overrides(read_raw(path), args.overrides)
        params = resolve_backends(validate(raw, str(path)), path.parent, str(path))
        warnings = check_paths(params, path.parent)
        missing = [name for name in Params.model_fields if name not in raw]
        if missing:
            warnings.append(
                f"section(s) {', '.join(missing)} not in the file: they take the built-in defaults, which are not "
                "the shipped params.yaml's"
            )
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        dc = params.train.distillation_config
        print(
            f"{path}: {'OK' if not warnings else f'valid, with {len(warnings)} warning(s)'} — teacher "
            f"{params.model.pretrained_model_name_or_path}, {len(dc.dmd_denoising_steps)}-step student "
            f"{dc.dmd_denoising_steps}, {params.train.student.model_type} student, critic "
            f"{'LoRA r=' + str(dc.fake_score_lora_rank) if dc.fake_score_lora_rank else 'full copy'}; "
            f"videos {params.generate.width}x{params.generate.height}, {params.generate.num_frames} frames"
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
        print(note if note.startswith(TODO) else f"note: {note}", file=sys.stderr)
    problems: list[str] = []
    try:
        validate(raw, str(config_path))
    except ConfigError as e:
        problems = e.problems
    todos = "".join(f"# {note}\n" for note in notes if note.startswith(TODO))
    text = f"# Imported from {config_path.name} by `dmd config import-simpletuner`.\n{todos}" + dump_raw(raw)
    if args.output:
        from dmd.core.io import write_text

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
