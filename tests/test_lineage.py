"""Lineage moves only when results move: runs that change nothing downstream leave `dvc status` clean."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import yaml
from test_dvc import BIN, dvc, make_tiny_workspace, ran_stages, run

from dmd.core.config import RUN_SETTINGS, STAGE_SETTINGS, load, stage_settings

pytestmark = pytest.mark.slow

# what a scheduled backfill run of the generate-teacher-data/backfill deployment executes
BACKFILL_RUN = (
    "from dmd_pipeline.flows.generate import generate_teacher_data; "
    "generate_teacher_data('params.yaml', max_shards=1)"
)


def status(workspace) -> dict:
    return json.loads(dvc("status", "--json", cwd=workspace).stdout)


def test_the_settings_a_stage_records_are_what_dvc_yaml_says_it_reads(tmp_path):
    from test_dvc import REPO

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert {name: tuple(stage["params"]) for name, stage in stages.items()} == STAGE_SETTINGS
    params = load(REPO / "params.yaml")
    recorded = stage_settings(params, "generate")
    assert set(recorded) == {"generate", "toy", "model"}
    assert recorded["model"]["negative_prompt"] == params.model.negative_prompt
    assert not {k.split(".")[1] for k in RUN_SETTINGS if k.startswith("generate.")} & set(
        recorded["generate"]
    )


def test_runs_that_change_no_result_leave_dvc_status_clean(tmp_path, tiny_wan_dir):
    ws = make_tiny_workspace(tmp_path / "ws", tiny_wan_dir)
    dvc("repro", cwd=ws)
    assert status(ws) == {}
    dmd = str(BIN / "dmd")

    # a generate run that has nothing to generate, with another stage's setting changed
    run([dmd, "generate", "--set", "train.learning_rate=3e-5", "--set", "generate.workers=1"], ws)
    assert status(ws) == {}
    # a scheduled backfill run: the next missing shard, of which there is none
    run([sys.executable, "-c", BACKFILL_RUN], ws)
    assert status(ws) == {}

    # a setting that changes how the cache is built, not what it holds: the cache reruns, reuses every
    # entry, and writes the same bytes, so nothing downstream is stale
    params = (ws / "params.yaml").read_text()
    assert "  vae_batch_size: 2\n" in params
    (ws / "params.yaml").write_text(params.replace("  vae_batch_size: 2\n", "  vae_batch_size: 3\n"))
    again = dvc("repro", cwd=ws)
    assert ran_stages(again.stdout) == ["cache"]
    assert "(0 encoded, 0 from teacher latents, 6 reused)" in again.stdout
    assert status(ws) == {}

    # the cache rebuilt from nothing in another process
    shutil.rmtree(ws / "cache")
    run([dmd, "cache"], ws)
    assert status(ws) == {}

    # an ODE-initialisation setting while the stage is off: it reruns and records the same "off", so nothing
    # downstream is stale
    params = (ws / "params.yaml").read_text()
    assert "ode_init:\n  enabled: false\n  output_dir: output/ode-init\n  max_train_steps: 4\n" in params
    params = params.replace("  output_dir: output/ode-init\n  max_train_steps: 4\n",
                            "  output_dir: output/ode-init\n  max_train_steps: 5\n")  # fmt: skip
    (ws / "params.yaml").write_text(params)
    assert ran_stages(dvc("repro", cwd=ws).stdout) == ["ode_init"]
    assert status(ws) == {}

    # a block-causal student: the stages that read the key rerun, and evaluate after them; data and cache do not
    assert params.count("  causal: false\n") == 1
    (ws / "params.yaml").write_text(params.replace("  causal: false\n", "  causal: true\n"))
    assert set(status(ws)) == {"ode_init", "train"}
    assert ran_stages(dvc("repro", cwd=ws).stdout) == ["ode_init", "train", "evaluate"]
    assert json.loads((ws / "output" / "student" / "student.json").read_text())["causal"] is True
    assert status(ws) == {}
