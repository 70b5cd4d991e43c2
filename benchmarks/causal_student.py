"""Block-causal students on the toy world: the teacher, the bidirectional student and two causal students side by
side, the causal one also streaming clips twice its trained length; and the KV cache against the re-fed prefix.

Rows (held-out captions, `--eval-seeds` seeds each, the same initial noise in every row):

1. the teacher, 50 steps with CFG, as the generate stage makes it (`TeacherSampler`, generate.* settings);
2. the bidirectional 3-step student: params.yaml as it is (one time block over the whole 6-latent-frame clip,
   `num_frame_per_block = num_training_frames = 6`);
3. a causal 3-step student without ODE initialisation: `train.causal=true` with `--frames-per-block` latent
   frames per block (default 3, the seed trainer's block: 2 blocks over the toy clip's 6 latent frames;
   `--independent-first-frame` puts frame 0 in a block of its own, then the rest must split into blocks);
4. the same causal student, ODE-initialised first: it regresses the teacher's own trajectories at its σs
   (`dmd.training.ode_init.ode_regression_loss`, block-causal teacher forcing, `--ode-steps`, `--ode-lr`), then
   DMD trains it from there, as `dmd ode-init` then `dmd train` do;
5. row 4's student streaming clips `--length-factor` (2) times its trained length (a rolling KV cache,
   `RolloutSchedule.cache_frames`), the first trained length of latents being the same initial noise as rows 1-4.
   The clip is cut into windows of the trained length in latent frames (window 0: latent frames 0-5 = pixel frames
   0-20; window 1: latent frames 6-11 = pixel frames 21-44, 24 frames as every latent frame after the first decodes
   to 4) and each window is judged against the caption.

What the judge can judge past the first window: colour and shape, whenever an object is in view. Direction and
speed it reads off any object it tracks over 3 frames or more, but the toy world defines clips of its trained length
only: its start ranges keep the object in frame for exactly that long, so a clip that carried on with the caption's
motion would take the object out of frame during the second window (a quick one within a few frames) and the judge
would score it wrong on every attribute (no object). An attribute "right" in a later window therefore means the
student kept an object of that colour, shape, direction and speed in view, which the world's physics would not. The
JSON says, per window, how many clips the caption's own motion from the start the judge found in window 0 would keep
wholly in frame (`world_keeps_in_frame`), the accuracy on those clips alone, and how many clips show an object the
judge tracks (`object_tracked`). FD and diversity compare a window with the world's real clips, which start anywhere
in the start range: past window 0 a window starts where the one before ended, so they are reported but not
comparable (`comparable_with_real_clips: false`).

Columns: accuracy per attribute, FD to the world's real clips, motion consistency and diversity (the judge's),
then time to first frame and seconds per clip: medians over `--timing-clips` clips generated one at a time, rows
interleaved clip by clip (the order rotating) so a change in the machine's load reaches every row alike, from
precomputed prompt embeddings to uint8 frames. Time to first frame is the wall time until the first decoded frame
exists: for the teacher and the bidirectional student the whole clip (sampling + VAE decode), for a causal student
its first time block sampled and decoded (a causal block never depends on later ones: the JSON records that the
first block sampled alone equals the first block of the whole clip); seconds per clip is the whole clip. The goal for
the first frame compares a causal student's first frame with the bidirectional student's whole clip (what one waits
for without streaming); the ratio to its own whole clip is reported too.

Also: one training step (the student's rollout + backward + optimizer step) with the KV cache against today's
re-fed prefix (a multi-block bidirectional rollout, each block re-reading all earlier blocks) at the seed's layout of
7 blocks (21 latent frames, 3 per block), on a random-initialised small Wan transformer (`--memory-*`), every block
running all its steps (the costliest rollout, so both reach their peak), each variant in its own subprocess,
alternating over `--memory-rounds` rounds: seconds per step and peak memory as ratios cached / re-fed. Peak memory
is `dmd.evaluation.metrics.PeakMemory`: on CUDA `torch.cuda.max_memory_allocated` (weights included); on the CPU
the peak resident memory of the timed steps above the resident memory after setup (weights, optimizer states and
imports excluded), the whole-process peak beside it.

Goals printed against: a causal student within 0.02 of the teacher on every attribute, FD at or below the
bidirectional student's, first frame at least 3x sooner than a whole clip, and the 2x clips keeping every attribute
within 0.02 of the teacher in every window.

    .venv/bin/python benchmarks/causal_student.py
    # defaults: --steps train.max_train_steps (400) --eval-seeds 24 --ode-steps ode_init.max_train_steps (200)
    #           --ode-lr ode_init.learning_rate --timing-clips 24 --memory-rounds 3 --memory-steps 2

Threads: OMP_NUM_THREADS (else every core). An interrupted run starts over (no --resume): the timings need every
row's student in memory at once. Writes benchmarks/results/causal_student.json after every row, then
causal_student_stream.gif (the 2x clips of each held-out caption's first seed, streamed) and causal_student.png
(evaluate.grid_frames frames of every row's clip, each held-out caption's first seed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import dmd_toy  # noqa: E402
from dmd_toy import Teacher, batched, held_out_set, train_student  # noqa: E402

from dmd.core.config import load  # noqa: E402
from dmd.core.io import write_json  # noqa: E402
from dmd.distill.rollout import RolloutSchedule, rollout, sample, transformer_velocity  # noqa: E402
from dmd.toy.judge import judge_clips, start_variety  # noqa: E402
from dmd.toy.world import ATTRIBUTES, DIRECTIONS, OBJECT_SIZE, SPEEDS, ToyWorld, parse_caption  # noqa: E402
from dmd.training.ode_init import ode_regression_loss  # noqa: E402
from dmd.training.optim import build_optimizer  # noqa: E402
from dmd.wan.causal import block_causal  # noqa: E402
from dmd.wan.loading import load_transformer  # noqa: E402
from dmd.wan.sampler import TeacherSampler  # noqa: E402

log = logging.getLogger("causal_student")
RESULTS = Path(__file__).parent / "results" / "causal_student.json"
DC = "train.distillation_config."

TEACHER = "teacher"
BIDIRECTIONAL = "bidirectional student"
CAUSAL = "causal student, no ODE init"
CAUSAL_ODE = "causal student, ODE init"
CAUSAL_LONG = "causal student, ODE init, long clips"
ROWS = (TEACHER, BIDIRECTIONAL, CAUSAL, CAUSAL_ODE, CAUSAL_LONG)
CAUSAL_ROWS = (CAUSAL, CAUSAL_ODE, CAUSAL_LONG)
ATTRIBUTE_TOLERANCE = 0.02
FIRST_FRAME_SPEEDUP = 3.0
MEMORY_VARIANTS = {
    "cached": "KV cache (train.causal)",
    "refed": "re-fed prefix (today's multi-block rollout)",
}
MEMORY_BLOCKS, MEMORY_FRAMES_PER_BLOCK = 7, 3  # the seed trainer's layout: 21 latent frames


def judge(clips: list[np.ndarray], captions: list[str], world: ToyWorld, reference) -> tuple[dict, dict]:
    """The judge's figures of a set of clips (as mode_coverage's `judge_row`, plus sharpness), and its details."""
    judged = judge_clips(clips, captions, world, reference=reference)
    row = {
        "fd": judged["fd"],
        "motion_consistency": judged["motion_consistency"],
        "sharpness": judged["sharpness"],
        "accuracy_all": judged["accuracy_all"],
        **{f"acc_{a}": judged["accuracy"][a] for a in ATTRIBUTES},
        **start_variety(judged, world),
    }
    return row, judged


def pixel_range(latent_start: int, latent_end: int, temporal_factor: int) -> tuple[int, int]:
    """Pixel frames [start, end) that latent frames [latent_start, latent_end) decode to: the causal VAE makes one
    frame of latent frame 0 and `temporal_factor` of every later one."""

    def first(k: int) -> int:
        return 0 if k == 0 else temporal_factor * (k - 1) + 1

    return first(latent_start), first(latent_end)


def world_keeps_in_frame(caption: str, start_xy, frames: range, height: int, width: int) -> bool:
    """Whether the caption's constant motion (the world's own `floor(speed·t)` steps) from `start_xy` at frame 0
    keeps the whole object inside the frame on every frame of `frames`."""
    if start_xy is None:
        return False
    cap = parse_caption(caption)
    dx, dy = DIRECTIONS[cap.direction]
    shift = np.floor(SPEEDS[cap.speed] * np.arange(frames.start, frames.stop))
    x = round(start_xy[0]) + dx * shift
    y = round(start_xy[1]) + dy * shift
    inside = (x >= 0) & (x + OBJECT_SIZE <= width) & (y >= 0) & (y + OBJECT_SIZE <= height)
    return bool(inside.all())


def ode_initialise(params, data: SimpleNamespace, steps: int, lr: float, batch_size: int, seed: int) -> tuple:
    """`dmd ode-init` on in-memory trajectories: the stage's loss, optimizer, clipping and teacher forcing, on the
    teacher's trajectories of the training clips at the student's σs. Returns the full student's weights and the
    loss of every step."""
    if params.train.student.model_type != "full":
        raise SystemExit(
            "the in-memory ODE initialisation here trains a full student (train.model_type: full)"
        )
    schedule = RolloutSchedule.from_params(params)
    student = load_transformer(params.model, "cpu").train().requires_grad_(True)
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = build_optimizer(parameters, params.train.optim.optimizer, lr)
    model = transformer_velocity(student)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    frames = data.latents.shape[2]
    ranges = schedule.block_ranges(frames) if schedule.causal else [(0, frames)]
    sigmas_K = torch.tensor(schedule.sigmas, dtype=torch.float32)
    max_norm = params.train.optim.max_grad_norm or float("inf")
    losses = []
    with block_causal(student) if schedule.causal else contextlib.nullcontext() as causal:
        for step in range(steps):
            idx = torch.from_numpy(rng.choice(len(data.latents), size=batch_size, replace=False))
            batch = SimpleNamespace(
                trajectory_BKCTHW=data.trajectory[idx],
                prompt_embeds_BLD=data.embeds[idx],
                latents_BCTHW=data.latents[idx],
            )
            loss = ode_regression_loss(model, causal, batch, sigmas_K, ranges, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, max_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
            if (step + 1) % max(1, steps // 5) == 0:
                log.info("ODE init step %d/%d: loss %.4f", step + 1, steps, losses[-1])
    return {k: v.detach().clone() for k, v in student.state_dict().items()}, losses


@contextlib.contextmanager
def student_starts_from(state_dict):
    """`train_student` builds its roles itself: the ODE-initialised weights go into the student where the training
    loop's `load_initial_student` puts them, right after the roles are built and before EMA and optimizers."""
    original = dmd_toy.build_roles

    def build_roles(params, *args, **kwargs):
        roles = original(params, *args, **kwargs)
        roles.student_transformer.load_state_dict(state_dict)
        return roles

    dmd_toy.build_roles = build_roles
    try:
        yield
    finally:
        dmd_toy.build_roles = original


def sample_batches(transformer, schedule, embeds, noise, seed: int, size: int = 16) -> torch.Tensor:
    """The student's clips, a generator per batch seeded by (seed, batch): the re-noising draws of a clip do not
    depend on how many draws another row's clips took, so row 5's first window is row 4's clip exactly."""
    out = []
    for b, i in enumerate(range(0, len(noise), size)):
        generator = torch.Generator().manual_seed(seed * 10_000 + b)
        out.append(sample(transformer, embeds[i : i + size], noise[i : i + size], schedule, generator))
    return torch.cat(out)


def median_iqr(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(v)),
        "q1": float(np.percentile(v, 25)),
        "q3": float(np.percentile(v, 75)),
        "n": len(v),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, help="DMD steps per student (default: train.max_train_steps)")
    parser.add_argument("--eval-seeds", type=int, default=24, help="evaluation seeds per held-out caption")
    parser.add_argument(
        "--teacher-clips",
        type=int,
        help="training clips, one per training caption in turn (generate.num_videos)",
    )
    parser.add_argument("--frames-per-block", type=int, default=3, help="latent frames per causal block")
    parser.add_argument(
        "--independent-first-frame",
        action="store_true",
        help="the causal students' first block is frame 0 alone",
    )
    parser.add_argument("--ode-steps", type=int, help="ODE initialisation steps (ode_init.max_train_steps)")
    parser.add_argument(
        "--ode-lr", type=float, help="ODE initialisation learning rate (ode_init.learning_rate)"
    )
    parser.add_argument(
        "--ode-batch-size", type=int, help="ODE initialisation batch (ode_init.train_batch_size)"
    )
    parser.add_argument("--length-factor", type=int, default=2, help="row 5's clips, in trained lengths")
    parser.add_argument("--timing-clips", type=int, default=24, help="clips per row timed one at a time")
    parser.add_argument(
        "--memory-rounds", type=int, default=3, help="rounds of the cached/re-fed step comparison"
    )
    parser.add_argument(
        "--memory-steps", type=int, default=2, help="timed training steps per variant and round"
    )
    parser.add_argument("--memory-layers", type=int, default=4, help="layers of the random-initialised Wan")
    parser.add_argument("--memory-heads", type=int, default=4, help="its attention heads")
    parser.add_argument("--memory-head-dim", type=int, default=64, help="its head width (FFN: 4x the width)")
    parser.add_argument("--memory-latent", type=int, default=16, help="latent height = width of its clip")
    parser.add_argument("--memory-device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--child-memory", choices=list(MEMORY_VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # OMP_NUM_THREADS=1 when the machine is shared: threads spinning against another process's slow every row down
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    if args.child_memory:
        print(json.dumps(memory_child(args, args.child_memory)))
        return 0
    return run(args, threads)


def run(args, threads: int) -> int:
    started_run = time.perf_counter()
    base = load(args.params)
    steps = args.steps if args.steps is not None else base.train.run.max_train_steps
    ode = base.ode_init
    ode_steps = args.ode_steps if args.ode_steps is not None else ode.max_train_steps
    ode_lr = args.ode_lr if args.ode_lr is not None else ode.learning_rate
    ode_batch = args.ode_batch_size or ode.train_batch_size
    causal_overrides = [
        "train.causal=true",
        f"{DC}num_frame_per_block={args.frames_per_block}",
        f"{DC}independent_first_frame={str(args.independent_first_frame).lower()}",
    ]
    params = {
        BIDIRECTIONAL: base,
        CAUSAL: load(args.params, causal_overrides),
    }
    bidirectional, causal = RolloutSchedule.from_params(base), RolloutSchedule.from_params(params[CAUSAL])

    world = ToyWorld(base.toy)
    teacher = Teacher(base)
    gen_cfg = base.generate
    sampler = TeacherSampler(
        teacher.pipe,
        gen_cfg.num_inference_steps,
        gen_cfg.guidance_scale,
        base.model.negative_prompt,
        base.model.max_sequence_length,
    )
    trained_frames = teacher.latent_shape[1]
    ranges = causal.block_ranges(trained_frames)
    first_block_end = ranges[0][1]
    lead = 1 if args.independent_first_frame else 0
    long_frames = lead + args.length_factor * (trained_frames - lead)
    causal.block_ranges(long_frames)  # the long clip must split into the causal blocks too
    temporal = teacher.pipe.vae.config.scale_factor_temporal

    # the training data as the generate stage makes it with generate.save_trajectory: one clip per training
    # caption in turn, with the teacher's trajectory at the student's σs for the ODE initialisation
    train_captions = world.captions("train")
    num_clips = args.teacher_clips or gen_cfg.num_videos
    captions = [train_captions[i % len(train_captions)] for i in range(num_clips)]
    negative, empty = teacher.encode([base.model.negative_prompt]), teacher.encode([""])
    embeds = teacher.encode(captions)
    noise = torch.randn(
        (num_clips, *teacher.latent_shape), generator=torch.Generator().manual_seed(gen_cfg.seed)
    )

    def teacher_embeds(e: torch.Tensor) -> dict:
        out = {"prompt_embeds": e}
        if sampler.guidance > 1:
            out["negative_prompt_embeds"] = negative.expand(e.shape[0], -1, -1)
        return out

    started = time.perf_counter()
    latents, trajectories = [], []
    for i in range(0, num_clips, 16):
        lat, traj = sampler.denoise_with_trajectory(
            teacher_embeds(embeds[i : i + 16]), noise[i : i + 16], causal.sigmas
        )
        latents.append(lat)
        trajectories.append(traj)
    data = SimpleNamespace(
        latents=torch.cat(latents),
        trajectory=torch.cat(trajectories),
        embeds=embeds,
        noise=noise,
        captions=captions,
        negative=negative,
        empty=empty,
    )
    log.info("teacher data: %d clips with trajectories in %.0f s", num_clips, time.perf_counter() - started)

    eval_captions, eval_embeds, eval_noise, reference = held_out_set(
        teacher, world, args.eval_seeds, base.evaluate.seed
    )
    extra_noise = torch.randn(
        (
            len(eval_captions),
            teacher.latent_shape[0],
            long_frames - trained_frames,
            *teacher.latent_shape[2:],
        ),
        generator=torch.Generator().manual_seed(base.evaluate.seed + 1),
    )
    long_noise = torch.cat([eval_noise, extra_noise], dim=2)

    def decode(latents_BCTHW: torch.Tensor) -> list[np.ndarray]:
        return [c.numpy() for c in batched(lambda z: torch.from_numpy(teacher.decoder(z)), latents_BCTHW)]

    windows = [(0, trained_frames)] + [
        (s, s + trained_frames - lead) for s in range(trained_frames, long_frames, trained_frames - lead)
    ]
    output = {
        "machine": dict(platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__),
        "threads": threads,
        "settings": {
            "params": args.params,
            "dmd_steps": steps,
            "eval_seeds_per_caption": args.eval_seeds,
            "eval_clips": len(eval_captions),
            "eval_captions": sorted(set(eval_captions)),
            "teacher_clips": num_clips,
            "teacher": {"steps": gen_cfg.num_inference_steps, "guidance": gen_cfg.guidance_scale},
            "student_sigmas": list(causal.sigmas),
            "trained_latent_frames": trained_frames,
            "bidirectional_blocks": bidirectional.block_ranges(trained_frames),
            "causal_blocks": ranges,
            "causal_overrides": causal_overrides,
            "cache_frames": causal.cache_frames(),
            "ode_init": {
                "steps": ode_steps,
                "learning_rate": ode_lr,
                "batch_size": ode_batch,
                "seed": ode.seed,
            },
            "length_factor": args.length_factor,
            "long_latent_frames": long_frames,
            "windows_latent": windows,
            "windows_pixel": [pixel_range(a, b, temporal) for a, b in windows],
            "timing_clips": args.timing_clips,
        },
        "rows": {},
    }
    rows = output["rows"]
    students: dict[str, object] = {}
    grid_clips: dict[str, list[np.ndarray]] = {}
    first_of_caption = [eval_captions.index(c) for c in sorted(set(eval_captions), key=eval_captions.index)]

    def record(name: str, description: str, clips: list[np.ndarray], **extra) -> dict:
        row, _ = judge(clips, eval_captions, world, reference)
        rows[name] = {"description": description, "judge": row, **extra}
        grid_clips[name] = [clips[i] for i in first_of_caption]
        log.info("%s: %s", name, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
        write_json(args.output, output)
        return row

    # 1. the teacher
    teacher_latents = batched(lambda e, z: sampler.denoise(teacher_embeds(e), z), eval_embeds, eval_noise)
    record(
        TEACHER,
        f"teacher {sampler.steps} steps + CFG {sampler.guidance:g}, as the generate stage samples it",
        decode(teacher_latents),
        nfe=sampler.steps * (2 if sampler.guidance > 1 else 1),
    )

    def train(name: str, p, initial=None) -> dict:
        with student_starts_from(initial) if initial is not None else contextlib.nullcontext():
            roles, seconds, history = train_student(p, data, steps)
        roles.activate_student()
        students[name] = roles.student_transformer.eval()
        last = history[-max(1, len(history) // 10) :]
        return {
            "steps": steps,
            "train_seconds": seconds,
            "seconds_per_step": seconds / max(steps, 1),
            "critic_loss_end": float(np.mean([m["critic_loss"] for m in last])) if last else None,
        }

    # 2. the bidirectional student, 3. the causal one from the teacher's weights
    for name, schedule, description, overrides in (
        (BIDIRECTIONAL, bidirectional, "params.yaml as it is: one block over the whole clip", []),
        (
            CAUSAL,
            causal,
            f"train.causal=true, blocks {ranges}, DMD from the teacher's weights",
            causal_overrides,
        ),
    ):
        log.info("%s: %d DMD steps, %s", name, steps, overrides or "params as given")
        info = train(name, params[name])
        clips = decode(sample_batches(students[name], schedule, eval_embeds, eval_noise, base.evaluate.seed))
        record(name, description, clips, overrides=overrides, train=info)

    # 4. ODE initialisation, then DMD from it
    started = time.perf_counter()
    initial, losses = ode_initialise(params[CAUSAL], data, ode_steps, ode_lr, ode_batch, ode.seed)
    ode_info = {
        "steps": ode_steps,
        "learning_rate": ode_lr,
        "batch_size": ode_batch,
        "seconds": time.perf_counter() - started,
        "first_loss": losses[0] if losses else None,
        "last_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])) if losses else None,
    }
    log.info("%s: ODE init %s, then %d DMD steps", CAUSAL_ODE, ode_info, steps)
    info = train(CAUSAL_ODE, params[CAUSAL], initial)
    ode_latents = sample_batches(students[CAUSAL_ODE], causal, eval_embeds, eval_noise, base.evaluate.seed)
    record(
        CAUSAL_ODE,
        "row 3's student, ODE-initialised on the teacher's trajectories at its σs, then DMD",
        decode(ode_latents),
        overrides=causal_overrides,
        ode_init=ode_info,
        train=info,
    )

    # 5. row 4's student, long clips, judged per window
    long_latents = sample_batches(students[CAUSAL_ODE], causal, eval_embeds, long_noise, base.evaluate.seed)
    long_clips = decode(long_latents)
    rows[CAUSAL_LONG] = judge_windows(
        long_clips, eval_captions, world, reference, windows, temporal, base.toy.height, base.toy.width
    )
    rows[CAUSAL_LONG].update(
        description=f"row 4's student streaming {long_frames} latent frames ({args.length_factor}x its trained "
        f"{trained_frames}) with a rolling KV cache of {causal.cache_frames()} frames, judged per window",
        first_window_latents_max_abs_diff_to_row_4=float(
            (long_latents[:, :, :trained_frames] - ode_latents).abs().max()
        ),
    )
    grid_clips[CAUSAL_LONG] = [long_clips[i] for i in first_of_caption]
    write_json(args.output, output)

    # timings, all rows interleaved clip by clip
    run_clip = Runners(teacher.decoder, first_block_end)
    runners = {
        TEACHER: run_clip.whole(lambda e, z: sampler.denoise(teacher_embeds(e), z)),
        BIDIRECTIONAL: run_clip.whole(
            lambda e, z: sample(students[BIDIRECTIONAL], e, z, bidirectional, run_clip.generator())
        ),
        CAUSAL: run_clip.streamed(students[CAUSAL], causal),
        CAUSAL_ODE: run_clip.streamed(students[CAUSAL_ODE], causal),
        CAUSAL_LONG: run_clip.streamed(students[CAUSAL_ODE], causal),
    }
    # held-out clips are caption-major (a caption's seeds in a row): seed 0 of every caption, then seed 1, ...
    n_captions = len(eval_captions) // args.eval_seeds
    order = [c * args.eval_seeds + s for s in range(args.eval_seeds) for c in range(n_captions)]
    noise_of = {name: long_noise if name == CAUSAL_LONG else eval_noise for name in runners}
    output["timing"] = time_rows(runners, order[: max(1, args.timing_clips)], eval_embeds, noise_of)
    output["timing"]["first_block_latent_frames"] = first_block_end
    output["timing"]["first_block_alone_equals_whole_clip"] = {
        name: run_clip.first_block_alone_is_the_clips(students[name], causal, eval_embeds[:1], eval_noise[:1])
        for name in (CAUSAL, CAUSAL_ODE)
    }
    for name, t in output["timing"]["rows"].items():
        rows[name]["time_to_first_frame_s"] = t["time_to_first_frame"]["median"]
        rows[name]["seconds_per_clip"] = t["seconds_per_clip"]["median"]
    write_json(args.output, output)

    output["memory"] = memory_comparison(args)
    output["goals"] = goals(rows, output["timing"])
    output["seconds"] = time.perf_counter() - started_run
    write_json(args.output, output)

    out = Path(args.output)
    gif = out.with_name(out.stem + "_stream.gif")
    png = out.with_suffix(".png")
    save_pictures(grid_clips, sorted(set(eval_captions), key=eval_captions.index), gif, png, base, windows)
    print_table(output)
    print(f"wrote {out}, {gif} and {png}")
    return 0


def judge_windows(clips, captions, world, reference, windows, temporal: int, height: int, width: int) -> dict:
    """Each window of the long clips judged against the caption (module docstring: what is judgeable there)."""
    per_window = []
    starts = None
    for w, (a, b) in enumerate(windows):
        p0, p1 = pixel_range(a, b, temporal)
        row, judged = judge([c[p0:p1] for c in clips], captions, world, reference)
        if starts is None:  # the start positions the judge found in window 0, at frame 0 of the clip
            starts = [c["start_xy"] for c in judged["clips"]]
        keeps = [
            world_keeps_in_frame(cap, s, range(p0, p1), height, width) for cap, s in zip(captions, starts)
        ]
        kept = [i for i, k in enumerate(keeps) if k]
        per_window.append(
            {
                "window": w,
                "latent_frames": [a, b],
                "pixel_frames": [p0, p1],
                "judge": row,
                "comparable_with_real_clips": w == 0,
                "object_tracked": float(np.mean([c["start_xy"] is not None for c in judged["clips"]])),
                "world_keeps_in_frame": float(np.mean(keeps)),
                "accuracy_where_world_keeps_in_frame": {
                    attr: float(np.mean([judged["clips"][i]["correct"][attr] for i in kept]))
                    if kept
                    else None
                    for attr in ATTRIBUTES
                },
            }
        )
        log.info("%s window %d (pixel frames %d-%d): %s", CAUSAL_LONG, w, p0, p1 - 1, per_window[-1])
    return {
        "windows": per_window,
        "judge": per_window[0]["judge"],
        "not_judgeable_past_window_0": {
            "fd": "compares with real clips, which start anywhere in the world's start range; a later window starts "
            "where the one before ended",
            "diversity": "the same: the spread of positions at a window's start is not the spread of start positions",
            "direction": "the world keeps the object in frame for the trained length only: a clip carrying on the "
            "caption's motion loses the object during a later window, which the judge scores wrong; see "
            "world_keeps_in_frame and accuracy_where_world_keeps_in_frame",
            "speed": "as direction",
        },
    }


class Runners:
    """Each row's generation of one clip (batch 1) as (time to first frame, seconds per clip), from precomputed prompt
    embeddings and initial noise to uint8 frames."""

    SEED = 12_345  # the re-noising draws between steps, the same for every row

    def __init__(self, decoder, first_block_end: int):
        self.decoder, self.first_block_end = decoder, first_block_end

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.SEED)

    def whole(self, generate):
        """The whole clip before any frame: its time to first frame is its time per clip."""

        def run(e, z):
            start = time.perf_counter()
            self.decoder(generate(e, z))
            total = time.perf_counter() - start
            return total, total

        return run

    def streamed(self, transformer, schedule):
        """The first block sampled and decoded alone (what a streamer shows first), then the whole clip."""

        def run(e, z):
            start = time.perf_counter()
            self.decoder(sample(transformer, e, z[:, :, : self.first_block_end], schedule, self.generator()))
            first = time.perf_counter() - start
            start = time.perf_counter()
            self.decoder(sample(transformer, e, z, schedule, self.generator()))
            return first, time.perf_counter() - start

        return run

    def first_block_alone_is_the_clips(self, transformer, schedule, e, z) -> bool:
        """Whether the first block sampled alone equals the whole clip's first block: then what a streamer shows
        first is what the clip holds."""
        alone = sample(transformer, e, z[:, :, : self.first_block_end], schedule, self.generator())
        clip = sample(transformer, e, z, schedule, self.generator())
        return bool(torch.equal(alone, clip[:, :, : self.first_block_end]))


def time_rows(runners: dict, indices: list[int], embeds, noise: dict) -> dict:
    """Every row's `runners` entry on clips `indices` one at a time, rows interleaved clip by clip (the order rotating
    by one row per clip) after one untimed warm-up each; `noise[name]` is the row's initial noise."""

    def run_row(name: str, i: int) -> tuple[float, float]:
        return runners[name](embeds[i : i + 1], noise[name][i : i + 1])

    names = list(runners)
    for name in names:  # warm-up, untimed: first calls allocate and pick kernels
        run_row(name, indices[0])
    firsts: dict[str, list[float]] = {name: [] for name in names}
    totals: dict[str, list[float]] = {name: [] for name in names}
    for j, i in enumerate(indices):
        for name in names[j % len(names) :] + names[: j % len(names)]:
            first, total = run_row(name, i)
            firsts[name].append(first)
            totals[name].append(total)
    rows = {
        name: {
            "time_to_first_frame": median_iqr(firsts[name]),
            "seconds_per_clip": median_iqr(totals[name]),
            "per_clip_first": firsts[name],
            "per_clip_total": totals[name],
        }
        for name in names
    }
    whole_bidirectional = np.asarray(totals[BIDIRECTIONAL])
    for name in CAUSAL_ROWS:
        first, total = np.asarray(firsts[name]), np.asarray(totals[name])
        rows[name]["first_frame_speedup_vs_bidirectional_clip"] = float(
            np.median(whole_bidirectional) / np.median(first)
        )
        rows[name]["first_frame_speedup_vs_bidirectional_clip_per_clip_median"] = float(
            np.median(whole_bidirectional / first)
        )
        rows[name]["first_frame_speedup_vs_own_clip"] = float(np.median(total) / np.median(first))
    return {
        "clips": indices,
        "order": "rows interleaved clip by clip, the order rotating by one row per clip; one untimed warm-up each",
        "what": "from precomputed prompt embeddings and initial noise to uint8 frames, batch 1",
        "rows": rows,
    }


def memory_child(args, variant: str) -> dict:
    """One variant of the step comparison, alone in this process: build, one untimed step (the optimizer's states
    belong to the steady state), then `--memory-steps` timed steps under PeakMemory."""
    from dmd.evaluation.metrics import PeakMemory
    from dmd.wan.tiny import build_transformer

    device = torch.device(
        "cuda"
        if args.memory_device == "cuda" or (args.memory_device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    params = load(args.params)
    schedule = RolloutSchedule(
        sigmas=RolloutSchedule.from_params(params).sigmas,
        num_frame_per_block=MEMORY_FRAMES_PER_BLOCK,
        num_training_frames=MEMORY_BLOCKS * MEMORY_FRAMES_PER_BLOCK,
        causal=variant == "cached",
    )
    width = args.memory_heads * args.memory_head_dim
    text_dim = 64
    model = build_transformer(
        in_channels=16,
        text_dim=text_dim,
        num_layers=args.memory_layers,
        num_attention_heads=args.memory_heads,
        attention_head_dim=args.memory_head_dim,
        ffn_dim=4 * width,
        seed=0,
    ).to(device)
    model.train().requires_grad_(True)
    optimizer = build_optimizer(list(model.parameters()), "adamw", 1e-5)
    fn = transformer_velocity(model)
    g = torch.Generator().manual_seed(0)
    shape = (1, 16, MEMORY_BLOCKS * MEMORY_FRAMES_PER_BLOCK, args.memory_latent, args.memory_latent)
    noise = torch.randn(shape, generator=g).to(device)
    prompt = torch.randn((1, 16, text_dim), generator=g).to(device)
    # every block runs all its steps, the last with gradient: the costliest rollout, whose peak both reach
    exits = [schedule.num_steps - 1] * MEMORY_BLOCKS

    def step(i: int) -> None:
        generator = torch.Generator().manual_seed(i)
        if schedule.causal:
            with block_causal(model) as handle:
                x0 = rollout(fn, prompt, noise, schedule, exits, generator, causal=handle)
        else:
            x0 = rollout(fn, prompt, noise, schedule, exits, generator)
        x0.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step(0)
    seconds = []
    with PeakMemory(device) as peak:
        for i in range(args.memory_steps):
            start = time.perf_counter()
            step(i + 1)
            seconds.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "device": str(device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds_per_step": seconds,
        "peak_memory_mib": peak.mb,
        "peak_memory_kind": peak.kind,
        "process_peak_rss_mib": _status_kib("VmHWM") / 1024 if device.type == "cpu" else None,
    }


def _status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def memory_comparison(args) -> dict:
    """Both variants in their own subprocesses (so neither's peak hides the other's), alternating (the order flips
    every round) so a change in the machine's load reaches both alike."""
    settings = ("params", "memory_steps", "memory_layers", "memory_heads", "memory_head_dim", "memory_latent")
    flags = [
        x
        for key in (*settings, "memory_device")
        for x in (f"--{key.replace('_', '-')}", str(getattr(args, key)))
    ]
    runs: dict[str, list[dict]] = {v: [] for v in MEMORY_VARIANTS}
    orders = []
    for r in range(args.memory_rounds):
        order = list(MEMORY_VARIANTS) if r % 2 == 0 else list(reversed(MEMORY_VARIANTS))
        orders.append(order)
        for variant in order:
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child-memory", variant, *flags],
                capture_output=True,
                text=True,
                env=os.environ.copy(),
            )
            if proc.returncode != 0:
                raise RuntimeError(f"memory child {variant} failed:\n{proc.stderr[-3000:]}")
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            log.info("memory round %d, %s: %s", r, variant, runs[variant][-1])
    summary = {}
    for variant, rs in runs.items():
        seconds = [s for run in rs for s in run["seconds_per_step"]]
        summary[variant] = {
            "label": MEMORY_VARIANTS[variant],
            "median_seconds_per_step": float(np.median(seconds)),
            "median_peak_memory_mib": float(np.median([run["peak_memory_mib"] for run in rs])),
            "peak_memory_kind": rs[0]["peak_memory_kind"],
            "median_process_peak_rss_mib": (
                float(np.median([run["process_peak_rss_mib"] for run in rs]))
                if rs[0]["process_peak_rss_mib"] is not None
                else None
            ),
        }
    cached, refed = summary["cached"], summary["refed"]
    ratios = {
        "seconds_per_step": cached["median_seconds_per_step"] / refed["median_seconds_per_step"],
        "peak_memory": cached["median_peak_memory_mib"] / refed["median_peak_memory_mib"],
        "per_round_seconds_per_step": [
            float(np.median(c["seconds_per_step"]) / np.median(f["seconds_per_step"]))
            for c, f in zip(runs["cached"], runs["refed"])
        ],
        "per_round_peak_memory": [
            c["peak_memory_mib"] / f["peak_memory_mib"] for c, f in zip(runs["cached"], runs["refed"])
        ],
    }
    if cached["median_process_peak_rss_mib"] is not None:
        ratios["process_peak_rss"] = (
            cached["median_process_peak_rss_mib"] / refed["median_process_peak_rss_mib"]
        )
    return {
        "layout": {"blocks": MEMORY_BLOCKS, "frames_per_block": MEMORY_FRAMES_PER_BLOCK},
        "model": {
            "layers": args.memory_layers,
            "heads": args.memory_heads,
            "head_dim": args.memory_head_dim,
            "ffn_dim": 4 * args.memory_heads * args.memory_head_dim,
            "latent": [16, MEMORY_BLOCKS * MEMORY_FRAMES_PER_BLOCK, args.memory_latent, args.memory_latent],
            "parameters": runs["cached"][0]["parameters"],
            "device": runs["cached"][0]["device"],
        },
        "step": "the student's rollout, every block to its last step (the last with gradient), backward, AdamW step",
        "rounds": args.memory_rounds,
        "order_per_round": orders,
        "steps_per_round": args.memory_steps,
        "runs": runs,
        "summary": summary,
        "ratio_cached_over_refed": ratios,
    }


def goals(rows: dict, timing: dict) -> dict:
    """The brief's goals, each against the row it names."""
    teacher, bidirectional = rows[TEACHER]["judge"], rows[BIDIRECTIONAL]["judge"]
    out = {}
    for name in (CAUSAL, CAUSAL_ODE):
        row = rows[name]["judge"]
        out[name] = {
            "attributes_within_0.02_of_teacher": all(
                row[f"acc_{a}"] >= teacher[f"acc_{a}"] - ATTRIBUTE_TOLERANCE for a in ATTRIBUTES
            ),
            "fd_at_or_below_bidirectional": row["fd"] <= bidirectional["fd"],
            "first_frame_3x_sooner_than_bidirectional_clip": timing["rows"][name][
                "first_frame_speedup_vs_bidirectional_clip"
            ]
            >= FIRST_FRAME_SPEEDUP,
        }
    out[CAUSAL_LONG] = {
        "every_attribute_within_0.02_of_teacher_in_every_window": all(
            w["judge"][f"acc_{a}"] >= teacher[f"acc_{a}"] - ATTRIBUTE_TOLERANCE
            for w in rows[CAUSAL_LONG]["windows"]
            for a in ATTRIBUTES
        ),
    }
    return out


def save_pictures(grid_clips, prompts, gif: Path, png: Path, base, windows) -> None:
    from dmd.evaluation.report import comparison_frames, comparison_grid, save_gif, save_png

    label = f"causal student, {len(windows)}x length"
    save_gif(
        gif,
        comparison_frames(prompts, {CAUSAL_LONG: grid_clips[CAUSAL_LONG]}, {CAUSAL_LONG: label}),
        base.toy.fps,
    )
    save_png(png, comparison_grid(prompts, grid_clips, {n: n for n in grid_clips}, base.evaluate.grid_frames))


def _cell(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def print_table(output: dict) -> None:
    rows = output["rows"]
    print(
        f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs, {output['threads']} threads, torch {torch.__version__}"
    )
    s = output["settings"]
    print(
        f"{s['eval_clips']} held-out clips ({s['eval_seeds_per_caption']} seeds x {len(s['eval_captions'])} captions), "
        f"{s['dmd_steps']} DMD steps per student, causal blocks {s['causal_blocks']}, ODE init {s['ode_init']['steps']} "
        f"steps at lr {s['ode_init']['learning_rate']:g}; timings: median of {s['timing_clips']} clips, batch 1\n"
    )
    names = [*ATTRIBUTES, "FD ↓", "motion", "diversity", "first frame s", "s/clip"]
    print("| row | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))

    def line(label: str, judge_row: dict, first, total, star: bool = False) -> None:
        mark = "*" if star else ""
        cells = [_cell(judge_row[f"acc_{a}"]) for a in ATTRIBUTES]
        cells += [_cell(judge_row["fd"]) + mark, _cell(judge_row["motion_consistency"])]
        cells += [_cell(judge_row["diversity"]) + mark, _cell(first), _cell(total)]
        print(f"| {label} | " + " | ".join(cells) + " |")

    for k, name in enumerate(ROWS[:4], start=1):
        r = rows[name]
        line(f"{k}. {name}", r["judge"], r.get("time_to_first_frame_s"), r.get("seconds_per_clip"))
    long = rows[CAUSAL_LONG]
    for w in long["windows"]:
        a, b = w["pixel_frames"]
        first = long.get("time_to_first_frame_s") if w["window"] == 0 else None
        total = long.get("seconds_per_clip") if w["window"] == 0 else None
        line(
            f"5. {CAUSAL_LONG}, window {w['window']} (frames {a}-{b - 1})",
            w["judge"],
            first,
            total,
            w["window"] > 0,
        )
    print("\n* past window 0, FD and diversity compare with real clips that start anywhere; not comparable.")
    for w in long["windows"]:
        kept = w["accuracy_where_world_keeps_in_frame"]
        print(
            f"window {w['window']}: object tracked in {w['object_tracked']:.2f} of clips; the caption's own motion keeps "
            f"it wholly in frame in {w['world_keeps_in_frame']:.2f}; accuracy there: "
            + ", ".join(f"{a} {_cell(kept[a], 2)}" for a in ATTRIBUTES)
        )

    timing = output["timing"]
    print(
        f"\nfirst block sampled alone equals the whole clip's first block: {timing['first_block_alone_equals_whole_clip']}"
    )
    for name in CAUSAL_ROWS:
        t = timing["rows"][name]
        print(
            f"{name}: first frame {t['first_frame_speedup_vs_bidirectional_clip']:.2f}x sooner than the bidirectional "
            f"student's whole clip (per-clip median {t['first_frame_speedup_vs_bidirectional_clip_per_clip_median']:.2f}x), "
            f"{t['first_frame_speedup_vs_own_clip']:.2f}x sooner than its own whole clip"
        )

    memory = output["memory"]
    ratio, summary = memory["ratio_cached_over_refed"], memory["summary"]
    model = memory["model"]
    print(
        f"\ntraining step, {memory['layout']['blocks']} blocks x {memory['layout']['frames_per_block']} latent frames, "
        f"random Wan ({model['layers']} layers, width {model['heads'] * model['head_dim']}, latent {model['latent']}, "
        f"{model['parameters'] / 1e6:.1f} M parameters, {model['device']}), {memory['rounds']} rounds x "
        f"{memory['steps_per_round']} steps:"
    )
    for variant in MEMORY_VARIANTS:
        v = summary[variant]
        print(
            f"  {v['label']}: {v['median_seconds_per_step']:.3f} s/step, peak {v['median_peak_memory_mib']:.0f} MiB "
            f"({v['peak_memory_kind']})"
        )
    print(
        f"  cached / re-fed: step time {ratio['seconds_per_step']:.2f}, peak memory {ratio['peak_memory']:.2f}"
        + (f", whole-process peak RSS {ratio['process_peak_rss']:.2f}" if "process_peak_rss" in ratio else "")
    )

    print("\ngoals:")
    for name, checks in output["goals"].items():
        print(f"  {name}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items()))


if __name__ == "__main__":
    sys.exit(main())
