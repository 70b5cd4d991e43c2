"""Teacher data generation: videos/s, and the wall time of the generate-teacher-data flow over the teacher's pure
sampling time (target: orchestration and I/O overhead at most 10%).

    .venv/bin/python benchmarks/generate.py [--shards N] [--rounds 2] [--params params.yaml]

Side by side in one process, on the same videos (same prompts, noise, batches, steps and guidance, from params;
by default the whole target of params, i.e. what the generate stage of the default pipeline makes):
  teacher        the flow's own teacher sampler (WanPipeline: initial noise, denoising, VAE decode to frames) called
                 batch by batch, nothing written: pure sampling
  flow, N        the generate-teacher-data flow with N workers (thread runner): Prefect flow and task runs,
                 mp4 + latents + noise files, shard and top-level manifests
  flow, no work  the same flow over shards that are already complete: what a flow run costs whatever its size
                 (Prefect's flow-run start and finish, the plan, status checks, the manifest)
  files          the files of one video written alone (mp4 encode, latents, noise, sha256), per video
  plain script   the teacher's WanPipeline called on the main thread of a process of its own, as a plain script
                 would (see TeacherWorker in dmd/data/generate.py for why the flow samples on one dedicated thread)
Rounds of teacher, flow 2, flow 1, no-work flow, interleaved; each kind keeps its best time, since the machine
may be shared. One-time costs (the teacher's load, the Prefect server's start) are measured by a warm-up run and
reported apart: they do not grow with the data set.

Uses the shipped toy teacher (models/toy-teacher) when it exists, else a random-weight Wan of the toy teacher's
architecture (sampling costs the same; its noise-like videos take longer to encode than toy clips). Writes
benchmarks/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOY_TEACHER = REPO / "models" / "toy-teacher"
RESULTS = REPO / "benchmarks" / "results" / "generate.json"


def random_toy_teacher(params, directory: Path) -> Path:
    """A Wan pipeline of the toy teacher's architecture with random weights."""
    from diffusers import WanPipeline

    from dmd.toy.world import ToyWorld
    from dmd.wan.tiny import (
        build_scheduler,
        build_text_encoder,
        build_tokenizer,
        build_transformer,
        build_vae,
        save_pipeline,
    )

    cfg = params.toy_teacher
    tokenizer = build_tokenizer(ToyWorld(params.toy).vocabulary())
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=build_text_encoder(len(tokenizer), d_model=cfg.text_dim, seed=cfg.seed),
        vae=build_vae(cfg.z_dim, cfg.vae_base_dim, seed=cfg.seed),
        transformer=build_transformer(
            in_channels=cfg.z_dim,
            text_dim=cfg.text_dim,
            num_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            attention_head_dim=cfg.attention_head_dim,
            ffn_dim=cfg.ffn_dim,
            seed=cfg.seed,
        ),
        scheduler=build_scheduler(params.model.flow_schedule_shift),
    )
    return save_pipeline(pipe, directory / "toy-teacher-random")


def teacher_pass(sampler, plan, shards: range) -> float:
    """Seconds for the teacher alone to draw the videos of `shards` as the flow batches them: the shared sampler
    the flow uses (same thread, same pipeline call, same decode), nothing written."""
    cfg = plan.params.generate
    start = time.perf_counter()
    for shard in shards:
        samples = plan.samples(shard)
        for i in range(0, len(samples), cfg.batch_size):
            sampler.sample(samples[i : i + cfg.batch_size], plan.params)
    return time.perf_counter() - start


def plain_script_seconds(params_file: Path, rounds: int) -> list[float]:
    """`plain_script` timings from a fresh process, run after the others so that nothing overlaps them."""
    command = [
        sys.executable,
        __file__,
        "--plain-script",
        "--params",
        str(params_file),
        "--rounds",
        str(rounds),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def plain_script(params_file: str, rounds: int) -> int:
    """Print the seconds of `rounds` passes of WanPipeline on this process's main thread over the plan's videos,
    as the flow batches them (output_type="np": denoising and VAE decode)."""
    from diffusers import WanPipeline

    from dmd.core.config import load
    from dmd.data.generate import prepare
    from dmd.wan.latents import LatentGeometry, initial_noise

    params = load(params_file)
    plan = prepare(params)
    cfg = params.generate
    pipe = WanPipeline.from_pretrained(params.model.pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    shape = LatentGeometry.of(pipe.transformer, pipe.vae).latent_shape(cfg.height, cfg.width, cfg.num_frames)
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for shard in range(plan.num_shards):
            samples = plan.samples(shard)
            for i in range(0, len(samples), cfg.batch_size):
                batch = samples[i : i + cfg.batch_size]
                pipe(
                    prompt=[s.prompt for s in batch],
                    negative_prompt=[params.model.negative_prompt] * len(batch),
                    height=cfg.height,
                    width=cfg.width,
                    num_frames=cfg.num_frames,
                    num_inference_steps=cfg.num_inference_steps,
                    guidance_scale=cfg.guidance_scale,
                    latents=torch.stack([initial_noise(s.seed, shape) for s in batch]),
                    output_type="np",
                    max_sequence_length=params.model.max_sequence_length,
                )
        seconds.append(time.perf_counter() - start)
    print(json.dumps(seconds))
    return 0


def files_per_video(sampler, plan, directory: Path, repeats: int = 3) -> float:
    """Seconds to write one video's files (mp4, latents, noise, sha256) as a shard does, best of `repeats`."""
    from dmd.data.generate import _write_sample

    samples = plan.samples(0)
    out = sampler.sample(samples, plan.params)
    fingerprint = plan.fingerprint(0)
    directory.mkdir(parents=True, exist_ok=True)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for k, sample in enumerate(samples):
            _write_sample(directory, sample, out, k, plan, fingerprint)
        best = min(best, (time.perf_counter() - start) / len(samples))
    return best


def flow_pass(params, workdir: Path, name: str, shards: range, workers: int) -> tuple[float, dict]:
    from dmd.core.config import dump, load
    from flows.generate import generate_teacher_data

    params_file = workdir / f"{name}.yaml"
    params_file.write_text(dump(params))
    overrides = [f"generate.output_dir={workdir / name}", f"generate.workers={workers}"]
    load(params_file, overrides)  # fail here, not inside the timing, on bad settings
    start = time.perf_counter()
    result = generate_teacher_data(
        params_file=str(params_file), overrides=overrides, shards=f"{shards.start}:{shards.stop}"
    )
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shards", type=int, default=None, help="shards per measured run (default: the target of params)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is kept")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--plain-script", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_script:
        return plain_script(args.params, args.rounds)

    workdir = Path(tempfile.mkdtemp(prefix="dmd-bench-generate-"))
    if "PREFECT_API_URL" not in os.environ:  # a throwaway temporary server, not the user's Prefect home
        os.environ["PREFECT_HOME"] = str(workdir / "prefect")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from dmd.core.config import dump, load
    from dmd.core.io import write_json
    from dmd.data.generate import TeacherWorker, prepare

    params = load(args.params)
    if (TOY_TEACHER / "model_index.json").is_file():
        teacher, teacher_note = TOY_TEACHER, "models/toy-teacher"
    else:
        teacher = random_toy_teacher(params, workdir)
        teacher_note = "random weights, toy-teacher architecture (models/toy-teacher not found)"
    cfg = params.generate
    args.shards = args.shards or cfg.num_shards
    shards = range(args.shards)
    params = load(
        args.params,
        [
            f"model.pretrained_model_name_or_path={teacher}",
            f"generate.num_videos={min(cfg.num_videos, args.shards * cfg.shard_size)}",
            f"generate.output_dir={workdir / 'plan'}",
        ],
    )
    plan = prepare(params)
    videos = sum(len(plan.samples(k)) for k in shards)

    start = time.perf_counter()
    teacher_worker = TeacherWorker.shared(params)  # the instance the flows below use
    load_seconds = time.perf_counter() - start
    # warm-up: starts the Prefect server, loads the flow's shared teacher, runs one shard end to end
    warmup_seconds, _ = flow_pass(params, workdir, "warmup", range(1), workers=2)

    runs = {"teacher": [], "flow, 2 workers (default)": [], "flow, 1 worker": [], "flow, no work": []}
    for r in range(args.rounds):  # interleaved, so a burst of load elsewhere hits every kind of run
        runs["teacher"].append(teacher_pass(teacher_worker, plan, shards))
        for workers, name in ((2, "flow, 2 workers (default)"), (1, "flow, 1 worker")):
            seconds, result = flow_pass(params, workdir, f"round{r}-{workers}", shards, workers)
            assert result["videos"] == videos, result
            runs[name].append(seconds)
        seconds, result = flow_pass(params, workdir, f"round{r}-1", shards, 1)  # complete: nothing to sample
        assert result["videos"] == 0, result
        runs["flow, no work"].append(seconds)
    best = {name: min(times) for name, times in runs.items()}
    teacher_seconds = best["teacher"]
    file_seconds = files_per_video(teacher_worker, plan, workdir / "files")
    plan_file = workdir / "plan.yaml"
    plan_file.write_text(dump(params))
    main_thread_seconds = plain_script_seconds(plan_file, args.rounds)

    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(teacher_worker.device),
    }
    print(f"machine: {machine}")
    print(f"teacher: {teacher_note}")
    print(
        f"work: {videos} videos ({args.shards} shards of {cfg.shard_size}, batch {cfg.batch_size}), "
        f"{cfg.num_inference_steps} steps, guidance {cfg.guidance_scale}, {cfg.num_frames}×{cfg.height}×{cfg.width}; "
        f"best of {args.rounds} interleaved rounds"
    )
    print(f"{'run':<28}{'best s':>9}{'all s':>18}{'videos/s':>10}{'÷ teacher':>11}")
    for name, times in runs.items():
        listed = " ".join(f"{t:.1f}" for t in times)
        rate = f"{videos / best[name]:>10.3f}" if name != "flow, no work" else f"{'-':>10}"
        print(f"{name:<28}{best[name]:>9.2f}{listed:>18}{rate}{best[name] / teacher_seconds:>11.3f}")
    print(
        f"one-time: teacher load {load_seconds:.2f} s; warm-up (Prefect server start + first shard) "
        f"{warmup_seconds:.2f} s"
    )
    overhead = best["flow, 2 workers (default)"] / teacher_seconds - 1
    per_run = best["flow, no work"]
    per_video = (best["flow, 2 workers (default)"] - per_run - teacher_seconds) / videos
    print(
        f"teacher: {teacher_seconds / videos * 1000:.0f} ms per video; files alone: {file_seconds * 1000:.1f} ms per "
        f"video; a flow run with no work: {per_run:.2f} s"
    )
    print(f"overhead of the default flow over pure sampling: {overhead:+.1%} (target ≤ +10%)")
    print(
        f"  of which per flow run: {per_run / teacher_seconds:+.1%} ({per_run:.2f} s, whatever the size); "
        f"per video: {per_video * videos / teacher_seconds:+.1%} ({per_video * 1000:+.1f} ms)"
    )
    plain = min(main_thread_seconds)
    print(
        f"a plain script (WanPipeline on its main thread, own process): {plain:.2f} s; the default flow over it: "
        f"{best['flow, 2 workers (default)'] / plain - 1:+.1%}"
    )

    write_json(
        RESULTS,
        {
            "machine": machine,
            "teacher": teacher_note,
            "videos": videos,
            "shards": args.shards,
            "rounds": args.rounds,
            "settings": {
                "shard_size": cfg.shard_size,
                "batch_size": cfg.batch_size,
                "steps": cfg.num_inference_steps,
                "guidance": cfg.guidance_scale,
                "frames": cfg.num_frames,
                "height": cfg.height,
                "width": cfg.width,
            },
            "seconds": runs,
            "best_seconds": best,
            "videos_per_second": {name: videos / s for name, s in best.items()},
            "ratio_to_teacher": {name: s / teacher_seconds for name, s in best.items()},
            "overhead_default_flow": overhead,
            "overhead_per_flow_run_seconds": per_run,
            "teacher_main_thread_seconds": main_thread_seconds,
            "overhead_default_flow_over_main_thread": best["flow, 2 workers (default)"] / plain - 1,
            "overhead_per_video_seconds": per_video,
            "files_seconds_per_video": file_seconds,
            "teacher_seconds_per_video": teacher_seconds / videos,
            "one_time_seconds": {"teacher_load": load_seconds, "warmup_flow": warmup_seconds},
        },
    )
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
