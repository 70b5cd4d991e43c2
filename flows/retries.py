"""Every retry of the pipeline's Prefect tasks, in one table. A task is retried only where a rerun can succeed
and resumes rather than restarts; a task not listed is never retried."""

from __future__ import annotations

# task name -> retries; the `dmd-pipeline` flow's `dvc-stage` task as `dvc-stage/<stage>`, one entry per stage
RETRIES = {
    # the cache is content-addressed: a retry encodes only what the failed try left undone
    "build-cache": 1,
    # generation keeps finished shards (persist: true), training resumes from its checkpoints; cache and evaluate
    # are cheap to redo. The toy teacher is deterministic and long: a failure there is a bug, not a hiccup.
    "dvc-stage/toy_teacher": 0,
    "dvc-stage/generate": 2,
    "dvc-stage/cache": 1,
    "dvc-stage/train": 1,
    "dvc-stage/evaluate": 1,
}
# Not in the table: `generate-shard` retries `generate.retries` times, `generate.retry_delay_seconds` apart, settings
# of params.yaml because they depend on the cluster. `train-student` and `evaluate-student` are not retried inside
# their flow: the pipeline's stage retry reruns the whole stage, and training resumes from its checkpoints.
RETRY_DELAY_SECONDS = 5


def retry_options(name: str) -> dict:
    """`retries` and `retry_delay_seconds` of the task `name`, for `@task(...)` or `.with_options(...)`."""
    return {"retries": RETRIES.get(name, 0), "retry_delay_seconds": RETRY_DELAY_SECONDS}


def retry_unless(*errors: type[Exception]):
    """A `retry_condition_fn` that gives up at once on `errors`: bad input, which a rerun meets again."""

    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except errors:
            return False
        except Exception:
            return True
        return True

    return condition
