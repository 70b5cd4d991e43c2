"""`train.fsdp` on two CPU processes (gloo): a full student and a full-copy critic sharded with FSDP2 train the weights
the unsharded two-process run trains, their checkpoints hold the same full tensors, they validate alike, a resumed
sharded run ends where the uninterrupted one does, and the export is a plain diffusers transformer."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_world import build_cache, run_params

from dmd.core.config import ConfigError, load
from flows.train import launch_command

pytestmark = pytest.mark.slow

STEPS = 3


def _full_copies(world: dict, **train) -> dict:
    """A full student and a full-copy critic, random exit steps per time block (two blocks), gradient checkpointing
    (the 14B recipe's), the EMA exported."""
    distillation = {**world["train"]["distillation_config"], "fake_score_lora_rank": None}
    return dict(model_type="full", distillation_config=distillation, max_train_steps=STEPS, train_batch_size=1,
                checkpoint_step_interval=1, use_ema=True, gradient_checkpointing=True, **train)  # fmt: skip


def _train(params_file) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(launch_command(str(params_file), [], 2), env=env, capture_output=True, text=True)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_sharded_full_copies_train_resume_and_export_like_the_unsharded_run(tmp_path, tiny_wan_dir):
    from diffusers import WanTransformer3DModel

    world = build_cache(tmp_path / "world", tiny_wan_dir)
    whole, sharded, resumed = tmp_path / "whole", tmp_path / "sharded", tmp_path / "resumed"
    validated = dict(
        validation_prompt=world["train"]["validation_prompt"],
        validation_step_interval=2,
        disable_benchmark=False,
    )
    _train(run_params(world, whole, **_full_copies(world, fsdp=False, **validated)))
    log = _train(run_params(world, sharded, **_full_copies(world, fsdp=True, **validated)))
    assert "training 0/3 steps on 2 process(es)" in log

    # the same updates (the gradients averaged by FSDP's reduce-scatter instead of the trainer's all-reduce, the
    # norm summed over shards): equal to rounding, a thousandth of what training changed at most
    export = "student/transformer/diffusion_pytorch_model.safetensors"
    exported = load_file(sharded / export)
    teacher = WanTransformer3DModel.from_pretrained(tiny_wan_dir, subfolder="transformer").state_dict()
    moved = _max_difference(exported, teacher)
    assert _max_difference(exported, load_file(whole / export)) <= 1e-3 * moved

    # checkpoints gathered whole: the student, critic and EMA tensors of the unsharded run, its optimizer state
    for part in ("student", "critic", "ema"):
        name = f"checkpoint-{STEPS:07d}/{part}.safetensors"
        assert _max_difference(
            load_file(sharded / "checkpoints" / name), load_file(whole / "checkpoints" / name)
        ) <= (1e-3 * moved)
    name = f"checkpoint-{STEPS:07d}/state.safetensors"
    state, unsharded_state = (
        load_file(sharded / "checkpoints" / name),
        load_file(whole / "checkpoints" / name),
    )
    assert set(state) == set(unsharded_state)
    for key in state:
        torch.testing.assert_close(state[key], unsharded_state[key], rtol=1e-5, atol=1e-7, msg=key)

    # validation before training and at step 2: every process ran the sharded student, the main one wrote
    for step, most in (
        (0, 0),
        (2, 1),
    ):  # the teacher's weights exactly; after training, off by a rounding at most
        grid = f"student/validation/step-{step:07d}/grid.png"
        frames = [np.asarray(Image.open(run / grid), dtype=np.int16) for run in (sharded, whole)]
        assert frames[0].shape == frames[1].shape and np.abs(frames[0] - frames[1]).max() <= most, grid

    # a sharded run resumed from the gathered checkpoint of step 2 ends where the uninterrupted one did
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        sharded / "checkpoints" / "checkpoint-0000002", resumed / "checkpoints" / "checkpoint-0000002"
    )
    log = _train(run_params(world, resumed, **_full_copies(world, fsdp=True)))
    assert "resumed from" in log and "at step 2 of 3" in log, log[-3000:]
    again = load_file(resumed / export)
    for key in exported:
        assert torch.equal(again[key], exported[key]), key

    # plain diffusers loads the export
    plain = WanTransformer3DModel.from_pretrained(sharded / "student", subfolder="transformer")
    for key, value in plain.state_dict().items():
        assert torch.equal(value, exported[key]), key


def test_fsdp_refuses_a_run_with_nothing_to_shard(tiny_params_file):
    with pytest.raises(
        ConfigError, match="fsdp: true shards the full copies, and with model_type: lora and a LoRA"
    ):
        load(tiny_params_file, ["train.fsdp=true", "train.distillation_config.fake_score_lora_rank=4"])
