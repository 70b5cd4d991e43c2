"""The teacher's trajectory at the student's σs (generate.save_trajectory): what it is (an independent teacher run
stopped at each σ), its files and manifest columns, the backfill of shards made without it (their other files left
byte for byte), the cache carrying it to the loader, the refusal of schedulers it cannot be read from, and the
default (off) leaving the data as it was."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dmd.core.config import load, stage_settings
from dmd.data.cache.build import build_cache
from dmd.data.cache.loader import CacheLoader, open_cache
from dmd.data.generate import (
    COMPLETE,
    MISSING_TRAJECTORIES,
    GenerationError,
    generate_shard,
    generate_teacher_data,
    generation_settings,
    missing_shards,
    prepare,
    trajectory_sigmas,
    write_manifest,
)
from dmd.data.schema import (
    MANIFEST,
    MANIFEST_COLUMNS,
    TEACHER_TRAJECTORY_TENSOR,
    TRAJECTORY_SIGMAS_METADATA,
    Index,
    Manifest,
)
from dmd.distill.rollout import RolloutSchedule
from dmd.wan.sampler import (
    TeacherSampler,
    TrajectoryError,
    load_teacher_pipeline,
    trajectory_scheduler_problem,
)

ON = "generate.save_trajectory=true"
# the manifest's columns before trajectories existed, in their order
COLUMNS_BEFORE = [
    "id", "prompt", "negative_prompt", "seed", "steps", "guidance", "shift", "frames", "fps", "width", "height",
    "teacher", "teacher_revision", "video", "sha256", "latents", "noise", "index", "prompt_id", "fingerprint",
]  # fmt: skip


def _trajectory(path: Path) -> tuple[torch.Tensor, list[float]]:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(TEACHER_TRAJECTORY_TENSOR), json.loads(f.metadata()[TRAJECTORY_SIGMAS_METADATA])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class NoTeacher:
    """A teacher that must not be asked: dropping trajectories needs no sampling."""

    def sample(self, *args, **kwargs):
        raise AssertionError("the teacher ran")


# ---------------------------------------------------------------------------------------------------------------
# What the trajectory is


@pytest.mark.parametrize("warp", [False, True])
def test_the_sigmas_are_the_students_rollout_sigmas(tiny_params_file, warp):
    steps = "train.distillation_config.dmd_denoising_steps=[1000, 750, 500, 250]"
    warped = f"train.distillation_config.warp_denoising_steps={str(warp).lower()}"
    params = load(tiny_params_file, [ON, steps, warped, "model.flow_schedule_shift=5.0"])
    assert trajectory_sigmas(params) == RolloutSchedule.from_params(params).sigmas
    assert (trajectory_sigmas(params)[1] > 0.75) is warp  # a shift of 5 moves every step towards noise
    assert trajectory_sigmas(load(tiny_params_file, [steps, warped])) is None


def test_the_trajectory_is_a_teacher_run_stopped_at_each_sigma(tiny_params_file, tiny_wan_dir, one_thread):
    """The scheduler loop by hand (the transformer with CFG, Euler steps) from the saved noise down to each σ*, its
    last step a partial one, gives the saved trajectory; the first point, at σ = 1 where the grid starts, is the
    noise itself."""
    from diffusers import WanPipeline

    shift, steps = 5.0, 6
    params = load(
        tiny_params_file,
        [
            ON,
            f"generate.num_inference_steps={steps}",
            f"generate.flow_shift={shift}",
            "train.distillation_config.dmd_denoising_steps=[1000, 757, 522, 300]",
            "train.distillation_config.warp_denoising_steps=true",
        ],
    )
    sigmas = trajectory_sigmas(params)
    plan = prepare(params)
    assert generate_shard(plan, 0).trajectories == 2
    shard = plan.shard_dir(0)
    rows = pd.read_parquet(shard / MANIFEST)
    assert [tuple(s) for s in rows[Manifest.TRAJECTORY_SIGMAS]] == [sigmas] * 2
    saved, metadata = zip(*(_trajectory(shard / f) for f in rows[Manifest.TRAJECTORY]))
    assert list(metadata) == [list(sigmas)] * 2
    trajectory = torch.stack(saved)  # (B,K,C,T,H,W)
    noise = torch.stack([load_file(shard / f)["noise"] for f in rows[Manifest.NOISE]])
    assert trajectory.dtype == torch.float32 and trajectory.shape == (2, len(sigmas), *noise.shape[1:])

    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=shift)
    scheduler.set_timesteps(steps)
    grid = scheduler.sigmas
    assert float(grid[0]) == 1.0 and sigmas[0] == 1.0
    positive, negative = pipe.encode_prompt(
        list(rows[Manifest.PROMPT]),
        list(rows[Manifest.NEGATIVE_PROMPT]),
        do_classifier_free_guidance=True,
        max_sequence_length=params.model.max_sequence_length,
    )
    guidance = params.generate.guidance_scale

    @torch.no_grad()
    def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
        t = scheduler.timesteps[i].expand(x.shape[0])
        cond = pipe.transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=positive, return_dict=False
        )[0]
        uncond = pipe.transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=negative, return_dict=False
        )[0]
        return uncond + guidance * (cond - uncond)

    partial_steps = 0
    for k, target in enumerate(sigmas):
        x, i = noise.clone(), 0
        while target <= grid[i + 1]:  # whole Euler steps down to the grid point at or above σ*
            x = x + (grid[i + 1] - grid[i]) * velocity(x, i)
            i += 1
        if target < grid[i]:  # the partial step from there to σ*
            x = x + (torch.tensor(target) - grid[i]) * velocity(x, i)
            partial_steps += 1
        torch.testing.assert_close(trajectory[:, k], x, rtol=1e-5, atol=1e-5)
    assert partial_steps == len(sigmas) - 1  # only σ = 1 is on the grid
    assert torch.equal(trajectory[:, 0], noise)
    assert (trajectory[:, 1] - trajectory[:, 0]).abs().mean() > 0.01  # the points are not all the noise


# ---------------------------------------------------------------------------------------------------------------
# Backfill of shards made without trajectories


def test_a_shard_made_without_trajectories_gains_them_and_keeps_its_files(
    tiny_params_file, tmp_path, one_thread
):
    off = load(tiny_params_file)
    generate_teacher_data(off, shards="0:2")
    plan_off = prepare(off)
    shard = plan_off.shard_dir(0)
    before = _files(shard)
    manifest_before = pd.read_parquet(shard / MANIFEST)

    on = load(tiny_params_file, [ON])
    plan = prepare(on)
    assert [plan.status(k) for k in range(3)] == [MISSING_TRAJECTORIES, MISSING_TRAJECTORIES, "missing"]
    assert missing_shards(plan) == [0, 1, 2]
    report = generate_teacher_data(on, shards="0:1")  # the stage's own path for missing shards
    assert (report.generated_shards, report.videos, report.trajectories) == ([0], 0, 2)
    assert [plan.status(k) for k in range(2)] == [COMPLETE, MISSING_TRAJECTORIES]

    after = _files(shard)
    names = sorted(f"{i}.trajectory.safetensors" for i in manifest_before[Manifest.ID])
    assert sorted(set(after) - set(before)) == names
    assert {k: v for k, v in after.items() if k not in (*names, MANIFEST)} == {
        k: v for k, v in before.items() if k != MANIFEST
    }
    manifest = pd.read_parquet(shard / MANIFEST)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    changed = [Manifest.FINGERPRINT, Manifest.TRAJECTORY, Manifest.TRAJECTORY_SIGMAS]
    pd.testing.assert_frame_equal(manifest.drop(columns=changed), manifest_before.drop(columns=changed))
    assert set(manifest[Manifest.FINGERPRINT]) == {plan.fingerprint(0)} != {plan_off.fingerprint(0)}

    # the top-level manifest lists the shard still waiting for trajectories, without them
    top = pd.read_parquet(Path(on.generate.output_dir) / MANIFEST)
    assert list(top["shard"]) == [0, 0, 1, 1]
    assert top[Manifest.TRAJECTORY].isna().tolist() == [False, False, True, True]

    # the same samples generated afresh with trajectories: the same latents (the run made again agrees with the
    # stored one), the same trajectories and the same manifest (the mp4 bytes aside, which H.264 may vary)
    fresh = load(tiny_params_file, [ON, f"generate.output_dir={tmp_path / 'fresh'}"])
    fresh_plan = prepare(fresh)
    generate_shard(fresh_plan, 0)
    fresh_shard = fresh_plan.shard_dir(0)
    for row in manifest.itertuples():
        assert torch.equal(
            load_file(fresh_shard / row.latents)["latents"], load_file(shard / row.latents)["latents"]
        )
        assert torch.equal(
            _trajectory(fresh_shard / row.trajectory)[0], _trajectory(shard / row.trajectory)[0]
        )
    fresh_manifest = pd.read_parquet(fresh_shard / MANIFEST)
    pd.testing.assert_frame_equal(manifest.drop(columns="sha256"), fresh_manifest.drop(columns="sha256"))

    # other σs: the trajectories are made again, the rest kept
    other = load(tiny_params_file, [ON, "train.distillation_config.dmd_denoising_steps=[1000, 500]"])
    other_plan = prepare(other)
    assert other_plan.status(0) == MISSING_TRAJECTORIES
    assert generate_shard(other_plan, 0).trajectories == 2
    trajectory, sigmas = _trajectory(shard / manifest[Manifest.TRAJECTORY][0])
    assert sigmas == [1.0, 0.5] and trajectory.shape[0] == 2
    assert {k: v for k, v in _files(shard).items() if k.endswith((".mp4", ".latents.safetensors"))} == {
        k: v for k, v in before.items() if k.endswith((".mp4", ".latents.safetensors"))
    }

    # turned off again: the trajectory files go, without sampling, and the manifest is the one made without them
    assert plan_off.status(0) == MISSING_TRAJECTORIES
    assert generate_shard(plan_off, 0, teacher=NoTeacher()).trajectories == 0
    assert _files(shard) == before
    assert plan_off.status(0) == COMPLETE


def test_a_backfill_whose_teacher_no_longer_gives_the_saved_latents_stops(tiny_params_file):
    off = load(tiny_params_file)
    plan_off = prepare(off)
    generate_shard(plan_off, 0)
    shard = plan_off.shard_dir(0)
    latents = shard / "00000001.latents.safetensors"
    save_file({"latents": load_file(latents)["latents"] + 1.0}, latents)  # as another teacher would have made
    before = _files(shard)

    with pytest.raises(GenerationError, match="00000001.latents.safetensors") as error:
        generate_shard(prepare(load(tiny_params_file, [ON])), 0)
    assert "generate.save_trajectory" in str(error.value) and f"delete {shard}" in str(error.value)
    assert _files(shard) == before and not list(shard.parent.glob(".shard-00000*"))


def test_a_manifest_written_before_trajectories_existed_still_counts(tiny_params_file):
    off = load(tiny_params_file)
    plan_off = prepare(off)
    generate_shard(plan_off, 0)
    manifest = plan_off.shard_dir(0) / MANIFEST
    pd.read_parquet(manifest)[COLUMNS_BEFORE].to_parquet(manifest)

    assert plan_off.status(0) == COMPLETE
    top = write_manifest(plan_off)
    assert list(top.columns) == ["shard", *MANIFEST_COLUMNS] and top[Manifest.TRAJECTORY].isna().all()
    plan = prepare(load(tiny_params_file, [ON]))
    assert plan.status(0) == MISSING_TRAJECTORIES
    assert generate_shard(plan, 0).trajectories == 2 and plan.status(0) == COMPLETE


# ---------------------------------------------------------------------------------------------------------------
# Cache and loader


def _source_trajectory(source: str) -> torch.Tensor:
    video = Path(source)
    return _trajectory(video.with_name(video.stem + ".trajectory.safetensors"))[0]


def test_the_cache_carries_trajectories_and_the_loader_returns_them_with_their_samples(tiny_params_file):
    off = load(tiny_params_file)
    generate_teacher_data(off)
    assert build_cache(off, "cpu").encoded == 6
    cache = open_cache(off.cache.output_dir)
    assert cache.index[Index.TRAJECTORY_SIGMAS].isna().all()
    assert "trajectory" not in cache.load(cache.index[Index.KEY][0])
    batch = next(iter(CacheLoader(cache, batch_size=2, seed=0)))
    assert batch.trajectory_BKCTHW is None and batch.trajectory_sigmas_K is None

    on = load(tiny_params_file, [ON])
    sigmas = trajectory_sigmas(on)
    generate_teacher_data(on, shards="0:1")
    summary = build_cache(on, "cpu")  # only the two clips that gained a trajectory are encoded again
    assert (summary.encoded, summary.reused) == (2, 4)
    cache = open_cache(on.cache.output_dir)
    has = cache.index[Index.TRAJECTORY_SIGMAS].notna()
    assert sorted(Path(s).parent.name for s in cache.index[Index.SOURCE][has]) == ["shard-00000"] * 2
    for row in cache.index.itertuples():
        item = cache.load(row.key)
        if row.trajectory_sigmas is None:
            assert "trajectory" not in item
            continue
        assert tuple(item["trajectory_sigmas"].tolist()) == pytest.approx(sigmas)
        assert torch.equal(item["trajectory"], _source_trajectory(row.source))

    generate_teacher_data(on)
    assert (build_cache(on, "cpu").encoded, build_cache(on, "cpu").encoded) == (4, 0)
    cache = open_cache(on.cache.output_dir)
    sources = dict(zip(cache.index[Index.KEY], cache.index[Index.SOURCE]))
    loader = CacheLoader(cache, batch_size=2, seed=0)
    seen = set()
    for batch in [b for _, b in zip(range(len(loader)), loader)]:
        assert batch.trajectory_BKCTHW.shape == (2, len(sigmas), *batch.latents_BCTHW.shape[1:])
        assert batch.trajectory_sigmas_K.tolist() == list(sigmas)
        for key, trajectory, noise in zip(batch.keys, batch.trajectory_BKCTHW, batch.noise_BCTHW):
            assert torch.equal(trajectory, _source_trajectory(sources[key]))
            assert torch.equal(
                trajectory[0], noise
            )  # σ = 1: the sample's own noise, so rows are not mixed up
            seen.add(key)
    assert seen == set(sources)
    moved = batch.to("cpu", torch.float64)
    assert moved.trajectory_BKCTHW.dtype == torch.float64 and moved.trajectory_sigmas_K.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Schedulers it cannot be read from


def _unipc_teacher(tiny_wan_dir: Path, folder: Path) -> Path:
    from diffusers import UniPCMultistepScheduler

    shutil.copytree(tiny_wan_dir, folder)
    shutil.rmtree(folder / "scheduler")
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    ).save_config(folder / "scheduler")
    return folder


def test_a_scheduler_that_is_not_euler_is_refused_before_any_sampling(
    tiny_params_file, tiny_wan_dir, tmp_path, capsys
):
    from flows.generate import main

    teacher = _unipc_teacher(tiny_wan_dir, tmp_path / "unipc-teacher")
    model = f"model.pretrained_model_name_or_path={teacher}"
    with pytest.raises(GenerationError) as error:
        prepare(load(tiny_params_file, [ON, model]))
    message = str(error.value)
    assert message.startswith("generate.save_trajectory:") and "UniPCMultistepScheduler" in message
    assert "generate.save_trajectory: false" in message and "FlowMatchEulerDiscreteScheduler" in message
    prepare(load(tiny_params_file, [model]))  # sampling without trajectories is another matter

    args = argparse.Namespace(params=str(tiny_params_file), overrides=[ON, model], shards=None)
    assert main(args) == 2
    assert "UniPCMultistepScheduler" in capsys.readouterr().err
    assert not list(Path(load(tiny_params_file).generate.output_dir).glob("*shard-*"))


def test_the_sampler_refuses_trajectories_it_cannot_read_off(tiny_params, tiny_wan_dir):
    from diffusers import UniPCMultistepScheduler

    euler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": False}
    assert trajectory_scheduler_problem(euler) is None
    assert "stochastic_sampling" in trajectory_scheduler_problem({**euler, "stochastic_sampling": True})
    assert "UniPCMultistepScheduler" in trajectory_scheduler_problem(
        {"_class_name": "UniPCMultistepScheduler"}
    )

    pipe = load_teacher_pipeline(tiny_params.model, "cpu", 3.0)
    sampler = TeacherSampler(pipe, 2, 3.0, "", tiny_params.model.max_sequence_length)
    noise = torch.randn(
        1, *sampler.geometry.latent_shape(32, 32, 21), generator=torch.Generator().manual_seed(0)
    )
    embeds = sampler.encode("a red square")
    with pytest.raises(TrajectoryError, match="outside the teacher's run"):
        sampler.denoise_with_trajectory(embeds, noise, [1.5])
    pipe.scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    with pytest.raises(TrajectoryError, match="UniPCMultistepScheduler"):
        sampler.denoise_with_trajectory(embeds, noise, [1.0])


# ---------------------------------------------------------------------------------------------------------------
# The default: off


def test_off_writes_no_trajectory_and_records_no_student_setting(tiny_params_file):
    params = load(tiny_params_file)
    assert "trajectory_sigmas" not in generation_settings(params)
    assert "train" not in stage_settings(params, "generate")
    on = stage_settings(load(tiny_params_file, [ON]), "generate")
    assert set(on["train"]["distillation_config"]) == {"dmd_denoising_steps", "warp_denoising_steps"}

    plan = prepare(params)
    generate_shard(plan, 0)
    shard = plan.shard_dir(0)
    kinds = ("latents.safetensors", "mp4", "noise.safetensors")
    assert sorted(p.name for p in shard.iterdir()) == sorted(
        [MANIFEST, *(f"0000000{i}.{kind}" for i in range(2) for kind in kinds)]
    )
    manifest = pd.read_parquet(shard / MANIFEST)
    assert list(manifest.columns) == [*COLUMNS_BEFORE, Manifest.TRAJECTORY, Manifest.TRAJECTORY_SIGMAS]
    assert manifest[Manifest.TRAJECTORY].isna().all() and manifest[Manifest.TRAJECTORY_SIGMAS].isna().all()


def test_save_trajectory_needs_the_latents_file_its_clean_end_is(tiny_params_file):
    from dmd.core.config import ConfigError

    with pytest.raises(ConfigError, match="generate.save_trajectory needs generate.save_latents"):
        load(tiny_params_file, [ON, "generate.save_latents=false"])


def test_params_yaml_lists_the_key_with_its_default(tmp_path):
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert raw["generate"]["save_trajectory"] is False
