"""The shipped toy teacher on held-out captions: 50 steps + CFG against 3 steps (same scheduler, same seeds),
both judged against real clips of the toy world, which are the first row of the table; the second row is those
real clips encoded and decoded by the teacher's VAE, the ceiling for what the teacher can draw.

    .venv/bin/python benchmarks/toy_teacher.py [--teacher models/toy-teacher] [--seeds 4] [--guidance 3]

Writes benchmarks/results/toy_teacher.json and docs/images/toy_teacher_grid.png (rows: captions; columns: a real
clip, the teacher at 50 steps, the teacher at 3 steps; several frames each).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dmd.core.config import load  # noqa: E402
from dmd.core.io import atomic_path, write_json  # noqa: E402
from dmd.toy.judge import judge_clips, reference_clips  # noqa: E402
from dmd.toy.teacher import sample_clips, vae_round_trip  # noqa: E402
from dmd.toy.world import ToyWorld  # noqa: E402

GRID_FRAMES = (0, 5, 10, 15, 20)
SUMMARY_KEYS = ("sharpness", "purity", "edge", "motion_consistency", "fd", "diversity")


def _shown(path) -> str:
    """A path as the results show it: relative to the repository when inside it (results are committed)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def summarise(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "clips"}


def grid_png(path: Path, captions: list[str], columns: dict[str, np.ndarray], frames=GRID_FRAMES) -> None:
    """One row per caption; per column a strip of frames, upscaled 4× without smoothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    fig, axes = plt.subplots(
        len(captions), len(names), figsize=(3.2 * len(names), 0.9 * len(captions) + 0.6), squeeze=False
    )
    for r, caption in enumerate(captions):
        for c, name in enumerate(names):
            clip = columns[name][r]
            pad = np.full((clip.shape[1], 2, 3), 255, dtype=np.uint8)
            strip = np.concatenate([x for f in frames if f < len(clip) for x in (clip[f], pad)][:-1], axis=1)
            ax = axes[r][c]
            ax.imshow(strip, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0:
                ax.set_ylabel(caption.removeprefix("a ").replace(" moving ", "\n"), fontsize=7)
    fig.suptitle(f"frames {', '.join(map(str, frames))}", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--teacher", default=None, help="teacher dir (default: toy_teacher.output_dir)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per held-out caption")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--few-steps", type=int, default=3)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "toy_teacher.json"))
    parser.add_argument("--grid", default=str(REPO / "docs" / "images" / "toy_teacher_grid.png"))
    args = parser.parse_args()

    from diffusers import WanPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    params = load(args.params)
    teacher = Path(args.teacher or REPO / params.toy_teacher.output_dir)
    world = ToyWorld(params.toy)
    held_out = world.captions("held_out")
    captions = [c for c in held_out for _ in range(args.seeds)]
    seeds = [s for _ in held_out for s in range(args.seeds)]
    pipe = WanPipeline.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)

    reference = reference_clips(world, captions)
    rng = np.random.default_rng(0)
    real = np.stack([world.sample_clip(c, rng) for c in captions])
    start = time.perf_counter()
    round_trip = vae_round_trip(pipe.vae, real)  # what the VAE alone keeps: the ceiling for the teacher
    runs = {
        "real clips": (real, 0.0),
        "real clips through the VAE": (round_trip, time.perf_counter() - start),
    }
    settings = [
        (f"teacher {args.steps} steps, CFG {args.guidance:g}", args.steps, args.guidance),
        (f"teacher {args.few_steps} steps, CFG {args.guidance:g}", args.few_steps, args.guidance),
        (f"teacher {args.steps} steps, no CFG", args.steps, 1.0),
    ]
    for name, steps, guidance in settings:
        start = time.perf_counter()
        clips = sample_clips(
            pipe,
            captions,
            seeds,
            num_inference_steps=steps,
            guidance_scale=guidance,
            toy=params.toy,
            max_sequence_length=params.model.max_sequence_length,
        )
        runs[name] = (clips, time.perf_counter() - start)

    results = {
        name: summarise(judge_clips(clips, captions, world, reference)) for name, (clips, _) in runs.items()
    }
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}")
    print(
        f"teacher: {teacher}; {len(held_out)} held-out captions × {args.seeds} seeds; same seeds in every row"
    )
    header = f"{'':34s} {'colour':>6s} {'shape':>6s} {'dir':>6s} {'speed':>6s} " + " ".join(
        f"{k[:10]:>10s}" for k in SUMMARY_KEYS
    )
    print(header + f" {'seconds':>8s}")
    for name, result in results.items():
        acc = result["accuracy"]
        cells = " ".join(
            f"{result[k]:10.3f}" if result[k] is not None else f"{'-':>10s}" for k in SUMMARY_KEYS
        )
        print(
            f"{name:34s} {acc['colour']:6.2f} {acc['shape']:6.2f} {acc['direction']:6.2f} {acc['speed']:6.2f} "
            f"{cells} {runs[name][1]:8.1f}"
        )
    full, few = results[settings[0][0]], results[settings[1][0]]
    ratios = {
        "sharpness_few_over_full": few["sharpness"] / max(full["sharpness"], 1e-9),
        "fd_few_over_full": few["fd"] / max(full["fd"], 1e-9),
    }
    print(
        f"{args.few_steps} steps vs {args.steps} steps: sharpness ×{ratios['sharpness_few_over_full']:.2f}, "
        f"fd ×{ratios['fd_few_over_full']:.2f}"
    )
    write_json(
        args.output,
        {
            "machine": machine,
            "teacher": _shown(teacher),
            "captions": held_out,
            "seeds_per_caption": args.seeds,
            "guidance_scale": args.guidance,
            "results": results,
            "seconds": {name: seconds for name, (_, seconds) in runs.items()},
            "ratios": ratios,
        },
    )
    first = [i * args.seeds for i in range(len(held_out))]
    grid_png(
        Path(args.grid),
        held_out,
        {
            "real clip": real[first],
            f"teacher {args.steps} steps + CFG {args.guidance:g}": runs[settings[0][0]][0][first],
            f"teacher {args.few_steps} steps + CFG {args.guidance:g}": runs[settings[1][0]][0][first],
        },
    )
    print(f"wrote {args.output} and {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
