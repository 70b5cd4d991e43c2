"""Training under faults: kill -9 while rotating checkpoints, a non-finite streak, a parent that dies, two trainers
on one checkpoint folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from train_world import build_cache, run_params

from dmd.training.checkpoint import LOCK_FILE, STATE_FILE, CheckpointManager

pytestmark = pytest.mark.slow

# Runs `python -m dmd.training.loop PARAMS` with a fault: the process kills itself (SIGKILL) at the first file it deletes
# inside a checkpoint folder, i.e. in the middle of rotating the oldest checkpoint out.
KILL_WHILE_ROTATING = """
import os, re, signal, sys
real_unlink = os.unlink

def unlink(path, *, dir_fd=None):
    folder = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.path.dirname(os.fspath(path))
    if re.fullmatch(r"\\.?checkpoint-\\d+(\\.old)?", os.path.basename(folder)):  # a checkpoint, not a temporary
        os.kill(os.getpid(), signal.SIGKILL)
    return real_unlink(path, dir_fd=dir_fd)

os.unlink = unlink
from dmd.training.loop import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_wan_dir):
    return build_cache(tmp_path_factory.mktemp("fault-world"), tiny_wan_dir)


def _train(params_file, *extra_env, script: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", script, str(params_file)] if script else [sys.executable, "-m", "dmd.training.loop",
                                                                                 str(params_file)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(sys.platform != "linux", reason="the fault is injected through /proc/self/fd")
def test_a_kill_while_rotating_checkpoints_leaves_only_complete_ones(world, tmp_path):
    run = tmp_path / "run"
    params_file = run_params(
        world, run, max_train_steps=3, checkpoint_step_interval=1, checkpoints_total_limit=1
    )
    killed = _train(params_file, script=KILL_WHILE_ROTATING)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    root = run / "checkpoints"
    folders = sorted(p for p in root.iterdir() if p.name.startswith("checkpoint-"))
    assert [p.name for p in folders] == ["checkpoint-0000002"]  # the new one is in place, the old one is gone
    files = {p.name for p in folders[0].iterdir()}
    assert STATE_FILE in files and {"student.safetensors", "critic.safetensors"} <= files

    finished = _train(params_file)  # resumes from checkpoint 2, removes the half-deleted leftover
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert sorted(p.name for p in root.iterdir() if p.name != LOCK_FILE) == ["checkpoint-0000003"]
    assert CheckpointManager(root, 1).load(root / "checkpoint-0000003")[1]["run"]["step"] == 3


def _weights(path) -> dict:
    groups, _ = CheckpointManager(path.parent, 10).load(path)
    return {f"{role}/{k}": t for role in ("student", "critic") for k, t in groups[role].items()}


def test_a_non_finite_streak_keeps_no_poisoned_checkpoint_and_resumes_with_a_lower_learning_rate(
    world, tmp_path, caplog
):
    import logging

    import torch

    from dmd.core.config import load
    from dmd.training.loop import NonFiniteError, train

    run = tmp_path / "run"
    sane = dict(checkpoint_step_interval=1, checkpoints_total_limit=5, max_consecutive_nonfinite=2)
    train(load(run_params(world, run, max_train_steps=2, **sane)), progress=False)
    root = run / "checkpoints"

    # a learning rate that blows the student up: resumed from checkpoint 2 (learning rates are resumable), the
    # first update sends the weights to ~1e20, finite, and every step after it is non-finite
    with caplog.at_level(logging.INFO, logger="dmd.training.loop"), pytest.raises(NonFiniteError) as err:
        train(load(run_params(world, run, max_train_steps=8, learning_rate=1e20, **sane)), progress=False)
    assert f"resumed from {root / 'checkpoint-0000002'}" in caplog.text
    first_bad = int(str(err.value).split("from step ")[1].split(" ")[0])
    kept = CheckpointManager(root, 5).checkpoints()
    assert kept and all(int(p.name.split("-")[1]) < first_bad for p in kept), (first_bad, kept)
    for path in kept:
        assert all(
            bool(torch.isfinite(t).all()) and float(t.abs().max()) < 1e3 for t in _weights(path).values()
        )
    assert f"The last checkpoint, {kept[-1]}, is intact" in str(err.value)
    assert [p.name for p in root.glob("nonfinite-*/checkpoint-*")] == [f"checkpoint-{first_bad:07d}"]

    # lowered again, as the message advises: the run continues from the intact checkpoint
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dmd.training.loop"):
        train(load(run_params(world, run, max_train_steps=8, learning_rate=1e-5, **sane)), progress=False)
    assert f"resumed from {kept[-1]}" in caplog.text and not list(root.glob("superseded-*"))
    final = CheckpointManager(root, 5).latest()
    assert final.name == "checkpoint-0000008"
    assert all(bool(torch.isfinite(t).all()) for t in _weights(final).values())


# A stand-in for `dvc repro`: runs the stage command under a shell, as DVC does ($SHELL -c "dmd train").
FAKE_DVC = "import subprocess, sys; subprocess.run([sys.argv[1], '-c', sys.argv[2]])"


def _wait_for(condition, timeout: float, what: str):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout:.0f} s")


def _descendants(pid: int, argument: str) -> list:
    import psutil

    try:
        tree = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in tree:
        try:
            if argument in p.cmdline():  # a whole argument: `sh -c "dmd train ..."` is not the stage
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.mark.parametrize("kill", ["bash parent", "sh parent", "the stage itself"])
def test_a_killed_stage_or_parent_leaves_no_trainer_and_no_prefect_server_behind(world, tmp_path, kill):
    import psutil

    run = tmp_path / "run"
    params_file = run_params(world, run, max_train_steps=400, checkpoint_step_interval=1)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the stage starts its own server
    env.update(OMP_NUM_THREADS="1", PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}")
    shell = "/bin/sh" if kill == "sh parent" else "/bin/bash"
    parent = subprocess.Popen(
        [sys.executable, "-c", FAKE_DVC, shell, f"dmd train --params {params_file}"],
        env=env,
        # as `dvc repro` from a terminal: a suite started under nohup would hand its ignored SIGHUP down, and a
        # stage started that way is asked to outlive its parent (dmd.core.process.stop_with_parent)
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    try:
        (stage,) = _wait_for(lambda: _descendants(parent.pid, "train"), 60, "dmd train")
        (server,) = _wait_for(lambda: _descendants(stage.pid, "uvicorn"), 180, "temporary Prefect server")
        _wait_for(lambda: (run / "checkpoints" / "checkpoint-0000001").is_dir(), 300, "first checkpoint")

        # a second trainer on the same checkpoints is refused, naming the first
        second = _train(params_file)
        assert second.returncode != 0 and f"in use by another training run (PID {stage.pid})" in second.stderr

        os.kill(parent.pid if kill.endswith("parent") else stage.pid, signal.SIGKILL)
        gone, alive = psutil.wait_procs([stage, server], timeout=30)
        assert not alive, f"still running after the kill: {[' '.join(p.cmdline()[:3]) for p in alive]}"
    finally:
        try:
            leftovers = psutil.Process(parent.pid).children(recursive=True)
        except psutil.Error:
            leftovers = []
        for p in [parent, *leftovers]:
            try:
                p.kill()
            except (OSError, psutil.Error):
                pass
        parent.wait()
    CheckpointManager(run / "checkpoints", 3).hold().close()  # the folder is free for the next run
