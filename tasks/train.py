"""Prefect task of the training stage: one training run, in this process or as `accelerate launch` workers.

No retries: a failed run keeps its checkpoints, and rerunning the stage resumes from the latest one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from dmd.config import load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(params_file: str, overrides: list[str], num_processes: int) -> list[str]:
    """`accelerate launch` of `python -m dmd.train` on `num_processes` processes.

    accelerate's multi-process launcher (torchrun underneath) starts them; each worker's Accelerator picks NCCL on
    GPUs and gloo on CPU (dmd.train passes cpu=True when there is no GPU).
    """
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", str(free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
        "-m", "dmd.train", params_file, *overrides,
    ]  # fmt: skip


@task(name="train-student", cache_policy=NO_CACHE)
def train_student(params_file: str, overrides: list[str], progress: bool = True) -> Path:
    """Train and export the student; returns its directory."""
    params = load(params_file, overrides)
    if params.train.num_processes == 1:
        from dmd.train import train

        return train(params, progress=progress)
    # mixed precision comes from the params inside each worker, so accelerate's own flag stays "no"
    command = launch_command(params_file, overrides, params.train.num_processes)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(command, env=env)
    if result.returncode:
        raise RuntimeError(
            f"training workers exited with code {result.returncode} (command: {' '.join(command)}); the log above "
            "says why; checkpoints are kept and a rerun resumes from the latest"
        )
    return Path(params.train.output_dir)
