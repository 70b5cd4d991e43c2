"""Backfill against a real Prefect server on loopback: `dmd backfill` creates scheduled runs once (idempotency
keys), a runner serving generate-teacher-data/backfill executes them and fills exactly their shards, and a run
with the deployment's own parameters (as its schedule makes) generates the next missing shard."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from dmd.core.config import load
from dmd.data.generate import missing_shards, prepare
from flows.local_server import stop_process

REPO = Path(__file__).resolve().parents[1]
DMD = str(Path(sys.executable).parent / "dmd")
# 10 videos in shards of 2: a target of 5 shards; no schedule, so the server makes no runs of its own
OVERRIDES = ["generate.num_videos=10", "generate.backfill_interval_seconds=null"]


def _backfill(params_file: Path, *options: str) -> str:
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    proc = subprocess.run(
        [DMD, "backfill", "--params", str(params_file), *sets, *options],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@contextmanager
def _client(api_url: str) -> Iterator:
    """A client of the test server, whatever API URL this process's Prefect settings were loaded with."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def _runs(api_url: str, deployment_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with _client(api_url) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))
        )


def _wait(api_url: str, deployment_id, count: int, runner: subprocess.Popen, timeout: float = 300) -> list:
    deadline = time.monotonic() + timeout
    while True:
        runs = _runs(api_url, deployment_id)
        finals = [r for r in runs if r.state and r.state.is_final()]
        if len(finals) >= count:
            return runs
        assert runner.poll() is None, "the runner exited"
        assert time.monotonic() < deadline, [(r.name, r.state_name) for r in runs]
        time.sleep(1)


@pytest.mark.slow
def test_backfill_creates_runs_once_and_a_runner_fills_the_shards(prefect_server, tiny_params_file):
    first = _backfill(tiny_params_file, "--shards", "0:4", "--per-run", "2", "--every", "1s")
    assert "2 run(s) created, 0 already there" in first
    with _client(prefect_server) as client:
        deployment = client.read_deployment_by_name("generate-teacher-data/backfill")
    runs = _runs(prefect_server, deployment.id)
    assert sorted(r.parameters["shards"] for r in runs) == ["0:2", "2:4"]
    assert all(r.state_name == "Scheduled" and r.idempotency_key.startswith("backfill-") for r in runs)
    start = {r.parameters["shards"]: r.state.state_details.scheduled_time for r in runs}
    assert (start["2:4"] - start["0:2"]).total_seconds() == pytest.approx(1)

    second = _backfill(tiny_params_file, "--shards", "0:4", "--per-run", "2")
    assert "0 run(s) created, 2 already there" in second
    assert len(_runs(prefect_server, deployment.id)) == 2

    params = load(tiny_params_file, OVERRIDES)
    assert missing_shards(prepare(params)) == [0, 1, 2, 3, 4]
    # one accelerator: both runs' shards take turns on the global concurrency limit `gpu`
    with _client(prefect_server) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu", limit=1))
    serve = (
        "import sys; from prefect import serve; from flows.generate import backfill_deployment; "
        "serve(backfill_deployment(sys.argv[1], sys.argv[2:]))"
    )
    runner = subprocess.Popen(
        [sys.executable, "-c", serve, str(tiny_params_file.resolve()), *OVERRIDES],
        cwd=REPO,
        env={
            **os.environ,
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",  # the runs' info logs reach the server
            "OMP_NUM_THREADS": "1",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        runs = _wait(prefect_server, deployment.id, 2, runner)
        assert sorted(r.state_name for r in runs) == ["Completed", "Completed"]
        assert missing_shards(prepare(params)) == [4]
        with _client(prefect_server) as client:
            assert client.read_global_concurrency_limit_by_name("gpu").active_slots == 0  # released
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
            used = {
                log.flow_run_id
                for log in logs
                if "holds a slot of the global concurrency limit" in log.message
            }
            assert used == {r.id for r in runs}
            client.delete_global_concurrency_limit_by_name("gpu")

        # a run as the schedule makes it: the deployment's parameters, i.e. the next missing shard(s)
        with _client(prefect_server) as client:
            client.create_flow_run_from_deployment(deployment.id)
        runs = _wait(prefect_server, deployment.id, 3, runner)
        assert sorted(r.state_name for r in runs) == ["Completed"] * 3
        assert missing_shards(prepare(params)) == []
    finally:
        stop_process(runner)
