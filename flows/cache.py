"""`dmd cache`: the `cache` flow. Plans the work, embeds captions, maps a task over chunks of clips, then
writes the index, problems and effective settings. Chunks run one at a time: inside each, reader threads decode
videos while the VAE encodes, which keeps the cores busy without two VAEs competing for them."""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from dmd.core.config import Params, load
from dmd.data.cache import CacheSummary, NoUsableSamplesError, progress_line
from dmd.data.datasets import DatasetError, check_datasets
from dmd.wan.loading import ModelNotFoundError
from flows.subflow import run_stage_flow
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


def check_inputs(params: Params) -> None:
    """What the cache reads, checked before Prefect starts: the model directory (ModelNotFoundError, or a
    ConfigError naming the setting) and every enabled dataset's manifest or folder (DatasetError naming its key)."""
    from dmd.data.cache import default_device
    from dmd.wan.loading import check_model_dir, model_source

    model = params.model
    model_source(model.pretrained_model_name_or_path, "model.pretrained_model_name_or_path")
    model_source(model.text_encoder_path, "model.pretrained_t5_model_name_or_path")
    check_model_dir(model, default_device(), component="text_encoder")  # the VAE runs in float32 anywhere
    check_datasets(params.cache)


def main(args) -> int:
    try:
        check_inputs(load(args.params, args.overrides))
    except (DatasetError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_stage_flow(cache_flow, params_file=args.params, overrides=args.overrides)
    except (NoUsableSamplesError, DatasetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0
