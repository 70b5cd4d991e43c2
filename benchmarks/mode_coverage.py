"""Mode coverage on the toy world (issue 20): DMD alone and with its mode-covering terms, 3 training seeds each.

Rows: the 50-step teacher with CFG; DMD as params.yaml has it; DMD + regression; DMD + DMD2's GAN term;
DMD + regression + GAN; DMD + the discrete-time consistency term (rCM-style); and the best of the mode-coverage
rows (highest diversity among those with FD ≤ the teacher's and every attribute within 0.02 of it, else the
highest diversity) with one rollout per step. Its step time is compared with the same row's two rollouts in
short runs side by side (`--timing-rounds`, `--timing-steps`): the table's own column is taken while rows run at
different times and reads the machine's load as much as the method. Columns: attribute accuracies, FD,
motion consistency, diversity and pairwise diversity (`dmd.toy.variety.start_position_variety`), training seconds
per step. Every student row is the mean ± standard deviation over its training seeds; the teacher's spread is the
bootstrap spread over evaluation seeds. Each figure of one student also carries its own bootstrap spread in the
JSON.

Training is `benchmarks/dmd_toy.py`'s (`train_student`: the training run's own step on in-memory data), on the
teacher's clips made as the generate stage makes them; students are evaluated on the held-out captions with
`--eval-seeds` seeds each, the same initial noise for every row. Rows are interleaved per training seed, so a
change in the machine's load reaches every row alike.

    .venv/bin/python benchmarks/mode_coverage.py            # --steps 300 --seeds 3 --eval-seeds 24

Prints the table and writes benchmarks/results/mode_coverage.json after every student; `--resume` keeps the
students an interrupted run of the same settings wrote there and trains only the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dmd_toy import Teacher, batched, held_out_set, train_student  # noqa: E402

from dmd.core.config import load  # noqa: E402
from dmd.core.io import write_json  # noqa: E402
from dmd.distill.rollout import RolloutSchedule, sample  # noqa: E402
from dmd.toy.judge import judge_clips, start_variety  # noqa: E402
from dmd.toy.world import ATTRIBUTES, ToyWorld  # noqa: E402

log = logging.getLogger("mode_coverage")
RESULTS = Path(__file__).parent / "results" / "mode_coverage.json"
DC = "train.distillation_config."

REGRESSION = [f"{DC}regression_loss_weight=0.25"]
GAN = [f"{DC}gen_cls_loss_weight=0.05", f"{DC}guidance_cls_loss_weight=0.1"]
CONSISTENCY = [f"{DC}consistency_loss_weight=1.0"]
ONE_ROLLOUT = [f"{DC}critic_reuses_generator_rollout=true"]
CANDIDATES = {
    "DMD (today)": [],
    "DMD + regression": REGRESSION,
    "DMD + GAN": GAN,
    "DMD + regression + GAN": REGRESSION + GAN,
    "DMD + consistency (rCM-style)": CONSISTENCY,
}
FIGURES = ("fd", "motion_consistency", "diversity", "pairwise_diversity", "accuracy_all") + tuple(
    f"acc_{a}" for a in ATTRIBUTES
)


def judge_row(clips, captions, world, reference) -> dict:
    judged = judge_clips(clips, captions, world, reference=reference)
    variety = start_variety(judged, world)
    return {
        "fd": judged["fd"],
        "motion_consistency": judged["motion_consistency"],
        "accuracy_all": judged["accuracy_all"],
        **{f"acc_{a}": judged["accuracy"][a] for a in ATTRIBUTES},
        **variety,
    }


def mean_spread(runs: list[dict], key: str) -> tuple[float, float]:
    values = np.array([r[key] for r in runs], dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def meets_goal(row: dict, teacher: dict) -> bool:
    """Diversity ≥ 0.95 of the teacher's, FD ≤ the teacher's, every attribute within 0.02 (issue 20's goal)."""
    return (
        row["diversity"][0] >= 0.95 * teacher["diversity"]
        and row["fd"][0] <= teacher["fd"]
        and all(row[f"acc_{a}"][0] >= teacher[f"acc_{a}"] - 0.02 for a in ATTRIBUTES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=300, help="training steps per student")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per row")
    parser.add_argument("--eval-seeds", type=int, default=24, help="evaluation seeds per held-out caption")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--resume", action="store_true", help="keep the students already in --output")
    parser.add_argument(
        "--timing-rounds", type=int, default=5, help="rounds of the one-rollout step-time comparison"
    )
    parser.add_argument("--timing-steps", type=int, default=40, help="training steps per timed run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # OMP_NUM_THREADS=1 when the machine is shared: threads spinning against another process's slow every row down
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))

    base = load(args.params)
    world = ToyWorld(base.toy)
    teacher = Teacher(base)
    negative, empty = teacher.encode([base.model.negative_prompt]), teacher.encode([""])

    # the training data as the generate stage makes it: one clip per training caption, in turn
    train_captions = world.captions("train")
    captions = [train_captions[i % len(train_captions)] for i in range(base.generate.num_videos)]
    embeds = teacher.encode(captions)
    noise = torch.randn(
        (len(captions), *teacher.latent_shape), generator=torch.Generator().manual_seed(base.generate.seed)
    )
    started = time.perf_counter()
    latents = batched(
        lambda e, z: teacher.generate(
            e, negative, z, base.generate.num_inference_steps, base.generate.guidance_scale
        ),
        embeds,
        noise,
    )
    log.info("teacher data: %d clips in %.0f s", len(captions), time.perf_counter() - started)
    data = SimpleNamespace(
        latents=latents, embeds=embeds, noise=noise, captions=captions, negative=negative, empty=empty
    )

    eval_captions, eval_embeds, eval_noise, reference = held_out_set(
        teacher, world, args.eval_seeds, base.evaluate.seed
    )

    def decode(latents_BCTHW: torch.Tensor) -> list[np.ndarray]:
        return [c.numpy() for c in batched(lambda z: torch.from_numpy(teacher.decoder(z)), latents_BCTHW)]

    guidance, full = base.evaluate.teacher_guidance, base.evaluate.teacher_steps
    teacher_name = f"teacher {full} steps + CFG {guidance:g}"
    teacher_latents = batched(
        lambda e, z: teacher.generate(e, negative, z, full, guidance), eval_embeds, eval_noise
    )
    teacher_row = judge_row(decode(teacher_latents), eval_captions, world, reference)
    log.info("%s: %s", teacher_name, teacher_row)

    runs: dict[str, list[dict]] = {}
    if args.resume and Path(args.output).is_file():
        previous = json.loads(Path(args.output).read_text())
        same = all(
            previous.get(k) == v
            for k, v in (("steps", args.steps), ("eval_seeds_per_caption", args.eval_seeds))
        )
        if not same:
            raise SystemExit(f"{args.output}: written with other --steps/--eval-seeds; run without --resume")
        kept = {*CANDIDATES, *(f"{name}, one rollout per step" for name in CANDIDATES)}
        runs.update({name: rs for name, rs in previous["runs"].items() if name in kept})
    output = {
        "machine": dict(platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__),
        "steps": args.steps,
        "training_seeds": args.seeds,
        "eval_clips": len(eval_captions),
        "eval_seeds_per_caption": args.eval_seeds,
        "teacher_clips": len(captions),
        "rows": {teacher_name: teacher_row},
        "overrides": {},
        "runs": runs,
    }

    def train_and_judge(name: str, overrides: list[str], seed_index: int) -> None:
        params = load(args.params, [*overrides, f"train.seed={base.train.run.seed + seed_index}"])
        if any(r["seed"] == params.train.run.seed for r in runs.get(name, [])):
            log.info("%s, seed %d: kept from %s", name, params.train.run.seed, args.output)
            output["overrides"][name] = overrides
            return
        log.info("%s, seed %d: %s", name, params.train.run.seed, overrides or "params as given")
        roles, seconds, _ = train_student(params, data, args.steps)
        schedule = RolloutSchedule.from_params(params)
        gen = torch.Generator().manual_seed(base.evaluate.seed)
        student = batched(lambda e, z: sample(roles.student, e, z, schedule, gen), eval_embeds, eval_noise)
        row = judge_row(decode(student), eval_captions, world, reference)
        row.update(seed=params.train.run.seed, seconds_per_step=seconds / args.steps)
        runs.setdefault(name, []).append(row)
        output["overrides"][name] = overrides
        log.info("%s: %s", name, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        write_json(args.output, output)

    for seed_index in range(args.seeds):
        for name, overrides in CANDIDATES.items():
            train_and_judge(name, overrides, seed_index)

    summary = {
        name: {k: mean_spread(rs, k) for k in (*FIGURES, "seconds_per_step")} for name, rs in runs.items()
    }
    candidates = {n: summary[n] for n in CANDIDATES if n != "DMD (today)"}
    meeting = [n for n, row in candidates.items() if meets_goal(row, teacher_row)]
    best = max(meeting or candidates, key=lambda n: candidates[n]["diversity"][0])
    best_name = f"{best}, one rollout per step"
    for seed_index in range(args.seeds):
        train_and_judge(best_name, [*CANDIDATES[best], *ONE_ROLLOUT], seed_index)
    summary[best_name] = {k: mean_spread(runs[best_name], k) for k in (*FIGURES, "seconds_per_step")}
    output.update(summary=summary, best=best, meets_goal=meeting)
    output["timing"] = time_one_rollout(args, data, CANDIDATES[best], best)
    write_json(args.output, output)
    print_table(teacher_name, teacher_row, summary)
    print(f"wrote {args.output}")
    return 0


def time_one_rollout(args, data, overrides: list[str], name: str) -> dict:
    """Seconds per training step of `name` with two rollouts per step and with one, measured side by side: short
    runs alternate (the order flips every round) so a change in the machine's load reaches both alike; the
    figure is the median over rounds, the ratio that of the medians and the median of per-round ratios."""
    variants = {"two rollouts": overrides, "one rollout": [*overrides, *ONE_ROLLOUT]}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for round_index in range(args.timing_rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for variant in order:
            params = load(args.params, variants[variant])
            _, elapsed, _ = train_student(params, data, args.timing_steps)
            seconds[variant].append(elapsed / args.timing_steps)
            log.info("timing round %d, %s: %.3f s/step", round_index, variant, seconds[variant][-1])
    one, two = np.array(seconds["one rollout"]), np.array(seconds["two rollouts"])
    timing = {
        "row": name,
        "steps_per_run": args.timing_steps,
        "seconds_per_step": {v: list(s) for v, s in seconds.items()},
        "median_seconds_per_step": {
            "two rollouts": float(np.median(two)),
            "one rollout": float(np.median(one)),
        },
        "ratio_of_medians": float(np.median(one) / np.median(two)),
        "median_round_ratio": float(np.median(one / two)),
    }
    print(
        f"\n{name}: one rollout per step takes {timing['ratio_of_medians']:.2f} of two rollouts' step time "
        f"(median {timing['median_seconds_per_step']['one rollout']:.3f} against "
        f"{timing['median_seconds_per_step']['two rollouts']:.3f} s/step over {args.timing_rounds} rounds; "
        f"median of per-round ratios {timing['median_round_ratio']:.2f})"
    )
    return timing


def print_table(teacher_name: str, teacher: dict, summary: dict) -> None:
    """A Markdown table: mean ± std over training seeds (the teacher: ± its bootstrap spread over seeds)."""
    cols = [f"acc_{a}" for a in ATTRIBUTES] + ["fd", "motion_consistency", "diversity", "pairwise_diversity"]
    names = [a for a in ATTRIBUTES] + ["FD ↓", "motion", "diversity", "pairwise div.", "train s/step"]
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| run | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    cells = [f"{teacher[c]:.3f}" for c in cols[:-2]]
    cells += [f"{teacher[c]:.3f} ± {teacher[c + '_spread']:.3f}" for c in cols[-2:]] + ["—"]
    print(f"| {teacher_name} | " + " | ".join(cells) + " |")
    for name, row in summary.items():
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" for c in cols]
        cells.append(f"{row['seconds_per_step'][0]:.3f} ± {row['seconds_per_step'][1]:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
