"""Prefect flows: orchestration only. One flow per stage, the `dmd-pipeline` parent flow and deployments."""
