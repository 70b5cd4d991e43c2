"""A PostgreSQL-backed Prefect server, two runners (`dmd serve`), one backfill: every shard done exactly once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from test_dvc import make_tiny_workspace

from dmd.core.config import dump, load

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NUM_SHARDS = 3


@pytest.fixture(scope="module")
def postgres_url():
    """DMD_TEST_POSTGRES_URL when set (CI), else a PostgreSQL started here by scripts/ci-postgres.sh."""
    if os.environ.get("DMD_TEST_POSTGRES_URL"):
        yield os.environ["DMD_TEST_POSTGRES_URL"]
        return
    root = Path(tempfile.mkdtemp(prefix="dmd-postgres-"))
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "ci-postgres.sh"), str(root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    url = result.stdout.strip().splitlines()[-1]
    assert url.startswith("postgresql+asyncpg://"), result.stdout
    try:
        yield url
    finally:
        pg_ctl = next(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), None) or shutil.which("pg_ctl")
        stop = [str(pg_ctl), "-D", str(root / "data"), "-m", "fast", "stop"]
        if os.getuid() == 0:
            stop = ["runuser", "-u", "postgres", "--", *stop]
        subprocess.run(stop, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_prefect(postgres_url, tmp_path_factory):
    from flows.local_server import local_prefect_server

    home = tmp_path_factory.mktemp("prefect-postgres")
    with local_prefect_server(home, {"PREFECT_API_DATABASE_CONNECTION_URL": postgres_url}) as url:
        yield url


def _backfill_runs(client, deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(),
    )


@pytest.mark.slow
def test_backfill_with_two_runners_on_postgres(tmp_path, tiny_wan_dir, postgres_prefect):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ws = make_tiny_workspace(tmp_path / "ws", tiny_wan_dir)
    params = load(
        ws / "params.yaml", ["generate.backfill_interval_seconds=null"]
    )  # runs come from the backfill
    (ws / "params.yaml").write_text(dump(params))
    assert params.generate.num_shards == NUM_SHARDS
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_API_URL": postgres_prefect,
    }
    logs = [open(tmp_path / f"runner-{i}.log", "wb") for i in range(2)]
    runners = [
        subprocess.Popen([str(BIN / "dmd"), "serve"], cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT)
        for log in logs
    ]
    try:
        with temporary_settings({PREFECT_API_URL: postgres_prefect}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 180
            while True:
                try:
                    deployment = client.read_deployment_by_name("generate-teacher-data/backfill")
                    break
                except Exception:
                    assert all(r.poll() is None for r in runners), (tmp_path / "runner-0.log").read_text()
                    assert time.monotonic() < deadline
                    time.sleep(1)
            backfill = subprocess.run(
                [str(BIN / "dmd"), "backfill", "--shards", f"0:{NUM_SHARDS}", "--per-run", "1"],
                cwd=ws,
                env=env,
                capture_output=True,
                text=True,
            )
            assert backfill.returncode == 0, backfill.stdout + backfill.stderr

            deadline = time.monotonic() + 600
            while True:
                runs = _backfill_runs(client, deployment.id)
                if len(runs) == NUM_SHARDS and all(r.state.is_final() for r in runs):
                    break
                assert time.monotonic() < deadline, [(r.name, r.state_name) for r in runs]
                assert all(r.poll() is None for r in runners)
                time.sleep(2)
    finally:
        for runner in runners:
            runner.terminate()
        for runner, log in zip(runners, logs):
            runner.wait(timeout=60)
            log.close()

    assert sorted(r.state_name for r in runs) == ["Completed"] * NUM_SHARDS, [r.state.message for r in runs]
    assert all(r.run_count == 1 for r in runs)  # no run was started twice
    shards = sorted(r.parameters["shards"] for r in runs)
    assert shards == [f"{k}:{k + 1}" for k in range(NUM_SHARDS)]  # each shard in exactly one run
    manifest = pd.read_parquet(ws / "data" / "teacher" / "manifest.parquet")
    assert sorted(manifest["shard"].unique()) == list(range(NUM_SHARDS))
    assert len(manifest) == params.generate.num_videos and manifest["id"].is_unique
