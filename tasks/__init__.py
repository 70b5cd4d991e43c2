"""Thin Prefect tasks over the `dmd` library: I/O units, retries, concurrency; no algorithm."""
