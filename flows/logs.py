"""Where the stage commands' messages go: the library's `dmd.*` loggers to the console and to the Prefect run.

The library logs with the standard `logging` module (it never imports Prefect). Python drops INFO records by
default and Prefect only ships its own loggers' records to the API, so without this the library's resume
decisions, progress lines and hints (e.g. the wandb sync command) reach no one.
"""

from __future__ import annotations

import logging

LIBRARY_LOGGER = "dmd"

# The console format of a stage whose lines are copied into another run's logs (the `dmd-pipeline` flow's stage
# tasks): that run stamps each line with its own time, so the stage's lines carry none.
UNSTAMPED_CONSOLE_FORMATS = {
    "PREFECT_LOGGING_FORMATTERS_STANDARD_FORMAT": "%(levelname)-7s | %(name)s - %(message)s",
    "PREFECT_LOGGING_FORMATTERS_STANDARD_FLOW_RUN_FMT": "%(levelname)-7s | Flow run %(flow_run_name)r - %(message)s",
    "PREFECT_LOGGING_FORMATTERS_STANDARD_TASK_RUN_FMT": "%(levelname)-7s | Task run %(task_run_name)r - %(message)s",
}


class _InRun(logging.Filter):
    """Pass records logged inside a Prefect flow or task run (only those can be attached to a run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def route_library_logs(level: int = logging.INFO) -> None:
    """INFO and above of `dmd.*` to the console (Prefect's console handler on the root logger, or a plain one)
    and, inside a flow or task run, to that run's logs on the Prefect server. Idempotent."""
    from prefect.logging.handlers import APILogHandler

    library = logging.getLogger(LIBRARY_LOGGER)
    library.setLevel(level)
    if not logging.getLogger().handlers:  # Prefect sets up the root's console handler when it is imported
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    if not any(isinstance(h, APILogHandler) for h in library.handlers):
        api = APILogHandler()
        api.addFilter(_InRun())
        library.addHandler(api)
