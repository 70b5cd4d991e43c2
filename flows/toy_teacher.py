"""The `toy-teacher` flow (`dmd toy-teacher`, DVC stage `toy_teacher`): train the toy world's tiny Wan teacher
(dmd.toy.teacher.train_teacher) and write it, with its effective settings, to toy_teacher.output_dir."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dmd.core.config import Params, dump, load
from dmd.core.io import write_text
from dmd.toy.teacher import train_teacher

from .subflow import run_stage_flow


# The teacher directory is the output DVC tracks, so Prefect keeps none.
@task(name="train-toy-teacher", cache_policy=NO_CACHE)
def train_toy_teacher(params: Params, device: str) -> Path:
    return Path(train_teacher(params, device=device))


@flow(name="toy-teacher")
def toy_teacher(
    params_file: str = "params.yaml", overrides: list[str] | None = None, device: str = "cpu"
) -> str:
    params = load(params_file, overrides)
    output = train_toy_teacher(params, device)
    write_text(output / "params.effective.yaml", dump(params))
    return str(output)


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        output = run_stage_flow(
            toy_teacher, params_file=args.params, overrides=args.overrides, device=args.device
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(output)
    return 0
