"""`dmd cache`: the `cache` flow. One task builds the cache (dmd.data.cache.build.build_cache: plan, embed captions,
encode chunks, write the index and problems), then the flow writes the effective settings beside it.

Devices. With one device in `cache.device` the chunks are encoded one after another. With several (`auto` on a
machine with several GPUs, or a list), the build task maps one `encode-chunk` task per chunk over a thread runner
with a thread per device; each chunk leases the least busy device of the process (dmd.wan.device.DevicePool) and
encodes with that device's VAE, so every device encodes a chunk at a time. Captions are embedded before, on the
first device: one text-encoder pass per distinct caption, small beside the VAE's pass over every frame of every
clip.
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from dmd.core.config import Params, load
from dmd.data.cache.build import (
    DEVICE_KEY,
    CacheSummary,
    ChunkResult,
    NoUsableSamplesError,
    Plan,
    WorkItem,
    build_cache,
    cache_devices,
    encode_chunk,
    encode_in_order,
    progress_line,
    write_effective_params,
)
from dmd.data.datasets import DatasetError, check_datasets
from dmd.wan.device import DeviceError, DeviceSlot, device_pool
from dmd.wan.loading import ModelNotFoundError

from .retries import retry_options, retry_unless
from .subflow import run_stage_flow


# Not retried on its own: the build task's retry re-runs the build, which reuses every chunk already written.
@task(name="encode-chunk", task_run_name="encode-chunk-{number}", cache_policy=NO_CACHE)
def encode_chunk_task(params: Params, plan: Plan, chunk: list[WorkItem], number: int) -> ChunkResult:
    """Encode one chunk on the least busy device of cache.device in this process."""
    with device_pool(params.cache.device, DEVICE_KEY).lease() as slot:
        return encode_chunk(params, plan, chunk, slot)


def encode_on_every_device(
    params: Params, plan: Plan, chunks: list[list[WorkItem]], slots: list[DeviceSlot]
) -> list[ChunkResult]:
    """The flow's ChunkEncoder: with several device slots, one Prefect task per chunk on a thread per slot;
    with one, the chunks in order in this thread, as build_cache runs them itself."""
    if len(slots) == 1 or len(chunks) <= 1:
        return encode_in_order(params, plan, chunks, slots)
    logger = get_run_logger()
    logger.info("encoding %d chunk(s) on %s", len(chunks), ", ".join(str(s) for s in slots))
    done: list[ChunkResult] = []
    with ThreadPoolTaskRunner(max_workers=len(slots)) as runner:
        # quoted: Prefect would otherwise walk the whole plan (every source of the data set) for each chunk task,
        # looking for futures among its inputs
        futures = [
            runner.submit(
                encode_chunk_task,
                {"params": quote(params), "plan": quote(plan), "chunk": quote(chunk), "number": i},
            )
            for i, chunk in enumerate(chunks)
        ]
        for future in as_completed(futures):
            done.append(future.result())  # a failed chunk fails the build task, whose retry resumes
            logger.info("cache %s", progress_line(done, len(chunks)))
    return [future.result() for future in futures]  # the chunks' order, whichever finished first


# The shards on disk are the cache (content-addressed, so a re-run finds what is done), so Prefect keeps none.
@task(
    name="build-cache",
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_unless(NoUsableSamplesError, DatasetError, FileNotFoundError),
    **retry_options("build-cache"),
)
def build_cache_task(params: Params) -> CacheSummary:
    return build_cache(params, encode_chunks=encode_on_every_device)


@flow(name="cache")
def cache_flow(params_file: str = "params.yaml", overrides: list[str] | None = None) -> CacheSummary:
    params = load(params_file, overrides)
    summary = build_cache_task(params)
    write_effective_params(params)
    get_run_logger().info(summary.line())
    return summary


def check_inputs(params: Params) -> None:
    """What the cache reads, checked before Prefect starts: cache.device (DeviceError naming it), the model
    directory (ModelNotFoundError, or a ConfigError naming the setting) and every enabled dataset's manifest or folder
    (DatasetError naming its key)."""
    from dmd.wan.loading import check_model_dir, model_source

    model = params.model
    text_device = cache_devices(params)[0].device  # captions are embedded on the first device
    model_source(model.pretrained_model_name_or_path, "model.pretrained_model_name_or_path")
    model_source(model.text_encoder_path, "model.pretrained_t5_model_name_or_path")
    check_model_dir(model, text_device, component="text_encoder")  # the VAE runs in float32 anywhere
    check_datasets(params.cache)


def main(args) -> int:
    try:
        check_inputs(load(args.params, args.overrides))
    except (DatasetError, ModelNotFoundError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_stage_flow(cache_flow, params_file=args.params, overrides=args.overrides)
    except (NoUsableSamplesError, DatasetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0
