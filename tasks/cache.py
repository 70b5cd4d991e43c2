"""Prefect tasks of the cache stage: plan, embed captions, encode one chunk, finish.

The shards on disk are the cache (content-addressed, so a re-run finds what is done), so Prefect keeps none.
An interrupted chunk leaves no shard behind (atomic writes); its retry re-encodes it.
"""

from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from dmd.core.config import Params
from dmd.data import cache


@task(name="plan-cache", cache_policy=NO_CACHE)
def plan_cache_task(params: Params) -> cache.Plan:
    return cache.plan_cache(params)


@task(name="embed-captions", cache_policy=NO_CACHE, retries=1)
def embed_captions_task(params: Params, plan: cache.Plan) -> pd.DataFrame:
    return cache.encode_texts(params, plan)


@task(name="encode-chunk", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def encode_chunk_task(params: Params, plan: cache.Plan, chunk: list[cache.WorkItem]) -> cache.ChunkResult:
    return cache.encode_chunk(params, plan, chunk)


@task(name="finalize-cache", cache_policy=NO_CACHE)
def finalize_cache_task(
    params: Params, plan: cache.Plan, results: list[cache.ChunkResult], text_rows: pd.DataFrame
) -> cache.CacheSummary:
    summary = cache.finalize_cache(params, plan, results, text_rows)
    cache.write_effective_params(params)
    return summary
