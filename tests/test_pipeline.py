"""The dmd-pipeline flow on a toy DVC workspace (trivial stages) and, end to end, through a Prefect server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from test_dvc import stage_flow_runs_nested

from dmd.core.config import ConfigError, load

FIXTURES = Path(__file__).parent / "fixtures"
BIN = Path(sys.executable).parent

# Trivial stages with the real stage names (so the flow's per-stage retries apply). Each writes a
# deterministic file from the settings it reads; marker files make a stage fail once, fail always, wait, or
# run inside a Prefect flow of its own.
STAGE_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import yaml

    stage = sys.argv[1]
    params = yaml.safe_load(open("params.yaml"))
    print(f"{stage}: starting", flush=True)
    with open("attempts.log", "a") as log:
        log.write(stage + "\\n")
    if Path("bad-settings-" + stage).exists():
        sys.exit(2)
    if Path("fail-once-" + stage).exists():
        Path("fail-once-" + stage).unlink()
        sys.exit("transient failure")
    if Path("fail-always-" + stage).exists():
        sys.exit(f"{stage} cannot work")
    while Path("hold-" + stage).exists():
        time.sleep(0.05)

    def work():
        if stage == "generate":
            n = params["generate"]["num_videos"]
            Path("data").mkdir(exist_ok=True)
            for i in range(n):
                print(f"generate: item {i + 1}/{n}", flush=True)
            Path("data/items.txt").write_text("".join(f"item {i}\\n" for i in range(n)))
        elif stage == "cache":
            Path("cached.txt").write_text(Path("data/items.txt").read_text().upper())
        elif stage == "train":
            steps = params["train"]["max_train_steps"]
            Path("student.txt").write_text(f"{steps} steps on {len(Path('cached.txt').read_text())} bytes\\n")
        elif stage == "evaluate":
            Path("metrics.json").write_text(json.dumps({"score": len(Path("student.txt").read_text())}))

    if Path("as-flow").exists():  # as the dmd stage commands run: inside a Prefect flow of the stage's name
        from prefect import flow
        from dmd_pipeline.flows.subflow import run_stage_flow

        run_stage_flow(flow(name=stage)(work))
    else:
        work()
    print(f"{stage}: done", flush=True)
    """
)

TOY_DVC_YAML = textwrap.dedent(
    """
    stages:
      generate:
        cmd: python stage.py generate
        deps: [stage.py]
        params: [generate.num_videos]
        outs: [data]
      cache:
        cmd: python stage.py cache
        deps: [stage.py, data]
        outs: [cached.txt]
      train:
        cmd: python stage.py train
        deps: [stage.py, cached.txt]
        params: [train.max_train_steps]
        outs: [student.txt]
      evaluate:
        cmd: python stage.py evaluate
        deps: [stage.py, student.txt]
        metrics: [metrics.json]
    """
)


def run(
    cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None, **kwargs
) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    if check and result.returncode:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def git_commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", message], repo)


def make_toy_workspace(root: Path) -> Path:
    """A git + DVC workspace with a valid params.yaml (the tiny profile) and the toy DAG."""
    root.mkdir(parents=True)
    run(["git", "init", "-q"], root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], root)
    shutil.copy(FIXTURES / "tiny.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text(TOY_DVC_YAML)
    (root / "stage.py").write_text(STAGE_SCRIPT)
    (root / ".gitignore").write_text("attempts.log\nhold-*\nfail-*\nbad-settings-*\nas-flow\n")
    git_commit(root, "toy pipeline")
    return root


def lock_of(workspace: Path) -> dict:
    return yaml.safe_load((workspace / "dvc.lock").read_text())


def dvc_status(workspace: Path) -> dict:
    return json.loads(run([str(BIN / "dvc"), "status", "--json"], workspace).stdout)


@pytest.fixture
def toy(tmp_path):
    return make_toy_workspace(tmp_path / "toy")


@pytest.fixture
def api(prefect_server):
    """In-process flow runs report to the test session's Prefect server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server


def attempts(workspace: Path) -> list[str]:
    log = workspace / "attempts.log"
    return log.read_text().split() if log.exists() else []


def clone(source: Path, dest: Path) -> Path:
    run(["git", "clone", "-q", str(source), str(dest)], source.parent)
    return dest


# --------------------------------------------------------------------------------------------------------------
# The flow on trivial stages


def test_flow_leaves_the_same_lock_as_dvc_repro(api, toy, tmp_path):
    from flows.pipeline import dmd_pipeline, stage_order

    other = clone(toy, tmp_path / "other")
    assert stage_order(toy) == ["generate", "cache", "train", "evaluate"]

    (toy / "as-flow").touch()  # each stage runs its own Prefect flow, as the dmd stage commands do
    state = dmd_pipeline(params_file=str(toy / "params.yaml"), return_state=True)
    results = state.result()
    run([str(BIN / "dvc"), "repro"], other)

    assert results == dict.fromkeys(["generate", "cache", "train", "evaluate"], "ran")
    # {stage task: the flow run under it}
    assert stage_flow_runs_nested(state.state_details.flow_run_id) == {s: s for s in results}
    assert lock_of(toy) == lock_of(other)
    assert dvc_status(toy) == {}

    start = time.monotonic()
    again = dmd_pipeline(params_file=str(toy / "params.yaml"))
    assert again == dict.fromkeys(results, "up to date")
    assert attempts(toy) == ["generate", "cache", "train", "evaluate"]  # nothing ran the second time
    assert lock_of(toy) == lock_of(other)
    assert time.monotonic() - start < 30


def test_a_stage_flow_whose_parent_task_run_is_unknown_runs_top_level(api, monkeypatch, caplog, capfd):
    """A stale or foreign DMD_PARENT_TASK_RUN_ID (no such task run on this server) leaves the stage as it runs on
    its own: a top-level flow run, with a warning, and the flow's result."""
    import uuid

    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.subflow import PARENT_TASK_RUN_ENV, run_stage_flow

    @flow(name="lone-stage")
    def lone_stage(value: int = 1) -> str:
        from prefect.runtime import flow_run

        return f"{flow_run.id} {value}"

    unknown = str(uuid.uuid4())
    monkeypatch.setenv(PARENT_TASK_RUN_ENV, unknown)
    run_id, value = run_stage_flow(lone_stage, value=3).split()
    assert value == "3"
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    assert run.parent_task_run_id is None and run.state.is_completed()
    # Prefect's console handler writes it to stderr, or, once logging has been configured to propagate, pytest's
    # log capture holds it
    said = caplog.text + capfd.readouterr().err
    assert f"{PARENT_TASK_RUN_ENV}={unknown}: no such task run" in said


def test_target_stops_after_its_stage(api, toy):
    from flows.pipeline import dmd_pipeline, stage_order

    assert stage_order(toy, "cache") == ["generate", "cache"]
    assert dmd_pipeline(params_file=str(toy / "params.yaml"), target="cache") == {
        "generate": "ran",
        "cache": "ran",
    }
    assert set(lock_of(toy)["stages"]) == {"generate", "cache"}
    with pytest.raises(ConfigError, match="'fit'.*generate, cache, train, evaluate|'fit'.*cache"):
        stage_order(toy, "fit")


def test_overrides_are_written_as_dvc_exp_run_writes_them(api, toy, tmp_path):
    from flows.pipeline import dmd_pipeline

    other = clone(toy, tmp_path / "other")
    dmd_pipeline(params_file=str(toy / "params.yaml"))
    run([str(BIN / "dvc"), "repro"], other)

    results = dmd_pipeline(params_file=str(toy / "params.yaml"), overrides=["train.max_train_steps=5"])
    run([str(BIN / "dvc"), "exp", "run", "-S", "train.max_train_steps=5"], other)

    assert results == {"generate": "up to date", "cache": "up to date", "train": "ran", "evaluate": "ran"}
    text = (toy / "params.yaml").read_text()
    assert text.startswith((FIXTURES / "tiny.yaml").read_text().splitlines()[0])  # comments are kept
    assert load(toy / "params.yaml").train.run.max_train_steps == 5
    assert text == (other / "params.yaml").read_text()
    assert lock_of(toy) == lock_of(other)
    assert dvc_status(toy) == {}


def test_overrides_mean_to_the_pipeline_what_they_mean_to_every_dmd_command(api, toy):
    """One --set grammar: a comma needs no quoting, `key=` is the empty string (as `dvc exp run -S` writes it)."""
    from flows.pipeline import dmd_pipeline

    overrides = [
        "train.validation_prompt=a red square, moving",
        "model.negative_prompt=",
        "generate.num_videos=3",
    ]
    dmd_pipeline(params_file=str(toy / "params.yaml"), overrides=overrides, target="generate")
    assert load(toy / "params.yaml") == load(FIXTURES / "tiny.yaml", overrides)
    assert load(toy / "params.yaml").train.validation.validation_prompt == "a red square, moving"
    text = (toy / "params.yaml").read_text()
    assert text.startswith((FIXTURES / "tiny.yaml").read_text().splitlines()[0])  # comments are kept


def test_bad_override_changes_nothing(api, toy):
    from flows.pipeline import dmd_pipeline

    before = (toy / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match="train.max_train_stepz"):
        dmd_pipeline(params_file=str(toy / "params.yaml"), overrides=["train.max_train_stepz=5"])
    with pytest.raises(ConfigError, match="train.max_train_steps"):
        dmd_pipeline(params_file=str(toy / "params.yaml"), overrides=["train.max_train_steps=-3"])
    assert (toy / "params.yaml").read_bytes() == before
    assert attempts(toy) == []


def test_params_file_must_be_the_workspace_params_yaml(api, toy):
    from flows.pipeline import dmd_pipeline

    shutil.copy(toy / "params.yaml", toy / "other.yaml")
    with pytest.raises(ConfigError, match="dvc.yaml reads its settings from params.yaml"):
        dmd_pipeline(params_file=str(toy / "other.yaml"))


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Hook.received
    server.shutdown()


def test_transient_failure_is_retried(api, toy, monkeypatch):
    import flows.pipeline as pipeline
    import flows.retries as retries

    monkeypatch.setattr(retries, "RETRY_DELAY_SECONDS", 0)
    (toy / "fail-once-generate").touch()
    results = pipeline.dmd_pipeline(params_file=str(toy / "params.yaml"))
    assert results["generate"] == "ran"
    assert attempts(toy) == ["generate", "generate", "cache", "train", "evaluate"]
    assert dvc_status(toy) == {}


def test_failure_is_reported_with_the_stage_output_and_notified(api, toy, webhook, monkeypatch):
    import flows.pipeline as pipeline
    import flows.retries as retries

    monkeypatch.setattr(retries, "RETRY_DELAY_SECONDS", 0)
    url, received = webhook
    (toy / "fail-always-train").touch()
    with pytest.raises(pipeline.StageFailedError, match="(?s)stage 'train' failed.*train cannot work"):
        pipeline.dmd_pipeline(params_file=str(toy / "params.yaml"), notify_url=url)
    assert attempts(toy) == ["generate", "cache", "train", "train"]  # one retry, then evaluate never runs
    assert len(received) == 1
    assert received[0]["flow"] == "dmd-pipeline" and received[0]["state"] == "Failed"
    assert "train cannot work" in received[0]["message"]

    # bad settings (exit code 2) are not retried: a rerun cannot fix them
    (toy / "fail-always-train").unlink()
    (toy / "attempts.log").unlink()
    (toy / "bad-settings-train").touch()
    with pytest.raises(pipeline.StageFailedError, match="exited with 2"):
        pipeline.dmd_pipeline(params_file=str(toy / "params.yaml"))
    assert attempts(toy) == ["train"]


def _stored_run(api_url: str, flow_run_id=None):
    """The newest dmd-pipeline run as the server stores it, and every log line the server holds for it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(), sort=FlowRunSort.START_TIME_DESC, limit=1
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
    return flow_run, "\n".join(entry.message for entry in logs)


def test_a_token_in_the_failure_webhook_url_is_neither_logged_nor_stored(
    api, toy, webhook, monkeypatch, caplog, capfd
):
    import logging

    from prefect.blocks.system import Secret

    import flows.pipeline as pipeline
    import flows.retries as retries
    from dmd.training.webhooks import redact_url

    monkeypatch.setattr(retries, "RETRY_DELAY_SECONDS", 0)
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "INFO")
    url, received = webhook
    token = "T0KEN-" + os.urandom(8).hex()
    (toy / "fail-always-train").touch()
    caplog.set_level(logging.INFO)

    # a URL given to the flow: delivered, and stored reduced to its host
    with pytest.raises(pipeline.StageFailedError):
        pipeline.dmd_pipeline(params_file=str(toy / "params.yaml"), notify_url=f"{url}/{token}")
    assert len(received) == 1 and "train cannot work" in received[0]["message"]
    stored, server_logs = _stored_run(api)
    assert stored.parameters["notify_url"] == redact_url(url)

    # a URL nobody answers: the warning names the host, not the token
    closed = f"http://127.0.0.1:{_free_port()}/{token}"
    with pytest.raises(pipeline.StageFailedError):
        pipeline.dmd_pipeline(params_file=str(toy / "params.yaml"), notify_url=closed)
    logged = caplog.text + "".join(capfd.readouterr())
    assert (
        f"webhook http://127.0.0.1:{closed.split(':')[2].split('/')[0]}/…: failure event not delivered"
        in logged
    )

    # a deployment run names a Secret block; its parameters then hold the name only
    Secret(value=f"{url}/{token}").save("failure-hook", overwrite=True)
    with pytest.raises(pipeline.StageFailedError):
        pipeline.dmd_pipeline(params_file=str(toy / "params.yaml"), notify_secret="failure-hook")
    assert len(received) == 2 and received[1]["parameters"]["notify_secret"] == "failure-hook"
    stored, more_logs = _stored_run(api)
    assert stored.parameters["notify_secret"] == "failure-hook"
    logged += caplog.text + "".join(capfd.readouterr())
    for where, text in [("logs", logged), ("server logs", server_logs + more_logs),
                        ("parameters", json.dumps(stored.parameters)), ("webhook body", json.dumps(received))]:  # fmt: skip
        assert token not in text, where


def _free_port() -> int:
    from flows.local_server import free_port

    return free_port()


def _start_holding_repro(workspace: Path, stage: str) -> subprocess.Popen:
    (workspace / f"hold-{stage}").touch()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    first = subprocess.Popen(
        [str(BIN / "dvc"), "repro"], cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while stage not in attempts(workspace):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read().decode()
        time.sleep(0.1)
    return first


def test_concurrent_repro_fails_fast_and_the_first_is_unaffected(api, toy):
    from flows.pipeline import WorkspaceBusyError, dmd_pipeline

    first = _start_holding_repro(toy, "train")
    try:
        start = time.monotonic()
        second = run([str(BIN / "dvc"), "repro"], toy, check=False)
        assert second.returncode != 0 and "is busy" in second.stderr + second.stdout
        with pytest.raises(WorkspaceBusyError) as err:
            dmd_pipeline(params_file=str(toy / "params.yaml"))
        assert time.monotonic() - start < 30
        message = str(err.value)
        assert (
            f"PID {first.pid} (" in message and "dvc repro) writes student.txt; reads cached.txt" in message
        )
        assert "Wait for that run to finish" in message and "rwlock" in message
    finally:
        (toy / "hold-train").unlink()
    output = first.communicate(timeout=120)[0].decode()
    assert first.returncode == 0, output
    assert attempts(toy) == ["generate", "cache", "train", "evaluate"]
    assert dvc_status(toy) == {}


def test_dmd_pipeline_command_streams_stage_output(toy):
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "INFO"}
    result = run([str(BIN / "dmd"), "pipeline", "--params", str(toy / "params.yaml")], toy, env=env)
    logs = result.stdout + result.stderr
    assert "Task run 'generate' - generate: item 6/6" in logs
    assert "Task run 'evaluate' - Running stage 'evaluate':" in logs
    assert "evaluate: ran" in result.stdout

    (toy / "fail-always-cache").touch()
    cmd = [
        str(BIN / "dmd"),
        "pipeline",
        "--params",
        str(toy / "params.yaml"),
        "--set",
        "generate.num_videos=3",
    ]
    failed = run(cmd, toy, check=False)
    assert failed.returncode == 1 and "stage 'cache' failed" in failed.stderr
    assert "cache cannot work" in failed.stderr


# --------------------------------------------------------------------------------------------------------------
# With a Prefect server: the workspace's concurrency limit


def test_runs_on_one_workspace_queue_on_its_concurrency_limit(api, toy):
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    from flows.pipeline import dmd_pipeline, workspace_limit_name

    name = workspace_limit_name(toy)
    assert dmd_pipeline(params_file=str(toy / "params.yaml"), target="generate") == {"generate": "ran"}
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert limit.limit == 1 and limit.active_slots == 0

    with concurrency(name, occupy=1):  # another run holds the workspace
        with pytest.raises(TimeoutError):
            dmd_pipeline(params_file=str(toy / "params.yaml"), wait_for_workspace_seconds=2)
    assert attempts(toy) == ["generate"]  # the queued run touched nothing
    assert dmd_pipeline(params_file=str(toy / "params.yaml"))["evaluate"] == "ran"


def test_the_busy_message_tells_stale_lock_entries_from_live_ones(toy):
    from flows.pipeline import busy_message

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (toy / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    (toy / ".dvc" / "tmp" / "rwlock").write_text(
        json.dumps(
            {
                "write": {
                    str(toy / "student.txt"): {"pid": gone.pid, "cmd": "dvc repro"},
                    str(toy / "cached.txt"): {"pid": os.getpid(), "cmd": "dvc repro train"},
                },
                "read": {},
            }
        )
    )
    message = busy_message(toy, "train", "ERROR: 'student.txt' is busy, it is being blocked by:")
    # one line per process, in PID order (the finished child's PID may be the lower one once PIDs wrap around)
    live, stale = sorted(
        (line for line in message.splitlines() if line.startswith("  PID")), key=lambda line: "stale" in line
    )
    assert live == f"  PID {os.getpid()} (dvc repro train) writes cached.txt"
    assert stale.startswith(f"  PID {gone.pid} (dvc repro) writes student.txt (not running any more")


def test_a_damaged_dvc_lock_file_is_named_with_what_to_do(api, toy):
    from flows.pipeline import StageFailedError, dmd_pipeline

    (toy / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    (toy / ".dvc" / "tmp" / "rwlock").write_text('{"write": {"data": {"pid": 1')  # cut short
    start = time.monotonic()
    with pytest.raises(StageFailedError) as err:
        dmd_pipeline(params_file=str(toy / "params.yaml"))
    assert "delete .dvc/tmp/rwlock and run again" in str(err.value) and not err.value.retryable
    assert attempts(toy) == [] and time.monotonic() - start < 60  # not retried
