"""Prefect flows: orchestration only. One flow per stage, each with its tasks beside it; the `dmd-pipeline` parent
flow and deployments. Installed as `dmd_pipeline.flows`; its modules import one another relatively, so they run
both from a checkout (`python -m flows.cli`, prefect.yaml's `flows/...py` entrypoints) and from the wheel."""
