"""`dmd train`: the `train` flow. One task trains and exports the student (on `train.num_processes` processes
through dmd.training.launch when above 1), then the flow writes params.effective.yaml beside the student."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger

from dmd.core.config import ConfigError, dump_stage, load
from dmd.core.io import write_text
from dmd.training.checkpoint import CheckpointError
from dmd.training.loop import NonFiniteError
from flows.subflow import run_stage_flow
from tasks.train import train_student


@flow(name="train")
def train_flow(
    params_file: str = "params.yaml", overrides: list[str] | None = None, progress: bool = True
) -> Path:
    params = load(params_file, overrides)
    logger = get_run_logger()
    logger.info(
        "training %s steps on %d process(es); checkpoints in %s",
        params.train.max_train_steps or f"{params.train.num_train_epochs} epochs of",
        params.train.num_processes,
        params.train.checkpoint_dir,
    )
    student_dir = train_student(params_file, list(overrides or []), progress)
    write_text(Path(student_dir) / "params.effective.yaml", dump_stage(params, "train"))
    logger.info("student exported to %s", student_dir)
    return Path(student_dir)


def check_inputs(params) -> None:
    """What training reads, checked before Prefect starts: the teacher directory (a ConfigError names the
    setting) and the cache (FileNotFoundError says how to build it)."""
    from dmd.data.cache import open_cache
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
