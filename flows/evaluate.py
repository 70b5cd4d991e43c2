"""The `evaluate` flow (`dmd evaluate`): the student against the full and the few-step teacher, on the same
prompts and noise; writes metrics/eval.json, reports/eval.md with its pictures, and the videos."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from prefect import flow

from dmd import evaluate as lib
from dmd.config import dump, load
from dmd.io import write_text
from dmd.metrics import FeatureModelError
from dmd.wan import ModelNotFoundError
from tasks.evaluate import score, student_run, teacher_runs, write_outputs


@flow(name="evaluate")
def evaluate(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    params = load(params_file, overrides)
    ev = params.evaluate
    device = lib.pick_device()
    items = lib.plan(params)
    # the student first: the few-step teacher runs at its step count
    student = student_run(params, items, device)
    runs = {**teacher_runs(params, items, student.steps, device), "student": student}
    metrics = score(params, items, runs, device)
    report = write_outputs(params, items, runs, metrics)
    write_text(Path(ev.report_dir) / "params.effective.yaml", dump(params))
    lib.log_summary(metrics)
    logging.getLogger(__name__).info("report: %s, metrics: %s", report, ev.metrics_path)
    return metrics


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        evaluate(args.params, args.overrides)
    except (lib.EvaluationError, FeatureModelError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
