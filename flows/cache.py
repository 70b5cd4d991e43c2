"""`dmd cache`: the `cache` flow. One task builds the cache (dmd.data.cache.build.build_cache: plan, embed captions,
encode chunks, write the index and problems), then the flow writes the effective settings beside it."""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dmd.core.config import Params, load
from dmd.data.cache.build import CacheSummary, NoUsableSamplesError, build_cache, write_effective_params
from dmd.data.datasets import DatasetError, check_datasets
from dmd.wan.loading import ModelNotFoundError

from .retries import retry_options, retry_unless
from .subflow import run_stage_flow


# The shards on disk are the cache (content-addressed, so a re-run finds what is done), so Prefect keeps none.
@task(
    name="build-cache",
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_unless(NoUsableSamplesError, DatasetError, FileNotFoundError),
    **retry_options("build-cache"),
)
def build_cache_task(params: Params) -> CacheSummary:
    return build_cache(params)


@flow(name="cache")
def cache_flow(params_file: str = "params.yaml", overrides: list[str] | None = None) -> CacheSummary:
    params = load(params_file, overrides)
    summary = build_cache_task(params)
    write_effective_params(params)
    get_run_logger().info(summary.line())
    return summary


def check_inputs(params: Params) -> None:
    """What the cache reads, checked before Prefect starts: the model directory (ModelNotFoundError, or a
    ConfigError naming the setting) and every enabled dataset's manifest or folder (DatasetError naming its key)."""
    from dmd.wan.device import pick_device
    from dmd.wan.loading import check_model_dir, model_source

    model = params.model
    model_source(model.pretrained_model_name_or_path, "model.pretrained_model_name_or_path")
    model_source(model.text_encoder_path, "model.pretrained_t5_model_name_or_path")
    check_model_dir(model, str(pick_device()), component="text_encoder")  # the VAE runs in float32 anywhere
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
