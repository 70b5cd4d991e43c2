"""Tuning harness for the DMD method on the toy world: train students with `DMDMethod` directly, judge them.

The teacher (model.pretrained_model_name_or_path, the shipped toy teacher by default) makes the training data the
way the generate stage does (50 steps, CFG generate.guidance_scale, negative prompt), then every trial trains a
3-step student from the same data and is judged on the held-out captions with the same initial noise as the
teacher's references (50 steps with and without CFG, and the teacher's own scheduler at the student's step count).

    .venv/bin/python benchmarks/dmd_toy.py --steps 1500 \
        --trial default \
        --trial "cfg1:train.distillation_config.real_score_guidance_scale=1"

A trial is `name` or `name:key=value,key=value` with `--set`-style keys applied on top of params.yaml.
Prints one table (judge scores per run, training time), writes benchmarks/results/dmd_toy.json and a PNG grid of
middle frames per run.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dmd.config import Params, load
from dmd.ema import EMA
from dmd.evaluate import LatentDecoder, load_teacher_pipeline, scheduler_with_shift
from dmd.io import atomic_path, write_json
from dmd.method import DMDMethod
from dmd.roles import build_roles
from dmd.rollout import RolloutSchedule, sample
from dmd.toy.judge import judge_clips, reference_clips
from dmd.toy.world import ATTRIBUTES, ToyWorld
from dmd.wan import encode_prompts

log = logging.getLogger("dmd_toy")
RESULTS = Path(__file__).parent / "results" / "dmd_toy.json"


def parse_trial(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    return name, [kv for kv in rest.split(",") if kv]


class Teacher:
    """The teacher pipeline, its text encoder and decoder, and the latent layout of a toy clip."""

    def __init__(self, params: Params):
        self.params = params
        self.pipe = load_teacher_pipeline(params, torch.device("cpu"))
        self.pipe.set_progress_bar_config(disable=True)
        self.decoder = LatentDecoder(self.pipe.vae)
        vae, tr, toy = self.pipe.vae.config, self.pipe.transformer.config, params.toy
        self.latent_shape = (
            tr.in_channels,
            (toy.num_frames - 1) // vae.scale_factor_temporal + 1,
            toy.height // vae.scale_factor_spatial,
            toy.width // vae.scale_factor_spatial,
        )

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


def batched(fn, *tensors, size: int = 16):
    return torch.cat([fn(*(t[i : i + size] for t in tensors)) for i in range(0, len(tensors[0]), size)])


def summarise(result: dict) -> dict:
    keep = ("sharpness", "fd", "motion_consistency", "diversity", "accuracy_all")
    return {**{k: result[k] for k in keep}, **{f"acc_{a}": result["accuracy"][a] for a in ATTRIBUTES}}


def train_student(params: Params, data: SimpleNamespace, steps: int, seed: int) -> tuple[object, float, list]:
    """A plain DMD loop (critic every step, generator per generator_update_interval, EMA); returns the roles with
    EMA weights swapped in when train.use_ema, the wall time, and the loss log."""
    torch.manual_seed(seed)
    roles = build_roles(params)
    method = DMDMethod(params, roles, data.negative, data.empty)
    tc = params.train
    critic_opt = method.critic_optimizer()
    student_opt = torch.optim.AdamW(method.student_parameters(), lr=tc.learning_rate, weight_decay=0.0)
    ema = EMA(method.student_parameters(), tc.ema_decay, tc.ema_update_interval) if tc.use_ema else None
    gen = torch.Generator().manual_seed(seed)
    batch_rng = np.random.default_rng(seed)
    history, start = [], time.perf_counter()
    n = len(data.latents)
    for step in range(steps):
        idx = torch.from_numpy(batch_rng.choice(n, size=tc.train_batch_size, replace=False))
        batch = SimpleNamespace(
            latents_BCTHW=data.latents[idx],
            prompt_embeds_BLD=data.embeds[idx],
            noise_BCTHW=data.noise[idx],
            captions=[data.captions[i] for i in idx],
            keys=[str(int(i)) for i in idx],
        )
        loss, m = method.critic_loss(batch, gen)
        critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        method.clip_critic_gradients()
        critic_opt.step()
        if method.updates_generator(step):
            loss, g = method.generator_loss(batch, gen)
            student_opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(method.student_parameters(), tc.max_grad_norm)
            student_opt.step()
            if ema is not None:
                ema.step()
            m.update(g)
        history.append(m)
        if (step + 1) % max(1, steps // 10) == 0:
            rate = (step + 1) / (time.perf_counter() - start)
            log.info(
                "step %d/%d (%.1f it/s) critic %.4f dmd %.4f",
                step + 1,
                steps,
                rate,
                m["critic_loss"],
                m.get("dmd_loss", float("nan")),
            )
    seconds = time.perf_counter() - start
    if ema is not None:
        with torch.no_grad():
            for p, shadow in zip(method.student_parameters(), ema.shadow):
                p.copy_(shadow)
    return roles, seconds, history


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--trial", action="append", default=[], help="name[:key=value,...] (repeatable)")
    parser.add_argument("--steps", type=int, help="training steps per trial (default: train.max_train_steps)")
    parser.add_argument("--teacher-clips", type=int, default=256, help="teacher clips to train on")
    parser.add_argument("--seeds", type=int, default=8, help="evaluation seeds per held-out caption")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    trials = [parse_trial(t) for t in (args.trial or ["default"])]

    base = load(args.params, args.overrides)
    world = ToyWorld(base.toy)
    teacher = Teacher(base)
    few = len(base.train.distillation_config.dmd_denoising_steps)

    # training data as the generate stage makes it
    train_captions = world.captions("train")
    captions = [train_captions[i % len(train_captions)] for i in range(args.teacher_clips)]
    negative, empty = teacher.encode([base.negative_prompt]), teacher.encode([""])
    embeds = teacher.encode(captions)
    g = torch.Generator().manual_seed(base.generate.seed)
    noise = torch.randn((len(captions), *teacher.latent_shape), generator=g)
    start = time.perf_counter()
    latents = batched(
        lambda e, z: teacher.generate(
            e, negative, z, base.generate.num_inference_steps, base.generate.guidance_scale
        ),
        embeds,
        noise,
    )
    log.info("teacher data: %d clips in %.0f s", len(captions), time.perf_counter() - start)
    data = SimpleNamespace(
        latents=latents, embeds=embeds, noise=noise, captions=captions, negative=negative, empty=empty
    )

    # held-out evaluation set: the same noise for every run
    eval_captions = [c for c in world.captions("held_out") for _ in range(args.seeds)]
    eval_embeds = teacher.encode(eval_captions)
    eval_noise = torch.randn(
        (len(eval_captions), *teacher.latent_shape),
        generator=torch.Generator().manual_seed(base.evaluate.seed),
    )
    reference = reference_clips(world, eval_captions)
    rows, grids = {}, {}

    def judge(name: str, latents_BCTHW: torch.Tensor, **info):
        clips = list(batched(lambda z: torch.from_numpy(teacher.decoder(z)), latents_BCTHW))
        clips = [c.numpy() for c in clips]
        rows[name] = {**summarise(judge_clips(clips, eval_captions, world, reference=reference)), **info}
        grids[name] = np.stack([c[len(c) // 2] for c in clips[:: args.seeds]])
        log.info(
            "%s: %s", name, {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[name].items()}
        )

    guidance = base.evaluate.teacher_guidance
    full = base.evaluate.teacher_steps
    for steps, w in ((full, guidance), (full, 1.0), (few, guidance), (few, 1.0)):
        judge(
            f"teacher {steps} steps cfg {w:g}",
            batched(
                lambda e, z, s=steps, w=w: teacher.generate(e, negative, z, s, w), eval_embeds, eval_noise
            ),
        )

    for name, overrides in trials:
        params = load(args.params, args.overrides + overrides)
        steps = args.steps or params.train.max_train_steps
        log.info("trial %s: %s, %d steps", name, overrides or "params as given", steps)
        roles, seconds, history = train_student(params, data, steps, params.train.seed)
        schedule = RolloutSchedule.from_params(params)
        gen = torch.Generator().manual_seed(base.evaluate.seed)
        student = batched(
            lambda e, z, fn=roles.student, sc=schedule, g=gen: sample(fn, e, z, sc, g),
            eval_embeds,
            eval_noise,
        )
        last = history[-max(1, len(history) // 10) :]
        judge(
            f"student {name}",
            student,
            train_seconds=round(seconds, 1),
            steps=steps,
            overrides=overrides,
            critic_loss_end=float(np.mean([m["critic_loss"] for m in last])),
        )

    print_table(rows)
    machine = dict(platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__)
    write_json(args.output, {"machine": machine, "eval_clips": len(eval_captions), "rows": rows})
    grid = Path(args.output).with_suffix(".png")
    save_grid(grids, grid)
    print(f"wrote {args.output} and {grid}")
    return 0


def print_table(rows: dict) -> None:
    cols = ["sharpness", "fd", "motion_consistency", "diversity", "accuracy_all"] + [
        f"acc_{a}" for a in ATTRIBUTES
    ]
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    short = {"motion_consistency": "motion", "accuracy_all": "acc_all"}
    header = (
        f"{'run':44s}"
        + "".join(f"{short.get(c, c.replace('acc_', '')):>10s}" for c in cols)
        + f"{'train s':>9s}"
    )
    print(header + "\n" + "-" * len(header))
    for name, r in rows.items():
        cells = "".join(f"{r[c]:10.3f}" if r[c] is not None else f"{'-':>10s}" for c in cols)
        print(f"{name:44s}{cells}{r.get('train_seconds', ''):>9}")


def save_grid(grids: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(grids)
    cols = max(len(g) for g in grids.values())
    fig, axes = plt.subplots(len(names), cols, figsize=(1.2 * cols + 2, 1.3 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(grids[name]):
                ax.imshow(grids[name][c])
        axes[r][0].set_title(name, fontsize=7, loc="left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
