"""The `evaluate` flow (`dmd evaluate`): the student against the full and the few-step teacher, on the same
prompts and noise (dmd.evaluation.evaluate.evaluate); writes metrics/eval.json, reports/eval.md with its
pictures, and the videos, then publishes the report as artifacts of the run."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dmd.core.config import Params, dump_stage, load
from dmd.core.io import write_text
from dmd.evaluation import evaluate as lib
from dmd.evaluation.metrics import FeatureModelError
from dmd.wan.loading import ModelNotFoundError

from .subflow import run_stage_flow


# Keeps no cache: the point of the stage is to measure afresh.
@task(name="evaluate-student", cache_policy=NO_CACHE)
def evaluate_task(params: Params) -> dict:
    return lib.evaluate(params)


@flow(name="evaluate")
def evaluate(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    params = load(params_file, overrides)
    metrics = evaluate_task(params)
    write_text(Path(params.evaluate.report_dir) / "params.effective.yaml", dump_stage(params, "evaluate"))
    publish_report(report_path(params), metrics)
    get_run_logger().info("report: %s, metrics: %s", report_path(params), params.evaluate.metrics_path)
    return metrics


def report_path(params: Params) -> Path:
    return Path(params.evaluate.report_dir) / "eval.md"


def publish_report(report: Path, metrics: dict) -> None:
    """eval.md (its pictures inlined) and the headline figures as artifacts of this flow run: the Prefect UI shows
    the results on the run's page (Artifacts tab) and under Artifacts, keyed eval-report / eval-figures."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from dmd.evaluation.report import figure_rows, self_contained

    create_markdown_artifact(
        markdown=self_contained(report.read_text(), report.parent),
        key="eval-report",
        description=f"{report}: student vs teacher, speed and quality",
    )
    create_table_artifact(
        table=figure_rows(metrics, lib.run_labels(metrics)),
        key="eval-figures",
        description="Headline figures per run (medians per video; speed-ups against the full teacher)",
    )


def main(args) -> int:
    params = load(args.params, args.overrides)
    try:
        lib.plan(params)  # the prompts, before Prefect starts
        lib.read_student_card(params)
        run_stage_flow(evaluate, params_file=args.params, overrides=args.overrides)
    except (lib.EvaluationError, FeatureModelError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"report: {report_path(params)}, metrics: {params.evaluate.metrics_path}")
    return 0
