"""A train-only experiment below the last run's length, as the README's "Running it" section promises: the
experiment's student has the shorter length, and the train stage says what it did with the longer checkpoints.

Its own file so that the test runner can run it beside tests/test_docs.py rather than after it."""

from __future__ import annotations

import json

import pytest
import yaml
from test_docs import Block, Runner, build_workspace

from dmd.core.config import load

pytestmark = pytest.mark.slow


def test_a_shorter_experiment_holds_the_shorter_student(tmp_path, tiny_wan_dir):
    """`dvc exp run -S train.max_train_steps=N` below the last run's length: the experiment's student has N steps,
    and the train stage says what it did with the longer run's checkpoints."""
    workspace = build_workspace(tmp_path / "workspace", tiny_wan_dir, [])
    runner = Runner(workspace, tmp_path)
    from flows.local_server import local_prefect_server

    with local_prefect_server(tmp_path / "server") as url:
        runner.env["PREFECT_API_URL"] = url
        runner.run(Block("test", "bash", "dvc repro"))
        steps = load(workspace / "params.yaml").train.run.max_train_steps
        result = runner.run(Block("test", "bash", f"dvc exp run -S train.max_train_steps={steps - 1}"))
    card = json.loads((workspace / "output" / "student" / "student.json").read_text())
    assert card["train_steps"] == steps - 1
    assert f"past this run's {steps - 1} steps" in result.stdout + result.stderr
    assert yaml.safe_load((workspace / "params.yaml").read_text())["train"]["max_train_steps"] == steps - 1
