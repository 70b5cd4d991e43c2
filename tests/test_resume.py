"""An experiment holds the student it says it holds: resuming never hands back a student trained past the run's own
length, continues only a checkpoint on the run's own trajectory, and says what it did."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_world import build_cache, run_params

from dmd.core.config import load
from dmd.training.checkpoint import CheckpointManager
from dmd.training.loop import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_wan_dir):
    return build_cache(tmp_path_factory.mktemp("resume-world"), tiny_wan_dir)


def _student(run_dir):
    return load_file(run_dir / "student" / "pytorch_lora_weights.safetensors")


def _train_steps(run_dir) -> int:
    return json.loads((run_dir / "student" / "student.json").read_text())["train_steps"]


def _checkpoints(run_dir) -> list[str]:
    return [p.name for p in CheckpointManager(run_dir / "checkpoints", 10).checkpoints()]


def _messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "dmd.training.loop")


def test_a_shorter_run_never_hands_back_the_longer_student(world, tmp_path, one_thread, caplog):
    caplog.set_level(logging.INFO, logger="dmd.training.loop")
    settings = dict(checkpoint_step_interval=2, checkpoints_total_limit=5)
    straight = tmp_path / "straight"
    train(load(run_params(world, straight, max_train_steps=3, **settings)), progress=False)

    run = tmp_path / "experiment"
    train(load(run_params(world, run, max_train_steps=4, **settings)), progress=False)
    assert _checkpoints(run) == ["checkpoint-0000002", "checkpoint-0000004"]

    # 3 steps: checkpoint-4 is past the end; checkpoint-2 lies on the 3-step run's trajectory
    caplog.clear()
    train(load(run_params(world, run, max_train_steps=3, **settings)), progress=False)
    said = _messages(caplog)
    assert "checkpoint-0000004 is at step 4, past this run's 3 steps" in said
    assert "resumed from" in said and "checkpoint-0000002 at step 2 of 3" in said
    assert _train_steps(run) == 3
    a, b = _student(straight), _student(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # 1 step: no checkpoint at or before it, so a new run, and the old checkpoints are moved aside
    caplog.clear()
    train(load(run_params(world, run, max_train_steps=1, **settings)), progress=False)
    said = _messages(caplog)
    assert "past this run's 1 steps" in said and "starting a new 1-step run" in said
    assert "training a new run of 1 steps" in said
    assert _train_steps(run) == 1
    assert _checkpoints(run) == ["checkpoint-0000001"]
    assert len(list((run / "checkpoints").glob("superseded-*/checkpoint-0000004"))) == 1


@pytest.mark.parametrize("schedule, continues", [("constant", True), ("cosine", False)])
def test_a_longer_run_continues_only_where_the_schedule_ignores_the_length(world, tmp_path, schedule, continues,
                                                                           caplog):  # fmt: skip
    caplog.set_level(logging.INFO, logger="dmd.training.loop")
    settings = dict(checkpoint_step_interval=2, lr_scheduler=schedule, lr_warmup_steps=0)
    run = tmp_path / schedule
    train(load(run_params(world, run, max_train_steps=2, **settings)), progress=False)
    caplog.clear()
    train(load(run_params(world, run, max_train_steps=4, **settings)), progress=False)
    said = _messages(caplog)
    assert _train_steps(run) == 4
    if continues:
        assert "checkpoint-0000002 at step 2 of 4 (written by a run planned for 2 steps" in said
    else:
        assert "planned for 2 steps, this run for 4" in said and "spans the run's length" in said
        assert "resumed from" not in said


def test_a_changed_learning_rate_is_resumed_only_with_a_warning(world, tmp_path, caplog):
    """A new learning rate may continue a checkpoint (lowering it is how a non-finite streak is recovered from),
    but the run then mixes two learning rates, and says so."""
    caplog.set_level(logging.INFO, logger="dmd.training.loop")
    run = tmp_path / "lr"
    train(load(run_params(world, run, max_train_steps=2, checkpoint_step_interval=2)), progress=False)
    caplog.clear()
    train(load(run_params(world, run, max_train_steps=3, checkpoint_step_interval=2, learning_rate=1e-5)),
          progress=False)  # fmt: skip
    said = _messages(caplog)
    assert "train.learning_rate=1e-05 from step 2 on; the steps before it were taken at 5e-05" in said


def test_resuming_a_named_checkpoint_past_the_end_is_refused(world, tmp_path):
    from dmd.training.checkpoint import CheckpointError

    run = tmp_path / "named"
    train(load(run_params(world, run, max_train_steps=2, checkpoint_step_interval=2)), progress=False)
    params = load(run_params(world, run, max_train_steps=1, resume_from_checkpoint="checkpoint-0000002"))
    with pytest.raises(CheckpointError, match="past this run's 1 steps"):
        train(params, progress=False)


def test_dmd_train_says_what_it_did_with_the_checkpoints(world, tmp_path):
    """The stage command shows the library's INFO lines: the resume decision and the progress, throttled."""
    run = tmp_path / "command"
    train(load(run_params(world, run, max_train_steps=2, checkpoint_step_interval=2)), progress=False)
    params_file = run_params(world, run, max_train_steps=1, checkpoint_step_interval=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING_")}
    env.update(OMP_NUM_THREADS="1", PREFECT_LOGGING_LEVEL="INFO")
    env.pop("DO_NOT_TRACK", None)
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)
    env.pop(
        "PREFECT_API_URL", None
    )  # the temporary server of a plain `dmd train`, whatever server this process has
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--params", str(params_file)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "past this run's 1 steps" in result.stderr and "training a new run of 1 steps" in result.stderr
    assert (
        "dmd.training.loop - train: 1/1 steps (100%)" in result.stderr
    )  # a progress line, not a redrawn bar
    assert "telemetry" not in result.stderr.lower()  # the CLI turns it off when the caller did not
    assert "View at http" not in result.stderr  # no links to the temporary server that stops with the command
    assert _train_steps(run) == 1
