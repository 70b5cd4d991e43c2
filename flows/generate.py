"""The `generate-teacher-data` flow (`dmd generate`) and its backfill (`dmd backfill`, deployment
`generate-teacher-data/backfill`).

`dmd generate [--shards A:B]` runs the stage (dmd.data.generate.generate_teacher_data) with one Prefect task per
missing or stale shard of A:B (default: the whole target), logging progress. The task runner is
`generate.task_runner`: threads in this process, or Dask (a local cluster, or `generate.dask_address`) to spread
shards over machines.

Devices. `generate.device` lists the device slots (dmd.wan.device; `auto`: every visible GPU), one teacher each. With
threads, `generate.workers` × slots threads run shards and each shard leases the least busy slot of this process
(dmd.data.generate.generate_shard), so every device holds `workers` shards at a time. A local Dask cluster with
several slots has one worker process per slot, `generate.workers` threads each, and worker i's shards pin its process
to slot i (the layout of dask-cuda's LocalCUDACluster, which is not a dependency and sets CUDA_VISIBLE_DEVICES per
worker instead; pinning keeps device names as written, so `cpu,cpu` runs the same code on a machine without GPUs).
On an existing cluster each worker process spreads its shards over the slots `generate.device` resolves to on its
machine.

Backfill. The deployment `generate-teacher-data/backfill` runs on the schedule in params
(`generate.backfill_interval_seconds` or `generate.backfill_cron`); each scheduled run generates the next
`generate.backfill_shards_per_run` missing shards of the target. `dmd backfill --shards A:B --per-run K` creates
scheduled runs for a range on the Prefect server at PREFECT_API_URL, K shards each, spaced by `--every` from
`--start-at`; each run's shard range is in its parameters (never derived from the clock) and its idempotency
key is `backfill-{a}-{b}-{settings hash}`, so repeating the command creates nothing new. The deployment is
registered when missing. Its runs are executed by a runner serving it: `dmd serve` (which serves it together with
`dmd-pipeline/default`), started in the project directory; to run them on other machines instead, deploy the flow
to a work pool and start `prefect worker start --pool POOL` there.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import time
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from dmd.core.config import GenerateConfig, Params, load
from dmd.data import generate as generation
from dmd.data.generate import (
    GenerationError,
    GenerationPlan,
    ShardResult,
    devices,
    generate_shard,
    parse_shard_range,
    prepare,
    settings_hash,
)
from dmd.data.prompts import PromptLibraryError
from dmd.wan.device import DeviceSlot, pin_slot
from dmd.wan.loading import ModelNotFoundError

from .logs import route_library_logs
from .subflow import run_stage_flow

FLOW_NAME = "generate-teacher-data"
BACKFILL = "backfill"
INPUT_ERRORS = (GenerationError, PromptLibraryError, ModelNotFoundError)
GPU_LIMIT = "gpu"


# The shard on disk is the cache (a complete shard is skipped, a stale one regenerated), so Prefect keeps none.
# Its retries are the settings generate.retries and generate.retry_delay_seconds (flows.retries), given by the flow.
# When the Prefect server has a global concurrency limit named GPU_LIMIT (`prefect gcl create gpu --limit 1`, one
# slot per accelerator), every shard holds one slot while it runs; the flow looks the limit up once and passes its
# name, because acquiring a limit that does not exist costs a round trip and a warning per shard.
@task(name="generate-shard", task_run_name="generate-shard-{shard}", cache_policy=NO_CACHE)
def generate_shard_task(
    plan: GenerationPlan,
    shard: int,
    concurrency_limit: str | None = None,
    worker_slots: list[DeviceSlot] | None = None,
) -> dict:
    """Generate `shard` (or find it complete) on a device slot of this process; returns the ShardResult as a dict.
    `worker_slots`: on a local Dask cluster with several slots, the worker's process takes its own first."""
    if worker_slots:
        _pin_to_dask_worker(worker_slots)
    with concurrency(concurrency_limit or [], occupy=1, strict=False):
        return asdict(generate_shard(plan, shard))


@flow(name=FLOW_NAME)
def generate_teacher_data(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    shards: str | None = None,
    max_shards: int | None = None,
) -> dict:
    """Generate the missing shards of `shards` ('A:B', default all), at most `max_shards` of them."""
    route_library_logs()  # the stage's own lines, also in runs a served deployment starts in a new process
    run_shards = functools.partial(_run_shard_tasks, logger=get_run_logger())
    report = generation.generate_teacher_data(load(params_file, overrides), shards, max_shards, run_shards)
    return asdict(report)


def _run_shard_tasks(plan: GenerationPlan, todo: list[int], logger) -> tuple[list[ShardResult], list[int]]:
    """The stage's ShardRunner: one Prefect task per shard on the task runner, with the settings' retries; a
    failed shard is logged and the others go on."""
    cfg = plan.params.generate
    limit = _gpu_limit(logger)
    task = generate_shard_task.with_options(retries=cfg.retries, retry_delay_seconds=cfg.retry_delay_seconds)
    total = sum(len(plan.samples(k)) for k in todo)
    done, results, failed = 0, [], []
    start = time.perf_counter()
    slots = devices(plan.params)
    where = "as each Dask worker finds them" if cfg.dask_address else ", ".join(str(s) for s in slots)
    logger.info(
        "devices (generate.device=%s): %s; %d shard(s) in flight per device", cfg.device, where, cfg.workers
    )
    parameters = {"plan": plan, "concurrency_limit": limit, "worker_slots": _local_dask_slots(cfg, slots)}
    with _task_runner(cfg, slots) as runner:
        futures = {runner.submit(task, {**parameters, "shard": k}): k for k in todo}
        for future in as_completed(list(futures)):
            shard = futures[future]
            try:
                result = ShardResult(**future.result())
            except Exception as e:  # the task's own error, after its retries; the other shards go on
                logger.error("shard %d failed: %s", shard, e)
                failed.append(shard)
                continue
            results.append(result)
            done += len(plan.samples(shard))
            elapsed = time.perf_counter() - start
            rate = done / elapsed
            logger.info(
                "shard %d done on %s (%d videos, %d trajectories, %.1f s, teacher %.1f s) | %d/%d videos, "
                "%.2f videos/s, ETA %.0f s",
                shard,
                result.device or "no device",
                result.videos,
                result.trajectories,
                result.seconds,
                result.sampling_seconds,
                done,
                total,
                rate,
                (total - done) / rate,
            )
    return results, sorted(failed)


def _task_runner(cfg: GenerateConfig, slots: list[DeviceSlot] | None = None):
    """The task runner of `generate.task_runner` for the device slots `slots` (default: one)."""
    per_device = len(slots or [None])
    if cfg.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        # One device: `workers` processes, each with its own teacher (on the CPU they sample side by side). Several:
        # one process per device, its shards on `workers` threads sharing its teacher, as threads do in this process.
        processes, threads = (cfg.workers, 1) if per_device == 1 else (per_device, cfg.workers)
        # scheduler, workers and dashboard on loopback only (the dashboard would listen on every interface)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": processes,
                "threads_per_worker": threads,
                "host": "127.0.0.1",
                "dashboard_address": "127.0.0.1:0",
            }
        )
    return ThreadPoolTaskRunner(max_workers=cfg.workers * per_device)


def _local_dask_slots(cfg: GenerateConfig, slots: list[DeviceSlot]) -> list[DeviceSlot] | None:
    """The slots the workers of a local Dask cluster pin themselves to (worker i: slot i), or None when shards
    lease from every slot of their process (threads, an existing cluster, a single slot)."""
    if cfg.task_runner != "dask" or cfg.dask_address or len(slots) == 1:
        return None
    return slots


def _pin_to_dask_worker(slots: list[DeviceSlot]) -> None:
    """Pin this Dask worker process to its slot: LocalCluster names its workers 0..n-1 and a worker the nanny
    restarts keeps its name, so worker i always leases slot i and loads one teacher, on that device."""
    from distributed import get_worker

    pin_slot(slots[int(get_worker().name) % len(slots)])


def _gpu_limit(logger) -> str | None:
    """GPU_LIMIT when the server has that global concurrency limit, else None (shards are then not throttled)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            logger.info(
                "no global concurrency limit '%s': shards are not throttled across flow runs "
                "(create one with `prefect gcl create %s --limit N`, N = accelerators)",
                GPU_LIMIT,
                GPU_LIMIT,
            )
            return None
    logger.info("each shard holds a slot of the global concurrency limit '%s'", GPU_LIMIT)
    return GPU_LIMIT


def main(args) -> int:
    """`dmd generate`: inputs are checked here, before Prefect starts, so bad input costs no sampling."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        plan = prepare(load(args.params, args.overrides))
        parse_shard_range(args.shards, plan.num_shards)
        run_stage_flow(
            generate_teacher_data, params_file=args.params, overrides=args.overrides, shards=args.shards
        )
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------------------------------
# Backfill


def backfill_deployment(params_file: str = "params.yaml", overrides: list[str] | None = None):
    """The `generate-teacher-data/backfill` RunnerDeployment: on its schedule, the next missing shards."""
    cfg = load(params_file, overrides).generate
    return generate_teacher_data.to_deployment(
        name=BACKFILL,
        interval=cfg.backfill_interval_seconds,
        cron=cfg.backfill_cron,
        parameters={
            "params_file": params_file,
            "overrides": list(overrides or []),
            "max_shards": cfg.backfill_shards_per_run,
        },
        description="Teacher data backfill: each run generates the next missing shards (or the range it is given).",
        tags=["dmd", "generate", "backfill"],
    )


def parse_duration(text: str) -> timedelta:
    """'90s', '10m', '1h30m', '2d', '1 day 6 hours' (pandas' Timedelta reads them), or a number of seconds."""
    import pandas as pd

    text = text.strip()
    try:
        value = pd.Timedelta(seconds=float(text))
    except ValueError:
        try:  # pandas spells days 'D' ('d' is deprecated there)
            value = pd.Timedelta(re.sub(r"(?<=\d)\s*d(?![a-z])", "D", text))
        except ValueError:
            value = None
    if value is None or pd.isna(value) or value < pd.Timedelta(0):
        raise GenerationError(f"--every {text!r}: expected a duration such as 90s, 10m, 1h30m or 2d")
    return value.to_pytimedelta()


def parse_time(text: str | None) -> datetime:
    """An ISO time (local time when it has no zone); None means now."""
    if text is None:
        return datetime.now(timezone.utc)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise GenerationError(f"--start-at {text!r}: expected an ISO time such as 2025-01-31T22:00") from None
    return when if when.tzinfo else when.astimezone()


def backfill_chunks(shards: range, per_run: int) -> list[range]:
    if per_run < 1:
        raise GenerationError(f"--per-run {per_run}: must be at least 1")
    return [range(a, min(a + per_run, shards.stop)) for a in range(shards.start, shards.stop, per_run)]


def schedule_backfill(
    params: Params,
    params_file: str,
    overrides: list[str] | None,
    chunks: list[range],
    start: datetime,
    every: timedelta,
) -> tuple[list, list]:
    """Create one scheduled run per chunk of shards on the server; returns (created runs, already existing)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterIdempotencyKey,
    )
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Scheduled

    tag = settings_hash(params)
    keys = {f"backfill-{c.start}-{c.stop}-{tag}": (i, c) for i, c in enumerate(chunks)}
    created, existing = [], []
    with get_client(sync_client=True) as client:
        try:
            deployment_id = client.read_deployment_by_name(f"{FLOW_NAME}/{BACKFILL}").id
        except ObjectNotFound:
            deployment_id = backfill_deployment(params_file, overrides).apply()
        found = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
                idempotency_key=FlowRunFilterIdempotencyKey(any_=list(keys)),
            )
        )
        existing = sorted(found, key=lambda r: r.idempotency_key)
        known = {r.idempotency_key for r in found}
        for key, (i, chunk) in keys.items():
            if key in known:
                continue
            created.append(
                client.create_flow_run_from_deployment(
                    deployment_id,
                    parameters={
                        "params_file": params_file,
                        "overrides": list(overrides or []),
                        "shards": f"{chunk.start}:{chunk.stop}",
                        "max_shards": None,
                    },
                    state=Scheduled(scheduled_time=start + i * every),
                    name=f"backfill-shards-{chunk.start:05d}-{chunk.stop:05d}",
                    tags=["backfill"],
                    idempotency_key=key,
                )
            )
    return created, existing


def backfill_main(args) -> int:
    """`dmd backfill --shards A:B [--per-run K] [--start-at TIME] [--every DURATION]`."""
    from prefect.settings import get_current_settings

    params = load(args.params, args.overrides)
    try:
        chunks = backfill_chunks(parse_shard_range(args.shards, params.generate.num_shards), args.per_run)
        start, every = parse_time(args.start_at), parse_duration(args.every)
    except GenerationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not get_current_settings().api.url:
        print(
            "error: dmd backfill needs a Prefect server: start one with `prefect server start --host 127.0.0.1` "
            "and `export PREFECT_API_URL=http://127.0.0.1:4200/api`",
            file=sys.stderr,
        )
        return 2
    params_file = str(Path(args.params).resolve())
    created, existing = schedule_backfill(params, params_file, args.overrides, chunks, start, every)
    for run in created:
        print(
            f"scheduled {run.name} (shards {run.parameters['shards']}) at {run.state.state_details.scheduled_time}"
        )
    for run in existing:
        print(f"exists    {run.name} (shards {run.parameters['shards']}), state {run.state_name}")
    print(
        f"{len(created)} run(s) created, {len(existing)} already there. They run where "
        f"{FLOW_NAME}/{BACKFILL} is served: `dmd serve` in the project directory."
    )
    return 0
