"""Tuning harness for the DMD method on the toy world: train students with `DMDMethod` directly, judge them.

Every trial trains a 3-step student with the training run's own step (`dmd.training.loop`'s optimizer groups,
learning-rate schedule, per-step generator, update order, EMA) on in-memory data: the prompts of the toy world's
training captions and, when a trial reads them (rollouts from data, the regression loss), the teacher's clips made
as the generate stage makes them (50 steps, CFG generate.guidance_scale, negative prompt). Each student is judged
on the held-out captions with the same initial noise as the teacher's references (the teacher's scheduler at 50
steps and at the student's step count, with and without CFG); `gap closed` is the share of the few-step → 50-step
teacher gap (both at evaluate.teacher_guidance) that the student closes, as the evaluate stage reports it.

The final comparison (params.yaml as it is), one command:

    .venv/bin/python benchmarks/dmd_toy.py

A sweep: a trial is `name` or `name:key=value,key=value` with `--set`-style keys applied on top of params.yaml
(`train.max_train_steps` per trial, or `--steps` for all):

    .venv/bin/python benchmarks/dmd_toy.py --seeds 2 --steps 300 --trial default \
        --trial "cfg1:train.distillation_config.real_score_guidance_scale=1" \
        --trial "lora:train.model_type=lora,train.learning_rate=5e-5"

Prints one table (judge scores per run, NFE, gap closed, training seconds), writes benchmarks/results/dmd_toy.json
(after every run) and a PNG grid of middle frames (rows: held-out captions, first seed; columns: runs).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch

from dmd.core.config import Params, load
from dmd.core.io import atomic_path, write_json
from dmd.distill.method import DMDMethod
from dmd.distill.roles import build_roles
from dmd.distill.rollout import RolloutSchedule, sample
from dmd.evaluation.metrics import gap_closed
from dmd.toy.judge import judge_clips, reference_clips
from dmd.toy.world import ATTRIBUTES, ToyWorld
from dmd.training.ema import EMA
from dmd.training.loop import step_generator
from dmd.training.optim import build_groups
from dmd.wan.decode import LatentDecoder
from dmd.wan.latents import LatentGeometry
from dmd.wan.loading import encode_prompts
from dmd.wan.sampler import load_teacher_pipeline, scheduler_with_shift

log = logging.getLogger("dmd_toy")
RESULTS = Path(__file__).parent / "results" / "dmd_toy.json"


def parse_trial(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    return name, [kv for kv in rest.split(",") if kv]


class Teacher:
    """The teacher pipeline, its text encoder and decoder, and the latent layout of a toy clip."""

    def __init__(self, params: Params):
        self.params = params
        self.pipe = load_teacher_pipeline(params.model, torch.device("cpu"), params.model.flow_schedule_shift)
        self.pipe.set_progress_bar_config(disable=True)
        self.decoder = LatentDecoder(self.pipe.vae)
        toy = params.toy
        geometry = LatentGeometry.of(self.pipe.transformer, self.pipe.vae)
        self.latent_shape = geometry.latent_shape(toy.height, toy.width, toy.num_frames)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(
            self.pipe.tokenizer, self.pipe.text_encoder, prompts, self.params.model.max_sequence_length
        )

    @torch.no_grad()
    def generate(
        self, embeds: torch.Tensor, negative: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float
    ):
        toy = self.params.toy
        self.pipe.scheduler = scheduler_with_shift(self.pipe.scheduler, self.params.model.flow_schedule_shift)
        return self.pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative.expand(embeds.shape[0], -1, -1) if guidance > 1 else None,
            height=toy.height,
            width=toy.width,
            num_frames=toy.num_frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise,
            output_type="latent",
            return_dict=False,
        )[0]


def uses_teacher_clips(params: Params) -> bool:
    dc = params.train.distillation_config
    return dc.rollout_from == "data" or dc.regression_loss_weight > 0


def batched(fn, *tensors, size: int = 16):
    return torch.cat([fn(*(t[i : i + size] for t in tensors)) for i in range(0, len(tensors[0]), size)])


def summarise(result: dict) -> dict:
    keep = ("sharpness", "fd", "motion_consistency", "diversity", "accuracy_all")
    return {**{k: result[k] for k in keep}, **{f"acc_{a}": result["accuracy"][a] for a in ATTRIBUTES}}


class HeldOut(NamedTuple):
    captions: list[str]
    embeds: torch.Tensor
    noise: torch.Tensor
    reference: list[np.ndarray]


def held_out_set(teacher: Teacher, world: ToyWorld, seeds_per_caption: int, seed: int) -> HeldOut:
    """The held-out captions, each `seeds_per_caption` times, their prompt embeddings, one initial noise per clip
    (the same for every run judged on it) and the world's reference clips of those captions."""
    captions = [c for c in world.captions("held_out") for _ in range(seeds_per_caption)]
    noise = torch.randn((len(captions), *teacher.latent_shape), generator=torch.Generator().manual_seed(seed))
    return HeldOut(captions, teacher.encode(captions), noise, reference_clips(world, captions))


def train_student(params: Params, data: SimpleNamespace, steps: int) -> tuple[object, float, list]:
    """The training run's own step on in-memory data: `dmd.training.loop`'s optimizer groups (learning-rate schedule,
    clipping, weight decay), its per-step generator and its order (student update when `updates_generator`,
    then the critic), and EMA. Returns the roles with the EMA weights swapped in when train.use_ema, the wall
    time of the loop, and the metrics log."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    tc = params.train
    acc = Accelerator(mixed_precision=tc.run.mixed_precision, cpu=True)
    set_seed(tc.run.seed)
    roles = build_roles(params)
    method = DMDMethod(params, roles, RolloutSchedule.from_params(params), data.negative, data.empty)
    student, critic = build_groups(params, method, steps, acc)
    ema = EMA(student.params, tc.ema.ema_decay, tc.ema.ema_update_interval) if tc.ema.use_ema else None
    batch_rng = np.random.default_rng(tc.run.seed)
    history, start = [], time.perf_counter()
    n = len(data.latents)
    for step in range(steps):
        idx = torch.from_numpy(batch_rng.choice(n, size=tc.batch.train_batch_size, replace=False))
        batch = SimpleNamespace(
            latents_BCTHW=data.latents[idx],
            prompt_embeds_BLD=data.embeds[idx],
            noise_BCTHW=data.noise[idx],
            captions=[data.captions[i] for i in idx],
            keys=[str(int(i)) for i in idx],
        )
        generator = step_generator(tc.run.seed, step, 0)
        m = {}
        if method.updates_generator(step):
            update = student.update(partial(method.generator_loss, generator=generator), [batch])
            if ema is not None and update.finite:
                ema.step()
            m.update(update.metrics)
        update = critic.update(partial(method.critic_loss, generator=generator), [batch])
        m.update(update.metrics)
        history.append(m)
        if (step + 1) % max(1, steps // 10) == 0:
            rate = (step + 1) / (time.perf_counter() - start)
            log.info(
                "step %d/%d (%.2f it/s) critic %.4f dmd %.4f",
                step + 1,
                steps,
                rate,
                m["critic_loss"],
                m.get("dmd_loss", float("nan")),
            )
    seconds = time.perf_counter() - start
    if ema is not None:
        with torch.no_grad():
            for p, shadow in zip(student.params, ema.shadow):
                p.copy_(shadow)
    return roles, seconds, history


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--trial", action="append", default=[], help="name[:key=value,...] (repeatable)")
    parser.add_argument("--steps", type=int, help="training steps per trial (default: train.max_train_steps)")
    parser.add_argument(
        "--teacher-clips",
        type=int,
        help="teacher clips to train on, one per training caption in turn (default: generate.num_videos)",
    )
    parser.add_argument(
        "--seeds", type=int, help="evaluation seeds per held-out caption (default: evaluate.num_seeds)"
    )
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    trials = [parse_trial(t) for t in (args.trial or ["default"])]

    base = load(args.params, args.overrides)
    world = ToyWorld(base.toy)
    teacher = Teacher(base)
    few = len(base.train.distillation_config.dmd_denoising_steps)
    args.seeds = args.seeds or base.evaluate.num_seeds

    # training data as the generate stage makes it; the teacher's clips only when a trial reads them (rollouts
    # from data, the regression loss): rollouts from noise use the prompts alone
    trial_params = [(name, load(args.params, args.overrides + ov), ov) for name, ov in trials]
    train_captions = world.captions("train")
    num_clips = args.teacher_clips or base.generate.num_videos
    captions = [train_captions[i % len(train_captions)] for i in range(num_clips)]
    negative, empty = teacher.encode([base.model.negative_prompt]), teacher.encode([""])
    embeds = teacher.encode(captions)
    g = torch.Generator().manual_seed(base.generate.seed)
    noise = torch.randn((len(captions), *teacher.latent_shape), generator=g)
    if any(uses_teacher_clips(p) for _, p, _ in trial_params):
        start = time.perf_counter()
        latents = batched(
            lambda e, z: teacher.generate(
                e, negative, z, base.generate.num_inference_steps, base.generate.guidance_scale
            ),
            embeds,
            noise,
        )
        log.info("teacher data: %d clips in %.0f s", len(captions), time.perf_counter() - start)
    else:
        latents = torch.zeros_like(noise)  # only their shape is read
    data = SimpleNamespace(
        latents=latents, embeds=embeds, noise=noise, captions=captions, negative=negative, empty=empty
    )

    eval_captions, eval_embeds, eval_noise, reference = held_out_set(
        teacher, world, args.seeds, base.evaluate.seed
    )
    rows, grids = {}, {}
    machine = dict(platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__)
    guidance = base.evaluate.teacher_guidance
    full = base.evaluate.teacher_steps
    full_name, few_name = f"teacher {full} steps cfg {guidance:g}", f"teacher {few} steps cfg {guidance:g}"

    def judge(name: str, latents_BCTHW: torch.Tensor, **info):
        clips = list(batched(lambda z: torch.from_numpy(teacher.decoder(z)), latents_BCTHW))
        clips = [c.numpy() for c in clips]
        rows[name] = {**summarise(judge_clips(clips, eval_captions, world, reference=reference)), **info}
        if full_name in rows and few_name in rows:
            rows[name]["gap_closed"] = {
                k: gap_closed(rows[few_name][k], rows[full_name][k], rows[name][k])
                for k in ("sharpness", "fd")
            }
        grids[name] = np.stack([c[len(c) // 2] for c in clips[:: args.seeds]])
        log.info(
            "%s: %s", name, {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[name].items()}
        )
        # after every run, so a long sweep keeps what it measured so far
        write_json(
            args.output,
            {
                "machine": machine,
                "eval_clips": len(eval_captions),
                "eval_captions": sorted(set(eval_captions)),
                "seeds_per_caption": args.seeds,
                "teacher_clips": num_clips,
                "rows": rows,
            },
        )

    for steps, w in ((full, guidance), (few, guidance), (full, 1.0), (few, 1.0)):
        judge(
            f"teacher {steps} steps cfg {w:g}",
            batched(
                lambda e, z, s=steps, w=w: teacher.generate(e, negative, z, s, w), eval_embeds, eval_noise
            ),
            nfe=steps * (2 if w > 1 else 1),
        )

    for name, params, overrides in trial_params:
        steps = args.steps or params.train.run.max_train_steps
        log.info("trial %s: %s, %d steps", name, overrides or "params as given", steps)
        roles, seconds, history = train_student(params, data, steps)
        schedule = RolloutSchedule.from_params(params)
        gen = torch.Generator().manual_seed(base.evaluate.seed)
        student = batched(
            lambda e, z, fn=roles.student, sc=schedule, g=gen: sample(fn, e, z, sc, g),
            eval_embeds,
            eval_noise,
        )
        last = history[-max(1, len(history) // 10) :]
        n_blocks = len(schedule.block_ranges(teacher.latent_shape[1]))
        judge(
            f"student {name}",
            student,
            nfe=schedule.num_steps * n_blocks,
            train_seconds=round(seconds, 1),
            steps=steps,
            overrides=overrides,
            critic_loss_end=float(np.mean([m["critic_loss"] for m in last])),
        )
        del roles

    print_table(rows)
    grid = Path(args.output).with_suffix(".png")
    save_grid(grids, sorted(set(eval_captions)), grid)
    print(f"wrote {args.output} and {grid}")
    return 0


def print_table(rows: dict) -> None:
    cols = ["sharpness", "fd", "motion_consistency", "diversity", "accuracy_all"] + [
        f"acc_{a}" for a in ATTRIBUTES
    ]
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    short = {"motion_consistency": "motion", "accuracy_all": "acc_all"}
    header = (
        f"{'run':34s}{'NFE':>5s}"
        + "".join(f"{short.get(c, c.replace('acc_', '')):>9s}" for c in cols)
        + f"{'gap sharp':>10s}{'gap fd':>8s}{'train s':>9s}"
    )
    print(header + "\n" + "-" * len(header))
    for name, r in rows.items():
        cells = "".join(f"{r[c]:9.3f}" if r[c] is not None else f"{'-':>9s}" for c in cols)
        gap = r.get("gap_closed", {})
        gaps = "".join(
            f"{gap[k]:{w}.2f}" if gap.get(k) is not None else f"{'':>{w}s}"
            for k, w in (("sharpness", 10), ("fd", 8))
        )
        print(f"{name[:34]:34s}{r['nfe']:5d}{cells}{gaps}{r.get('train_seconds', ''):>9}")


def save_grid(grids: dict, captions: list[str], path: Path) -> None:
    """Middle frames: one row per held-out caption (its first seed), one column per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(grids)
    fig, axes = plt.subplots(
        len(captions), len(names), figsize=(1.4 * len(names) + 2.5, 1.4 * len(captions)), squeeze=False
    )
    for c, name in enumerate(names):
        for r in range(len(captions)):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(grids[name][r])
            if r == 0:
                ax.set_title(name.replace(" cfg", "\ncfg").replace("student ", "student\n"), fontsize=7)
            if c == 0:
                ax.set_ylabel(captions[r].replace(" moving ", "\nmoving "), fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
