"""`dmd ode-init`: the `ode-init` flow (DVC stage `ode_init`, between cache and train). One task regresses the student
on the teacher's ODE trajectories (dmd.training.ode_init.ode_init), then the flow writes the effective settings
beside it; with `ode_init.enabled: false` the stage only records that DMD starts from the teacher."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dmd.core.config import Params, dump_stage, load
from dmd.core.io import write_text
from dmd.training.ode_init import OdeInitError, ode_init

from .subflow import run_stage_flow


# The folder is the output DVC tracks, and a rerun is a fresh regression, so Prefect keeps none.
@task(name="ode-init", cache_policy=NO_CACHE)
def ode_init_task(params: Params, progress: bool) -> Path:
    return ode_init(params, progress=progress)


@flow(name="ode-init")
def ode_init_flow(
    params_file: str = "params.yaml", overrides: list[str] | None = None, progress: bool = True
) -> str:
    params = load(params_file, overrides)
    output = ode_init_task(params, progress)
    write_text(output / "params.effective.yaml", dump_stage(params, "ode_init"))
    get_run_logger().info("ODE initialisation in %s", output)
    return str(output)


def main(args) -> int:
    try:
        output = run_stage_flow(ode_init_flow, params_file=args.params, overrides=args.overrides)
    except (OdeInitError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(output)
    return 0
