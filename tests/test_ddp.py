"""Two CPU processes (gloo) through `accelerate launch`: the run completes and the replicas stay identical."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from train_world import build_cache, run_params

from dmd.checkpoint import CheckpointManager
from tasks.train import launch_command

pytestmark = pytest.mark.slow


def test_two_processes_keep_identical_replicas(tmp_path, tiny_wan_dir):
    world = build_cache(tmp_path / "world", tiny_wan_dir)
    run = tmp_path / "ddp"
    params_file = run_params(world, run, max_train_steps=3, checkpoint_step_interval=1, train_batch_size=1,
                             num_processes=2, report_to="dvclive")  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(launch_command(str(params_file), [], 2), env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "training 0/3 steps on 2 process(es)" in log
    # each checkpoint compares sha256 digests of both processes' student and critic weights
    digests = re.findall(r"replicas identical on 2 processes \(student (\w+), critic (\w+)\)", log)
    assert len(digests) == 2 * 3, log[-3000:]  # logged by both processes at steps 1, 2, 3
    assert len(set(digests)) == 3  # the weights changed every step, identically on both
    assert [p.name for p in CheckpointManager(run / "checkpoints", 3).checkpoints()] == [
        "checkpoint-0000001", "checkpoint-0000002", "checkpoint-0000003"
    ]  # fmt: skip
    assert (run / "student" / "student.json").is_file()
    rows = (run / "metrics" / "plots" / "metrics" / "fake_score_loss.tsv").read_text().splitlines()
    assert len(rows) == 4  # one writer: a header and one row per step
