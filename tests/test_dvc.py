"""dvc.yaml: its code deps match what each stage imports, and the real DAG runs end to end on the tiny profile."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dmd.core.config import dump, load

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
BIN = Path(sys.executable).parent
ENTRY_MODULES = {
    "toy_teacher": "dmd.toy.teacher",
    "generate": "dmd.data.generate",
    "cache": "dmd.data.cache.build",
    "ode_init": "dmd.training.ode_init",
    "train": "dmd.training.loop",
    "evaluate": "dmd.evaluation.evaluate",
}
STAGES = list(ENTRY_MODULES)
FLOW_NAMES = {  # the Prefect flow each stage's command runs
    "toy_teacher": "toy-teacher",
    "generate": "generate-teacher-data",
    "cache": "cache",
    "ode_init": "ode-init",
    "train": "train",
    "evaluate": "evaluate",
}


# --------------------------------------------------------------------------------------------------------------
# Helpers shared with tests/test_pipeline.py


def run(
    cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], cwd, check=check)


def git_commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", message], repo)


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def stage_flow_runs_nested(pipeline_run_id) -> dict[str, str]:
    """{stage task: name of the flow under it} for a finished dmd-pipeline run, after checking that every flow run
    started while it ran hangs under one of its task runs, and the pipeline's own run alone is at the top. Runs of
    other deployments (a scheduled backfill served beside it) are not the pipeline's and are left out."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterId,
        FlowRunFilter,
        FlowRunFilterStartTime,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        pipeline = client.read_flow_run(pipeline_run_id)
        during = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                start_time=FlowRunFilterStartTime(after_=pipeline.start_time, before_=pipeline.end_time)
            )
        )
        tasks = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[pipeline.id]))
        )
        flows = client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=[r.flow_id for r in during])))
    during = [r for r in during if r.deployment_id in (None, pipeline.deployment_id)]
    assert [r.id for r in during if r.parent_task_run_id is None] == [pipeline.id]
    stage_tasks = {t.id: t.name for t in tasks}
    flow_names = {f.id: f.name for f in flows}
    children = [r for r in during if r.id != pipeline.id]
    assert all(r.parent_task_run_id in stage_tasks for r in children), children
    return {stage_tasks[r.parent_task_run_id]: flow_names[r.flow_id] for r in children}


def make_tiny_workspace(root: Path, tiny_wan_dir: Path) -> Path:
    """A git + DVC clone of the project's layout: the real dvc.yaml, .dvcignore, .gitignore and dmd/ sources,
    params.yaml from the tiny profile, and a tiny Wan as the toy teacher, recorded as toy_teacher's output
    (`dvc commit`, as the shipped teacher is) so that stage is up to date without training."""
    root.mkdir(parents=True)
    run(["git", "init", "-q"], root)
    dvc("init", "-q", cwd=root)
    dvc("config", "core.analytics", "false", cwd=root)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "dmd", root / "dmd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    overrides = [
        "model.pretrained_model_name_or_path=models/toy-teacher",
        "train.report_to=dvclive",  # the train stage declares dvclive's folder as an output
    ]
    (root / "params.yaml").write_text(
        dump(load(FIXTURES / "tiny.yaml", overrides))
    )  # every key, as dvc.yaml needs
    shutil.copytree(tiny_wan_dir, root / "models" / "toy-teacher")
    dvc("commit", "-f", "toy_teacher", cwd=root)
    git_commit(root, "tiny pipeline")
    return root


# --------------------------------------------------------------------------------------------------------------
# dvc.yaml itself


def _module_file(module: str) -> Path | None:
    for candidate in (
        REPO / (module.replace(".", "/") + ".py"),
        REPO / module.replace(".", "/") / "__init__.py",
    ):
        if candidate.exists():
            return candidate
    return None


def _dmd_imports(path: Path) -> set[str]:
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(parts + ([module] if module else []))
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "dmd" and _module_file(m)}


def code_closure(entry: str) -> set[str]:
    """Every dmd source file `entry` imports, directly or not (function-level imports included)."""
    seen, todo = set(), [entry]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += _dmd_imports(_module_file(module))
    return {str(_module_file(m).relative_to(REPO)) for m in seen}


def _sources(folder: Path) -> set[str]:
    """The dmd source files a folder dep stands for (package `__init__`s hold no code: see the next test)."""
    return {str(p.relative_to(REPO)) for p in folder.rglob("*.py") if p.name != "__init__.py"}


def test_code_deps_are_exactly_what_each_stage_imports():
    """A stage's code deps are exactly the dmd files it imports, and a folder it imports whole is named as the
    folder (so a new module there is a dep without editing dvc.yaml); a file it does not import is never a dep,
    so editing, say, the report writer leaves the train stage up to date."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == STAGES
    for stage, entry in ENTRY_MODULES.items():
        declared, folders = set(), []
        for dep in stages[stage]["deps"]:
            if dep.startswith("dmd/"):
                path = REPO / dep
                if path.is_dir():
                    folders.append(dep)
                    declared |= _sources(path)
                else:
                    declared.add(dep)
        expected = {f for f in code_closure(entry) if not f.endswith("__init__.py")} - {"dmd/core/config.py"}
        assert declared == expected, (
            f"{stage}: missing {sorted(expected - declared)}, not imported {sorted(declared - expected)}"
        )
        whole = {
            str(d.relative_to(REPO))
            for d in (REPO / "dmd").rglob("*")
            if d.is_dir() and d.name != "__pycache__" and _sources(d) and _sources(d) <= expected
        }
        outermost = {d for d in whole if not any(d.startswith(w + "/") for w in whole)}
        assert outermost <= set(folders), (
            f"{stage}: name these folders, not their files: {sorted(outermost - set(folders))}"
        )


def test_package_inits_hold_no_code():
    """Importing a dmd module runs its packages' `__init__`s; they hold only a docstring (and the version), so
    leaving them out of the code deps misses nothing."""
    for init in (REPO / "dmd").rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        assert not [
            n
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef))
        ], init


def test_the_committed_lock_keeps_the_shipped_teacher_up_to_date():
    """The toy teacher is committed with its dvc.lock entry so that a fresh clone never retrains it (42 minutes):
    every file that stage depends on must still have the content the lock records, as `dvc status` compares it."""
    import hashlib

    entry = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]["toy_teacher"]
    stale = [
        dep["path"]
        for dep in entry["deps"]
        if (REPO / dep["path"]).is_file()
        and hashlib.md5((REPO / dep["path"]).read_bytes()).hexdigest() != dep["md5"]
    ]
    assert not stale, (
        f"{stale} changed since the teacher's lock entry: run `dvc commit -f toy_teacher` if the change "
    )
    "leaves the teacher's training as it was, else retrain it (`dvc repro -f toy_teacher`)"


def test_real_params_survive_dvc_set_param(tmp_path):
    """`dvc exp run -S` rewrites params.yaml with DVC's YAML writer; the settings must still read the same."""
    from dvc.utils.hydra import apply_overrides

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(str(tmp_path / "params.yaml"), ["train.max_train_steps=7"])
    before = load(REPO / "params.yaml").model_dump()
    after = load(tmp_path / "params.yaml").model_dump()
    before["train"]["max_train_steps"] = 7
    assert after == before


def test_dag_order_is_the_design_order():
    from flows.pipeline import stage_order

    assert stage_order(REPO) == STAGES


# --------------------------------------------------------------------------------------------------------------
# End to end on the tiny profile


def lineage(lock: dict) -> dict:
    """What a dvc.lock says about each stage, less the hashes of generated artifacts: commands, settings,
    code hashes, and which paths each stage read and wrote."""
    return {
        name: {
            "cmd": stage["cmd"],
            "params": stage.get("params"),
            "deps": {
                d["path"]: d.get("md5") if d["path"].startswith("dmd/") else "artifact" for d in stage["deps"]
            },
            "outs": sorted(o["path"] for o in stage.get("outs", [])),
        }
        for name, stage in lock["stages"].items()
    }


def assert_consistent(lock: dict) -> None:
    """Each stage read exactly the artifact version its upstream stage recorded writing."""
    written = {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
    for name, stage in lock["stages"].items():
        for dep in stage["deps"]:
            if dep["path"] in written:
                assert dep["md5"] == written[dep["path"]], f"{name} read another {dep['path']}"


def _wait_for_deployment(client, name: str, runner: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            client.read_deployment_by_name(name)
            return
        except Exception:
            assert runner.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(1)


def _deployment_run(client, deployment_name: str):
    """The deployment's (single) flow run."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deployment = client.read_deployment_by_name(deployment_name)
    (flow_run,) = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
    )
    return flow_run


def _run_logs(client, deployment_name: str) -> str:
    """Every log line of the deployment's (single) flow run, as the server stored them."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    flow_run = _deployment_run(client, deployment_name)
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id]))
    lines: list[str] = []
    while page := client.read_logs(log_filter=log_filter, limit=200, offset=len(lines)):
        lines += [entry.message for entry in page]
    return "\n".join(lines)


@pytest.mark.slow
def test_dvc_repro_and_the_deployment_agree_end_to_end(tmp_path, tiny_wan_dir, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ws = make_tiny_workspace(tmp_path / "ws", tiny_wan_dir)
    served = tmp_path / "served"
    run(["git", "clone", "-q", str(ws), str(served)], tmp_path)
    status = json.loads(dvc("status", "--json", cwd=ws).stdout)
    assert "toy_teacher" not in status and set(status) == set(STAGES[1:])  # shipped teacher: up to date

    # 1. dvc repro from the clean clone runs every stage but the shipped teacher
    first = dvc("repro", cwd=ws)
    assert ran_stages(first.stdout) == STAGES[1:]
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert_consistent(
        lock
    )  # lineage: the cache hash that trained the student, the student that was evaluated
    assert {o["path"] for o in lock["stages"]["evaluate"]["outs"]} == {
        "metrics/eval.json",
        "reports",
        "eval_reference",
    }
    assert json.loads(dvc("status", "--json", cwd=ws).stdout) == {}

    # 2. the same DAG through a Prefect server, a runner (`dmd serve`) and `prefect deployment run`
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_LOGGING_LEVEL": "INFO"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        runner = subprocess.Popen(
            [str(BIN / "dmd"), "serve"],
            cwd=served,
            env={**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            with (
                temporary_settings({PREFECT_API_URL: prefect_server}),
                get_client(sync_client=True) as client,
            ):
                _wait_for_deployment(client, "dmd-pipeline/default", runner, log)
                deployment_run = run(
                    [str(BIN / "prefect"), "deployment", "run", "dmd-pipeline/default", "--watch"],
                    served,
                    env=env,
                )
                stage_logs = _run_logs(client, "dmd-pipeline/default")
                nested = stage_flow_runs_nested(_deployment_run(client, "dmd-pipeline/default").id)
        finally:
            runner.terminate()
            runner.wait(timeout=60)
    assert "Completed" in deployment_run.stdout, deployment_run.stdout
    served_lock = yaml.safe_load((served / "dvc.lock").read_text())
    assert lineage(served_lock) == lineage(lock)
    assert_consistent(served_lock)
    assert json.loads(dvc("status", "--json", cwd=served).stdout) == {}
    assert "Running stage 'evaluate':" in stage_logs  # each stage's output is streamed into the run's logs
    # each stage command's flow run is a subflow of its stage task, the pipeline run alone at the top
    assert nested == {stage: FLOW_NAMES[stage] for stage in ran_stages(stage_logs)}

    # 3. a second dvc repro does nothing, in seconds
    start = time.monotonic()
    again = dvc("repro", cwd=ws)
    assert ran_stages(again.stdout) == [] and time.monotonic() - start < 20

    # 4. one training setting changed: only train and evaluate rerun
    params = (ws / "params.yaml").read_text()
    assert "  max_train_steps: 2\n" in params
    (ws / "params.yaml").write_text(params.replace("  max_train_steps: 2\n", "  max_train_steps: 3\n"))
    assert ran_stages(dvc("repro", cwd=ws).stdout) == ["train", "evaluate"]

    # 5. experiments: dvc exp run -S, and dvc exp show lists the evaluation's metrics
    git_commit(ws, "three steps")
    dvc("exp", "run", "-S", "train.max_train_steps=4", cwd=ws)
    rows = json.loads(dvc("exp", "show", "--json", cwd=ws).stdout)
    experiments = [exp for row in rows for exp in (row.get("experiments") or [])]
    assert experiments, rows
    data = experiments[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["max_train_steps"] == 4
    eval_metrics = data["metrics"]["metrics/eval.json"]["data"]
    assert eval_metrics and all(v is not None for v in eval_metrics.values())
