"""The trained student as plain diffusers loads it, plus what our own sampler needs.

`train.output_dir` gets:
- `pytorch_lora_weights.safetensors` (LoRA student; `WanPipeline.load_lora_weights(dir)` loads it, rank and alpha
  in its metadata) or `transformer/` (full student; `WanTransformer3DModel.from_pretrained(dir, subfolder=...)`);
- `scheduler/scheduler_config.json`: a `FlowMatchEulerDiscreteScheduler` with `stochastic_sampling=True` whose
  `set_timesteps(num_steps)` yields the student's σs. Its step is x0 = x − σ·v, then re-noise to the next σ: for a
  single-block student exactly our rollout, so `WanPipeline` with this scheduler and `num_inference_steps=num_steps`
  samples like `dmd sample`. For the same video it must draw what `dmd sample --seed` draws: the initial noise and
  then the re-noising, from one CPU generator. WanPipeline takes `generator=` for the initial noise only and calls
  `scheduler.step` without it (the step then draws from torch's global stream on the pipeline's device, the CUDA
  one on a GPU), so the card's snippet binds the generator into `scheduler.step` as well;
- `student.json`: steps, σs, time-block settings, teacher, the base the student trained on (`base_model_precision`,
  and for an int8-quanto base the float dtype it computed in), whether the weights are the EMA's;
- `README.md`: a model card with the training settings (the evaluate stage adds the figures to its copy).

Files are written one by one atomically, `student.json` last, so a directory with `student.json` is a complete
student; a block-causal student's `pipeline/` (dmd.student.pipeline: the whole diffusers pipeline, for
`BlockCausalWanPipeline.from_pretrained`) is then built from it. The `validation/` folder that training writes there
is left alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml

from dmd.core.config import ModelConfig, Params
from dmd.core.flow_matching import denoising_sigmas
from dmd.core.io import atomic_dir, write_json, write_text
from dmd.distill.rollout import RolloutSchedule
from dmd.student.pipeline import pipeline_snippet, write_student_pipeline
from dmd.student.sample import pipeline_arguments
from dmd.wan.formats import LORA_WEIGHTS, save_lora_weights, save_scheduler, scheduler_sigmas
from dmd.wan.loading import (
    DTYPE_NAMES,
    DTYPES,
    MIXED_PRECISION_DTYPES,
    WAN_INT8_EXCLUDE,
    load_transformer,
    load_transformer_folder,
)

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel

log = logging.getLogger(__name__)

STUDENT_CARD = "student.json"
STUDENT_ADAPTER = "student"
# σs the shipped scheduler config reproduces within this are treated as exact
SIGMA_TOLERANCE = 1e-5


# --------------------------------------------------------------------------------------------------------------
# The few-step scheduler config


def fit_scheduler_config(sigmas: list[float]) -> tuple[dict, float]:
    """(config, max |σ error|) of a stochastic FlowMatchEulerDiscreteScheduler that steps through `sigmas`.

    WanPipeline calls `set_timesteps(n)` without σs, so the σs must come from the config: σ = shift(linspace(1,
    σ_min, n), shift), stretched so the last one is `shift_terminal`. With the first σ at 1, one or two steps fit
    exactly for any values and three for almost any; longer schedules fit when they have that form (e.g. evenly
    spaced), otherwise the closest shift is taken and the error returned (student.json and the card report it).
    """
    target = np.asarray(sigmas, dtype=np.float64)
    n = len(target)
    base = {"num_train_timesteps": 1000, "stochastic_sampling": True, "shift": 1.0}
    if n == 1:
        return base, float(abs(scheduler_sigmas(base, 1) - target).max())
    config = dict(base, shift_terminal=float(target[-1]))
    if n == 2:  # the stretch alone places the second σ
        return config, float(abs(scheduler_sigmas(config, 2) - target).max())

    def error(log_shift: float) -> float:
        return float(abs(scheduler_sigmas(dict(config, shift=math.exp(log_shift)), n) - target).max())

    grid = np.linspace(math.log(0.02), math.log(50.0), 121)
    best = min(grid, key=error)
    step = grid[1] - grid[0]
    lo, hi = best - step, best + step
    for _ in range(60):  # golden-section refinement around the best grid point
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if error(a) < error(b):
            hi = b
        else:
            lo = a
    config["shift"] = math.exp((lo + hi) / 2)
    return config, error(math.log(config["shift"]))


# --------------------------------------------------------------------------------------------------------------
# Export


def student_card(
    params: Params, schedule: RolloutSchedule, *, ema: bool, step: int, sigma_error: float
) -> dict:
    train, dc = params.train, params.train.distillation_config
    int8 = params.model.base_model_precision == "int8-quanto"
    return {
        "format": "dmd-student/1",
        "distillation_method": train.distillation_method,
        "model_family": params.model.model_family,
        "model_type": train.student.model_type,
        "lora_type": train.student.lora_type if train.student.model_type == "lora" else None,
        "num_steps": schedule.num_steps,
        "dmd_denoising_steps": list(dc.dmd_denoising_steps),
        "warp_denoising_steps": dc.warp_denoising_steps,
        "sigmas": [float(s) for s in schedule.sigmas],
        "num_frame_per_block": schedule.num_frame_per_block,
        "independent_first_frame": schedule.independent_first_frame,
        "context_sigma": schedule.context_sigma,
        "causal": schedule.causal,
        "num_training_frames": schedule.num_training_frames,
        "single_block_training": dc.num_frame_per_block >= dc.num_training_frames
        and not dc.independent_first_frame,
        "scheduler_sigma_error": sigma_error,
        "teacher": params.model.pretrained_model_name_or_path,
        "teacher_revision": params.model.revision,
        # a LoRA learns against the base's own weights: an int8 one is loaded on the same int8 base (student_base)
        "base_model_precision": params.model.base_model_precision,
        "int8_float_dtype": DTYPE_NAMES[MIXED_PRECISION_DTYPES[train.run.mixed_precision]] if int8 else None,
        "lora_rank": train.student.lora_rank if train.student.model_type == "lora" else None,
        "lora_alpha": train.student.lora_alpha if train.student.model_type == "lora" else None,
        "ema": ema,
        "ema_decay": train.ema.ema_decay if ema else None,
        "train_steps": step,
        "guidance": 1.0,
    }


def export_student(
    transformer: WanTransformer3DModel,
    params: Params,
    schedule: RolloutSchedule,
    output_dir: str | Path,
    *,
    ema: bool,
    step: int,
) -> Path:
    """Write the student (the weights `transformer` holds now; swap EMA weights in before calling), which trained
    with `schedule`, to `output_dir`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / STUDENT_CARD).unlink(missing_ok=True)  # the directory is incomplete until the card is back
    for stale in (LORA_WEIGHTS, "transformer", "scheduler"):
        path = out / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    if params.train.student.model_type == "lora":
        with atomic_dir(out / ".lora") as tmp:
            save_lora_weights(tmp, transformer, STUDENT_ADAPTER)
        (out / ".lora" / LORA_WEIGHTS).replace(out / LORA_WEIGHTS)
        shutil.rmtree(out / ".lora")
    else:
        with atomic_dir(out / "transformer") as tmp:
            transformer.save_pretrained(tmp, safe_serialization=True)

    config, sigma_error = fit_scheduler_config(list(schedule.sigmas))
    if sigma_error > SIGMA_TOLERANCE:
        log.warning(
            "the shipped scheduler config reproduces the student's σs %s only within %.2g; diffusers pipelines "
            "will sample slightly off the trained steps (dmd sample uses them exactly)",
            [round(s, 4) for s in schedule.sigmas],
            sigma_error,
        )
    with atomic_dir(out / "scheduler") as tmp:
        save_scheduler(tmp, config)

    card = student_card(params, schedule, ema=ema, step=step, sigma_error=sigma_error)
    write_model_card(out, params, card)
    write_json(out / STUDENT_CARD, card)
    write_student_pipeline(out, params)  # built from the exported student: a block-causal one's, else removed
    log.info("exported the %d-step student to %s", schedule.num_steps, out)
    return out


def write_model_card(
    student_dir: str | Path,
    params: Params,
    card: dict | None = None,
    metrics: dict | None = None,
    path: str | Path | None = None,
) -> Path:
    """The student's model card: how to load it, its steps, the training settings, and the evaluation figures
    when given. Training writes it as the student's README.md without figures (evaluation comes later in the
    DAG); the evaluate stage writes the card with its figures into its own report folder."""
    student_dir = Path(student_dir)
    card = card or json.loads((student_dir / STUDENT_CARD).read_text())
    teacher = card["teacher"]
    load = (
        f'pipe.load_lora_weights("{student_dir.name}", weight_name="{LORA_WEIGHTS}")'
        if card["model_type"] == "lora"
        else f'pipe.transformer = WanTransformer3DModel.from_pretrained("{student_dir.name}", subfolder="transformer")'
    )
    call = {"num_inference_steps": card["num_steps"], **pipeline_arguments(params)}
    arguments = "".join(f"    {key}={value!r},\n" for key, value in call.items())
    int8_base = card["model_type"] == "lora" and card.get("base_model_precision") == "int8-quanto"
    if int8_base:  # the base as dmd.wan.loading.quantize_int8 makes it, before the LoRA goes on
        imports = ["from optimum.quanto import freeze, qint8, quantize"]
        pipeline = [
            "# the LoRA was trained on this base with int8 weights (optimum-quanto): it is loaded on the same base",
            f'transformer = WanTransformer3DModel.from_pretrained(\n    "{teacher}", subfolder="transformer", '
            f"torch_dtype={DTYPES[card['int8_float_dtype']]}\n)",
            f"quantize(transformer, weights=qint8, exclude={json.dumps(WAN_INT8_EXCLUDE)})",
            "freeze(transformer)",
            f'pipe = WanPipeline.from_pretrained("{teacher}", transformer=transformer)',
        ]
    else:
        imports, pipeline = [], [f'pipe = WanPipeline.from_pretrained("{teacher}")']
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {teacher}",
        "tags: [text-to-video, wan, dmd, distillation, few-step]",
        "---",
        "",
        f"# {card['num_steps']}-step DMD student of {teacher}",
        "",
        f"Distilled with Distribution Matching Distillation for {card['train_steps']} steps"
        f"{' (EMA weights, decay ' + str(card['ema_decay']) + ')' if card['ema'] else ''}. "
        f"It samples in {card['num_steps']} steps at σ = {', '.join(f'{s:.4g}' for s in card['sigmas'])} "
        "without classifier-free guidance.",
        "",
        "```python",
        *(
            [pipeline_snippet(student_dir, params, card).rstrip()]
            if card.get("causal")
            else [
                "import functools",
                "",
                "import torch",
                "from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel",
                *imports,
                "",
                *pipeline,
                load,
                f'pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("{student_dir.name}", subfolder="scheduler")',
                'pipe.to("cuda" if torch.cuda.is_available() else "cpu")',
                'generator = torch.Generator("cpu").manual_seed(0)',
                "# WanPipeline draws the initial noise from `generator` but calls scheduler.step without one;",
                "# bound in, it draws the re-noising between steps from the same CPU stream on any device",
                "pipe.scheduler.step = functools.partial(pipe.scheduler.step, generator=generator)",
                f'video = pipe(\n    "a prompt",\n{arguments}    generator=generator,\n).frames[0]',
            ]
        ),
        "```",
        "",
        *(
            [
                f'`dmd sample --student {student_dir.name} --prompt "a prompt" --seed 0` makes the same video, on a '
                "GPU as on the CPU: both draw the initial noise, the re-noising between steps and each block's "
                "context noise from one CPU generator seeded with `--seed`.",
                "",
            ]
            if card.get("causal")
            else [
                f'`dmd sample --student {student_dir.name} --prompt "a prompt" --seed 0` makes the same video for a '
                "single-block student, on a GPU as on the CPU: it draws the initial noise and then the re-noising "
                "between steps from one CPU generator seeded with `--seed`, as the snippet does, at the size, "
                "guidance and prompt length above (`train.validation_*`, `model.max_sequence_length`).",
                "",
                "Without the `scheduler.step` line the stochastic scheduler draws the re-noising from torch's global "
                "random stream on the pipeline's device: on the CPU `torch.manual_seed(0)` in place of `generator=` "
                "then gives the same video, on a GPU the CUDA stream gives other noise and another video. With "
                "`torch_dtype=torch.bfloat16` (or float16) WanPipeline keeps the latents between steps in that "
                "dtype, where `dmd sample` keeps them in float32: the videos then agree to that precision, not "
                "exactly.",
                "",
            ]
        ),
    ]
    if int8_base:
        lines += [
            f"**Base: int8.** The LoRA was trained on {teacher}'s transformer with int8 weights (optimum-quanto "
            f"`qint8` in every linear layer but `{'`, `'.join(WAN_INT8_EXCLUDE)}`; the other weights and the "
            f"activations in {card['int8_float_dtype']}), so the snippet quantizes the base that way before "
            "loading the LoRA, as `dmd sample` and `dmd evaluate` do: it makes their video, and the evaluation "
            "figures are this base's. Measured (`benchmarks/int8_base.py`, `docs/results.md`), the full-precision "
            "teacher is just as good a base for it: on the toy world a LoRA trained on the int8 base is judged the "
            "same on either base, and the two bases differ about as much under it as under the teacher alone. Without "
            "the `quantize` and `freeze` lines the snippet loads it on the full-precision base (more memory, no "
            "optimum-quanto), whose videos then differ slightly from `dmd sample`'s.",
            "",
        ]
    if card.get("causal"):
        lines += [
            "**Block-causal.** This student generates block by block with a KV cache (each time block attends to "
            "itself and earlier blocks only), which diffusers' `WanPipeline` cannot do (it samples a clip as one "
            "bidirectional block): the snippet loads it as `BlockCausalWanPipeline` (dmd-pipeline's `WanPipeline` "
            "subclass, in `pipeline/` beside the student), which makes the video `dmd sample` makes, also past the "
            "trained length with a rolling cache window.",
            "",
        ]
    elif not card["single_block_training"]:
        lines += [
            "Trained with time blocks (self-forcing rollout); the diffusers scheduler samples the whole clip as one "
            "block, `dmd sample` reproduces the block-wise rollout.",
            "",
        ]
    if card["scheduler_sigma_error"] > SIGMA_TOLERANCE:
        lines += [
            f"The scheduler config matches the student's σs within {card['scheduler_sigma_error']:.2g}.",
            "",
        ]
    settings = yaml.safe_dump(
        {"train": params.train.model_dump(mode="json")}, sort_keys=False, allow_unicode=True
    )
    lines += ["## Training settings", "", "```yaml", settings.rstrip(), "```", ""]
    if metrics:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in _flatten(metrics).items()
        ]
        lines.append("")
    else:
        lines += [
            "## Evaluation",
            "",
            f"`dmd evaluate` compares this student with its teacher and writes `{params.evaluate.metrics_path}`, "
            f"`{params.evaluate.report_dir}/eval.md` and this card with the figures "
            f"(`{params.evaluate.report_dir}/model_card.md`).",
            "",
        ]
    path = Path(path) if path is not None else student_dir / "README.md"
    grids = sorted((student_dir / "validation").glob("step-*/grid*.png"))
    if grids:
        link = Path(os.path.relpath(grids[-1].resolve(), path.parent.resolve())).as_posix()
        lines += ["## Validation", "", f"![validation]({link})", ""]
    write_text(path, "\n".join(lines))
    return path


def _flatten(data, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}; lists are left out of the card's table."""
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    if isinstance(data, (int, float, str, bool)) and prefix:
        return {prefix[:-1]: data}
    return {}


# --------------------------------------------------------------------------------------------------------------
# Loading


def read_card(student_dir: str | Path) -> dict:
    path = Path(student_dir) / STUDENT_CARD
    if not path.is_file():
        raise FileNotFoundError(
            f"{Path(student_dir)}: no {STUDENT_CARD}, so this is not a complete exported student; "
            "run `dmd train` (it exports at the end) or point at the exported directory"
        )
    return json.loads(path.read_text())


def schedule_from_card(card: dict) -> RolloutSchedule:
    sigmas = card.get("sigmas") or denoising_sigmas(card["dmd_denoising_steps"]).tolist()
    return RolloutSchedule(
        sigmas=tuple(float(s) for s in sigmas),
        num_frame_per_block=card["num_frame_per_block"],
        independent_first_frame=card["independent_first_frame"],
        context_sigma=card["context_sigma"],
        # cards from before block-causal students: bidirectional, no cache window
        num_training_frames=card.get("num_training_frames"),
        causal=card.get("causal", False),
    )


def student_base(card: dict, model: ModelConfig) -> tuple[ModelConfig, torch.dtype]:
    """(teacher config, int8 float dtype) a LoRA student's base is loaded with.

    A student trained on an int8-quanto base is loaded on that int8 base, computing in the float dtype it trained in,
    whatever `model.base_model_precision` says now: its LoRA was trained against those weights, its evaluation
    measures it there, and the card's snippet loads it so. One trained on a float base is loaded on a float base, at
    `model`'s float precision (running bf16 / fp16 is an inference choice), never on an int8 one. A card from before
    the training base was recorded leaves `model` as it is."""
    trained_on = card.get("base_model_precision")
    if trained_on == "int8-quanto":
        int8_float_dtype = DTYPES[card["int8_float_dtype"]]
        return model.model_copy(update={"base_model_precision": trained_on}), int8_float_dtype
    if trained_on is not None and model.base_model_precision == "int8-quanto":
        log.warning(
            "the student was trained on a %s base, so it is loaded on the float teacher, not on the int8-quanto one "
            "model.base_model_precision names",
            trained_on,
        )
        return model.model_copy(update={"base_model_precision": trained_on}), torch.float32
    return model, torch.float32


def load_student(student_dir: str | Path, params: Params) -> tuple[WanTransformer3DModel, RolloutSchedule]:
    """(transformer with the student's weights, the student's RolloutSchedule); the teacher from `params.model`, a
    LoRA student's base as `student_base` says (int8 when it trained on int8)."""
    student_dir = Path(student_dir)
    card = read_card(student_dir)
    if card["model_type"] == "full":
        # at the base's precision, as a LoRA student's base is loaded
        transformer = load_transformer_folder(student_dir, params.model.base_model_precision)
    else:
        model, int8_float_dtype = student_base(card, params.model)
        transformer = load_transformer(model, int8_float_dtype=int8_float_dtype)
        transformer.load_lora_adapter(
            str(student_dir), weight_name=LORA_WEIGHTS, adapter_name=STUDENT_ADAPTER, prefix="transformer"
        )
    transformer.eval().requires_grad_(False)
    return transformer, schedule_from_card(card)
