"""Prefect task of the teacher data stage: one shard per task run.

The shard on disk is the cache (a complete shard is skipped, a stale one regenerated), so Prefect keeps none.
Retries come from `generate.retries` through `.with_options` in the flow. When the Prefect server has a global
concurrency limit named `gpu` (`prefect gcl create gpu --limit 1`, one slot per accelerator), every shard
holds one slot while it runs; the flow looks the limit up once and passes its name, because acquiring a limit
that does not exist costs a round trip and a warning per shard.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from dmd.data.generate import GenerationPlan, generate_shard

GPU_LIMIT = "gpu"


@task(
    name="generate-shard",
    task_run_name="generate-shard-{shard}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=10,
)
def generate_shard_task(plan: GenerationPlan, shard: int, concurrency_limit: str | None = None) -> dict:
    """Generate `shard` (or find it complete); returns the ShardResult as a dict."""
    with concurrency(concurrency_limit or [], occupy=1, strict=False):
        return asdict(generate_shard(plan, shard))
