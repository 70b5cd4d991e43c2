"""Prefect tasks of the evaluation stage: thin wrappers around dmd.evaluation.evaluate, one per unit of work.

All tasks run in the flow's process (timings are comparable only within one process) and keep no cache: the
inputs are videos in memory and the point of the stage is to measure afresh.
"""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from dmd.core.config import Params
from dmd.evaluation import evaluate


@task(name="sample-runs", cache_policy=NO_CACHE)
def sample_runs(
    params: Params, items: list[evaluate.EvalItem], device: torch.device
) -> dict[str, evaluate.RunOutput]:
    """The full teacher, the few-step teacher and the student, interleaved video by video."""
    return evaluate.run_all(params, items, device)


@task(name="score", cache_policy=NO_CACHE)
def score(
    params: Params, items: list[evaluate.EvalItem], runs: dict[str, evaluate.RunOutput], device: torch.device
) -> dict:
    return evaluate.score_runs(params, items, runs, device)


@task(name="write-report", cache_policy=NO_CACHE)
def write_outputs(
    params: Params, items: list[evaluate.EvalItem], runs: dict[str, evaluate.RunOutput], metrics: dict
) -> Path:
    return evaluate.write_outputs(params, items, runs, metrics)
