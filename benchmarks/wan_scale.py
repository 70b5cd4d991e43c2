"""Wan 2.1 1.3B and 14B at scale, on random-initialised models of the real configs (no download), on one GPU.

1. Sampling, 1.3B, 480×832, 81 frames (latent 16×21×60×104): the teacher, 50 steps with CFG (two transformer
   passes per step, as `WanPipeline` with guidance_scale > 1), against the 3-step student (one pass per step,
   `dmd.distill.rollout.sample`); DiT seconds and VAE-decode seconds, interleaved, medians; the DiT speed-up.
2. One DMD step, 1.3B, at that latent, as `dmd train` runs it (accelerate with mixed_precision bf16, a bf16 base,
   gradient checkpointing, `TrainableGroup` updates, optimizer adamw_bf16), LoRA rank-128 student: peak memory and
   seconds for (a) a LoRA critic on the shared base, (b) the same on an int8-quanto base, (c) a full-copy critic,
   against (d) a plain LoRA flow-matching fine-tune step on the same base; and (a)'s step time against the sum of
   the transformer passes it contains, each timed on its own.
3. 14B: does one DMD step of (a), else (b), fit on the GPU at 480p × 81 frames, at what peak memory and time; if
   not, the longest latent clip (21, 17, 13, 9, 5, 1 latent frames) at which one does.

Models are built directly on the device in bf16 from `dmd/wan/configs/` (`dmd.wan.skeleton.build_transformer`); prompt
embeddings are random tensors of the text encoder's output shape (the text encoder's time is not measured). The
student is timed on the base transformer: an exported student has the teacher's architecture (a LoRA student fused).

Without CUDA, or with --smoke, the same code runs with one transformer layer, a tiny latent and a few teacher steps:
a check of the code path (the test suite runs it), not a measurement; the JSON says so (`smoke`). Every part is
written to the JSON as soon as it finishes.

    .venv/bin/python benchmarks/wan_scale.py             # GPU: writes benchmarks/results/wan_scale.json
    .venv/bin/python benchmarks/wan_scale.py --smoke     # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dmd.core.config import Params  # noqa: E402
from dmd.core.flow_matching import add_noise, sigma_to_timestep, velocity_target  # noqa: E402
from dmd.core.io import write_json  # noqa: E402
from dmd.core.noise import randn  # noqa: E402
from dmd.evaluation.metrics import (  # noqa: E402
    NFECounter,
    PeakMemory,
    dmd_pass_seconds,
    dmd_step_pass_counts,
    speedup,
    synchronize,
)
from dmd.wan.device import pick_device  # noqa: E402
from dmd.wan.latents import initial_noise  # noqa: E402
from dmd.wan.skeleton import build_transformer, build_vae, config_folder, read_configs  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "wan_scale.json"
PARTS = ("sampling", "dmd_step", "fit_14b")
CONFIGS = {
    "a_lora_critic": "DMD step, LoRA critic on the shared base",
    "b_lora_critic_int8": "DMD step, LoRA critic on an int8-quanto base",
    "c_full_critic": "DMD step, full-copy critic",
    "d_lora_finetune": "plain LoRA flow-matching fine-tune step (reference)",
}
REFERENCE = "d_lora_finetune"
FIT_CONFIGS = ("a_lora_critic", "b_lora_critic_int8")
LORA_RANK = 128
TEACHER_GUIDANCE = 5.0  # WanPipeline's default guidance_scale
SEED = 0


@dataclass(frozen=True)
class Scale:
    """What one run builds and repeats; `FULL` is the measurement, `SMOKE` the CPU check of the code path."""

    smoke: bool
    num_layers: int | None  # transformer depth (None: the config's own)
    latent_frames: int  # latent T of the sampling and of the 1.3B DMD step
    latent_height: int
    latent_width: int
    text_tokens: int  # prompt-embedding length (WanPipeline's max_sequence_length)
    teacher_steps: int
    student_repeats: int  # timed student samplings, after one warm-up
    decode_repeats: int  # timed VAE decodes (teacher's and student's latents, alternately)
    step_repeats: int  # timed DMD / fine-tune steps per configuration, after one warm-up step
    pass_repeats: int  # timed repetitions of each pass kind
    fit_frames: tuple[int, ...]  # the 14B search, longest first

    @property
    def video(self) -> dict[str, int]:
        """The pixel video of the latent (Wan's VAE: 8× spatially, 4 frames per latent frame after the first)."""
        return {
            "height": self.latent_height * 8,
            "width": self.latent_width * 8,
            "frames": (self.latent_frames - 1) * 4 + 1,
        }


FULL = Scale(
    smoke=False,
    num_layers=None,
    latent_frames=21,
    latent_height=60,
    latent_width=104,
    text_tokens=512,
    teacher_steps=50,
    student_repeats=3,
    decode_repeats=2,
    step_repeats=1,
    pass_repeats=1,
    fit_frames=(21, 17, 13, 9, 5, 1),
)
SMOKE = Scale(
    smoke=True,
    num_layers=1,
    latent_frames=2,
    latent_height=4,
    latent_width=4,
    text_tokens=8,
    teacher_steps=3,
    student_repeats=2,
    decode_repeats=2,
    step_repeats=1,
    pass_repeats=1,
    fit_frames=(2, 1),
)


# --------------------------------------------------------------------------------------------------------------
# Shared pieces


def log(message: str) -> None:
    print(message, flush=True)


def timed(fn: Callable, device: torch.device):
    """(fn(), seconds), the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def resident_mib(device: torch.device) -> float | None:
    """Memory held now: the CUDA allocator's live bytes, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def resident_kind(device: torch.device) -> str:
    return "cuda_memory_allocated" if device.type == "cuda" else "cpu_process_rss"


def latent_shape(scale: Scale, frames: int | None = None) -> tuple[int, int, int, int, int]:
    return (1, 16, frames or scale.latent_frames, scale.latent_height, scale.latent_width)


def text_embeds(scale: Scale, text_dim: int, device: torch.device, seed: int) -> torch.Tensor:
    """A stand-in for the text encoder's output: what the transformer costs does not depend on its values."""
    return randn((1, scale.text_tokens, text_dim), torch.Generator("cpu").manual_seed(seed), device)


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def median(values: list[float]) -> float:
    return float(np.median(values))


# --------------------------------------------------------------------------------------------------------------
# 1. Sampling: teacher (50 steps + CFG) against the 3-step student


def sampling(scale: Scale, device: torch.device) -> dict:
    import diffusers
    from diffusers import WanPipeline

    from dmd.distill.rollout import RolloutSchedule
    from dmd.evaluation.evaluate import StudentSampler
    from dmd.wan.decode import LatentDecoder
    from dmd.wan.sampler import TeacherSampler

    configs = read_configs(config_folder("1.3b"))
    transformer = build_transformer(configs, SEED, scale.num_layers, device, torch.bfloat16)
    vae = build_vae(configs, SEED, device)
    scheduler_config = configs["scheduler"]
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer
    )
    teacher = TeacherSampler(pipe, scale.teacher_steps, TEACHER_GUIDANCE, "", scale.text_tokens)
    params = dmd_params(scale.latent_frames, LORA_RANK)
    schedule = RolloutSchedule.from_params(params)
    student = StudentSampler(transformer, schedule, None, None, scale.text_tokens)
    decode = LatentDecoder(vae)
    text_dim = transformer.config.text_dim
    embeds = {
        "prompt_embeds": text_embeds(scale, text_dim, device, 1),
        "negative_prompt_embeds": text_embeds(scale, text_dim, device, 2),
    }
    shape = latent_shape(scale)
    noise = initial_noise(SEED, shape, device)

    events: list[dict] = []
    outputs: dict[str, torch.Tensor] = {}

    def run(what: str, fn: Callable, counted: bool = False):
        with NFECounter(transformer) as nfe:
            out, seconds = timed(fn, device)
        event = {"what": what, "seconds": seconds}
        if counted:
            event["transformer_calls"] = nfe.calls
        events.append(event)
        log(f"    {what}: {seconds:.2f} s" + (f" ({nfe.calls} transformer passes)" if counted else ""))
        return out

    # the student first, untimed in the medians: it brings up the kernels both samplers use
    outputs["student"] = run("student (warm-up)", lambda: student.denoise(embeds, noise, SEED), counted=True)
    outputs["teacher"] = run("teacher", lambda: teacher.denoise(embeds, noise, SEED), counted=True)
    for i in range(max(scale.student_repeats, scale.decode_repeats)):
        if i < scale.decode_repeats:
            source = ("teacher", "student")[i % 2]
            run(f"vae decode ({source} latents)", lambda s=source: decode(outputs[s]))
        if i < scale.student_repeats:
            outputs["student"] = run("student", lambda: student.denoise(embeds, noise, SEED), counted=True)

    def seconds_of(what: str) -> list[float]:
        return [e["seconds"] for e in events if e["what"] == what]

    def calls_of(what: str) -> int:
        (calls,) = {e["transformer_calls"] for e in events if e["what"] == what}
        return calls

    teacher_s = median(seconds_of("teacher"))
    student_s = median(seconds_of("student"))
    decode_all = [e["seconds"] for e in events if e["what"].startswith("vae decode")]
    vae_s = median(decode_all)
    result = {
        "model": "1.3b",
        "num_layers": transformer.config.num_layers,
        "transformer_parameters": parameters(transformer),
        "transformer_dtype": str(transformer.dtype),
        "vae_dtype": str(vae.dtype),
        "video": scale.video,
        "latent_shape": list(shape),
        "text_tokens": scale.text_tokens,
        "teacher": {
            "sampler": "WanPipeline (UniPC from the shipped scheduler config), output_type='latent'",
            "steps": scale.teacher_steps,
            "guidance_scale": TEACHER_GUIDANCE,
            "transformer_passes": calls_of("teacher"),
            "dit_seconds": seconds_of("teacher"),
            "dit_seconds_median": teacher_s,
        },
        "student": {
            "sampler": "dmd.distill.rollout.sample, one time block",
            "steps": schedule.num_steps,
            "sigmas": list(schedule.sigmas),
            "transformer_passes": calls_of("student"),
            "dit_seconds": seconds_of("student"),
            "dit_seconds_median": student_s,
        },
        "vae_decode_seconds": decode_all,
        "vae_decode_seconds_median": vae_s,
        "dit_speedup": speedup(teacher_s, student_s),
        "dit_and_vae_speedup": speedup(teacher_s + vae_s, student_s + vae_s),
        "order": events,
    }
    return result  # its models are freed before the next part starts


# --------------------------------------------------------------------------------------------------------------
# 2 and 3. One DMD step per configuration


def dmd_params(frames: int, critic_rank: int | None) -> Params:
    """The run's settings: bf16 as `dmd train` runs it at scale, one time block, the exit always the last step (a
    fixed number of passes per step, so the step can be set against its passes)."""
    return Params.model_validate(
        {
            "model": {"base_model_precision": "bf16"},
            "train": {
                "lora_rank": LORA_RANK,
                "lora_alpha": LORA_RANK,
                "optimizer": "adamw_bf16",
                "mixed_precision": "bf16",
                "gradient_checkpointing": True,
                "train_batch_size": 1,
                "use_ema": False,
                "distillation_config": {
                    "num_training_frames": frames,
                    "num_frame_per_block": frames,
                    "last_step_only": True,
                    "fake_score_lora_rank": critic_rank,
                },
            },
        }
    )


def accelerator(device: torch.device):
    from accelerate import Accelerator

    return Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")


def run_config(
    config: str,
    model: str,
    frames: int,
    scale: Scale,
    acc,
    *,
    repeats: int,
    time_passes: bool = False,
) -> dict:
    """Build `config` on `model` at `frames` latent frames and run one warm-up step and `repeats` timed steps: peak
    memory over all of them (the warm-up allocates the optimizer state, which the timed steps then hold),
    seconds of the timed ones."""
    from dmd.distill.method import DMDMethod
    from dmd.distill.roles import MIXED_PRECISION_DTYPES, make_roles
    from dmd.distill.rollout import RolloutSchedule
    from dmd.training.loop import step_generator
    from dmd.training.optim import build_groups
    from dmd.wan.loading import place_int8

    device = acc.device
    free_memory(device)
    before_build = resident_mib(device)
    critic_rank = None if config == "c_full_critic" else LORA_RANK
    params = dmd_params(frames, critic_rank)
    train = params.train
    dtype = MIXED_PRECISION_DTYPES[train.run.mixed_precision]
    try:
        base = build_transformer(model, SEED, scale.num_layers, device, dtype)
    except torch.cuda.OutOfMemoryError:
        # not an answer to "does a step fit": the 14B search must stop here rather than step down
        raise RuntimeError(
            f"building the {model} transformer ran out of device memory: it is initialised in fp32 on the device "
            "before the cast, which needs 4 bytes per parameter; use a GPU with room for that"
        ) from None
    free_memory(device)  # hand back the fp32 weights it was initialised in
    n_params = parameters(base)
    text_dim = base.config.text_dim
    shape = latent_shape(scale, frames)
    g = torch.Generator("cpu").manual_seed(3)
    batch = SimpleNamespace(
        latents_BCTHW=randn(shape, g, device),
        prompt_embeds_BLD=text_embeds(scale, text_dim, device, 4),
        noise_BCTHW=None,
    )
    if config == REFERENCE:
        step, trainable, modules = finetune_step(base, params, batch, acc)
        roles = method = None
    else:
        quantize = None
        if config == "b_lora_critic_int8":
            quantize_via = "accelerator" if device.type == "cuda" else "cpu"
            quantize = partial(place_int8, quantize_via=quantize_via, device=device)
        roles = make_roles(base, train, quantize_base=quantize)
        modules = [m for m in (roles.base, roles.student_copy, roles.critic_copy) if m is not None]
        negative = text_embeds(scale, text_dim, device, 5)
        empty = torch.zeros_like(negative)
        method = DMDMethod(params, roles, RolloutSchedule.from_params(params), negative, empty)
        student, critic = build_groups(params, method, 1000, acc)
        trainable = method.student_parameters() + method.critic_parameters()

        def step(i: int) -> dict:
            generator = step_generator(train.run.seed, i, 0)
            updates = {
                "student": student.update(partial(method.generator_loss, generator=generator), [batch])
            }
            updates["critic"] = critic.update(partial(method.critic_loss, generator=generator), [batch])
            return {name: u.finite for name, u in updates.items()}

    for module in modules:  # as dmd.training.loop does with gradient_checkpointing
        module.enable_gradient_checkpointing()
    after_build = resident_mib(device)
    seconds, finite = [], []
    with PeakMemory(device) as peak:
        for i in range(1 + repeats):
            ok, s = timed(lambda i=i: step(i), device)
            finite.append(ok)
            seconds.append(s)
            log(f"      step {i}{' (warm-up)' if i == 0 else ''}: {s:.2f} s")
    out = {
        "config": config,
        "label": CONFIGS[config],
        "model": model,
        "latent_frames": frames,
        "latent_shape": list(shape),
        "video": {**scale.video, "frames": (frames - 1) * 4 + 1},
        "parameters": n_params,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
        "resident_kind": resident_kind(device),
        "resident_before_build_mib": before_build,
        "resident_after_build_mib": after_build,
        "peak_memory_mib": peak.mb,
        "peak_memory_kind": peak.kind,
        "warmup_seconds": seconds[0],
        "step_seconds": seconds[1:],
        "step_seconds_median": median(seconds[1:]),
        "finite": finite,
    }
    if time_passes:
        dc = method.config
        passes = dmd_pass_seconds(
            roles,
            dc,
            randn(shape, g, device),
            batch.prompt_embeds_BLD,
            repeats=scale.pass_repeats,
            warm_up=False,  # the steps above ran every kind of pass already
            autocast=acc.autocast,
        )
        counts = dmd_step_pass_counts(dc)
        total = sum(counts[k] * passes[k] for k in counts)
        out["passes"] = {
            "seconds": passes,
            "counts": counts,
            "sum_seconds": total,
            "step_over_sum": out["step_seconds_median"] / total,
        }
        for name, s in passes.items():
            log(f"      {name}: {s:.3f} s × {counts[name]}")
    return out  # its models are freed when the next configuration starts (`free_memory`)


def finetune_step(base, params: Params, batch, acc):
    """(d): a LoRA student on the base, one flow-matching step x_σ = (1−σ)·x0 + σ·ε → v = ε − x0 per update."""
    from dmd.distill.roles import STUDENT_ADAPTER
    from dmd.distill.rollout import transformer_velocity
    from dmd.training.optim import TrainableGroup, build_lr_scheduler, build_optimizer
    from dmd.wan.loading import add_lora

    cfg = params.train
    device = acc.device
    add_lora(base, cfg.student.lora_rank, cfg.student.lora_alpha, STUDENT_ADAPTER)
    lora = [p.requires_grad_(True) for n, p in base.named_parameters() if "lora_" in n]
    velocity = transformer_velocity(base)
    optimizer = build_optimizer(lora, cfg.optim.optimizer, cfg.optim.learning_rate)
    group = TrainableGroup(
        "student", lora, optimizer, build_lr_scheduler(optimizer, cfg, 1000), cfg.optim.grad_clip_method,
        cfg.optim.max_grad_norm, acc,
    )  # fmt: skip

    def loss_fn(b, generator):
        x0 = b.latents_BCTHW
        noise = randn(x0.shape, generator, device)
        sigma = torch.rand(x0.shape[0], generator=generator).to(device)
        frame_timesteps_BT = sigma_to_timestep(sigma)[:, None].expand(-1, x0.shape[2])
        pred = velocity(add_noise(x0, noise, sigma), frame_timesteps_BT, b.prompt_embeds_BLD)
        return ((pred - velocity_target(x0, noise)) ** 2).mean(), {}

    def step(i: int) -> dict:
        generator = torch.Generator("cpu").manual_seed(i)
        return {"student": group.update(partial(loss_fn, generator=generator), [batch]).finite}

    return step, lora, [base]


def dmd_step(scale: Scale, acc) -> dict:
    results = {}
    for config, label in CONFIGS.items():
        log(f"  ({config[0]}) {label}")
        results[config] = run_config(
            config,
            "1.3b",
            scale.latent_frames,
            scale,
            acc,
            repeats=scale.step_repeats,
            time_passes=config == "a_lora_critic",
        )
    ref = results[REFERENCE]
    for r in results.values():
        r["peak_ratio_to_d"] = r["peak_memory_mib"] / ref["peak_memory_mib"]
        r["seconds_ratio_to_d"] = r["step_seconds_median"] / ref["step_seconds_median"]
    return {
        "model": "1.3b",
        "latent_shape": list(latent_shape(scale)),
        "video": scale.video,
        "settings": settings(),
        "configs": results,
    }


def settings() -> dict:
    p = dmd_params(1, LORA_RANK)
    t, dc = p.train, p.train.distillation_config
    return {
        "base_precision": "bf16 weights (diffusers' fp32 modules kept fp32); (b): int8-quanto, bf16 elsewhere",
        "mixed_precision": t.run.mixed_precision,
        "gradient_checkpointing": t.student.gradient_checkpointing,
        "optimizer": t.optim.optimizer,
        "lora_rank": t.student.lora_rank,
        "critic_lora_rank": LORA_RANK,
        "batch_size": 1,
        "dmd_denoising_steps": dc.dmd_denoising_steps,
        "last_step_only": dc.last_step_only,
        "real_score_guidance_scale": dc.real_score_guidance_scale,
        "fake_score_guidance_scale": dc.fake_score_guidance_scale,
        "updates_per_step": "one student update (generator_loss), then one critic update (critic_loss)",
    }


def search_fit(
    frame_counts: tuple[int, ...],
    configs: tuple[str, ...],
    attempt: Callable[[int, str], dict],
    free: Callable,
) -> tuple[list[dict], dict | None]:
    """Try `attempt(frames, config)` from the longest clip down, each config in turn at each length, until one
    runs; an out-of-memory error marks that pair as not fitting, and `free` returns its memory before the next.
    Returns (every pair tried, the first result that fitted or None)."""
    tried = []
    for frames in frame_counts:
        for config in configs:
            error = None
            try:
                result = attempt(frames, config)
            except torch.cuda.OutOfMemoryError as e:
                error = (str(e).splitlines() or [type(e).__name__])[0]
            # out of the except block: the traceback, and the attempt's tensors it holds, are gone
            tried.append({"latent_frames": frames, "config": config, "fits": error is None, "error": error})
            if error is None:
                return tried, result
            log(f"    {config} at {frames} latent frames: out of memory")
            free()
    return tried, None


def fit_14b(scale: Scale, acc) -> dict:
    device = acc.device
    free_memory(device)
    resident = resident_mib(device)

    def attempt(frames: int, config: str) -> dict:
        log(f"  {config} at {frames} latent frames")
        # one timed step after the warm-up: the question is whether it fits, and the 10-minute budget
        return run_config(config, "14b", frames, scale, acc, repeats=1)

    tried, result = search_fit(scale.fit_frames, FIT_CONFIGS, attempt, lambda: free_memory(device))
    full = scale.fit_frames[0]
    return {
        "model": "14b",
        "question": f"does one DMD step of (a), else (b), fit at {full} latent frames "
        f"({(full - 1) * 4 + 1} video frames) at {scale.latent_height * 8}x{scale.latent_width * 8}?",
        "resident_before_mib": resident,
        "tried": tried,
        "fits_full_length": bool(result and result["latent_frames"] == full),
        "largest_latent_frames": result["latent_frames"] if result else None,
        "largest_video_frames": (result["latent_frames"] - 1) * 4 + 1 if result else None,
        "config": result["config"] if result else None,
        "result": result,
    }


# --------------------------------------------------------------------------------------------------------------
# Run


def environment(device: torch.device) -> dict:
    import accelerate
    import diffusers
    import peft

    try:
        from importlib.metadata import version

        quanto = version("optimum-quanto")
    except Exception:  # not installed: the int8 configuration would have failed already
        quanto = None
    info = {
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "optimum_quanto": quanto,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["device_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        info["cuda"] = torch.version.cuda
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choose_scale(smoke: bool, device: torch.device) -> tuple[Scale, str | None]:
    if smoke:
        return SMOKE, "--smoke"
    if device.type != "cuda":
        return SMOKE, f"no CUDA device (running on {device.type}): the real sizes need a GPU"
    return FULL, None


def holds_measurement(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("smoke") is False
    except (OSError, ValueError, AttributeError):
        return False


def earlier_parts(path: Path, report: dict, parts: list[str]) -> dict:
    """The parts not run now from an earlier run in `path` of the same scale on the same device, so a run split
    into several commands (--parts) still ends in one file."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    same = (
        all(earlier.get(k) == report[k] for k in ("smoke", "scale"))
        and earlier.get("environment", {}).get("device_name") == report["environment"]["device_name"]
    )
    if not same:
        return {}
    kept = {part: earlier[part] for part in PARTS if part not in parts and part in earlier}
    if kept:
        report["part_seconds"].update(
            {part: s for part, s in earlier.get("part_seconds", {}).items() if part in kept}
        )
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one layer, a tiny latent, a few steps")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"the JSON (default {RESULTS})")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {', '.join(PARTS)}; the other parts of an earlier run of the same scale "
        "on the same device in --output are kept",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else pick_device()
    scale, why = choose_scale(args.smoke, device)
    if scale.smoke and holds_measurement(args.output):
        parser.error(
            f"{args.output} holds a GPU measurement, which a smoke run does not replace; pass --output"
        )
    if why and not args.smoke:
        log(f"falling back to the smoke configuration: {why}")
    acc = accelerator(device)
    device = acc.device
    report = {
        "smoke": scale.smoke,
        "smoke_reason": why,
        "complete": False,
        "environment": environment(device),
        "scale": json.loads(json.dumps(asdict(scale))),  # as it reads back from the file
        "parts": parts,
        "part_seconds": {},
    }
    kept = earlier_parts(args.output, report, parts)
    if kept:
        log(f"keeping {', '.join(kept)} from the earlier run in {args.output}")
        report.update(kept)
        report["parts_from_earlier_run"] = sorted(kept)
    log(
        f"{'SMOKE RUN (not a measurement)' if scale.smoke else 'measurement'} on {report['environment']['device_name']}"
        f", torch {torch.__version__}, latent {latent_shape(scale)}, teacher {scale.teacher_steps} steps"
    )
    started = time.perf_counter()
    runs = {"sampling": lambda: sampling(scale, device), "dmd_step": lambda: dmd_step(scale, acc)}
    runs["fit_14b"] = lambda: fit_14b(scale, acc)
    titles = {
        "sampling": "sampling, 1.3B: teacher (steps + CFG) vs 3-step student, DiT and VAE decode",
        "dmd_step": "one DMD step, 1.3B: (a) LoRA critic, (b) int8 base, (c) full critic, (d) LoRA fine-tune",
        "fit_14b": "14B: one DMD step of (a) / (b) at the longest clip that fits",
    }
    for i, part in enumerate(parts, 1):
        log(f"[{i}/{len(parts)}] {titles[part]}")
        free_memory(device)
        part_start = time.perf_counter()
        report[part] = runs[part]()
        report["part_seconds"][part] = time.perf_counter() - part_start
        log(f"  done in {report['part_seconds'][part]:.0f} s (total {time.perf_counter() - started:.0f} s)")
        write_json(args.output, report)
    report["complete"] = all(part in report for part in PARTS)
    report["total_seconds"] = time.perf_counter() - started
    write_json(args.output, report)
    summary(report)
    log(f"wrote {args.output}")
    return 0


def summary(report: dict) -> None:
    if "sampling" in report:
        s = report["sampling"]
        log(
            f"sampling: teacher {s['teacher']['steps']} steps + CFG {s['teacher']['dit_seconds_median']:.2f} s, "
            f"student {s['student']['steps']} steps {s['student']['dit_seconds_median']:.3f} s (DiT "
            f"{s['dit_speedup']:.1f}x), VAE decode {s['vae_decode_seconds_median']:.2f} s "
            f"(DiT + VAE {s['dit_and_vae_speedup']:.1f}x)"
        )
    if "dmd_step" in report:
        configs = report["dmd_step"]["configs"]
        kind = next(iter(configs.values()))["peak_memory_kind"]
        log(f"one step, peak memory ({kind}) and seconds, against (d):")
        for name, r in configs.items():
            log(
                f"  ({name[0]}) {r['label']:52s} {r['peak_memory_mib']:10.0f} MiB {r['peak_ratio_to_d']:5.2f}x "
                f"{r['step_seconds_median']:8.2f} s {r['seconds_ratio_to_d']:5.2f}x"
            )
        p = configs["a_lora_critic"]["passes"]
        log(f"  (a) step / sum of its passes: {p['step_over_sum']:.2f} ({p['sum_seconds']:.2f} s)")
    if "fit_14b" in report:
        f = report["fit_14b"]
        r = f["result"]
        if r is None:
            log("14B: no DMD step fitted at any clip length tried")
        else:
            log(
                f"14B: {r['config']} fits at {r['latent_frames']} latent frames ({f['largest_video_frames']} video "
                f"frames), peak {r['peak_memory_mib']:.0f} MiB ({r['peak_memory_kind']}), "
                f"{r['step_seconds_median']:.2f} s per step"
            )


if __name__ == "__main__":
    sys.exit(main())
