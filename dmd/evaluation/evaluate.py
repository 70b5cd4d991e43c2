"""The evaluation stage: the few-step student against its teacher, on the same prompts and the same initial noise.

Three runs are compared (columns of the report, in this order):

- `teacher_full`: the teacher through diffusers' `WanPipeline` and its own scheduler, at
  `evaluate.teacher_steps` with CFG `evaluate.teacher_guidance`;
- `teacher_few`: the same sampler at the student's step count (the naive baseline distillation must beat);
- `student`: the exported student (EMA weights when the export holds them) through `dmd.distill.rollout.sample`.

The teacher and the student are loaded side by side and the runs interleaved video by video (`run_samplers`), so
a change in the machine's load reaches all three alike. The teacher runs' clips are kept in a teacher reference
(`dmd.evaluation.reference`): when nothing they depend on changed, they are reused and the teacher is sampled, still
interleaved, on the first `evaluate.timed_reference_videos` items only, for its timings. Each run first generates
`evaluate.warmup` videos that are thrown away, then times every video phase by phase (text encoding, DiT, VAE
decode), counts transformer evaluations with a forward hook and records the peak working memory; times are medians
with their quartiles, and a speed-up is the median of the per-video ratios (`dmd.evaluation.metrics.paired_speedup`).
Quality: the toy judge on toy prompts; a Fréchet distance to the full teacher's samples and a CLIP score when
`evaluate.feature_model` / `evaluate.clip_model` name a model.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dmd.core.config import Params
from dmd.core.io import remove_stale_temporaries, write_json
from dmd.core.progress import Progress
from dmd.core.video import write_video
from dmd.data.prompts import PromptLibraryError, load_prompt_library
from dmd.evaluation.metrics import (
    FeatureModel,
    NFECounter,
    PeakMemory,
    PhaseTimer,
    SpeedStats,
    clip_score,
    frechet_distance,
    gap_closed,
    module_mb,
    paired_speedup,
    speedup,
    video_features,
)
from dmd.evaluation.reference import TeacherReference, teacher_identity
from dmd.wan.decode import LatentDecoder
from dmd.wan.device import pick_device
from dmd.wan.latents import LatentGeometry, initial_noise

log = logging.getLogger(__name__)

RUNS = ("teacher_full", "teacher_few", "student")
TEACHER_RUNS = ("teacher_full", "teacher_few")  # the runs whose clips the teacher reference keeps
RUN_LABELS = {"teacher_full": "teacher full", "teacher_few": "teacher few-step", "student": "student"}
DETAILS = "eval_details.json"  # beside eval.md: every figure of every run, as score_runs made them
HEADLINE_JUDGE = ("accuracy_all", "sharpness", "fd", "diversity", "motion_consistency")
# variety across seeds, with its spread over seeds (dmd.toy.variety.start_position_variety), for teacher and student
HEADLINE_VARIETY = ("diversity", "diversity_spread", "pairwise_diversity", "pairwise_diversity_spread")


class EvaluationError(ValueError):
    pass


# --------------------------------------------------------------------------------------------------------------
# What is evaluated


@dataclass(frozen=True)
class EvalItem:
    """One video of every run: a prompt and a seed (the seed fixes the initial noise)."""

    prompt_index: int
    prompt: str
    seed: int

    @property
    def stem(self) -> str:
        return f"p{self.prompt_index:03d}-seed{self.seed}"


@dataclass(frozen=True)
class VideoSpec:
    height: int
    width: int
    num_frames: int
    fps: int

    @classmethod
    def from_params(cls, params: Params) -> VideoSpec:
        ev, gen = params.evaluate, params.generate
        if params.evaluate.prompts == "toy":
            gen = params.toy  # the judge knows clips of the toy world's size only
        return cls(
            height=ev.height or gen.height,
            width=ev.width or gen.width,
            num_frames=ev.num_frames or gen.num_frames,
            fps=ev.fps or gen.fps,
        )


def load_prompts(params: Params) -> list[str]:
    """`evaluate.prompts`: the toy world's held-out captions, or a prompt library (dmd.data.prompts)."""
    try:
        library = load_prompt_library(
            params.evaluate.prompts, params.toy, setting="evaluate.prompts", toy_split="held_out"
        )
    except PromptLibraryError as e:
        raise EvaluationError(str(e)) from None
    return [p.text for p in library]


def eval_items(prompts: list[str], seed: int, num_seeds: int) -> list[EvalItem]:
    return [EvalItem(i, p, seed + s) for i, p in enumerate(prompts) for s in range(num_seeds)]


def plan(params: Params) -> list[EvalItem]:
    """The videos every run makes, checked before anything is generated."""
    ev = params.evaluate
    items = eval_items(load_prompts(params), ev.seed, ev.num_seeds)
    if ev.feature_model and len(items) < 2:
        raise EvaluationError(
            f"evaluate.feature_model needs at least 2 videos per run for a Fréchet distance, got {len(items)}; "
            "raise evaluate.num_seeds or add prompts"
        )
    return items


def video_noise_shape(transformer, vae, video: VideoSpec) -> tuple[int, int, int, int, int]:
    """(1, C, T, H, W) of the initial noise of one video of this size, as WanPipeline lays latents out."""
    geometry = LatentGeometry.of(transformer, vae)
    problem = geometry.size_problem(video.height, video.width, video.num_frames)
    if problem is not None:
        raise EvaluationError(f"{problem}; set evaluate.height / evaluate.width / evaluate.num_frames")
    return (1, *geometry.latent_shape(video.height, video.width, video.num_frames))


# --------------------------------------------------------------------------------------------------------------
# Samplers: prompt → embeddings → latents (the teacher's is dmd.wan.sampler.TeacherSampler); one decoder for all


class Sampler(Protocol):
    transformer: torch.nn.Module

    def encode(self, prompt: str) -> dict[str, torch.Tensor]: ...

    def denoise(
        self, embeds: dict[str, torch.Tensor], noise_BCTHW: torch.Tensor, seed: int
    ) -> torch.Tensor: ...


class StudentSampler:
    """The exported student through `dmd.distill.rollout.sample` (no CFG: the guidance is distilled into it)."""

    guidance = 1.0

    def __init__(self, transformer, schedule, tokenizer, text_encoder, max_sequence_length: int):
        self.transformer = transformer
        self.schedule = schedule
        self.steps = schedule.num_steps
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_sequence_length = max_sequence_length

    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        from dmd.wan.loading import encode_prompts

        return {
            "prompt_embeds": encode_prompts(
                self.tokenizer, self.text_encoder, [prompt], self.max_sequence_length
            )
        }

    def denoise(self, embeds: dict[str, torch.Tensor], noise_BCTHW: torch.Tensor, seed: int) -> torch.Tensor:
        """The video `dmd sample --seed seed` makes: its initial noise is `noise_BCTHW` (`initial_noise(seed)`, the
        first draw of the generator seeded `seed`) and the re-noising between steps continues that stream."""
        from dmd.student.sample import generate_latents

        return generate_latents(
            self.transformer, self.schedule, embeds["prompt_embeds"], noise_BCTHW.shape, seed
        )


# --------------------------------------------------------------------------------------------------------------
# Running and timing


@dataclass
class RunOutput:
    name: str
    steps: int
    guidance: float
    clips: list[np.ndarray]  # uint8 (T, H, W, 3), one per EvalItem, in order
    videos: list[Path]
    speed: SpeedStats  # per_video: the first speed.timed_videos items, in order
    info: dict = field(default_factory=dict)
    clips_from_reference: bool = False  # clips past the timed items came from the teacher reference


def _no_phase(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def run_sampler(
    name: str,
    sampler: Sampler,
    decoder: LatentDecoder,
    items: list[EvalItem],
    noise_shape: tuple[int, ...],
    device: torch.device,
    warmup: int,
    videos_dir: Path | None = None,
    fps: int = 8,
    progress: bool = True,
) -> RunOutput:
    """One run alone (see `run_samplers`)."""
    return run_samplers(
        {name: sampler}, decoder, items, noise_shape, device, warmup, videos_dir, fps, progress
    )[name]


def run_samplers(
    samplers: dict[str, Sampler],
    decoder: LatentDecoder,
    items: list[EvalItem],
    noise_shape: tuple[int, ...],
    device: torch.device,
    warmup: int,
    videos_dir: Path | None = None,
    fps: int = 8,
    progress: bool = True,
    reference_clips: dict[str, list[np.ndarray]] | None = None,
    timed_reference_videos: int = 1,
) -> dict[str, RunOutput]:
    """Generate every item with every sampler, interleaved: item by item, each run in turn, the order rotating from
    one item to the next. A change in the machine's load then reaches every run alike, and each item gives one
    paired timing of every run (`paired_speedup`). Before timing, `warmup` videos per run are thrown away.

    A run in `reference_clips` (every item's clip, from the teacher reference) is sampled only on the first
    `timed_reference_videos` items, still interleaved, for its timings; the rest of its clips are the stored ones.
    A re-sampled clip that differs from the stored one is logged and replaces it.

    Per run and video: phase times, NFE (a forward hook, active only while that run generates: the two teacher
    runs share one transformer) and the peak working memory above what was resident before the video."""
    names = list(samplers)
    reference_clips = reference_clips or {}
    sampled = {
        n: min(timed_reference_videos, len(items)) if n in reference_clips else len(items) for n in names
    }

    def generate(name: str, item: EvalItem, timer: PhaseTimer | None) -> np.ndarray:
        sampler = samplers[name]
        phase = timer.phase if timer is not None else _no_phase
        noise = initial_noise(item.seed, noise_shape, device)
        with phase("text_encoding"):
            embeds = sampler.encode(item.prompt)
        with phase("dit"):
            latents = sampler.denoise(embeds, noise, item.seed)
        with phase("vae_decode"):
            clip = decoder(latents)[0]
        return clip

    for name in names:
        for _ in range(warmup):
            generate(name, items[0], None)
    timers = {n: PhaseTimer(device) for n in names}
    counters = {n: NFECounter(samplers[n].transformer) for n in names}
    clips: dict[str, list[np.ndarray]] = {n: [] for n in names}
    peak = dict.fromkeys(names, 0.0)
    kind = ""
    with Progress(len(items), "evaluate", log, unit="item", enabled=progress) as bar:
        for i, item in enumerate(items):
            active = [n for n in names if i < sampled[n]]
            for name in active[i % len(active) :] + active[: i % len(active)]:
                with PeakMemory(device) as memory, counters[name]:
                    clips[name].append(generate(name, item, timers[name]))
                timers[name].end_video()
                peak[name], kind = max(peak[name], memory.mb or 0.0), memory.kind
            bar.update(1)
    for name, stored in reference_clips.items():
        fresh = clips[name]
        differ = [i for i, clip in enumerate(fresh) if not np.array_equal(clip, stored[i])]
        if differ:
            log.warning(
                "%s: %d of %d re-sampled clips differ from the teacher reference's (items %s); using the fresh "
                "clips for those items and the stored ones for the other %d",
                name, len(differ), len(fresh), [items[i].stem for i in differ], len(items) - len(fresh),
            )  # fmt: skip
        clips[name] = fresh + list(stored[len(fresh) :])
    out = {}
    for name in names:
        speed = SpeedStats(
            nfe=counters[name].samples / sampled[name],
            seconds=timers[name].median_seconds(),
            peak_memory_mb=peak[name],
            peak_memory_kind=kind,
            timed_videos=sampled[name],
            warmup_videos=warmup,
            device=str(device),
            per_video=timers[name].videos,
            weights_mb=module_mb(samplers[name].transformer),
        )
        videos = []
        if videos_dir is not None:
            videos = [
                write_video(videos_dir / name / f"{it.stem}.mp4", c, fps) for it, c in zip(items, clips[name])
            ]
        from_reference = sampled[name] < len(items)
        log.info(
            "%s: %d videos%s, NFE %.1f, median %.3f s/video end to end (DiT %.3f s), peak working memory %.0f MiB",
            name,
            len(items),
            f" ({sampled[name]} sampled and timed, the rest from the teacher reference)"
            if from_reference
            else "",
            speed.nfe,
            speed.seconds["end_to_end"],
            speed.seconds["dit"],
            speed.peak_memory_mb,
        )
        out[name] = RunOutput(
            name, samplers[name].steps, samplers[name].guidance, clips[name], videos, speed,
            clips_from_reference=from_reference,
        )  # fmt: skip
    return out


def student_dir(params: Params) -> Path:
    return Path(params.evaluate.student_dir or params.train.run.output_dir)


def read_student_card(params: Params) -> dict:
    """The exported student's card (student.json); an EvaluationError that says how to make one when missing."""
    from dmd.student.export import read_card

    try:
        return read_card(student_dir(params))
    except FileNotFoundError as e:
        raise EvaluationError(f"{e} (set by evaluate.student_dir, default train.output_dir)") from None


def fuse_student_lora(transformer, params: Params) -> bool:
    """Merge a LoRA student into its base weights and drop the adapter layers (diffusers' fuse + unload), so it
    is timed as it would be deployed; returns whether it did."""
    from dmd.wan.loading import is_int8

    if not params.evaluate.fuse_lora or not getattr(transformer, "peft_config", None):
        return False
    if is_int8(transformer):  # the base load_student chose (the student's own), whatever params say
        log.info("student LoRA left unfused: int8-quanto base weights cannot absorb it")
        return False
    transformer.fuse_lora()
    transformer.unload_lora()
    return True


def load_student_sampler(
    params: Params, device: torch.device, tokenizer, text_encoder
) -> tuple[StudentSampler, dict]:
    """The exported student (its LoRA merged when `evaluate.fuse_lora`) as a sampler, on the given text encoder;
    and what the report says about it."""
    from dmd.student.export import load_student

    path = student_dir(params)
    card = read_student_card(params)
    transformer, schedule = load_student(path, params)
    fused = fuse_student_lora(transformer, params)
    transformer.to(device).eval().requires_grad_(False)
    sampler = StudentSampler(transformer, schedule, tokenizer, text_encoder, params.model.max_sequence_length)
    info = {"dir": str(path), "ema": card.get("ema"), "sigmas": list(schedule.sigmas), "lora_fused": fused}
    return sampler, info


def run_all(
    params: Params, items: list[EvalItem], device: torch.device, progress: bool = True
) -> dict[str, RunOutput]:
    """`teacher_full`, `teacher_few` (the teacher at the student's step count) and `student`, interleaved
    (`run_samplers`). The teacher and the student are loaded side by side; the student uses the teacher's text
    encoder and VAE (the same files), so only the transformer is held twice.

    A teacher run whose every clip is in the teacher reference (`dmd.evaluation.reference`) takes its clips from there
    and is sampled on the first `evaluate.timed_reference_videos` items only; a run sampled in full is stored
    there. Entries no current item refers to are then removed."""
    from dmd.wan.sampler import TeacherSampler, load_teacher_pipeline

    ev = params.evaluate
    read_student_card(params)  # a missing student fails before the teacher is loaded
    pipe = load_teacher_pipeline(params.model, device, params.model.flow_schedule_shift)
    student, info = load_student_sampler(params, device, pipe.tokenizer, pipe.text_encoder)
    video = VideoSpec.from_params(params)
    teacher = {
        name: TeacherSampler(
            pipe, steps, ev.teacher_guidance, params.model.negative_prompt, params.model.max_sequence_length
        )
        for name, steps in zip(TEACHER_RUNS, (ev.teacher_steps, student.steps))
    }
    shape = video_noise_shape(pipe.transformer, pipe.vae, video)
    reference = TeacherReference(ev.teacher_reference_dir, teacher_identity(params, shape, device))
    stored = {
        name: clips
        for name, sampler in teacher.items()
        if (clips := reference.load(name, sampler.steps, sampler.guidance, items)) is not None
    }
    torch.manual_seed(ev.seed)
    runs = run_samplers(
        {**teacher, "student": student},
        LatentDecoder(pipe.vae),
        items,
        shape,
        device,
        ev.warmup,
        Path(ev.videos_dir),
        video.fps,
        progress,
        reference_clips=stored,
        timed_reference_videos=ev.timed_reference_videos,
    )
    runs["student"].info = info
    for name in teacher:
        runs[name].info = {"scheduler": pipe.scheduler.__class__.__name__}
        if name not in stored:
            reference.save(teacher[name].steps, teacher[name].guidance, items, runs[name].clips)
    reference.prune({key for s in teacher.values() for key in reference.keys(s.steps, s.guidance, items)})
    del pipe, student, teacher
    _free(device)
    return {name: runs[name] for name in RUNS}


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# Scoring


def score_runs(
    params: Params, items: list[EvalItem], runs: dict[str, RunOutput], device: torch.device | None = None
) -> dict:
    """metrics/eval.json's content: one object per run, the speed-ups, the toy gap closure, the setup."""
    ev = params.evaluate
    device = device or pick_device()
    missing = [r for r in RUNS if r not in runs]
    if missing:
        raise EvaluationError(f"runs {missing} are missing; the comparison needs {list(RUNS)}")
    metrics: dict = {}
    for name in RUNS:
        run = runs[name]
        metrics[name] = {
            "steps": run.steps,
            "guidance": run.guidance,
            **run.speed.as_dict(),
            "clips_from_reference": run.clips_from_reference,
        }
    full, student = metrics["teacher_full"], metrics["student"]
    for name in RUNS:  # every run against the full teacher; the student's are the stage's headline
        # per_video holds the first timed_videos items of each run, so the shorter prefix pairs the same videos
        baseline, timed = runs["teacher_full"].speed.per_video, runs[name].speed.per_video
        paired = min(len(baseline), len(timed))
        for key, phase, seconds in (("speedup_dit", "dit", "dit_seconds_per_video"),
                                    ("speedup_end_to_end", None, "seconds_per_video")):  # fmt: skip
            if paired:  # per-video ratios of videos timed side by side
                q1, median, q3 = paired_speedup(baseline[:paired], timed[:paired], phase)
                metrics[name][key], metrics[name][f"{key}_quartiles"] = median, [q1, q3]
                metrics[name]["speedup_paired_videos"] = paired
            else:
                metrics[name][key] = speedup(full[seconds], metrics[name][seconds])
    for key in ("speedup_dit", "speedup_end_to_end"):
        metrics[key] = student[key]
        if f"{key}_quartiles" in student:
            metrics[f"{key}_quartiles"] = student[f"{key}_quartiles"]
    if "speedup_paired_videos" in student:
        metrics["speedup_paired_videos"] = student["speedup_paired_videos"]
    metrics["nfe_ratio"] = full["nfe"] / student["nfe"]

    setup: dict = {}
    if ev.prompts == "toy":
        _judge(params, items, runs, metrics)
    feature = None
    if ev.feature_model:
        feature = FeatureModel(ev.feature_model, "evaluate.feature_model", device, ev.feature_batch_size)
        frames = {name: feature.frame_features(runs[name].clips) for name in RUNS}
        for name in RUNS:
            metrics[name]["fd_to_teacher_full"] = frechet_distance(
                video_features(frames[name]), video_features(frames["teacher_full"])
            )
    if ev.clip_model_path:
        if feature is not None and ev.clip_model_path == ev.feature_model:
            clip = feature
        else:
            clip = FeatureModel(ev.clip_model_path, "evaluate.clip_model", device, ev.feature_batch_size)
            frames = {name: clip.frame_features(runs[name].clips) for name in RUNS}
        if clip.has_text or ev.clip_model:
            text = clip.text_features([it.prompt for it in items])
            for name in RUNS:
                metrics[name]["clip_score"] = clip_score(frames[name], text)
        else:
            setup["clip_score_skipped"] = (
                f"evaluate.feature_model ({clip.model_type}) has no text tower; set evaluate.clip_model to a CLIP"
            )
    metrics["setup"] = {
        **setup,
        "prompts": len({it.prompt for it in items}),
        "seeds_per_prompt": len({it.seed for it in items}),
        "videos_per_run": len(items),
        "device": full["device"],
        "feature_model": ev.feature_model,
        "clip_model": ev.clip_model_path,
        **{f"student_{k}": v for k, v in runs["student"].info.items()},
        "teacher": params.model.pretrained_model_name_or_path,
        "teacher_scheduler": runs["teacher_full"].info.get("scheduler"),
        "teacher_reference_dir": ev.teacher_reference_dir,
    }
    return metrics


def _judge(params: Params, items: list[EvalItem], runs: dict[str, RunOutput], metrics: dict) -> None:
    """The toy judge for every run (its own fixed set of real clips per caption as the reference), and the share
    of the few-step → full teacher gap the student closes."""
    from dmd.toy.judge import judge_clips, start_variety
    from dmd.toy.world import ToyWorld

    world = ToyWorld(params.toy)
    captions = [it.prompt for it in items]
    for name in RUNS:
        scores = judge_clips(runs[name].clips, captions, world)
        scores.update(start_variety(scores, world))
        scores.pop("clips", None)  # per-clip details: too long for a metrics file
        metrics[name]["judge"] = _plain(scores)
    judged = {name: metrics[name]["judge"] for name in RUNS}
    closed = {}
    for key in ("sharpness", "fd"):
        if all(isinstance(judged[n].get(key), (int, float)) for n in RUNS):
            closed[key] = gap_closed(
                judged["teacher_few"][key], judged["teacher_full"][key], judged["student"][key]
            )
    metrics["gap_closed"] = closed


def _plain(value):
    """JSON-ready copy (numpy scalars → float)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------------------------
# The stage


def run_labels(metrics: dict) -> dict[str, str]:
    """Each run's label, e.g. 'teacher full (50 steps, CFG 3)'."""
    labels = {}
    for name in RUNS:
        guidance = metrics[name]["guidance"]
        cfg = f", CFG {guidance:g}" if guidance > 1 else ""
        labels[name] = f"{RUN_LABELS[name]} ({metrics[name]['steps']} steps{cfg})"
    return labels


def headline(metrics: dict) -> dict:
    """What `evaluate.metrics_path` holds, the file DVC tracks (`dvc metrics show`, `dvc exp show`): the
    comparison and the student's own figures. Every run's details (teacher timings, phases, memory, setup) are
    in the report folder's DETAILS file."""
    out = {key: metrics[key] for key in ("speedup_dit", "speedup_end_to_end", "nfe_ratio") if key in metrics}
    # what the speed figures rest on: a teacher run whose clips were reused is timed on a few items only
    for key, names in (("timed_videos", RUNS), ("clips_from_reference", TEACHER_RUNS)):
        if values := {name: metrics[name][key] for name in names if key in metrics.get(name, {})}:
            out[key] = values
    if metrics.get("gap_closed"):
        out["gap_closed"] = metrics["gap_closed"]
    s = metrics["student"]
    student = {"nfe": s["nfe"], "seconds_per_video": s["seconds_per_video"],
               "dit_seconds_per_video": s["dit_seconds_per_video"]}  # fmt: skip
    judge = s.get("judge", {})
    student.update({k: judge[k] for k in HEADLINE_JUDGE if isinstance(judge.get(k), (int, float))})
    student.update({k: s[k] for k in ("fd_to_teacher_full", "clip_score") if k in s})
    out["student"] = student
    variety = {
        name: {k: metrics[name]["judge"][k] for k in HEADLINE_VARIETY if k in metrics[name]["judge"]}
        for name in ("teacher_full", "student")
        if "judge" in metrics.get(name, {})
    }
    if any(variety.values()):
        out["variety"] = variety
    return out


def write_outputs(params: Params, items: list[EvalItem], runs: dict[str, RunOutput], metrics: dict) -> Path:
    """metrics/eval.json (the headline), reports/eval_details.json (everything) and reports/eval.md (with its PNG
    grid and side-by-side GIF); returns the report's path."""
    from dmd.evaluation.report import write_report
    from dmd.student.export import STUDENT_CARD, write_model_card

    ev = params.evaluate
    write_json(ev.metrics_path, headline(metrics))
    write_json(Path(ev.report_dir) / DETAILS, metrics)
    if (student_dir(params) / STUDENT_CARD).is_file():  # an exported student: its card, with these figures
        write_model_card(
            student_dir(params), params, metrics=metrics, path=Path(ev.report_dir) / "model_card.md"
        )
    first_seed = [i for i, it in enumerate(items) if it.seed == ev.seed]
    return write_report(
        Path(ev.report_dir),
        metrics,
        prompts=[items[i].prompt for i in first_seed],
        clips={name: [runs[name].clips[i] for i in first_seed] for name in RUNS},
        videos={name: [(it.stem, p) for it, p in zip(items, runs[name].videos)] for name in RUNS},
        labels=run_labels(metrics),
        fps=VideoSpec.from_params(params).fps,
        grid_frames=ev.grid_frames,
    )


def evaluate(params: Params, progress: bool = True) -> dict:
    """Run the three runs, score them, write metrics, videos and the report; return the metrics."""
    for folder in (params.evaluate.report_dir, params.evaluate.videos_dir):  # what a killed run was writing
        remove_stale_temporaries(folder)
    device = pick_device()
    items = plan(params)
    runs = run_all(params, items, device, progress)
    metrics = score_runs(params, items, runs, device)
    write_outputs(params, items, runs, metrics)
    log_summary(metrics)
    return metrics


def log_summary(metrics: dict) -> None:
    log.info(
        "speed-up vs %d-step teacher: %.1f× DiT, %.1f× end to end (NFE %g → %g)",
        metrics["teacher_full"]["steps"],
        metrics["speedup_dit"],
        metrics["speedup_end_to_end"],
        metrics["teacher_full"]["nfe"],
        metrics["student"]["nfe"],
    )
