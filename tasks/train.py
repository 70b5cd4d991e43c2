"""Prefect task of the training stage: one training run, in this process or as workers started by dmd.training.launch.

No retries: a failed run keeps its checkpoints, and rerunning the stage resumes from the latest one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from dmd.core.config import load


def launch_command(params_file: str, overrides: list[str], num_processes: int) -> list[str]:
    """`python -m dmd.training.loop` on `num_processes` processes of this machine, through torchrun with every socket on
    loopback (dmd/training/launch.py)."""
    return [sys.executable, "-m", "dmd.training.launch", str(num_processes), params_file, *overrides]


@task(name="train-student", cache_policy=NO_CACHE)
def train_student(params_file: str, overrides: list[str], progress: bool = True) -> Path:
    """Train and export the student; returns its directory."""
    params = load(params_file, overrides)
    if params.train.num_processes == 1:
        from dmd.training.loop import train

        return train(params, progress=progress)
    # each worker reads its settings (mixed precision included) from the params file
    command = launch_command(params_file, overrides, params.train.num_processes)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(command, env=env)
    if result.returncode:
        raise RuntimeError(
            f"training workers exited with code {result.returncode} (command: {' '.join(command)}); the log above "
            "says why; checkpoints are kept and a rerun resumes from the latest"
        )
    return Path(params.train.output_dir)
