"""The `dmd-pipeline` flow: the DVC DAG reproduced stage by stage, DVC alone deciding what is stale.

One Prefect task per stage runs `dvc repro --single-item <stage>` in the workspace, in the order `dvc repro`
itself would use, and streams the stage's output into the run's logs line by line. So `dvc repro`,
`dmd pipeline` and the `dmd-pipeline/default` deployment all leave the same dvc.lock. Each stage command's own flow
run is recorded as a subflow of its stage task (flows/subflow.py), so the pipeline run holds the whole DAG's runs.

Overrides (`--set section.key=value`, or the deployment's `overrides` parameter) are read as every `dmd --set`
reads them and written into params.yaml with DVC's own YAML writer, as `dvc exp run -S` writes them, before any
stage runs: dvc.lock must describe the settings the outputs were made with, and params.yaml is where DVC reads
them. They are checked against the typed settings first; if the result does not validate, params.yaml is left as
it was.

Only one DVC operation runs at a time per workspace: with a Prefect server, runs queue on a global
concurrency limit named after the workspace (created on first use); DVC's own lock is the last line of
defence, and hitting it raises `WorkspaceBusyError` naming the process that holds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_logger
from pydantic import SecretStr

from dmd.core.config import ConfigError, load, set_overrides
from dmd.core.io import process_running

from .retries import retry_options

PARAMS_FILE = "params.yaml"  # the file dvc.yaml's `params:` entries are read from
LOCK_MESSAGES = ("Unable to acquire lock", "is busy, it is being blocked by")
CONFIG_EXIT_CODE = 2  # what `dmd` returns for bad settings; retrying cannot fix those
TAIL_LINES = 40


class WorkspaceBusyError(RuntimeError):
    """Another DVC operation holds the workspace's lock."""

    retryable = False


class StageFailedError(RuntimeError):
    """A stage's `dvc repro` failed; the message ends with the last lines of its output."""

    def __init__(self, stage: str, message: str, retryable: bool):
        super().__init__(message)
        self.stage = stage
        self.retryable = retryable


# --------------------------------------------------------------------------------------------------------------
# The workspace and its DAG


def workspace_of(params_file: str | os.PathLike) -> Path:
    """The DVC workspace a params file belongs to; it must be that workspace's params.yaml."""
    path = Path(params_file).resolve()
    if path.name != PARAMS_FILE:
        raise ConfigError(
            str(params_file),
            [
                f"dvc.yaml reads its settings from {PARAMS_FILE}; copy this file to {path.parent / PARAMS_FILE} "
                "or use --set / `dvc exp run -S` to change single settings"
            ],
        )
    if not (path.parent / "dvc.yaml").exists():
        raise ConfigError(
            str(params_file), [f"no dvc.yaml next to it: {path.parent} is not the pipeline's workspace"]
        )
    load(path)  # a readable, valid settings file before anything runs
    return path.parent


def stage_order(workspace: Path, target: str | None = None) -> list[str]:
    """The stages `dvc repro [target]` would visit, in the order it visits them (upstream first)."""
    from dvc.dvcfile import PROJECT_FILE
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    with Repo(str(workspace)) as repo:
        try:
            project = str(workspace / PROJECT_FILE)
            stages = collect_stages(repo, [f"{project}:{target}" if target else project])
        except DvcException as e:
            names = sorted(s.addressing for s in repo.index.stages)
            raise ConfigError("target", [f"{target!r}: {e}; stages: {', '.join(names)}"]) from None
        return [_address(s, workspace) for s in plan_repro(get_active_graph(repo.index.graph), stages)]


def _address(stage, workspace: Path) -> str:
    """How `dvc repro` run in `workspace` names a stage: `name` in the top dvc.yaml, else `file:name`."""
    file = os.path.relpath(stage.path, workspace)
    name = getattr(stage, "name", None)
    if not name:
        return file
    return name if file == "dvc.yaml" else f"{file}:{name}"


def workspace_limit_name(workspace: Path) -> str:
    """The Prefect global concurrency limit guarding one workspace (one clone on one machine)."""
    key = f"{socket.gethostname()}:{workspace.resolve()}"
    return f"dvc-workspace-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def lock_holders(workspace: Path) -> list[str]:
    """Who holds DVC's locks in `workspace`, one line per process: the repository lock's holder and the stage
    locks recorded in `.dvc/tmp/rwlock`. An entry of a process that no longer runs is marked as stale (DVC drops
    such entries itself when it next takes a lock); an unreadable rwlock is reported as such."""
    tmp = workspace / ".dvc" / "tmp"
    lines = []
    repo_lock = _repository_lock_holder(tmp / "lock")
    if repo_lock is not None:
        lines.append(f"PID {repo_lock} holds the repository lock .dvc/tmp/lock")
    try:
        lock = json.loads((tmp / "rwlock").read_text())
    except FileNotFoundError:
        return lines
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return [*lines, f"{tmp / 'rwlock'} is damaged: {RWLOCK_HINT}"]
    holders: dict[int, dict] = {}
    for mode in ("write", "read"):
        for path, infos in lock.get(mode, {}).items():
            for info in infos if isinstance(infos, list) else [infos]:
                entry = holders.setdefault(int(info["pid"]), {"cmd": info["cmd"], "write": [], "read": []})
                entry[mode].append(os.path.relpath(path, workspace) if os.path.isabs(path) else path)
    for pid, entry in sorted(holders.items()):
        what = "; ".join(
            f"{mode}s {', '.join(sorted(entry[mode]))}" for mode in ("write", "read") if entry[mode]
        )
        stale = (
            "" if process_running(pid) else " (not running any more: a stale entry, not what blocks this run)"
        )
        lines.append(f"PID {pid} ({entry['cmd']}) {what}{stale}")
    return lines


RWLOCK_HINT = (
    "DVC cannot read its lock file (a DVC process killed while writing it, or a full disk). If no DVC command "
    "is running in this workspace, delete .dvc/tmp/rwlock and run again; DVC recreates it."
)
RWLOCK_MESSAGES = ("Unable to read RWLock-file",)


def _repository_lock_holder(path: Path) -> int | None:
    """The PID zc.lockfile writes into DVC's repository lock, when a running process holds it."""
    try:
        pid = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and process_running(pid) else None


def busy_message(workspace: Path, stage: str, dvc_line: str) -> str:
    holders = lock_holders(workspace)
    who = (
        "\n".join(f"  {h}" for h in holders)
        or "  (the repository lock .dvc/tmp/lock; no stage lock recorded)"
    )
    return (
        f"stage {stage!r}: the DVC workspace {workspace} is busy; another DVC operation holds its lock:\n"
        f"{who}\n"
        f"DVC said: {dvc_line.strip()}\n"
        "Wait for that run to finish (or stop it), then run again; nothing was changed by this attempt. "
        f"If no such process exists any more, delete {workspace / '.dvc' / 'tmp' / 'rwlock'} (a lock left by "
        "a killed run)."
    )


# --------------------------------------------------------------------------------------------------------------
# Tasks


def _retry_if_retryable(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as e:  # the task's exception, re-raised by result()
        return getattr(e, "retryable", True)
    return True


def _child_env(parent_task_run_id: str) -> dict[str, str]:
    """The stage commands' environment: our interpreter's scripts first on PATH (dvc.yaml calls `dmd`), the
    Prefect API this run talks to, so the stage flows report to the same server instead of each starting a
    temporary one, and the stage task's run, so each stage's flow run is recorded as its subflow
    (flows/subflow.py)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    from .logs import UNSTAMPED_CONSOLE_FORMATS
    from .subflow import PARENT_TASK_RUN_ENV

    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    with get_client(sync_client=True) as client:
        env["PREFECT_API_URL"] = str(client.api_url).rstrip("/")
    if get_current_settings().ui_url == "":  # a temporary server: no links to it (flows/cli.py)
        env["PREFECT_UI_URL"] = ""
    env.update(UNSTAMPED_CONSOLE_FORMATS)  # the task's log stamps each copied line
    env[PARENT_TASK_RUN_ENV] = parent_task_run_id
    return env


@task(
    name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retry_condition_fn=_retry_if_retryable
)
def reproduce_stage(stage: str, workspace: str) -> str:
    """`dvc repro --single-item <stage>`, its output streamed to the run's logs.

    Returns 'ran', 'restored from the run cache' or 'up to date'."""
    from prefect.runtime import task_run

    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    busy_line = damaged_lock = None
    outcome = "up to date"
    proc = subprocess.Popen(
        cmd,
        cwd=workspace,
        env=_child_env(task_run.id),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # universal newlines: progress bars' \r also end a line
        line = line.rstrip()
        if not line:
            continue
        logger.info("%s", line)
        tail.append(line)
        if any(m in line for m in LOCK_MESSAGES):
            busy_line = line
        if any(m in line for m in RWLOCK_MESSAGES):
            damaged_lock = line
        if line.startswith(f"Running stage '{stage}'"):
            outcome = "ran"
        elif line.startswith(f"Stage '{stage}' is cached - skipping run"):
            outcome = "restored from the run cache"
    code = proc.wait()
    if code == 0:
        return outcome
    if busy_line is not None:
        raise WorkspaceBusyError(busy_message(Path(workspace), stage, busy_line))
    if damaged_lock is not None:  # a retry meets the same file
        raise StageFailedError(
            stage, f"stage {stage!r}: {RWLOCK_HINT}\nDVC said: {damaged_lock.strip()}", retryable=False
        )
    bad_settings = any(f"exited with {CONFIG_EXIT_CODE}" in line for line in tail)
    raise StageFailedError(
        stage,
        f"stage {stage!r} failed (`{' '.join(cmd[1:])}` exited with {code}); last lines:\n" + "\n".join(tail),
        retryable=not bad_settings,
    )


@task(name="apply-overrides", cache_policy=NO_CACHE)
def apply_overrides(params_file: str, overrides: list[str]) -> None:
    """Write `section.key=value` overrides into params.yaml with DVC's own YAML writer (comments and layout kept,
    as `dvc exp run -S` writes them); all or nothing. The values are read as every `dmd --set` reads them
    (dmd.core.config.set_overrides), not with Hydra's grammar, so one override means the same to every command."""
    from dvc.utils.serialize import modify_yaml

    path = Path(params_file)
    load(path, overrides)  # typed check first: unknown keys and bad values are named before any write
    original = path.read_bytes()
    try:
        with modify_yaml(str(path)) as data:
            set_overrides(data, list(overrides))
        load(path)
    except Exception as e:
        path.write_bytes(original)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError("overrides", [f"{overrides}: {e}"]) from None
    get_run_logger().info("params.yaml updated: %s", ", ".join(overrides))


# --------------------------------------------------------------------------------------------------------------
# The flow


# The failure hook receives the run as the server stores it, with `notify_url` redacted; the flow body leaves the
# URL here for it, keyed by the run's id.
_NOTIFY_URLS: dict[str, str] = {}


def notify_failure(flow, flow_run, state) -> None:
    """on_failure hook: log what failed and, when the run has a `notify_url` or `notify_secret`, POST it a JSON
    summary. The URL's path and query carry its token: logs and the summary show it reduced to its host."""
    from dmd.training.webhooks import Webhook, WebhookConfig, redact_url

    logger = get_logger("dmd.pipeline")
    logger.error("dmd-pipeline run %s failed: %s", flow_run.name, state.message)
    url = _NOTIFY_URLS.pop(str(flow_run.id), None)
    if url is None and flow_run.parameters.get("notify_secret"):
        try:
            url = _secret_url(flow_run.parameters["notify_secret"])
        except Exception as e:  # a notification must never mask the failure itself
            logger.warning("failure notification: %s", e)
            return
    if not url:
        return
    parameters = dict(flow_run.parameters)
    if "://" in str(parameters.get("notify_url") or ""):  # a deployment run's plain string
        parameters["notify_url"] = redact_url(parameters["notify_url"])
    # Webhook.send never raises and names the URL by its host only
    Webhook(WebhookConfig(webhook_url=url)).send(
        "failure",
        f"dmd-pipeline run {flow_run.name} failed: {state.message}",
        flow=flow.name,
        flow_run=flow_run.name,
        flow_run_id=str(flow_run.id),
        state=state.name,
        parameters=parameters,
    )


def _redact_stored_url(flow_run_id: str, url: str) -> None:
    """Prefect stores a run's parameters as the caller passed them: keep `notify_url` reduced to its host there."""
    from prefect.client.orchestration import get_client

    from dmd.training.webhooks import redact_url

    with get_client(sync_client=True) as client:
        parameters = client.read_flow_run(flow_run_id).parameters
        if parameters.get("notify_url") == url:
            client.update_flow_run(flow_run_id, parameters={**parameters, "notify_url": redact_url(url)})


def _secret_url(block_name: str) -> str:
    from prefect.blocks.system import Secret

    try:
        return str(Secret.load(block_name).get())
    except ValueError as e:
        raise ConfigError(
            "notify_secret",
            [f"no Prefect Secret block {block_name!r} ({e}); create it with Secret(value=URL)"],
        ) from None


@contextmanager
def workspace_slot(workspace: Path, timeout_seconds: float | None):
    """Hold the workspace's Prefect concurrency slot, creating the limit (1 slot) on first use.

    Without a Prefect server (the temporary one `dmd pipeline` starts on its own) no other run can share
    the slot, so DVC's lock alone guards the workspace."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import get_current_settings

    logger = get_run_logger()
    if not get_current_settings().api.url:
        logger.info("no Prefect server configured: DVC's own lock guards the workspace")
        yield
        return
    name = workspace_limit_name(workspace)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass
    logger.info("waiting for concurrency slot %r (workspace %s)", name, workspace)
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield


@flow(name="dmd-pipeline", on_failure=[notify_failure], log_prints=True)
def dmd_pipeline(
    params_file: str = PARAMS_FILE,
    overrides: list[str] | None = None,
    target: str | None = None,
    notify_url: SecretStr | None = None,
    wait_for_workspace_seconds: float | None = None,
    notify_secret: str | None = None,
) -> dict[str, str]:
    """Reproduce the DAG up to `target` (default: every stage) in the workspace of `params_file`.

    `overrides` are written into params.yaml first (as `dvc exp run -S` would); `notify_url`, or the URL in the
    Prefect Secret block named `notify_secret`, receives a JSON POST if the run fails. The run's stored parameters
    hold `notify_url` reduced to its host once the run starts; with `notify_secret` the URL is never stored at all.
    `wait_for_workspace_seconds` bounds the wait for another run on this workspace (None: wait). Returns
    {stage: what DVC did}."""
    from prefect.runtime import flow_run

    if notify_url is not None:
        _NOTIFY_URLS[str(flow_run.id)] = notify_url.get_secret_value()
        _redact_stored_url(flow_run.id, notify_url.get_secret_value())
    if notify_secret is not None:
        _secret_url(notify_secret)  # a missing block is named now, not after a failure
    logger = get_run_logger()
    workspace = workspace_of(params_file)
    params_path = str(workspace / PARAMS_FILE)
    results: dict[str, str] = {}
    with workspace_slot(workspace, wait_for_workspace_seconds):
        if overrides:
            apply_overrides(params_path, overrides)
        stages = stage_order(workspace, target)
        logger.info("stages in order: %s", " -> ".join(stages))
        for stage in stages:
            name = stage.rsplit(":", 1)[-1]
            run = reproduce_stage.with_options(**retry_options(f"dvc-stage/{name}"))
            results[stage] = run(stage, str(workspace))
    logger.info("done: %s", ", ".join(f"{s} {r}" for s, r in results.items()))
    _NOTIFY_URLS.pop(str(flow_run.id), None)
    return results


# --------------------------------------------------------------------------------------------------------------
# Commands


def main(args) -> int:
    """`dmd pipeline`: the flow in this process (a temporary Prefect server unless PREFECT_API_URL is set)."""
    try:
        results = dmd_pipeline(params_file=args.params, overrides=args.overrides or None, target=args.target)
    except (WorkspaceBusyError, StageFailedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(f"{stage}: {result}" for stage, result in results.items()))
    report = Path(args.params).resolve().parent / load(args.params).evaluate.report_dir / "eval.md"
    if any(stage.rsplit(":", 1)[-1] == "evaluate" for stage in results) and report.is_file():
        print(
            f"report: {os.path.relpath(report)}; figures: `dvc metrics show`; training curves and samples: "
            "`dvc plots show`"
        )
    return 0


def serve_main(args) -> int:
    """`dmd serve`: a runner for `dmd-pipeline/default` and `generate-teacher-data/backfill`."""
    from prefect import serve
    from prefect.settings import get_current_settings

    from .generate import backfill_deployment

    if not get_current_settings().api.url:
        print(
            "error: dmd serve needs a Prefect server: start one with `prefect server start --host 127.0.0.1` "
            "and `export PREFECT_API_URL=http://127.0.0.1:4200/api`",
            file=sys.stderr,
        )
        return 2
    params_file = str(workspace_of(args.params) / PARAMS_FILE)
    pipeline = dmd_pipeline.to_deployment(
        name="default",
        parameters={"params_file": params_file, "overrides": list(args.overrides or [])},
        description="The whole DAG (dvc repro, stage by stage); parameters: overrides, target, notify_secret "
        "(a Prefect Secret block holding the failure webhook's URL).",
        tags=["dmd"],
    )
    serve(pipeline, backfill_deployment(params_file))
    return 0
