"""`dmd cache`: the `cache` flow. Plans the work, embeds captions, maps a task over chunks of clips, then
writes the index, problems and effective settings. Chunks run one at a time: inside each, reader threads decode
videos while the VAE encodes, which keeps the cores busy without two VAEs competing for them."""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from dmd.cache import CacheSummary, NoUsableSamplesError, progress_line
from dmd.config import load
from dmd.datasets import DatasetError
from tasks.cache import embed_captions_task, encode_chunk_task, finalize_cache_task, plan_cache_task


@flow(name="cache", task_runner=ThreadPoolTaskRunner(max_workers=1))
def cache_flow(params_file: str = "params.yaml", overrides: list[str] | None = None) -> CacheSummary:
    logger = get_run_logger()
    params = load(params_file, overrides)
    plan = plan_cache_task(params)
    logger.info(
        "%d sources: %d cached already, %d to encode, %d problems so far",
        len(plan.sources) + len(plan.problems),
        len(plan.sources) - len(plan.work),
        len(plan.work),
        len(plan.problems),
    )
    text_rows = embed_captions_task(params, plan)
    chunks = plan.chunks(params.cache.chunk_size)
    futures = encode_chunk_task.map(unmapped(params), unmapped(plan), chunks)
    results = []
    for future in futures:
        results.append(future.result())
        logger.info(progress_line(results, len(chunks)))
    summary = finalize_cache_task(params, plan, results, text_rows)
    logger.info(summary.line())
    return summary


def main(args) -> int:
    try:
        summary = cache_flow(args.params, args.overrides)
    except (NoUsableSamplesError, DatasetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0
