"""The `toy-teacher` flow (`dmd toy-teacher`, DVC stage `toy_teacher`): train the toy world's tiny Wan teacher
and write it, with its effective settings, to toy_teacher.output_dir."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from prefect import flow

from dmd.core.config import dump, load
from dmd.core.io import write_text
from dmd.toy.teacher import train_teacher
from flows.subflow import run_stage_flow

EPHEMERAL_STARTUP_SECONDS = 180


@flow(name="toy-teacher")
def toy_teacher(
    params_file: str = "params.yaml", overrides: list[str] | None = None, device: str = "cpu"
) -> str:
    params = load(params_file, overrides)
    output = train_teacher(params, device=device)
    write_text(Path(output) / "params.effective.yaml", dump(params))
    return str(output)


def main(args) -> int:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # the temporary Prefect server migrates a fresh database on first start, slower than Prefect's default
    # allows on a busy machine
    startup = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), EPHEMERAL_STARTUP_SECONDS)
    try:
        with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: startup}):
            output = run_stage_flow(
                toy_teacher, params_file=args.params, overrides=args.overrides, device=args.device
            )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(output)
    return 0
