"""The README's dry run on the real Wan 2.1 shapes, run exactly as printed (in a scratch folder holding the
repository's params.yaml and .venv, as a user's checkout does)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def dry_run_block() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Real Wan 2.1 on a GPU machine") :]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_readme_dry_run_writes_real_widths_and_generates(tmp_path):
    lines = dry_run_block()
    assert lines[0].startswith(".venv/bin/dmd wan-skeleton")  # the section opens with the dry run
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    for line in lines:
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=os.environ, capture_output=True, text=True)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    config = json.loads((tmp_path / "wan-dry-run" / "transformer" / "config.json").read_text())
    assert config["num_attention_heads"] * config["attention_head_dim"] == 1536 and config["num_layers"] == 1
    manifest = pd.read_parquet(tmp_path / "wan-dry-run-data" / "manifest.parquet")
    assert len(manifest) == 2
