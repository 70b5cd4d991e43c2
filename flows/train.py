"""`dmd train`: the `train` flow. One task trains and exports the student (on `train.num_processes` processes
through dmd.training.launch when above 1; `auto`: one per visible CUDA device), then the flow writes
params.effective.yaml beside the student."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dmd.core.config import ConfigError, dump_stage, load
from dmd.core.io import write_text
from dmd.training.checkpoint import CheckpointError
from dmd.training.loop import NonFiniteError
from dmd.wan.device import cuda_device_count, resolve_num_processes

from .subflow import run_stage_flow


def launch_command(params_file: str, overrides: list[str], num_processes: int) -> list[str]:
    """`python -m dmd.training.loop` on `num_processes` processes of this machine, through torchrun with every socket on
    loopback (dmd/training/launch.py)."""
    return [sys.executable, "-m", "dmd.training.launch", str(num_processes), params_file, *overrides]


# A failed run keeps its checkpoints, and rerunning the stage resumes from the latest one.
@task(name="train-student", cache_policy=NO_CACHE)
def train_student(params_file: str, overrides: list[str], progress: bool = True) -> Path:
    """Train and export the student, in this process or as workers started by dmd.training.launch; returns its
    directory."""
    params = load(params_file, overrides)
    num_processes = resolve_num_processes(params.train.run.num_processes)
    if num_processes == 1:
        from dmd.training.loop import train

        return train(params, progress=progress)
    # each worker reads its settings (mixed precision included) from the params file
    command = launch_command(params_file, overrides, num_processes)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(command, env=env)
    if result.returncode:
        raise RuntimeError(
            f"training workers exited with code {result.returncode} (command: {' '.join(command)}); the log above "
            "says why; checkpoints are kept and a rerun resumes from the latest"
        )
    return Path(params.train.run.output_dir)


@flow(name="train")
def train_flow(
    params_file: str = "params.yaml", overrides: list[str] | None = None, progress: bool = True
) -> Path:
    params = load(params_file, overrides)
    logger = get_run_logger()
    setting = params.train.run.num_processes
    auto = (
        f" (train.num_processes: auto, {cuda_device_count()} visible CUDA device(s))"
        if setting == "auto"
        else ""
    )
    logger.info(
        "training %s steps on %d process(es)%s; checkpoints in %s",
        params.train.run.max_train_steps or f"{params.train.run.num_train_epochs} epochs of",
        resolve_num_processes(setting),
        auto,
        params.train.checkpoint.checkpoint_dir,
    )
    student_dir = train_student(params_file, list(overrides or []), progress)
    write_text(Path(student_dir) / "params.effective.yaml", dump_stage(params, "train"))
    logger.info("student exported to %s", student_dir)
    return Path(student_dir)


def check_inputs(params) -> None:
    """What training reads, checked before Prefect starts: the teacher directory (a ConfigError names the
    setting) and the cache (FileNotFoundError says how to build it)."""
    from dmd.data.cache.loader import open_cache
    from dmd.wan.loading import check_model_dir

    check_model_dir(params.model)
    open_cache(params.cache.output_dir)


def main(args) -> int:
    try:
        check_inputs(load(args.params, args.overrides))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        student_dir = run_stage_flow(train_flow, params_file=args.params, overrides=args.overrides)
    except ConfigError:
        raise  # the CLI prints it and exits 2
    except (NonFiniteError, CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(student_dir)
    return 0
