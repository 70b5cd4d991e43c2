"""A stage command's flow run nested under the `dmd-pipeline` run that started it.

The pipeline runs each stage as `dvc repro --single-item <stage>` in another process, so Prefect cannot tell that
the stage's flow belongs to it and would list the two as unrelated top-level runs. Prefect records a subflow as a
flow run whose `parent_task_run_id` is a task run of the parent flow run: the pipeline's stage task puts its own
task run's id in PARENT_TASK_RUN_ENV, and `run_stage_flow` creates the stage's flow run with it as the parent, so
the UI shows every stage's run inside the pipeline run, under its stage task.
"""

from __future__ import annotations

import os
from typing import Any
from uuid import UUID

PARENT_TASK_RUN_ENV = "DMD_PARENT_TASK_RUN_ID"


def run_stage_flow(flow, **parameters: Any) -> Any:
    """`flow(**parameters)`, as a subflow of the task run named in PARENT_TASK_RUN_ENV when that task run is on the
    Prefect server this process reports to; otherwise a top-level run, as a plain call makes."""
    parent = parent_task_run_id()
    if parent is None:
        return flow(**parameters)
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Pending
    from prefect.utilities.callables import get_call_parameters

    parameters = get_call_parameters(
        flow.fn, (), parameters
    )  # with the defaults, as a plain call records them
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(
            flow,
            parameters=flow.serialize_parameters(parameters),
            parent_task_run_id=parent,
            state=Pending(),
        )
    return run_flow(flow, flow_run=flow_run, parameters=parameters)


def parent_task_run_id() -> UUID | None:
    """The task run in PARENT_TASK_RUN_ENV, if it exists on the configured Prefect server. Without a configured
    server the stage runs on a temporary one of its own, which cannot hold the pipeline's runs; a task run the server
    does not know (another server's, a stale variable) would make a parent link to nothing."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.logging import get_logger
    from prefect.settings import get_current_settings

    value = os.environ.get(PARENT_TASK_RUN_ENV)
    if not value or not get_current_settings().api.url:
        return None
    logger = get_logger("dmd.stage")
    try:
        task_run_id = UUID(value)
    except ValueError:
        logger.warning(
            "%s=%r is not a task run id; this stage's flow run is a top-level run", PARENT_TASK_RUN_ENV, value
        )
        return None
    try:
        with get_client(sync_client=True) as client:
            client.read_task_run(task_run_id)
    except ObjectNotFound:
        logger.warning(
            "%s=%s: no such task run on %s; this stage's flow run is a top-level run",
            PARENT_TASK_RUN_ENV,
            value,
            get_current_settings().api.url,
        )
        return None
    return task_run_id
