"""The `evaluate` flow (`dmd evaluate`): the student against the full and the few-step teacher, on the same
prompts and noise; writes metrics/eval.json, reports/eval.md with its pictures, and the videos."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger

from dmd.core.config import dump_stage, load
from dmd.core.io import remove_stale_temporaries, write_text
from dmd.evaluation import evaluate as lib
from dmd.evaluation.metrics import FeatureModelError
from dmd.wan.loading import ModelNotFoundError
from flows.subflow import run_stage_flow
from tasks.evaluate import sample_runs, score, write_outputs


@flow(name="evaluate")
def evaluate(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    params = load(params_file, overrides)
    ev = params.evaluate
    for folder in (ev.report_dir, ev.videos_dir):  # what a killed run was writing
        remove_stale_temporaries(folder)
    device = lib.pick_device()
    items = lib.plan(params)
    runs = sample_runs(params, items, device)
    metrics = score(params, items, runs, device)
    report = write_outputs(params, items, runs, metrics)
    write_text(Path(ev.report_dir) / "params.effective.yaml", dump_stage(params, "evaluate"))
    publish_report(report, metrics, {name: lib.run_label(run) for name, run in runs.items()})
    lib.log_summary(metrics)
    get_run_logger().info("report: %s, metrics: %s", report, ev.metrics_path)
    return metrics


def publish_report(report: Path, metrics: dict, labels: dict[str, str]) -> None:
    """eval.md (its pictures inlined) and the headline figures as artifacts of this flow run: the Prefect UI shows
    the results on the run's page (Artifacts tab) and under Artifacts, keyed eval-report / eval-figures."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from dmd.evaluation.report import figure_rows, self_contained

    create_markdown_artifact(
        markdown=self_contained(Path(report).read_text(), Path(report).parent),
        key="eval-report",
        description=f"{report}: student vs teacher, speed and quality",
    )
    create_table_artifact(
        table=figure_rows(metrics, labels),
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
    print(f"report: {Path(params.evaluate.report_dir) / 'eval.md'}, metrics: {params.evaluate.metrics_path}")
    return 0
